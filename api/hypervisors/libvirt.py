"""The libvirt adapter: hot-plug a volume's export into a running libvirt
domain as a `<disk type='vhostuser'>` (the blocking calls: libvirt_ops.py).

Connection handling: every libvirt call runs in a thread of its own, bounded
(calls.py), on a connection of its own; the daemon socket must be one of the
config's libvirt_sockets and what listens there a libvirt daemon running as
root. Who may connect to the export: the domain's QEMU process, and the
socket goes to the user libvirt runs QEMU as."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from blkserve.api.calls import BoundedCalls, Busy
from blkserve.api.errors import ApiError
from blkserve.api.hypervisors import base
from blkserve.api.hypervisors import libvirt_ops as virt
from blkserve.api.state import AttachmentRow, VolumeRow, now

log = logging.getLogger("blkserve.api")

# Local libvirt connections only: the export is a unix socket on this host, so
# a remote hypervisor could not reach it anyway.
LIBVIRT_URI_PATTERN = r"^qemu(\+unix)?:///(system|session)(\?socket=/[^?&#\s\x00]+)?$"


class LibvirtAttachmentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, title="LibvirtAttachmentCreate",
                              json_schema_extra={"examples": [
                                  {"hypervisor": "libvirt", "domain": "vm1"},
                                  {"hypervisor": "libvirt", "domain": "vm1",
                                   "uri": "qemu:///system"}]})

    hypervisor: Literal["libvirt"] = Field(description=(
        "`libvirt`: hot-attach through libvirt (`attachDeviceFlags`, live) as a "
        "`<disk type='vhostuser'>`. Needs the `libvirt-python` bindings on the daemon's "
        "host (else 501)."))
    domain: str = Field(min_length=1, max_length=256, pattern=r"^[^/\x00-\x1f\x7f]+$",
                        description=(
        "Name of the running libvirt domain. Its memory must be shared: "
        "`<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>` "
        "(else 409)."), examples=["vm1"])
    uri: str = Field(default="qemu:///system", max_length=4096,
                     pattern=LIBVIRT_URI_PATTERN, description=(
        "Local libvirt connection URI: `qemu:///system` (default), `qemu:///session`, or "
        "`qemu+unix:///system?socket=/path`. A session daemon is not started on demand."),
        examples=["qemu:///system"])


class Libvirt(base.Hypervisor):
    name = "libvirt"
    label = "libvirt"
    request_model = LibvirtAttachmentCreate

    def __init__(self, controller) -> None:
        super().__init__(controller)
        # libvirt calls: a few daemon threads, never joined at exit (calls.py)
        self.calls = BoundedCalls()

    # -- connection handling and error mapping ------------------------------------

    async def call(self, fn, *args, bounded: bool = True):
        """A blocking libvirt call in one of self.calls' threads, bounded by
        qmp_timeout_s, or when it changes the domain by qmp_timeout_s +
        detach_timeout_s (libvirt's own job timeouts normally end it first;
        504 then: it may still finish, see the controller's attach); errors
        as ApiError (except DomainGone, for the caller)."""
        timeout = self.settings.qmp_timeout_s
        if not bounded:
            timeout += self.settings.detach_timeout_s
        try:
            return await self.calls.run(fn, *args, timeout=timeout)
        except TimeoutError:
            raise ApiError(502 if bounded else 504,
                           f"libvirt did not answer in {timeout:.0f} s") from None
        except Busy as e:
            raise ApiError(503, str(e)) from None
        except virt.PeerRefused as e:
            raise ApiError(403, str(e)) from None
        except virt.Unavailable as e:
            raise ApiError(501, str(e)) from None
        except virt.DomainNotFound as e:
            raise ApiError(422, str(e)) from None
        except (virt.NotRunning, virt.NoSharedMemory, virt.NoFreeSlot) as e:
            raise ApiError(409, str(e)) from None
        except (virt.ConnectFailed, virt.LibvirtFailed) as e:
            raise ApiError(502, str(e)) from None

    async def check_daemon(self, uri: str) -> None:
        """Before talking to libvirt at URI: its socket must be one of the
        config's libvirt_sockets (403) and what listens there a libvirt
        daemon running as root (403; SO_PEERCRED)."""
        path = virt.daemon_socket(uri)
        if path is None:
            return  # no daemon socket: libvirt's own connect fails and says so
        if "?" in uri and not self.settings.libvirt_socket_allowed(path):
            raise ApiError(403, f"libvirt socket {path} is not in the daemon's "
                                "libvirt_sockets (config file); add it there to use it")
        await self.call(virt.check_daemon, path, self.settings.qmp_timeout_s)

    # -- attach and detach ---------------------------------------------------------

    async def prepare(self, v: VolumeRow, request: LibvirtAttachmentCreate) -> base.Target:
        domain, uri = request.domain, request.uri
        await self.call(virt.bindings)  # 501 without the bindings
        for a in self.state.attachments(v.name):
            if a.hypervisor == "libvirt" and (a.uri, a.domain) == (uri, domain) \
                    and a.state != "stale":
                raise ApiError(409, f"volume '{v.name}' is already attached to libvirt domain "
                                    f"'{domain}' (attachment {a.id})")
        await self.check_daemon(uri)
        info = await self.call(virt.inspect, uri, domain)
        att_id = uuid.uuid4().hex[:8]
        alias = virt.ALIAS_PREFIX + att_id
        # chardev: the id libvirt gives the disk's vhost-user chardev
        row = AttachmentRow(att_id, v.name, "libvirt", None, None, alias, f"chr-vu-{alias}",
                            "attaching", now(), None, uri=uri, domain=domain)
        return base.Target(row, f"libvirt domain '{domain}'", peer_pid=info.pid,
                           peer_gone=ApiError(409, f"the QEMU process of libvirt domain "
                                                   f"'{domain}' is gone"),
                           socket_owner=info.owner)

    def vm_key(self, att: AttachmentRow) -> str:
        return f"libvirt:{att.uri}:{att.domain}"

    async def plug(self, target: base.Target, v: VolumeRow, socket: str) -> None:
        row = target.row
        row.target, row.bus = await self.call(virt.attach, row.uri, row.domain, socket,
                                              v.queues, row.device_id, bounded=False)

    async def unplug(self, att: AttachmentRow, timeout: float) -> None:
        """Ask the guest to release the disk, then wait (up to TIMEOUT s) until
        it has left the domain's live XML."""
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            await self.check_daemon(att.uri)
            asked = await self.call(virt.request_detach, att.uri, att.domain, att.device_id,
                                    bounded=False)
            while asked and await self.call(virt.disk_present, att.uri, att.domain,
                                            att.device_id):
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise base.DetachTimeout(
                        f"the guest did not release disk {att.target} ({att.device_id}) of "
                        f"libvirt domain '{att.domain}' within {timeout:g} s; the unplug "
                        "request stays pending")
                await asyncio.sleep(min(0.2, left))
        except virt.DomainGone as e:
            log.warning("attachment %s of %s: %s; dropping it", att.id, att.volume, e)
        log.info("detached %s from libvirt domain %s", att.device_id, att.domain)

    # -- supervision -----------------------------------------------------------------

    async def present(self, att: AttachmentRow) -> bool:
        try:
            return await self.call(virt.disk_present, att.uri, att.domain, att.device_id)
        except virt.DomainGone:
            return False

    async def stale_reasons(self, atts: list[AttachmentRow]) -> dict[str, str]:
        """Attachments whose domain is gone, no longer runs, or no longer has
        the disk (one connection per URI; a URI that does not answer says
        nothing)."""
        by_uri: dict[str, list[AttachmentRow]] = {}
        for att in atts:
            if att.state not in ("stale", "attaching"):
                by_uri.setdefault(att.uri, []).append(att)
        out = {}
        for uri, group in by_uri.items():
            try:
                await self.check_daemon(uri)
                gone = await self.call(virt.stale_reasons, uri,
                                       [(a.domain, a.device_id) for a in group])
            except ApiError as e:
                log.debug("stale check on %s: %s", uri, e.detail)
                continue
            for att in group:
                why = gone.get((att.domain, att.device_id))
                if why:
                    out[att.id] = why
        return out

    # -- who may connect ---------------------------------------------------------------

    def default_socket_owner(self) -> tuple[int, int] | None:
        # the host's libvirt QEMU user (if any): a domain given the disk in
        # its config reaches the socket too
        return virt.default_qemu_owner()

    # -- cold attach -------------------------------------------------------------------

    def disk_xml(self, name: str, target: str) -> dict:
        """The <disk> element for a domain's persistent config (cold attach)."""
        v = self.controller.get_volume(name)
        exp = self.state.export(name)
        sock = exp.socket if exp else os.path.join(self.settings.sockets_dir, f"{name}.sock")
        return {"volume": name, "socket": sock, "exported": exp is not None,
                "target": target, "xml": virt.disk_xml(sock, target, v.queues)}
