"""`blkserve export`: open a backing file or block device and serve it as a
vhost-user-blk device until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import re
import signal
import socket
import stat
import struct
from dataclasses import dataclass

from blkserve import backing as backing_io
from blkserve import qos as qos_mod
from blkserve.logs import log_event
from blkserve.native import SERIAL_BYTES, RbdError, RbdImage, Target, TargetConfig
from blkserve.peers import PeerPolicy
from blkserve.sizes import parse_size
from blkserve.stats import StatsWriter
from blkserve.vhost.blk import SECTOR, BlkDeviceModel, Topology
from blkserve.vhost.server import VhostUserServer

log = logging.getLogger("blkserve.export")

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKIOMIN = 0x1278
BLKIOOPT = 0x1279
BLKALIGNOFF = 0x127A
BLKPBSZGET = 0x127B
MAX_QUEUES = 64
XEN_LOCK_DIR = "/run/blkserve"


class ExportError(Exception):
    """A user-facing configuration error (exit code 2)."""


@dataclass
class ExportOptions:
    backing: str
    socket: str | None = None
    queues: int = 1
    read_only: bool = False
    cache: str = "none"
    serial: str | None = None
    block_size: int | None = None
    poll_us: int = 0     # the polling window, or the adaptive one's cap (poll_adaptive)
    poll_adaptive: bool = False
    io_engine: str = "auto"
    stats_file: str | None = None
    drain_timeout: float = 30.0
    fd: int | None = None  # an inherited listening socket, instead of socket
    xen_domain: str | None = None  # serve a Xen domain (blkif) instead of vhost-user
    xen_devid: int | None = None
    vdev: str | None = None
    # (st_dev, st_ino) the backing must be (blkserve serve passes the inode
    # the volume was created on); BACKING is then taken as a real path
    backing_identity: tuple[int, int] | None = None
    allow_peer_pids: list[int] | None = None  # serve only these frontend processes
    allow_peers_file: str | None = None  # ... and those listed there (blkserve.peers)
    qos: str | None = None  # --qos iops_total=5000,... (blkserve.qos)
    qos_file: str | None = None  # the volume's shared QoS block (blkserve serve's)
    qos_group_file: str | None = None  # a group's shared QoS block
    # rbd:POOL/[NAMESPACE/]IMAGE backings: the client's configuration
    ceph_conf: str | None = None
    ceph_id: str | None = None
    ceph_keyring: str | None = None
    rbd_timeout: int = 60  # a request librbd has not answered in this long fails


RBD_PREFIX = "rbd:"
RBD_NAME_RE = r"[A-Za-z0-9_.+-][A-Za-z0-9_.+@-]*"


def parse_rbd(spec: str) -> tuple[str, str, str]:
    """rbd:POOL/IMAGE or rbd:POOL/NAMESPACE/IMAGE -> (pool, namespace, image)."""
    parts = spec[len(RBD_PREFIX):].split("/")
    if len(parts) not in (2, 3) or not all(re.fullmatch(RBD_NAME_RE, p) for p in parts):
        raise ExportError(f"{spec!r}: an RBD backing is rbd:POOL/IMAGE or "
                          "rbd:POOL/NAMESPACE/IMAGE (letters, digits, . _ + - @)")
    pool, image = parts[0], parts[-1]
    return pool, parts[1] if len(parts) == 3 else "", image


def is_rbd(backing: str | None) -> bool:
    """Does BACKING name a Ceph RBD image (rbd:...)?"""
    return backing is not None and backing.startswith(RBD_PREFIX)


NULL_PREFIX = "null:"
NULL_MAX = 1 << 60


def is_null(backing: str | None) -> bool:
    """Does BACKING name the null device (null:SIZE)?"""
    return backing is not None and backing.startswith(NULL_PREFIX)


def parse_null(spec: str) -> int:
    """null:SIZE (bytes or K/M/G/T, a multiple of 512) -> its size."""
    try:
        size = parse_size(spec[len(NULL_PREFIX):])
    except ValueError as e:
        raise ExportError(f"{spec!r}: a null backing is null:SIZE, e.g. null:1G ({e})") from None
    if size % SECTOR or size > NULL_MAX:
        raise ExportError(f"{spec!r}: the size must be a multiple of 512 bytes, at most 1 EiB")
    return size


POLL_AUTO_CAP_US = 50


def parse_poll(text: str) -> tuple[int, bool]:
    """--poll-us: "auto" (adaptive, up to 50 us), "auto:N" (adaptive, up to N
    us) or N (always N us; 0: never poll) -> (microseconds, adaptive)."""
    t = str(text).strip()
    adaptive = t == "auto" or t.startswith("auto:")
    num = (t[5:] if t.startswith("auto:") else str(POLL_AUTO_CAP_US)) if adaptive else t
    try:
        us = int(num)
    except ValueError:
        us = -1
    if not 0 <= us <= 1_000_000:
        raise ValueError(f"--poll-us must be auto, auto:N or N, with N from 0 to 1000000 "
                         f"(got {text!r})")
    return us, adaptive


def is_path(backing: str | None) -> bool:
    """A file or block device (not rbd:, not null:)."""
    return not (is_rbd(backing) or is_null(backing))


def default_serial(path: str) -> bytes:
    """A stable serial derived from the backing's real path, or its rbd:
    name (fits in 20 bytes)."""
    name = path if not is_path(path) else os.path.realpath(path)
    digest = hashlib.sha256(name.encode()).hexdigest()
    return ("bs-" + digest)[:SERIAL_BYTES].encode()


@dataclass
class Backing:
    fd: int
    fd_buffered: int
    capacity: int
    dio_align: int
    is_block: bool
    logical_block: int = SECTOR
    topology: Topology = Topology()
    rbd: RbdImage | None = None
    null: bool = False

    def close(self, timeout: float | None = None) -> bool:
        """False: an RBD image's cluster did not answer within TIMEOUT (the
        process should exit without waiting for it)."""
        if self.null:
            return True
        if self.rbd is not None:
            done = self.rbd.close(timeout)
            self.rbd = None
            return done
        if self.fd_buffered != self.fd:
            os.close(self.fd_buffered)
        os.close(self.fd)
        return True


def open_backing(path: str, read_only: bool, cache: str,
                 expect: tuple[int, int] | None = None) -> Backing:
    """Open PATH (no symlink anywhere in it; a regular file or block device
    only; the inode EXPECT = (st_dev, st_ino) if given): see blkserve.backing."""
    flags = os.O_RDONLY if read_only else os.O_RDWR
    try:
        fd_buffered, ident = backing_io.open_checked(path, flags, expect)
    except backing_io.BackingError as e:
        raise ExportError(str(e)) from None
    st = os.fstat(fd_buffered)
    is_block = ident.kind == "block"
    try:
        if is_block:
            size = _ioctl_int(fd_buffered, BLKGETSIZE64, "<Q")
            sec = _ioctl_int(fd_buffered, BLKSSZGET, "<i")
            topo = Topology(
                physical_block=_ioctl_int(fd_buffered, BLKPBSZGET, "<I"),
                alignment_offset=max(_ioctl_int(fd_buffered, BLKALIGNOFF, "<i"), 0),
                io_min=_ioctl_int(fd_buffered, BLKIOMIN, "<I"),
                io_opt=_ioctl_int(fd_buffered, BLKIOOPT, "<I"),
                discard_granularity=_sysfs_discard_granularity(st.st_rdev) or sec,
            )
        else:
            size = os.fstat(fd_buffered).st_size
            sec = SECTOR
            # A file's allocation unit is its filesystem block: writes below
            # it read-modify-write, and holes are punched in whole blocks.
            blk = max(st.st_blksize, SECTOR)
            topo = Topology(physical_block=blk, io_min=blk, discard_granularity=blk)
    except OSError as e:
        os.close(fd_buffered)
        raise ExportError(f"cannot read the size of {path}: {e.strerror}") from None
    capacity = size - size % SECTOR
    if capacity == 0:
        os.close(fd_buffered)
        raise ExportError(f"backing {path} is smaller than one 512-byte sector")
    if cache == "writeback":
        return Backing(fd_buffered, fd_buffered, capacity, 0, is_block, sec, topo)
    try:
        fd, _ = backing_io.open_checked(path, flags | os.O_DIRECT, (ident.dev, ident.ino))
    except backing_io.BackingError as e:
        if e.errno != errno.EINVAL:
            os.close(fd_buffered)
            raise ExportError(f"{e} (opening it with O_DIRECT)") from None
        log.warning("%s does not support O_DIRECT; serving it through the page cache", path)
        return Backing(fd_buffered, fd_buffered, capacity, 0, is_block, sec, topo)
    return Backing(fd, fd_buffered, capacity, max(sec, SECTOR), is_block, sec, topo)


def open_rbd_backing(opts: ExportOptions) -> Backing:
    """Connect to the cluster and open the image (bounded waits)."""
    pool, nspace, image = parse_rbd(opts.backing)
    for what, path in (("--ceph-conf", opts.ceph_conf), ("--ceph-keyring", opts.ceph_keyring)):
        if path is not None and not os.path.isfile(path):
            raise ExportError(f"{what} {path}: no such file")
    if not 0 <= opts.rbd_timeout <= 86400:
        raise ExportError("--rbd-timeout must be between 0 and 86400 seconds")
    try:
        img = RbdImage(pool, image, nspace=nspace, conf=opts.ceph_conf, client_id=opts.ceph_id,
                       keyring=opts.ceph_keyring, cache=opts.cache == "writeback",
                       read_only=opts.read_only, op_timeout=opts.rbd_timeout,
                       connect_timeout=min(opts.rbd_timeout or 30, 30))
    except RbdError as e:
        raise ExportError(str(e.strerror)) from None
    try:
        size = img.size()
    except OSError as e:
        img.close()
        raise ExportError(str(e.strerror)) from None
    capacity = size - size % SECTOR
    if capacity == 0:
        img.close()
        raise ExportError(f"{opts.backing} is smaller than one 512-byte sector")
    # RBD stores 4 MiB objects; a discard frees space only in whole objects
    # (a hint elsewhere), so that is its granularity
    topo = Topology(physical_block=4096, io_min=4096, discard_granularity=4 << 20)
    return Backing(-1, -1, capacity, 0, False, SECTOR, topo, rbd=img)


def supports_nowait(fd: int) -> bool:
    """Can the backing's driver do non-blocking reads (RWF_NOWAIT)?  If not
    (tmpfs, for one), io_uring hands every request to a kernel worker thread,
    and plain syscalls in the queue thread are faster."""
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT wants
    try:
        os.preadv(fd, [buf], 0, os.RWF_NOWAIT)
    except OSError as e:
        return e.errno != errno.EOPNOTSUPP
    finally:
        buf.close()
    return True


def _ioctl_int(fd: int, req: int, fmt: str) -> int:
    return struct.unpack(fmt, fcntl.ioctl(fd, req, b"\0" * struct.calcsize(fmt)))[0]


def _sysfs_discard_granularity(rdev: int) -> int:
    path = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/queue/discard_granularity"
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 0


class _InheritedSocketServer(VhostUserServer):
    """Serves on a listening socket the management layer created and passed
    as a file descriptor (--fd): nothing to bind, and on exit the socket is
    closed but its file left alone (it is not ours)."""

    def __init__(self, listener: socket.socket, *args) -> None:
        super().__init__(*args)
        self._inherited = listener

    def bind(self) -> None:
        self._inherited.setblocking(False)
        self._listener = self._inherited

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        super().close()


def inherited_listener(fd: int) -> tuple[socket.socket, str]:
    """The listening unix stream socket on FD and its name, or ExportError."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise ExportError(f"--fd {fd}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ExportError(f"--fd {fd} is not a socket")
    s = socket.socket(fileno=fd)
    try:
        listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if s.family != socket.AF_UNIX or s.type != socket.SOCK_STREAM or not listening:
            raise ExportError(f"--fd {fd} is not a listening unix stream socket (bind and "
                              "listen on it before passing it)")
        name = s.getsockname()
    except BaseException:
        s.detach()  # not ours to close on a refusal
        raise
    os.set_inheritable(fd, False)
    if isinstance(name, bytes):  # abstract namespace
        name = "@" + name.lstrip(b"\0").decode(errors="replace")
    return s, name or f"fd {fd}"


