"""Thin Python wrapper over the C engine (blkserve._native, built by cffi).

Every native call goes through _check(), which turns a negative errno into
OSError. The wrapper owns the native handles' lifetimes; file descriptors
passed in stay owned by the caller.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass

from blkserve._native import ffi, lib

log = logging.getLogger("blkserve.engine")

SERIAL_BYTES = 20


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


class RbdError(OSError):
    """Opening an RBD image failed; .stage names the step (connect, pool,
    image, ...) and the message says what to check."""

    def __init__(self, err: int, stage: str, msg: str) -> None:
        super().__init__(err, msg)
        self.stage = stage


_RBD_HINTS = {
    "connect": "cannot connect to the Ceph cluster (monitors unreachable, wrong key or "
               "client id, or a bad ceph.conf)",
    "pool": "no such pool (or no access to it)",
    "image": "no such image in the pool (or no access to it)",
    "conf": "cannot read the Ceph configuration",
    "create": "cannot create a Ceph client",
}


def _rbd_cfg(pool, nspace, image, conf, client_id, keyring, op_timeout, connect_timeout):
    c = ffi.new("struct bs_rbd_cfg *")
    keep = [ffi.new("char[]", (v or "").encode())
            for v in (pool, nspace, image, conf, client_id, keyring)]
    c.pool, c.nspace, c.image, c.conf, c.client_id, c.keyring = keep
    c.op_timeout_s = op_timeout
    c.connect_timeout_s = connect_timeout
    return c, keep


def _rbd_check(ret: int, c, pool: str, nspace: str, image: str) -> None:
    if ret < 0:
        stage = ffi.string(c.stage).decode()
        hint = _RBD_HINTS.get(stage, stage or "opening the image")
        raise RbdError(-ret, stage, f"rbd:{pool}/{nspace + '/' if nspace else ''}{image}: "
                                    f"{hint}: {os.strerror(-ret)}")


@dataclass(frozen=True)
class RbdCluster:
    """How to reach a Ceph cluster (the client side of a ceph.conf): image
    management for the control plane, each call on a connection of its own,
    every wait bounded by timeout."""

    conf: str | None = None
    client_id: str | None = None
    keyring: str | None = None
    timeout: int = 10

    def _manage(self, op: int, pool: str, nspace: str, image: str, size: int = 0) -> int:
        c, keep = _rbd_cfg(pool, nspace, image, self.conf, self.client_id, self.keyring,
                           self.timeout, self.timeout)
        out = ffi.new("uint64_t *", size)
        _rbd_check(lib.bs_rbd_manage(c, op, out), c, pool, nspace, image)
        del keep
        return int(out[0])

    def create(self, pool: str, nspace: str, image: str, size: int) -> None:
        self._manage(lib.BS_RBD_CREATE, pool, nspace, image, size)

    def remove(self, pool: str, nspace: str, image: str) -> None:
        self._manage(lib.BS_RBD_REMOVE, pool, nspace, image)

    def size(self, pool: str, nspace: str, image: str) -> int:
        return self._manage(lib.BS_RBD_STAT, pool, nspace, image)

    def resize(self, pool: str, nspace: str, image: str, size: int) -> None:
        self._manage(lib.BS_RBD_RESIZE, pool, nspace, image, size)


class RbdImage:
    """An open Ceph RBD image (librbd, in the engine): the target of an
    rbd: backing.  Every wait is bounded: connect_timeout for the monitors
    and the open, op_timeout (0: none) for each request."""

    def __init__(self, pool: str, image: str, *, nspace: str = "", conf: str | None = None,
                 client_id: str | None = None, keyring: str | None = None,
                 cache: bool = False, read_only: bool = False, op_timeout: int = 0,
                 connect_timeout: int = 30) -> None:
        c, keep = _rbd_cfg(pool, nspace, image, conf, client_id, keyring, op_timeout,
                           connect_timeout)
        c.cache = int(cache)
        c.read_only = int(read_only)
        out = ffi.new("bs_rbd **")
        _rbd_check(lib.bs_rbd_open(c, out), c, pool, nspace, image)
        del keep
        self._h = out[0]
        self.spec = f"{pool}/{nspace + '/' if nspace else ''}{image}"
        self.cache = cache

    @property
    def handle(self):
        return self._h

    def size(self) -> int:
        out = ffi.new("uint64_t *")
        _check(lib.bs_rbd_size(self._h, out), f"reading the size of rbd:{self.spec}")
        return int(out[0])

    def flush(self) -> None:
        """Blocks until every acknowledged write is in the cluster."""
        _check(lib.bs_rbd_flush(self._h), f"flushing rbd:{self.spec}")

    def lock(self, acquire: bool) -> None:
        _check(lib.bs_rbd_lock(self._h, int(acquire)),
               f"{'taking' if acquire else 'releasing'} the exclusive lock of rbd:{self.spec}")

    def close(self, timeout: float | None = None) -> bool:
        """Close the image and the cluster connection (the lock, if held,
        goes back).  With TIMEOUT, give up waiting after that long (a cluster
        that does not answer): False, the handle is left to the process's
        exit."""
        if self._h is None:
            return True
        h, self._h = self._h, None
        if timeout is None:
            lib.bs_rbd_close(h)
            return True
        t = threading.Thread(target=lib.bs_rbd_close, args=(h,), name="bs-rbd-close",
                             daemon=True)
        t.start()
        t.join(timeout)
        return not t.is_alive()


class GuestMemory:
    """A table of guest memory regions mapped from the frontend's fds."""

    def __init__(self) -> None:
        out = ffi.new("bs_mem **")
        _check(lib.bs_mem_new(out), "allocating guest memory table")
        self._h = out[0]

    @property
    def handle(self):
        return self._h

    def add(self, fd: int, gpa: int, size: int, uva: int, mmap_offset: int) -> None:
        _check(lib.bs_mem_add(self._h, fd, gpa, size, uva, mmap_offset),
               f"mapping guest region gpa={gpa:#x} size={size:#x}")

    def remove(self, gpa: int, size: int, uva: int) -> None:
        _check(lib.bs_mem_remove(self._h, gpa, size, uva),
               f"removing guest region gpa={gpa:#x} size={size:#x}")

    def set_log(self, log, size: int) -> None:
        """Dirty logging on (LOG: a cffi pointer to SIZE bytes) or off (None)."""
        _check(lib.bs_mem_set_log(self._h, log if log is not None else ffi.NULL, size),
               "setting the dirty log")

    def __len__(self) -> int:
        return lib.bs_mem_count(self._h)

    def close(self) -> None:
        if self._h is not None:
            _check(lib.bs_mem_free(self._h), "unmapping guest memory")
            self._h = None


