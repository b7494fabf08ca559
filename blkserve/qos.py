"""QoS limits: their names, their parsing and validation, and the shared
block (struct bs_qos) the engine takes each request's cost from.

A volume's limits, and a group's, live in a small file every process
concerned maps shared: the export worker (whose engine reads the limits
and updates the token buckets with atomic operations for every request)
and the control plane (which writes new limits there, so they apply to a
running export at once, and reads the counters for /metrics).  A group's
file is mapped by each member volume's worker, so the group's limit holds
for all of them together.

Semantics (native/blkserve_native.h, struct bs_qos, has the arithmetic):

- `iops_total`, `iops_read`, `iops_write`: requests per second;
  `bps_total`, `bps_read`, `bps_write`: data bytes per second.
  Reads count in *_total and *_read, writes in *_total and *_write;
  DISCARD and WRITE_ZEROES count as writes for the iops limits and not at
  all for the bandwidth ones (they move no data); FLUSH and GET_ID are never
  held.
- Without a burst a volume may run ahead of a rate by 100 ms worth of it
  (iops_total=5000 lets 500 requests through at once after an idle spell,
  as QEMU's default bucket does); over T seconds it gets at most
  rate * (T + 0.1).
- `X_max` (a rate above X) and `X_max_length` (seconds, default 1): after
  running below X long enough, the volume may run at up to X_max for
  X_max_length seconds before it is cut back to X; the credit refills at
  the rate the volume leaves unused.  As QEMU's `*-max` and `*-max-length`.
- A request larger than the bucket (a 4 MiB write under bps_write=1M) is
  started once the bucket is level; the debt it leaves delays the next ones.
- A queue out of budget stops taking requests from its ring (the guest sees
  back-pressure, nothing is buffered) and starts the held request when the
  budget is due.  A changed limit applies within 20 ms; debt owed under the
  old limit is forgiven.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass

from blkserve._native import ffi, lib
from blkserve.sizes import parse_size

KINDS = ("iops_total", "iops_read", "iops_write", "bps_total", "bps_read", "bps_write")
MAX_RATE = 1 << 50
MAX_BURST_SECONDS = 3600
BLOCK_SIZE = ffi.sizeof("struct bs_qos")
MAGIC = 0x534F5142
GROUP_NAME_BYTES = 63
GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class QosError(ValueError):
    """An invalid limit: the message is one line for a 422 or exit code 2."""


@dataclass(frozen=True)
class Limit:
    rate: int
    burst: int = 0              # X_max: 0 none
    burst_seconds: float = 0.0  # X_max_length


Limits = dict[str, Limit]


def _rate(key: str, value) -> int:
    if isinstance(value, bool):
        raise QosError(f"{key}: a rate is a number, not {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        try:
            n = int(value.strip()) if value.strip().lstrip("-").isdigit() else parse_size(value)
        except ValueError as e:
            raise QosError(f"{key}: {e}") from None
    else:
        raise QosError(f"{key}: a rate is an integer or a size string, not {value!r}")
    if n <= 0:
        raise QosError(f"{key}: the rate must be above 0 (got {n}); leave the key out for "
                       "no limit")
    if n > MAX_RATE:
        raise QosError(f"{key}: {n} is above the largest rate ({MAX_RATE})")
    return n


def _seconds(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise QosError(f"{key}: a length in seconds, not {value!r}")
    try:
        s = float(value)
    except ValueError:
        raise QosError(f"{key}: a length in seconds, not {value!r}") from None
    if not 0.001 <= s <= MAX_BURST_SECONDS:
        raise QosError(f"{key}: must be between 0.001 and {MAX_BURST_SECONDS} seconds")
    return s


def from_flat(flat: dict) -> Limits:
    """{"iops_total": 5000, "iops_total_max": 8000, "iops_total_max_length": 2,
    "bps_write": "20M"} -> Limits; unknown keys, non-positive rates, a burst
    without its rate or not above it are refused (QosError)."""
    known = set(KINDS) | {f"{k}_max" for k in KINDS} | {f"{k}_max_length" for k in KINDS}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise QosError(f"unknown QoS key {unknown[0]!r}; known: {', '.join(KINDS)} "
                       "and each with _max and _max_length")
    out: Limits = {}
    for k in KINDS:
        has_max, has_len = f"{k}_max" in flat, f"{k}_max_length" in flat
        if k not in flat:
            if has_max or has_len:
                raise QosError(f"{k}_max{'_length' if not has_max else ''} needs {k} "
                               "(the rate the burst goes back to)")
            continue
        rate = _rate(k, flat[k])
        burst, length = 0, 0.0
        if has_len and not has_max:
            raise QosError(f"{k}_max_length needs {k}_max")
        if has_max:
            burst = _rate(f"{k}_max", flat[f"{k}_max"])
            if burst <= rate:
                raise QosError(f"{k}_max ({burst}) must be above {k} ({rate})")
            length = _seconds(f"{k}_max_length", flat[f"{k}_max_length"]) if has_len else 1.0
        out[k] = Limit(rate, burst, length)
    return out


def parse_spec(spec: str) -> Limits:
    """`--qos iops_total=5000,bps_write=20M[,...]` (K/M/G: powers of 1024)."""
    flat: dict[str, str] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not value.strip():
            raise QosError(f"{item!r} is not KEY=VALUE")
        key = key.strip()
        if key in flat:
            raise QosError(f"{key} is given twice")
        flat[key] = value.strip()
    if not flat:
        raise QosError("no limit given")
    return from_flat(flat)


def to_flat(limits: Limits) -> dict[str, int | float]:
    out: dict[str, int | float] = {}
    for k, lim in limits.items():
        out[k] = lim.rate
        if lim.burst:
            out[f"{k}_max"] = lim.burst
            out[f"{k}_max_length"] = lim.burst_seconds
    return out


class QosBlock:
    """One struct bs_qos, in a shared file (path) or anonymous shared memory
    (path None: a standalone export's own limits)."""

    def __init__(self, path: str | None = None, create: bool = True):
        self.path = path
        if path is None:
            self._map = mmap.mmap(-1, BLOCK_SIZE, mmap.MAP_SHARED)
        else:
            flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
            fd = os.open(path, flags, 0o600)
            try:
                st = os.fstat(fd)
                if not (st.st_mode & 0o170000) == 0o100000:
                    raise OSError(22, f"{path} is not a regular file")
                if st.st_size < BLOCK_SIZE:
                    os.ftruncate(fd, BLOCK_SIZE)
                self._map = mmap.mmap(fd, BLOCK_SIZE, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        self.ptr = ffi.cast("struct bs_qos *", ffi.from_buffer(self._map))
        # bucket states are CLOCK_MONOTONIC times, which start again at 0 when
        # the host boots: a file kept across a reboot would hold its volume
        # for as long as the last boot lasted.  Each open starts them at now
        # (forgiving at most one bucket's debt).
        lib.bs_qos_rebase(self.ptr, -1)

    def apply(self, limits: Limits) -> None:
        """Write LIMITS (kinds not in it: no limit) for the engine to use
        from its next request on."""
        for i, k in enumerate(KINDS):
            lim = limits.get(k)
            slot = self.ptr.lim[i]
            new = (lim.rate, lim.burst, round(lim.burst_seconds * 1000)) if lim else (0, 0, 0)
            if (slot.rate, slot.burst_rate, slot.burst_ms) == new:
                continue
            # the rate last: a burst is never read against a stale rate of 0
            slot.burst_rate, slot.burst_ms = new[1], new[2]
            slot.rate = new[0]
            lib.bs_qos_rebase(self.ptr, i)

    def limits(self) -> Limits:
        out: Limits = {}
        for i, k in enumerate(KINDS):
            slot = self.ptr.lim[i]
            if slot.rate:
                burst = slot.burst_rate if slot.burst_rate > slot.rate and slot.burst_ms else 0
                out[k] = Limit(int(slot.rate), int(burst),
                               slot.burst_ms / 1000 if burst else 0.0)
        return out

    @property
    def group(self) -> str:
        return ffi.string(self.ptr.group).decode(errors="replace")

    @group.setter
    def group(self, name: str | None) -> None:
        raw = (name or "").encode()[:GROUP_NAME_BYTES]
        self.ptr.group = raw + b"\0" * (64 - len(raw))

    def counters(self) -> tuple[int, int, list[int]]:
        """(throttled requests, ns they waited, log2-ns wait histogram)."""
        p = self.ptr
        return int(p.throttled), int(p.wait_ns), [int(x) for x in p.wait_hist]

    def close(self) -> None:
        # the engine may still read it: only the control plane's own maps
        # (never handed to a target) are closed
        self.ptr = None
        self._map.close()


def group_path(qos_dir: str, group: str) -> str:
    """Where a group's block lives: in groups/ of the directory holding the
    volume blocks (blkserve serve's STATE_DIR/qos)."""
    return os.path.join(qos_dir, "groups", f"{group}.qos")
