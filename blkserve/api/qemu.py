"""Hot-attach and detach vhost-user-blk disks to running QEMU VMs over QMP
(the `qemu.qmp` library).

attach: chardev-add (a unix socket client to the export, reconnect=1, so a
restarted export worker is found again), then device_add vhost-user-blk-pci
on a free hotplug slot: on q35 an empty pcie-root-port, on pc the root bus
pci.0, unless the caller names a bus.  detach: device_del, wait for
DEVICE_DELETED (the guest must release the device first), chardev-remove."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import AsyncIterator

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient

log = logging.getLogger("blkserve.qemu")


class VMGone(Exception):
    """The QMP socket does not exist or nobody listens on it."""


class QMPFailed(Exception):
    """QEMU refused a command (the message is QEMU's)."""


class NoFreeSlot(Exception):
    pass


class DetachTimeout(Exception):
    pass


def vm_alive(qmp_socket: str) -> bool:
    """Does a process still listen on QMP_SOCKET?  (A plain connect: it does
    not take the monitor from its current client.)"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(qmp_socket)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        return False
    except OSError:
        return True  # e.g. EAGAIN on a full backlog: something is there
    finally:
        s.close()
    return True


@contextlib.asynccontextmanager
async def session(qmp_socket: str, timeout: float) -> AsyncIterator[QMPClient]:
    client = QMPClient("blkserve")
    try:
        await asyncio.wait_for(client.connect(qmp_socket), timeout)
    except (ConnectError, OSError, TimeoutError) as e:
        with contextlib.suppress(Exception):
            await client.disconnect()
        cause = e.exc if isinstance(e, ConnectError) and e.exc else e
        if isinstance(cause, (FileNotFoundError, ConnectionRefusedError)) \
                or not vm_alive(qmp_socket):
            raise VMGone(f"no QEMU listens on {qmp_socket}: {cause}") from None
        raise QMPFailed(f"cannot open a QMP session on {qmp_socket}: {cause}") from None
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


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
                 queues: int, bus: str | None, timeout: float) -> str:
    """Plug the export into the VM; returns the bus used."""
    async with session(qmp_socket, timeout) as client:
        if bus is None:
            bus = await _free_bus(client, timeout)
        await _execute(client, "chardev-add", {
            "id": chardev_id,
            "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": export_socket}},
                "server": False, "reconnect": 1}},
        }, timeout)
        try:
            await _execute(client, "device_add", {
                "driver": "vhost-user-blk-pci", "id": device_id, "chardev": chardev_id,
                "num-queues": queues, "bus": bus}, timeout)
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
