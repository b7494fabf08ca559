"""The shared stats block: one file per export worker holding every queue's
engine counters (struct bs_queue_stats, written by the queue threads), mapped
shared by the worker and read by `blkserve serve` for /metrics without
stopping or locking any queue.

Layout: a 64-byte header, then NQUEUES blocks of sizeof(struct
bs_queue_stats), each at a 64-byte aligned offset.

    magic    8s   b"BLKSTAT1"
    version  u32  1
    nqueues  u32
    qsize    u32  sizeof(struct bs_queue_stats): a reader built against another
                  layout refuses the file instead of misreading it
    stride   u32  bytes from one queue block to the next
    pid      u64  the worker
    capacity u64  bytes
    started  u64  CLOCK_REALTIME ns when the worker created the block
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

from blkserve._native import ffi, lib

MAGIC = b"BLKSTAT1"
VERSION = 1
HEADER = struct.Struct("<8sIIIIQQQ")
HEADER_SIZE = 64
QSIZE = ffi.sizeof("struct bs_queue_stats")
# the layout before the QoS counters were appended: a block an older worker
# (adopted across an upgrade) writes is read with those counters at zero
QSIZE_BEFORE_QOS = ffi.offsetof("struct bs_queue_stats", "throttled")
# ... and before the polling counters
QSIZE_BEFORE_POLL = ffi.offsetof("struct bs_queue_stats", "polls")
STRIDE = (QSIZE + 63) // 64 * 64

OPS = ("read", "write", "flush", "discard", "write_zeroes", "get_id", "other")
STATUSES = ("ok", "ioerr", "unsupp")
LAT_BUCKETS = int(lib.BS_LAT_BUCKETS)
assert len(OPS) == int(lib.BS_STAT_NOPS)


class StatsError(Exception):
    pass


class StatsWriter:
    """Created by the export worker; queue I counts into area(I)."""

    def __init__(self, path: str, nqueues: int, capacity: int):
        size = HEADER_SIZE + STRIDE * nqueues
        tmp = f"{path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        HEADER.pack_into(self._map, 0, MAGIC, VERSION, nqueues, QSIZE, STRIDE, os.getpid(),
                         capacity, time.time_ns())
        os.replace(tmp, path)  # readers never see a half-written header
        self.path = path
        self._buf = ffi.from_buffer(self._map)

    def area(self, index: int):
        return ffi.cast("struct bs_queue_stats *", self._buf + HEADER_SIZE + STRIDE * index)

    # The mapping stays for the life of the process: queue threads may write
    # into it until the very end.


@dataclass
class QueueStats:
    op_status: list[list[int]]   # [op][status]
    op_bytes: list[int]
    op_lat_sum_ns: list[int]
    op_lat_hist: list[list[int]]  # [op][bucket]: bucket i counts < 2**i ns
    inflight: int
    bad_chains: int
    io_errors: int
    kicks: int
    notifies: int
    broken: bool
    throttled: int = 0            # requests held for QoS budget
    throttle_wait_ns: int = 0
    throttle_wait_hist: list[int] | None = None  # log2 ns, like op_lat_hist
    polls: int = 0                # polling windows (--poll-us)
    poll_hits: int = 0            # ... that found work
    poll_ns: int = 0              # ... and the time spent in them


@dataclass
class Snapshot:
    pid: int
    capacity: int
    started_ns: int
    queues: list[QueueStats]


def read(path: str) -> Snapshot:
    """Read a worker's stats block (raises StatsError if absent or foreign)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise StatsError(f"{path}: {e.strerror}") from None
    if len(data) < HEADER_SIZE:
        raise StatsError(f"{path}: truncated")
    magic, version, nq, qsize, stride, pid, capacity, started = HEADER.unpack_from(data)
    layouts = (QSIZE, QSIZE_BEFORE_POLL, QSIZE_BEFORE_QOS)
    if magic != MAGIC or version != VERSION or qsize not in layouts or stride < qsize:
        raise StatsError(f"{path}: not a stats block of this blkserve version")
    if len(data) < HEADER_SIZE + stride * nq:
        raise StatsError(f"{path}: truncated")
    queues = []
    for i in range(nq):
        off = HEADER_SIZE + stride * i
        s = ffi.cast("struct bs_queue_stats *",
                     ffi.from_buffer(data[off:off + qsize].ljust(QSIZE, b"\0")))
        queues.append(QueueStats(
            op_status=[list(s.op_status[o]) for o in range(len(OPS))],
            op_bytes=list(s.op_bytes), op_lat_sum_ns=list(s.op_lat_sum_ns),
            op_lat_hist=[list(s.op_lat_hist[o]) for o in range(len(OPS))],
            inflight=int(s.inflight), bad_chains=int(s.bad_chains),
            io_errors=int(s.io_errors), kicks=int(s.kicks), notifies=int(s.notifies),
            broken=bool(s.broken), throttled=int(s.throttled),
            throttle_wait_ns=int(s.throttle_wait_ns),
            throttle_wait_hist=list(s.throttle_wait_hist),
            polls=int(s.polls), poll_hits=int(s.poll_hits), poll_ns=int(s.poll_ns)))
    return Snapshot(pid, capacity, started, queues)
