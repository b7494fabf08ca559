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

from blkserve.peers import PeerCred, exe_name, is_qemu, peer_cred

log = logging.getLogger("blkserve.qemu")


class VMGone(Exception):
    """The QMP socket does not exist or nobody listens on it."""


class QMPFailed(Exception):
    """QEMU refused a command (the message is QEMU's)."""


class NoFreeSlot(Exception):
    pass


class DetachTimeout(Exception):
    pass


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
                 expect_pid: int | None = None) -> str:
    """Plug the export into the VM (the QEMU process EXPECT_PID, if given);
    returns the bus used."""
    async with session(qmp_socket, timeout, expect_pid) as client:
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