class ExportQos:
    """The QoS blocks an export serves under: its own (anonymous with --qos,
    or --qos-file, whose group field names a group block beside it) and a
    group's (--qos-group-file, or the one the volume block names)."""

    def __init__(self, opts: ExportOptions):
        self.opts = opts
        self.vol: qos_mod.QosBlock | None = None
        self.grp: qos_mod.QosBlock | None = None
        self.group = ""
        limits = None
        try:
            if opts.qos is not None:
                limits = qos_mod.parse_spec(opts.qos)
            if opts.qos_file:
                self.vol = qos_mod.QosBlock(opts.qos_file)
            elif limits is not None:
                self.vol = qos_mod.QosBlock(None)
            if limits is not None:
                self.vol.apply(limits)
            if opts.qos_group_file:
                self.grp = qos_mod.QosBlock(opts.qos_group_file)
        except qos_mod.QosError as e:
            raise ExportError(f"--qos: {e}") from None
        except OSError as e:
            raise ExportError(f"cannot map a QoS file: {e}") from None

    def attach(self, target: Target) -> str:
        """Hand the blocks to the engine (again after SIGHUP: the volume
        block's group may have changed).  Returns what is in force."""
        if self.opts.qos_file and not self.opts.qos_group_file and self.vol is not None:
            name = self.vol.group
            if name != self.group:
                self.grp = None
                if name and qos_mod.GROUP_NAME_RE.match(name):
                    try:
                        path = qos_mod.group_path(os.path.dirname(self.opts.qos_file), name)
                        self.grp = qos_mod.QosBlock(path, create=False)
                    except OSError as e:
                        log.warning("QoS group %s: %s: serving without it", name, e)
                self.group = name if self.grp is not None else ""
        if self.vol is None and self.grp is None:
            return "no QoS limits"
        target.set_qos(self.vol, self.grp)
        parts = []
        if self.vol is not None:
            parts.append(f"limits {qos_mod.to_flat(self.vol.limits()) or 'none (yet)'}")
        if self.grp is not None:
            parts.append(f"group {self.group or self.opts.qos_group_file} "
                         f"{qos_mod.to_flat(self.grp.limits())}")
        return "QoS: " + ", ".join(parts)


