"""The Xen adapter: hot-plug a volume into a running Xen domain as a PV disk
(blkif). No export and no QEMU: a blkif worker of the attachment's own
(`blkserve export --xen-domain`) creates the vbd in xenstore and serves it,
so the attach is that worker's start and the detach its stop. The toolstack
calls (xenstore, domain lookup) are blkserve/xen.py, shared with the worker."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from blkserve import xen
from blkserve.api.config import SOCKET_PATH_MAX
from blkserve.api.errors import ApiError
from blkserve.api.hypervisors import base
from blkserve.api.state import AttachmentRow, VolumeRow, now
from blkserve.export import read_saved_marker

log = logging.getLogger("blkserve.api")


class XenAttachmentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, title="XenAttachmentCreate",
                              json_schema_extra={"examples": [
                                  {"hypervisor": "xen", "domain": "guest1"},
                                  {"hypervisor": "xen", "domain": "7", "vdev": "xvdc"}]})

    hypervisor: Literal["xen"] = Field(description=(
        "`xen`: hot-plug into a running Xen domain as a PV disk (blkif), served by a "
        "blkif worker of this daemon, which must run in dom0 (or a driver domain). Needs "
        "Debian's libxenstore4, libxengnttab1 and libxenevtchn1 and a running xenstored "
        "(else 501). The volume is served only to that domain: it must not be exported "
        "over vhost-user at the same time."))
    domain: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
                        description="Name or numeric id of the running Xen domain.",
                        examples=["guest1"])
    vdev: str | None = Field(default=None, pattern=r"^xvd[a-z]{1,2}$", description=(
        "Disk name in the guest. Default: the first `xvdX` from `xvdb` on the domain "
        "does not have."), examples=["xvdb"])


class Xen(base.Hypervisor):
    name = "xen"
    label = "Xen"
    request_model = XenAttachmentCreate
    own_worker = True

    async def prepare(self, v: VolumeRow, request: XenAttachmentCreate) -> base.Target:
        name = v.name
        for a in self.state.attachments(name):
            if a.state != "stale":
                raise ApiError(409, f"volume '{name}' is attached already (attachment {a.id}, "
                                    f"{a.hypervisor}); a Xen attachment serves the volume "
                                    "alone")
        if self.state.export(name) is not None:
            raise ApiError(409, f"volume '{name}' is exported over vhost-user; a Xen "
                                "attachment serves the volume from its own blkif worker: "
                                "DELETE the export first")
        try:
            domid, dname, vdev = await asyncio.to_thread(xen.find_domain, request.domain,
                                                         request.vdev)
        except xen.XenUnavailable as e:
            raise ApiError(501, f"Xen attach: {e}") from None
        except xen.VbdInUse as e:
            raise ApiError(409, str(e)) from None
        except xen.XenError as e:
            raise ApiError(422, str(e)) from None
        sock = self._socket(name)
        if len(sock.encode()) > SOCKET_PATH_MAX:
            raise ApiError(422, f"socket path {sock} is longer than {SOCKET_PATH_MAX} bytes; "
                                "use a shorter volume name or socket_dir")
        att_id = uuid.uuid4().hex[:8]
        row = AttachmentRow(att_id, name, "xen", None, None,
                            f"vbd-{xen.vdev_to_devid(vdev)}", "", "attaching", now(), None,
                            domain=dname, target=vdev)
        return base.Target(row, f"Xen domain '{dname}'", socket=sock,
                           fields={"domain": dname, "domid": domid, "vdev": vdev})

    async def plug(self, target: base.Target, v: VolumeRow, socket: str) -> None:
        # the worker's spec comes from the attachment row (recorded already)
        await self.controller.start_worker(v, socket, False)

    async def unplug(self, att: AttachmentRow, timeout: float) -> None:
        # the worker closes the vbd (the guest sees the disk go) and exits
        await self.controller.stop_worker(att.volume, timeout)

    async def present(self, att: AttachmentRow) -> bool:
        # the attach is the blkif worker's start
        w = self.controller.workers.get(att.volume)
        return w is not None and w.pid is not None

    async def stale_reasons(self, atts: list[AttachmentRow]) -> dict[str, str]:
        out = {}
        for a in atts:
            if a.state != "attached":
                continue
            try:
                await asyncio.to_thread(xen.domain_exists, a.domain)
            except xen.XenError:
                # saved (`xl save`): its worker waits for the domain to come
                # back under its name and offers the disk again; a marker
                # left by a worker that has died since keeps nothing alive
                w = self.controller.workers.get(a.volume)
                if w is None or w.pid is None or \
                        read_saved_marker(self._socket(a.volume)) != w.pid:
                    out[a.id] = "the Xen domain is gone"
            except xen.XenUnavailable:
                break
        return out

    def _socket(self, volume: str) -> str:
        return os.path.join(self.settings.sockets_dir, f"{volume}.xen.sock")

    def log_fields(self, att: AttachmentRow) -> dict:
        return {"domain": att.domain}

    def worker_spec(self, att: AttachmentRow) -> dict:
        return {"xen_domain": att.domain, "xen_vdev": att.target}