@dataclass
class TargetConfig:
    fd: int
    fd_buffered: int
    capacity: int
    dio_align: int
    read_only: bool
    serial: bytes
    block_size: int = 512
    is_block_device: bool = False
    writethrough: bool = False
    poll_us: int = 0
    poll_adaptive: bool = False   # poll_us is the cap of an adaptive window
    sync_io: bool = False
    drain_timeout_ms: int = 0   # a queue stop's bound on in-flight I/O; 0: 30 s
    rbd: RbdImage | None = None  # an RBD image instead of fd (fd -1)
    null_io: bool = False  # no backing (fd -1, sync_io): zeroes read, writes dropped


@dataclass(frozen=True)
class Limits:
    seg_max: int
    size_max: int
    max_discard_sectors: int
    max_discard_seg: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int


def inflight_queue_bytes(queue_size: int) -> int:
    return int(lib.bs_inflight_queue_bytes(queue_size))


def limits() -> Limits:
    """The request limits the engine enforces (advertised in the config space)."""
    out = ffi.new("struct bs_limits *")
    lib.bs_get_limits(out)
    return Limits(**{f: int(getattr(out, f)) for f in Limits.__dataclass_fields__})


class Target:
    """The backing store shared by an export's queues."""

    def __init__(self, cfg: TargetConfig) -> None:
        c = ffi.new("struct bs_target_cfg *")
        c.fd = cfg.fd
        c.fd_buffered = cfg.fd_buffered
        c.capacity = cfg.capacity
        c.dio_align = cfg.dio_align
        c.read_only = int(cfg.read_only)
        c.block_size = cfg.block_size
        c.is_block_device = int(cfg.is_block_device)
        c.writethrough = int(cfg.writethrough)
        c.poll_us = cfg.poll_us
        c.poll_adaptive = int(cfg.poll_adaptive)
        c.sync_io = int(cfg.sync_io)
        c.drain_timeout_ms = cfg.drain_timeout_ms
        c.serial = cfg.serial[:SERIAL_BYTES].ljust(SERIAL_BYTES, b"\0")
        c.rbd = cfg.rbd.handle if cfg.rbd is not None else ffi.NULL
        c.null_io = int(cfg.null_io)
        out = ffi.new("bs_target **")
        _check(lib.bs_target_new(c, out), "configuring the backing target")
        self._h = out[0]
        self.config = cfg

    @property
    def handle(self):
        return self._h

    def set_writethrough(self, on: bool) -> None:
        lib.bs_target_set_writethrough(self._h, int(on))

    def set_capacity(self, capacity: int) -> None:
        _check(lib.bs_target_set_capacity(self._h, capacity), "changing the capacity")

    def set_qos(self, vol, grp) -> None:
        """Serve under VOL's and GRP's limits (blkserve.qos.QosBlock or None).
        The blocks stay referenced as long as the target: a queue may still
        be reading the one replaced."""
        self._qos_keep = [*getattr(self, "_qos_keep", []), vol, grp]
        lib.bs_target_set_qos(self._h, vol.ptr if vol is not None else ffi.NULL,
                              grp.ptr if grp is not None else ffi.NULL)

    def close(self) -> None:
        if self._h is not None:
            lib.bs_target_free(self._h)
            self._h = None