def open_target(opts: ExportOptions) -> tuple[Target, Backing]:
    """Validate the backing options, open the backing and configure the
    engine's target (shared by the vhost-user and Xen transports)."""
    if not 1 <= opts.queues <= MAX_QUEUES:
        raise ExportError(f"--queues must be between 1 and {MAX_QUEUES}")
    if opts.cache not in ("none", "writeback"):
        raise ExportError("--cache must be 'none' or 'writeback'")
    if opts.io_engine not in ("auto", "io_uring", "sync"):
        raise ExportError("--io-engine must be auto, io_uring or sync")
    if not 0 <= opts.poll_us <= 1_000_000:
        raise ExportError("--poll-us must be between 0 and 1000000")
    if not 0.001 <= opts.drain_timeout <= 3600:
        raise ExportError("--drain-timeout must be between 0.001 and 3600 seconds")
    if opts.block_size not in (None, 512, 4096):
        raise ExportError("--block-size must be 512 or 4096")
    if opts.serial is not None:
        serial = opts.serial.encode()
        if len(serial) > SERIAL_BYTES:
            raise ExportError(f"--serial is longer than {SERIAL_BYTES} bytes")
    else:
        serial = default_serial(opts.backing)
    qos = ExportQos(opts)
    if is_rbd(opts.backing):
        if opts.io_engine == "sync":
            raise ExportError("--io-engine sync is for files: an RBD backing is served "
                              "through librbd's asynchronous API")
        backing = open_rbd_backing(opts)
    elif is_null(opts.backing):
        if opts.io_engine == "io_uring":
            raise ExportError("--io-engine io_uring is for files: a null backing does no I/O")
        size = parse_null(opts.backing)
        # nothing to open; 4 KiB as the device's preferred unit, like a disk
        backing = Backing(-1, -1, size, 0, False, SECTOR,
                          Topology(physical_block=4096, io_min=4096,
                                   discard_granularity=4096), null=True)
    else:
        backing = open_backing(opts.backing, opts.read_only, opts.cache,
                               opts.backing_identity)
    try:
        block_size = opts.block_size or (4096 if backing.logical_block == 4096 else SECTOR)
        if block_size < backing.logical_block:
            log.warning("--block-size %d is below the backing's %d-byte logical block: "
                        "unaligned guest I/O goes through the page cache", block_size,
                        backing.logical_block)
        capacity = backing.capacity - backing.capacity % block_size
        if capacity == 0:
            raise ExportError(f"backing {opts.backing} is smaller than one block")
        sync_io = backing.null or (backing.rbd is None and (opts.io_engine == "sync" or (
            opts.io_engine == "auto" and not supports_nowait(backing.fd))))
        if sync_io and opts.io_engine == "auto" and not backing.null:
            log.info("%s cannot do non-blocking I/O: serving it with plain syscalls in the "
                     "queue threads (--io-engine sync)", opts.backing)
        target = Target(TargetConfig(
            fd=backing.fd, fd_buffered=backing.fd_buffered, capacity=capacity,
            dio_align=backing.dio_align, read_only=opts.read_only, serial=serial,
            block_size=block_size, is_block_device=backing.is_block, poll_us=opts.poll_us,
            poll_adaptive=opts.poll_adaptive,
            sync_io=sync_io, drain_timeout_ms=max(1, round(opts.drain_timeout * 1000)),
            rbd=backing.rbd, null_io=backing.null,
        ))
        target.qos = qos
        msg = qos.attach(target)
        # said only when a limit is in force (blkserve serve gives every
        # worker a block, most of them empty)
        if (qos.vol is not None and qos.vol.limits()) or qos.grp is not None:
            log.info("%s", msg)
    except BaseException:
        backing.close()
        raise
    return target, backing


