"""Export workers: one `blkserve export` process per exported volume.

A worker runs in its own session, logs to STATE_DIR/logs/VOLUME.log and is
watched through a pidfd, so the daemon sees it die whether the daemon started
it or adopted it after a restart.  A worker that dies while its export is
wanted is restarted on the same socket path, after a back-off that starts
short (a guest's reconnecting chardev waits meanwhile) and doubles while the
worker keeps dying young.  When the daemon itself stops, workers keep running:
guests are not interrupted, and the next daemon adopts them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from blkserve.logs import worker_event
from blkserve.peers import start_time as proc_start_time  # one reader of /proc/PID/stat

log = logging.getLogger("blkserve.workers")

BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 30.0  # a worker that lived this long resets the back-off


class WorkerStartError(Exception):
    pass


def _is_export_worker(pid: int, socket_path: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"export" in argv and socket_path.encode() in argv


def serves_inode(pid: int, identity: tuple[int, int]) -> bool | None:
    """Has process PID a file descriptor open on the inode IDENTITY
    (st_dev, st_ino)?  None if its descriptors cannot be read."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return None
    for fd in fds:
        try:
            st = os.stat(os.path.join(fd_dir, fd))  # the open file, not the link
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == tuple(identity) and \
                (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            return True
    return False


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on (left by a killed worker), so the
    next worker's socket is recognisable even if it reuses the inode number."""
    if _socket_inode(path) is None:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        with contextlib.suppress(OSError):
            os.unlink(path)
    except OSError:
        pass
    finally:
        probe.close()


def _socket_inode(path: str) -> int | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def _kill_and_wait(pid: int, timeout: float = 5.0) -> None:
    """SIGKILL PID and wait (bounded) until it is gone, so that its socket
    is free for the worker started instead (daemon start-up only)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        select.select([pidfd], [], [], timeout)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


SOCKET_MODE = 0o660


def own_socket(path: str, owner: tuple[int, int] | None) -> None:
    """Give the socket to OWNER (uid, gid), the user QEMU runs as, mode 0660:
    connecting to a unix socket needs write permission on it, and libvirt does
    not relabel vhost-user sockets.  Nobody else may connect: a vhost-user
    frontend reads and writes the whole volume."""
    if owner is None:
        return
    try:
        os.chown(path, *owner)
        os.chmod(path, SOCKET_MODE)
    except OSError as e:
        log.warning("cannot give socket %s to %d:%d: %s", path, *owner, e.strerror)


@dataclass
class WorkerSpec:
    volume: str
    backing: str
    socket: str
    queues: int
    read_only: bool
    cache: str = "none"
    io_engine: str = "auto"
    poll_us: int | str = "auto"
    stats_file: str | None = None
    socket_owner: tuple[int, int] | None = None  # chowned to this after every start
    xen_domain: str | None = None  # serve this Xen domain (blkif); socket: readiness only
    xen_vdev: str | None = None
    # (st_dev, st_ino) the backing must still be: the worker refuses another
    backing_identity: tuple[int, int] | None = None
    # serve only the processes listed there (blkserve.peers); None: any peer
    allow_peers_file: str | None = None
    qos_file: str | None = None  # the volume's QoS block (blkserve.qos), live limits
    # an rbd: backing's client settings ([storage])
    ceph_conf: str | None = None
    ceph_id: str | None = None
    ceph_keyring: str | None = None
    rbd_timeout: int | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "blkserve", "export", self.backing,
                "--socket", self.socket, "--queues", str(self.queues),
                "--serial", self.volume[:20], "--cache", self.cache,
                "--io-engine", self.io_engine, "--poll-us", str(self.poll_us)]
        if self.read_only:
            argv.append("--read-only")
        if self.backing_identity is not None:
            dev, ino = self.backing_identity
            argv += ["--backing-identity", f"{dev}:{ino}"]
        if self.stats_file:
            argv += ["--stats-file", self.stats_file]
        if self.allow_peers_file:
            argv += ["--allow-peers-file", self.allow_peers_file]
        if self.qos_file:
            argv += ["--qos-file", self.qos_file]
        for opt, value in (("--ceph-conf", self.ceph_conf), ("--ceph-id", self.ceph_id),
                           ("--ceph-keyring", self.ceph_keyring),
                           ("--rbd-timeout", self.rbd_timeout)):
            if value is not None:
                argv += [opt, str(value)]
        if self.xen_domain is not None:
            argv += ["--xen-domain", self.xen_domain, "--vdev", self.xen_vdev or "xvdb"]
        return argv


@dataclass
class Worker:
    spec: WorkerSpec
    log_path: str
    on_pid: Callable[[str, int | None, int | None], None]
    on_restart: Callable[[str], None]
    state: str = "starting"  # starting | running | backoff | stopping | stopped
    start_timeout_s: float = 15.0  # a restarted worker's time to create its socket
    pid: int | None = None
    pid_start: int | None = None
    started_at: float = 0.0
    last_exit: str | None = None
    _pidfd: int | None = None
    _child: subprocess.Popen | None = None
    _exited: asyncio.Event = field(default_factory=asyncio.Event)
    _wanted: bool = True
    _backoff: float = BACKOFF_FIRST_S
    _restart_task: asyncio.Task | None = None
    _initial: bool = False

    # -- start / adopt -----------------------------------------------------

    def _spawn(self) -> None:
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self._child = subprocess.Popen(
                self.spec.argv(), stdin=subprocess.DEVNULL, stdout=logf,
                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        self.pid = self._child.pid
        self.pid_start = proc_start_time(self.pid)
        self.started_at = time.monotonic()
        self._watch()
        self.on_pid(self.spec.volume, self.pid, self.pid_start)

    def _watch(self) -> None:
        self._exited = asyncio.Event()
        self._pidfd = os.pidfd_open(self.pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    async def _spawn_and_wait(self, timeout: float) -> bool:
        """Spawn the worker; True once its (new) socket exists."""
        _remove_stale_socket(self.spec.socket)
        old_inode = _socket_inode(self.spec.socket)  # None unless something live is there
        self.state = "starting"
        self._spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._exited.is_set():
            ino = _socket_inode(self.spec.socket)
            if ino is not None and ino != old_inode:
                own_socket(self.spec.socket, self.spec.socket_owner)
                self.state = "running"
                return True
            await asyncio.sleep(0.02)
        return False

    async def start(self, timeout: float) -> None:
        """Start the worker and wait until its socket listens."""
        self._initial = True
        try:
            ok = await self._spawn_and_wait(timeout)
        finally:
            self._initial = False
        if ok:
            worker_event(self, "worker.started", socket=self.spec.socket)
            return
        reason = self.last_exit or f"no socket after {timeout:.0f} s"
        tail = self.log_tail()
        await self.stop(2.0)
        raise WorkerStartError(f"export worker for {self.spec.volume} failed to start "
                               f"({reason}): {tail}")

    def adopt(self, pid: int, pid_start: int | None) -> bool:
        """Take over a worker left running by a previous daemon."""
        if pid_start is None or proc_start_time(pid) != pid_start or \
                not _is_export_worker(pid, self.spec.socket):
            return False
        ident = self.spec.backing_identity
        if ident is not None and serves_inode(pid, ident) is False:
            # it opened something else than the volume's backing (replaced
            # before it started): it must not go on serving that
            worker_event(self, "worker.refused", "error", pid=pid,
                         msg=f"worker {pid} does not serve the volume's backing "
                             f"{self.spec.backing} (device:inode {ident[0]}:{ident[1]}): "
                             "it was replaced before the worker started; stopping it")
            _kill_and_wait(pid)
            return False
        self.pid, self.pid_start = pid, pid_start
        self.started_at = time.monotonic()
        try:
            self._watch()
        except ProcessLookupError:
            return False
        own_socket(self.spec.socket, self.spec.socket_owner)  # in case we died before
        self.state = "running"
        worker_event(self, "worker.adopted")
        return True

    # -- exit and restart --------------------------------------------------

    def _on_exit(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        status = None
        try:
            _, wstatus = os.waitpid(self.pid, os.WNOHANG)
            status = os.waitstatus_to_exitcode(wstatus)
        except ChildProcessError:
            pass  # adopted: our predecessor's child, reaped by init
        if self._child is not None:
            self._child.returncode = status  # already reaped; keep Popen quiet
            self._child = None
        if status is None:
            self.last_exit = "exited"
        elif status < 0:
            self.last_exit = f"killed by {signal.Signals(-status).name}"
        else:
            self.last_exit = f"exit code {status}"
        lived = time.monotonic() - self.started_at
        old_pid = self.pid
        self.pid = self.pid_start = None
        self._exited.set()
        self.on_pid(self.spec.volume, None, None)
        if not self._wanted or self._initial or self.state == "stopping":
            worker_event(self, "worker.exited", pid=old_pid, lived_s=lived)
            if self.state == "stopping":
                self.state = "stopped"
            return
        if lived > HEALTHY_AFTER_S:
            self._backoff = BACKOFF_FIRST_S
        delay = self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        log.warning("export %s: worker %d %s after %.1f s; restarting in %.1f s: %s",
                    self.spec.volume, old_pid, self.last_exit, lived, delay, self.log_tail())
        worker_event(self, "worker.exited", "warning", pid=old_pid, lived_s=lived, backoff_s=delay)
        self.state = "backoff"
        self._restart_task = loop.create_task(self._restart_after(delay))

    async def _restart_after(self, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._wanted:
            return
        self.on_restart(self.spec.volume)
        try:
            ok = await self._spawn_and_wait(self.start_timeout_s)
        except OSError as e:
            log.error("export %s: cannot start worker: %s", self.spec.volume, e)
            self.state = "backoff"
            self._restart_task = asyncio.get_running_loop().create_task(
                self._restart_after(self._backoff))
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
            return
        if ok:
            worker_event(self, "worker.restarted", socket=self.spec.socket)
        elif self.pid is not None and self._wanted:
            # alive but no socket: kill it; its exit schedules the next try
            log.warning("export %s: restarted worker %d has no socket after %.0f s; killing "
                        "it: %s", self.spec.volume, self.pid, self.start_timeout_s,
                        self.log_tail())
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def retry_later(self) -> None:
        """After a failed start: keep trying with back-off (daemon start-up)."""
        self._wanted = True
        self.state = "backoff"
        self._restart_task = asyncio.get_running_loop().create_task(
            self._restart_after(self._backoff))
        self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)

    # -- stop --------------------------------------------------------------

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the worker drains in-flight I/O and removes its socket),
        SIGKILL after TIMEOUT seconds."""
        self._wanted = False
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self.pid is None:
            self.state = "stopped"
            return
        self.state = "stopping"
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            log.warning("export %s: worker %s ignored SIGTERM for %.0f s; killing it",
                        self.spec.volume, self.pid, timeout)
            if self.pid is not None:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await asyncio.wait_for(self._exited.wait(), 5)
        self.state = "stopped"
        if _socket_inode(self.spec.socket) is not None:
            try:
                os.unlink(self.spec.socket)
            except OSError:
                pass

    def detach(self) -> None:
        """Stop watching without stopping the worker (daemon shutdown)."""
        self._wanted = False
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def log_tail(self, lines: int = 3) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                tail = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(tail[-lines:])