@dataclass
class VringConfig:
    num: int
    desc: int
    avail: int
    used: int
    base: int
    kick_fd: int
    call_fd: int
    event_idx: bool
    packed: bool = False


STAT_FIELDS = (
    "reqs_read", "reqs_write", "reqs_flush", "reqs_get_id", "reqs_discard",
    "reqs_write_zeroes", "reqs_other", "bytes_read", "bytes_write", "bytes_discard",
    "bytes_write_zeroes", "err_ioerr", "err_unsupp", "bad_chains",
    "io_errors", "kicks", "notifies", "inflight", "broken", "last_error", "resubmitted",
)


class Queue:
    """One virtqueue, served by its own engine thread and io_uring."""

    def __init__(self, target: Target, index: int) -> None:
        out = ffi.new("bs_queue **")
        _check(lib.bs_queue_new(target.handle, index, out), f"creating queue {index}")
        self._h = out[0]
        self.index = index

    def start(self, mem: GuestMemory, vc: VringConfig) -> None:
        c = ffi.new("struct bs_vring_cfg *")
        c.num = vc.num
        c.desc_uva = vc.desc
        c.avail_uva = vc.avail
        c.used_uva = vc.used
        c.base = vc.base
        c.kick_fd = vc.kick_fd
        c.call_fd = vc.call_fd
        c.event_idx = int(vc.event_idx)
        c.packed = int(vc.packed)
        _check(lib.bs_queue_start(self._h, mem.handle, c), f"starting queue {self.index}")

    def stop(self) -> int:
        """Stop after in-flight requests complete; returns the ring base
        (what GET_VRING_BASE answers).  The wait is bounded by the target's
        drain timeout: requests still in flight then are abandoned (left
        marked in the inflight region, if the frontend gave one, for the
        next backend to redo) and the stop completes with a log line."""
        last = ffi.new("uint32_t *")
        ret = lib.bs_queue_stop(self._h, last)
        if ret == -errno.ETIMEDOUT:
            log.error("queue %d: stopped with requests still in flight after the drain "
                      "timeout (backing store not answering); they were abandoned without "
                      "a status and are redone by the next backend only if the frontend "
                      "keeps an inflight region", self.index)
        else:
            _check(ret, f"stopping queue {self.index}")
        return int(last[0])

    @property
    def running(self) -> bool:
        return bool(lib.bs_queue_running(self._h))

    def set_inflight(self, region, size: int) -> None:
        """Track popped requests in REGION (a cffi pointer into the frontend's
        inflight memory, SIZE bytes), or stop with None; before start."""
        _check(lib.bs_queue_set_inflight(self._h, region if region is not None else ffi.NULL,
                                         size), f"queue {self.index}'s inflight region")

    def set_stats_area(self, area) -> None:
        """Count into AREA (a `struct bs_queue_stats *` in a shared mapping
        that outlives the queue) from now on."""
        _check(lib.bs_queue_set_stats(self._h, area), f"moving queue {self.index}'s stats")
        self._stats_area = area

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct bs_queue_stats *")
        lib.bs_queue_get_stats(self._h, s)
        return {f: int(getattr(s, f)) for f in STAT_FIELDS}

    def close(self) -> None:
        if self._h is not None:
            lib.bs_queue_free(self._h)
            self._h = None