def prepare(opts: ExportOptions) -> tuple[VhostUserServer, Backing]:
    """Validate options, open the backing and bind the socket (no I/O yet)."""
    target, backing = open_target(opts)
    capacity, block_size = target.config.capacity, target.config.block_size
    try:
        model = BlkDeviceModel(capacity=capacity, num_queues=opts.queues,
                               read_only=opts.read_only, blk_size=block_size,
                               topology=backing.topology)
        if opts.fd is not None:
            try:
                listener, name = inherited_listener(opts.fd)
            except ExportError:
                target.close()
                raise
            server = _InheritedSocketServer(listener, name, model, target)
        else:
            server = VhostUserServer(os.path.abspath(opts.socket), model, target)
        if opts.allow_peer_pids or opts.allow_peers_file:
            server.peer_policy = PeerPolicy(opts.allow_peer_pids, opts.allow_peers_file)
        if backing.null:
            server.size_probe = lambda: capacity
        elif backing.rbd is not None:
            server.size_probe = backing.rbd.size
        elif backing.is_block:
            server.size_probe = lambda: _ioctl_int(backing.fd_buffered, BLKGETSIZE64, "<Q")
        else:
            server.size_probe = lambda: os.fstat(backing.fd_buffered).st_size
        if opts.stats_file:
            try:
                server.stats = StatsWriter(opts.stats_file, opts.queues, capacity)
            except OSError as e:
                server.close()
                target.close()
                raise ExportError(f"cannot create --stats-file {opts.stats_file}: "
                                  f"{e.strerror}") from None
            for q in server.queues:
                q.set_stats_area(server.stats.area(q.index))
        try:
            server.bind()
        except OSError as e:
            server.close()
            target.close()
            raise ExportError(str(e) if e.strerror is None else e.strerror) from None
    except BaseException:
        backing.close()
        raise
    return server, backing


