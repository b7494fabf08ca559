"""The QEMU adapter: hot-attach and detach vhost-user-blk disks to running
QEMU VMs over QMP (the `qemu.qmp` library).

attach: chardev-add (a unix socket client to the export, reconnect=1, so a
restarted export worker is found again), then device_add vhost-user-blk-pci
on a free hotplug slot: on q35 an empty pcie-root-port, on pc the root bus
pci.0, unless the caller names a bus.  detach: device_del, wait for
DEVICE_DELETED (the guest must release the device first), chardev-remove.
Who may connect to the export: the QEMU process listening on the QMP socket
(SO_PEERCRED), and only if that socket lies under the config's
qmp_socket_dirs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient

from blkserve.api.errors import ApiError
from blkserve.api.hypervisors import base
from blkserve.api.state import AttachmentRow, VolumeRow, now
from blkserve.peers import PeerCred, exe_name, is_qemu, peer_cred

log = logging.getLogger("blkserve.qemu")


class VMGone(Exception):
    """The QMP socket does not exist or nobody listens on it."""


class QMPFailed(Exception):
    """QEMU refused a command (the message is QEMU's)."""


class NoFreeSlot(Exception):
    pass


DetachTimeout = base.DetachTimeout


class PeerRefused(Exception):
    """What listens on the QMP socket is not QEMU (SO_PEERCRED): nothing it
    says is trusted."""


def vm_alive(qmp_socket: str) -> bool:
    """Does a process still listen on QMP_SOCKET?  (A plain connect: it does
    not take the monitor from its current client; non-blocking, so a QEMU
    that stopped accepting cannot stall the caller.)"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        s.connect(qmp_socket)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        return False
    except OSError:
        return True  # e.g. EAGAIN on a full backlog: something is there
    finally:
        s.close()
    return True


async def _connect(qmp_socket: str, timeout: float,
                   expect_pid: int | None = None) -> tuple[socket.socket, PeerCred]:
    """A connected socket to the QEMU on QMP_SOCKET (its real path), checked
    to be QEMU (SO_PEERCRED: /proc/PID/exe is qemu-system-* or qemu-kvm) and,
    given EXPECT_PID, that very process.  Bounded by TIMEOUT: a QEMU that
    no longer accepts (stopped, hung, full backlog) is a QMPFailed."""
    real = os.path.realpath(qmp_socket)
    s = socket.socket(socket.AF_UNIX,
                      socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            try:
                s.connect(real)  # a unix connect is done at once or refused with EAGAIN
                break
            except BlockingIOError:  # the listener's backlog is full: it does not accept
                if asyncio.get_running_loop().time() > deadline:
                    raise QMPFailed(f"QEMU on {qmp_socket} accepts no connection in "
                                    f"{timeout:g} s (stopped or hung?)") from None
                await asyncio.sleep(0.05)
            except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
                raise VMGone(f"no QEMU listens on {qmp_socket}: {e.strerror}") from None
            except OSError as e:
                raise QMPFailed(f"cannot connect to {qmp_socket}: {e.strerror}") from None
        cred = peer_cred(s)
        if not is_qemu(cred.pid):
            raise PeerRefused(f"the process listening on {qmp_socket} (pid {cred.pid}, uid "
                              f"{cred.uid}, {exe_name(cred.pid) or 'unknown program'}) is "
                              "not QEMU (qemu-system-* or qemu-kvm); blkserve talks QMP to "
                              "QEMU only")
        if expect_pid is not None and cred.pid != expect_pid:
            raise QMPFailed(f"the QEMU on {qmp_socket} changed during the attach (pid "
                            f"{cred.pid}, was {expect_pid})")
    except BaseException:
        s.close()
        raise
    return s, cred


async def probe(qmp_socket: str, timeout: float) -> PeerCred:
    """The credentials of the QEMU on QMP_SOCKET (VMGone, PeerRefused,
    QMPFailed), without opening a QMP session."""
    s, cred = await _connect(qmp_socket, timeout)
    s.close()
    return cred


@contextlib.asynccontextmanager
async def session(qmp_socket: str, timeout: float,
                  expect_pid: int | None = None) -> AsyncIterator[QMPClient]:
    """A QMP session with the QEMU on QMP_SOCKET: connect, greeting and
    capabilities negotiation within TIMEOUT."""
    sock, cred = await _connect(qmp_socket, timeout, expect_pid)
    client = QMPClient("blkserve")
    try:
        await asyncio.wait_for(client.connect(sock), timeout)
    except (ConnectError, OSError, TimeoutError, EOFError) as e:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), timeout)
        sock.close()
        if isinstance(e, TimeoutError):
            raise QMPFailed(f"QEMU on {qmp_socket} (pid {cred.pid}) opened no QMP session in "
                            f"{timeout:g} s (stopped or hung?)") from None
        cause = e.exc if isinstance(e, ConnectError) and e.exc else e
        raise QMPFailed(f"cannot open a QMP session on {qmp_socket}: "
                        f"{cause or type(cause).__name__}") from None
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), timeout)
        sock.close()


async def _execute(client: QMPClient, cmd: str, args: dict | None, timeout: float):
    try:
        return await asyncio.wait_for(client.execute(cmd, args), timeout)
    except ExecuteError as e:
        raise QMPFailed(f"QEMU {cmd}: {e.error.error.desc}") from None
    except TimeoutError:
        raise QMPFailed(f"QEMU {cmd}: no reply in {timeout:.0f} s") from None


async def _free_bus(client: QMPClient, timeout: float) -> str:
    machine = await _execute(client, "qom-get", {"path": "/machine", "property": "type"},
                             timeout)
    if "q35" not in str(machine):
        return "pci.0"
    peripherals = await _execute(client, "qom-list", {"path": "/machine/peripheral"}, timeout)
    ports = [p["name"] for p in peripherals if p.get("type") == "child<pcie-root-port>"]
    busy: set[str] = set()
    for bus in await _execute(client, "query-pci", None, timeout):
        for dev in bus.get("devices", []):
            bridge = dev.get("pci_bridge")
            if bridge and bridge.get("devices"):
                busy.add(dev.get("qdev_id", ""))
    free = [p for p in ports if p not in busy]
    if not free:
        raise NoFreeSlot("the VM (q35) has no empty pcie-root-port with an id to hot-plug "
                         "into; start it with e.g. -device pcie-root-port,id=hp0,chassis=1,"
                         "slot=1, or name a bus in the request")
    return sorted(free)[0]


async def attach(qmp_socket: str, export_socket: str, chardev_id: str, device_id: str,
                 queues: int, bus: str | None, timeout: float,
                 expect_pid: int | None = None, addr: int | None = None) -> str:
    """Plug the export into the VM (the QEMU process EXPECT_PID, if given),
    at PCI device/function ADDR of the bus if given; returns the bus used."""
    async with session(qmp_socket, timeout, expect_pid) as client:
        if bus is None:
            bus = await _free_bus(client, timeout)
        where = {"bus": bus} if addr is None else {"bus": bus, "addr": addr}
        await _execute(client, "chardev-add", {
            "id": chardev_id,
            "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": export_socket}},
                "server": False, "reconnect": 1}},
        }, timeout)
        try:
            await _execute(client, "device_add", {
                "driver": "vhost-user-blk-pci", "id": device_id, "chardev": chardev_id,
                "num-queues": queues, **where}, timeout)
        except QMPFailed:
            with contextlib.suppress(QMPFailed):
                await _execute(client, "chardev-remove", {"id": chardev_id}, timeout)
            raise
        log.info("attached %s to %s as %s on bus %s", export_socket, qmp_socket, device_id, bus)
        return bus


async def _device_exists(client: QMPClient, device_id: str, timeout: float) -> bool:
    try:
        await _execute(client, "qom-get", {"path": f"/machine/peripheral/{device_id}",
                                           "property": "type"}, timeout)
    except QMPFailed:
        return False
    return True


async def device_addr(qmp_socket: str, device_id: str, timeout: float) -> int:
    """The PCI device/function number of DEVICE_ID on its bus."""
    async with session(qmp_socket, timeout) as client:
        return int(await _execute(client, "qom-get", {
            "path": f"/machine/peripheral/{device_id}", "property": "addr"}, timeout))


async def run_state(qmp_socket: str, timeout: float) -> str:
    """The VM's run state (query-status): `inmigrate` while it waits for or
    receives a migration, `running`, `paused`, `postmigrate`, ..."""
    async with session(qmp_socket, timeout) as client:
        return str((await _execute(client, "query-status", None, timeout))["status"])


async def device_present(qmp_socket: str, device_id: str, timeout: float) -> bool:
    async with session(qmp_socket, timeout) as client:
        return await _device_exists(client, device_id, timeout)


async def detach(qmp_socket: str, chardev_id: str, device_id: str, timeout: float,
                 qmp_timeout: float) -> None:
    """Unplug the device (waiting up to TIMEOUT seconds for the guest to
    release it) and remove its chardev."""
    async with session(qmp_socket, qmp_timeout) as client:
        if await _device_exists(client, device_id, qmp_timeout):
            deleted = EventListener("DEVICE_DELETED",
                                    lambda m: m.get("data", {}).get("device") == device_id)
            with client.listen(deleted):
                try:
                    await _execute(client, "device_del", {"id": device_id}, qmp_timeout)
                except QMPFailed as e:
                    # already being unplugged (an earlier detach timed out): wait again
                    if "process of unplug" not in str(e):
                        raise
                try:
                    await asyncio.wait_for(deleted.get(), timeout)
                except TimeoutError:
                    if await _device_exists(client, device_id, qmp_timeout):
                        raise DetachTimeout(
                            f"the guest did not release device {device_id} within "
                            f"{timeout:.0f} s; the unplug request stays pending") from None
        try:
            await _execute(client, "chardev-remove", {"id": chardev_id}, qmp_timeout)
        except QMPFailed as e:
            if "not found" not in str(e).lower():
                raise
        log.info("detached %s from %s", device_id, qmp_socket)


def check_qmp_path(path: str) -> str | None:
    """Why PATH cannot be a QMP socket, or None."""
    if not os.path.isabs(path):
        return "qmp_socket must be an absolute path"
    try:
        st = os.stat(path)
    except OSError as e:
        return f"qmp_socket {path}: {e.strerror}"
    except ValueError as e:  # embedded NUL byte
        return f"qmp_socket: {e}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"qmp_socket {path} is not a unix socket"
    return None


# -- the adapter ---------------------------------------------------------------


class QemuAttachmentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, title="QemuAttachmentCreate",
                              json_schema_extra={"examples": [
                                  {"hypervisor": "qemu", "qmp_socket": "/run/vm1/qmp.sock"}]})

    hypervisor: Literal["qemu"] = Field(description="`qemu`: talk to QEMU over QMP.")
    qmp_socket: str = Field(min_length=1, max_length=4096, pattern=r"^[^\x00]+$", description=(
        "Absolute path of the running VM's QMP unix socket (`-qmp unix:PATH,server=on,"
        "wait=off`). Its guest RAM must be shared (memory-backend-memfd with share=on)."),
        examples=["/run/vm1/qmp.sock"])
    bus: str | None = Field(default=None, min_length=1, max_length=128, description=(
        "QEMU bus id to plug into. Default: the first empty pcie-root-port (q35) or "
        "pci.0 (pc)."), examples=["hp0"])
    migrate_from: str | None = Field(default=None, pattern=r"^[0-9a-f]{8}$", description=(
        "Live migration: the id of this volume's attachment to the VM that migrates. "
        "`qmp_socket` is then its destination QEMU (started with `-incoming`, with the "
        "same devices and shared memory): the disk is plugged there with the source's "
        "device id, bus and PCI address, served by a second export of the volume that "
        "admits only that VM's QEMUs and runs rings only once the source's have stopped. "
        "The attachment is `incoming` until the destination has received the VM, then "
        "replaces the source's (forgotten, its export stopped). `bus` must be left out."),
        examples=["a1b2c3d4"])
    incoming: bool = Field(default=False, description=(
        "Live migration from another host (its blkserve daemon has the source "
        "attachment; the volume is on storage both hosts reach: an RBD image or a shared "
        "file): `qmp_socket` is the destination QEMU here (`-incoming`), the disk is "
        "plugged with `device_id` (the source attachment's), on `bus` at `addr` as the "
        "source VM has it, and served by this daemon's export of the volume; `incoming` "
        "until the VM has arrived, then `attached`. The source host's daemon retires its "
        "attachment (and its export, unless explicit) once its QEMU has handed the VM "
        "over (run state postmigrate). Not with `migrate_from`."))
    device_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                  description="With `incoming`: the source attachment's "
                                  "device id (required).", examples=["blkserve-a1b2c3d4"])
    addr: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{1,2}(\.[0-7])?$",
                             description="With `incoming`: the PCI address (slot[.function]) "
                             "the source VM has the disk at on `bus`, when that bus has more "
                             "than one slot (pci.0 of a pc machine); a pcie-root-port has "
                             "one.", examples=["4"])


class Qemu(base.Hypervisor):
    name = "qemu"
    label = "QEMU"
    request_model = QemuAttachmentCreate

    async def _probe(self, qmp_socket: str) -> PeerCred:
        """Who listens on QMP_SOCKET: it must lie under qmp_socket_dirs (its
        real path) and be a QEMU process (SO_PEERCRED), else 403."""
        if "\0" not in qmp_socket and os.path.isabs(qmp_socket) \
                and not self.settings.qmp_socket_allowed(qmp_socket):
            real = os.path.realpath(qmp_socket)
            shown = qmp_socket if real == qmp_socket else f"{qmp_socket} (resolving to {real})"
            raise ApiError(403, f"qmp_socket {shown} is not under the daemon's "
                                "qmp_socket_dirs (config file); add its directory there to "
                                "use it")
        why = check_qmp_path(qmp_socket)
        if why:
            raise ApiError(422, why)
        try:
            return await probe(qmp_socket, self.settings.qmp_timeout_s)
        except PeerRefused as e:
            raise ApiError(403, str(e)) from None
        except VMGone as e:
            raise ApiError(422, str(e)) from None
        except QMPFailed as e:
            raise ApiError(502, str(e)) from None

    async def prepare(self, v: VolumeRow, request: QemuAttachmentCreate) -> base.Target:
        qmp_socket = request.qmp_socket
        cred = await self._probe(qmp_socket)
        for a in self.state.attachments(v.name):
            if a.qmp_socket == qmp_socket and a.state != "stale":
                raise ApiError(409, f"volume '{v.name}' is already attached to the VM at "
                                    f"{qmp_socket} (attachment {a.id})")
        att_id = uuid.uuid4().hex[:8]
        dev = f"blkserve-{att_id}"
        row = AttachmentRow(att_id, v.name, "qemu", qmp_socket, request.bus, dev,
                            f"{dev}-chr", "attaching", now(), None)
        return base.Target(row, f"the VM at {qmp_socket}", peer_pid=cred.pid,
                           peer_gone=ApiError(422, f"the QEMU on {qmp_socket} (pid "
                                                   f"{cred.pid}) is gone"))

    def vm_key(self, att: AttachmentRow) -> str:
        return att.qmp_socket

    async def plug(self, target: base.Target, v: VolumeRow, socket: str) -> None:
        row = target.row
        try:
            row.bus = await attach(row.qmp_socket, socket, row.chardev_id, row.device_id,
                                   v.queues, row.bus, self.settings.qmp_timeout_s,
                                   expect_pid=target.peer_pid,
                                   addr=(target.placement or {}).get("addr"))
        except (QMPFailed, VMGone, NoFreeSlot, PeerRefused) as e:
            status = 409 if isinstance(e, NoFreeSlot) else \
                422 if isinstance(e, VMGone) else \
                403 if isinstance(e, PeerRefused) else 502
            raise ApiError(status, str(e)) from None

    async def unplug(self, att: AttachmentRow, timeout: float) -> None:
        try:
            await detach(att.qmp_socket, att.chardev_id, att.device_id, timeout,
                         self.settings.qmp_timeout_s)
        except (VMGone, PeerRefused) as e:
            # (not QEMU on the socket any more: the VM is gone, nothing is trusted)
            log.warning("attachment %s of %s: %s; dropping it", att.id, att.volume, e)
        except QMPFailed as e:
            raise ApiError(502, str(e)) from None

    async def present(self, att: AttachmentRow) -> bool:
        try:
            return await device_present(att.qmp_socket, att.device_id,
                                        self.settings.qmp_timeout_s)
        except (VMGone, PeerRefused):
            return False
        except QMPFailed as e:
            raise ApiError(502, str(e)) from None

    async def stale_reasons(self, atts: list[AttachmentRow]) -> dict[str, str]:
        return {a.id: "the VM is gone" for a in atts
                if a.state != "stale" and not vm_alive(a.qmp_socket)}

    def log_fields(self, att: AttachmentRow) -> dict:
        return {"qmp_socket": att.qmp_socket}

    async def placement(self, att: AttachmentRow) -> dict:
        try:
            addr = await device_addr(att.qmp_socket, att.device_id,
                                     self.settings.qmp_timeout_s)
        except (VMGone, PeerRefused) as e:
            raise ApiError(409, f"the VM of attachment {att.id} is gone: {e}") from None
        except QMPFailed as e:
            raise ApiError(502, f"where is device {att.device_id} in the VM at "
                                f"{att.qmp_socket}: {e}") from None
        return {"bus": att.bus, "addr": addr}

    async def migrated_away(self, att: AttachmentRow) -> bool:
        """Has ATT's VM handed itself over to a migration's destination
        (QEMU's run state postmigrate: the VM runs elsewhere now)?"""
        if not vm_alive(att.qmp_socket):
            return False
        try:
            return await run_state(att.qmp_socket, self.settings.qmp_timeout_s) == "postmigrate"
        except (VMGone, PeerRefused, QMPFailed):
            return False

    async def incoming_done(self, att: AttachmentRow) -> bool | None:
        try:
            status = await run_state(att.qmp_socket, self.settings.qmp_timeout_s)
        except (VMGone, PeerRefused, QMPFailed):
            return None
        return status not in ("inmigrate", "prelaunch")