async def _run(server: VhostUserServer) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    def hup() -> None:
        log.info("SIGHUP: %s", server.grow())
        if server.target.qos.opts.qos_file:
            log.info("SIGHUP: %s", server.target.qos.attach(server.target))

    loop.add_signal_handler(signal.SIGHUP, hup)
    m = server.model
    log_event(log, "export.listening", socket=server.path, queues=m.num_queues,
              capacity=m.capacity, read_only=m.read_only, pid=os.getpid(),
              msg=f"serving vhost-user-blk on {server.path} ({m.num_queues} queue(s), "
                  f"{m.capacity} bytes{', read-only' if m.read_only else ''})")
    await server.serve(stop)
    log_event(log, "export.drained", msg="stopped: in-flight I/O drained, socket "
              + ("closed" if isinstance(server, _InheritedSocketServer) else "removed"))


def _remove_stale(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)


def run_xen_export(opts: ExportOptions) -> int:
    """Serve the backing to a Xen domain's blkfront until SIGINT/SIGTERM,
    then detach the device (the guest sees it go)."""
    from blkserve import xen

    if opts.xen_devid is not None and opts.vdev is not None:
        raise ExportError("give --xen-devid or --vdev, not both")
    try:
        devid = opts.xen_devid if opts.xen_devid is not None else \
            xen.vdev_to_devid(opts.vdev or "xvdb")
        xs = xen.XenStore()
        try:
            domid, name = xen.resolve_domain(xs, opts.xen_domain or "")
        finally:
            xs.close()
    except (xen.XenUnavailable, xen.XenError) as e:
        raise ExportError(str(e)) from None
    if domid == 0:
        raise ExportError("--xen-domain: dom0 cannot be its own blkif frontend here")
    lock = [_lock_vbd(domid, devid, name)]
    try:
        return _serve_xen(opts, xen, domid, name, devid, lock)
    finally:
        os.close(lock[0])


def _lock_vbd(domid: int, devid: int, name: str) -> int:
    """One backend per vbd: the lock tells a live one from one that died."""
    os.makedirs(XEN_LOCK_DIR, exist_ok=True)
    lock_fd = os.open(os.path.join(XEN_LOCK_DIR, f"vbd-{domid}-{devid}.lock"),
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise ExportError(f"another blkserve export serves vbd {devid} of Xen domain "
                          f"{name} ({domid})") from None
    return lock_fd


def saved_marker(socket_path: str) -> str:
    """The file beside a supervised Xen worker's socket that says its domain
    was saved (or is migrating) and the worker (its pid is the content)
    waits for it to come back: `blkserve serve` does not take the
    attachment for stale meanwhile."""
    return socket_path + ".saved"


def read_saved_marker(socket_path: str) -> int | None:
    """The pid in SOCKET_PATH's saved marker, or None (no marker, or not a
    regular file we wrote: never followed through a symlink)."""
    try:
        fd = os.open(saved_marker(socket_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        text = os.read(fd, 32).decode(errors="replace").strip()
    finally:
        os.close(fd)
    return int(text) if text.isdigit() else None


def _write_saved_marker(socket_path: str) -> None:
    fd = os.open(saved_marker(socket_path),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def _serve_xen(opts: ExportOptions, xen, domid: int, name: str, devid: int,
               lock: list[int]) -> int:
    target, backing = open_target(opts)
    stats = None
    rfd, wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: os.write(wfd, b"x"))
    # the volume's QoS group may have changed (blkserve serve); nothing else
    # is re-read here (a blkif disk is not resized online)
    signal.signal(signal.SIGHUP, lambda *_: log.info("SIGHUP: %s", target.qos.attach(target)))
    be = None
    try:
        if opts.stats_file:
            try:
                stats = StatsWriter(opts.stats_file, xen.MAX_QUEUES, target.config.capacity)
            except OSError as e:
                raise ExportError(f"cannot create --stats-file {opts.stats_file}: "
                                  f"{e.strerror}") from None
        try:
            be = xen.BlkifBackend(
                target, domid, devid, read_only=opts.read_only,
                physical_sector_size=backing.topology.physical_block or SECTOR,
                discard_granularity=backing.topology.discard_granularity or 4096,
                stats_areas=stats.area if stats else None, name=name,
                on_change=lambda event, old, new: _xen_domain_changed(
                    opts, name, devid, lock, event, old, new))
            be.create(reclaim=True)
        except (xen.XenUnavailable, xen.XenError) as e:
            raise ExportError(str(e)) from None
        log_event(log, "export.xen", domain=name, domid=domid, devid=devid,
                  capacity=target.config.capacity, read_only=opts.read_only, pid=os.getpid(),
                  msg=f"offering a {target.config.capacity}-byte blkif disk (vbd {devid}) to "
                      f"Xen domain {name} ({domid}){', read-only' if opts.read_only else ''}")
        ready = None
        if opts.socket:
            # a supervisor's readiness and liveness handle: listening while
            # the vbd is offered (nothing is served on it)
            _remove_stale(opts.socket)
            ready = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            ready.bind(opts.socket)
            ready.listen(1)
        try:
            be.serve(rfd)
            be.destroy()
        finally:
            if ready is not None:
                ready.close()
                with contextlib.suppress(OSError):
                    os.unlink(opts.socket)
                with contextlib.suppress(OSError):
                    os.unlink(saved_marker(opts.socket))
        log_event(log, "export.drained", msg="stopped: in-flight I/O drained, vbd removed")
    finally:
        if be is not None:
            be.close()
        target.close()
        backing.close()
        os.close(rfd)
        os.close(wfd)
        if stats is not None and opts.stats_file:
            try:
                os.unlink(opts.stats_file)
            except OSError:
                pass
    return 0


def _xen_domain_changed(opts: ExportOptions, name: str, devid: int, lock: list[int],
                        event: str, old: int, new: int | None) -> bool:
    """The served domain went away (saved or for good) or came back (False:
    do not serve it, another export does)."""
    if event == "saved":
        log_event(log, "export.xen_saved", domain=name, domid=old, devid=devid,
                  msg=f"Xen domain {name} ({old}) was saved or is migrating: its rings are "
                      f"released; vbd {devid} is offered again when it comes back")
        if opts.socket:
            _write_saved_marker(opts.socket)
        return True
    if opts.socket:       # back, or gone for good: not waiting any more
        with contextlib.suppress(OSError):
            os.unlink(saved_marker(opts.socket))
    if event == "back":
        try:
            fd = _lock_vbd(new, devid, name)
        except ExportError as e:
            log.error("%s: this export stops serving the domain", e)
            return False
        os.close(lock[0])
        lock[0] = fd
        log_event(log, "export.xen_restored", domain=name, domid=new, old_domid=old,
                  devid=devid, msg=f"Xen domain {name} is back as domain {new}: offering "
                                   f"vbd {devid} again")
    else:
        log_event(log, "export.xen_domain_gone", level=logging.WARNING, domain=name,
                  domid=old, devid=devid,
                  msg=f"Xen domain {name} ({old}) is gone (destroyed, shut down or "
                      "crashed): its rings are released; nothing is served until SIGTERM")
    return True


def run_export(opts: ExportOptions) -> int:
    if opts.xen_domain is not None:
        return run_xen_export(opts)
    server, backing = prepare(opts)
    target = server.target
    closed = True
    try:
        asyncio.run(_run(server))
    finally:
        server.close()
        target.close()
        # an RBD image's close talks to the cluster: bounded like a stop
        closed = backing.close(timeout=opts.drain_timeout)
        if opts.stats_file:
            try:
                os.unlink(opts.stats_file)
            except OSError:
                pass
    if not closed:
        log.error("the Ceph cluster did not answer the image's close within %.1f s: "
                  "exiting without it (the cluster frees the image's lock when this "
                  "client's session times out)", opts.drain_timeout)
        logging.shutdown()
        os._exit(0)   # librbd's threads still wait on the cluster: no clean exit
    return 0
