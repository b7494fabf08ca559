"""`blkserve bench`: a vhost-user-blk frontend load generator.

The frontend itself is C (native/bench.c, reached through blkserve._native):
it owns the "guest RAM", negotiates with the backend over the unix socket and
runs one thread per virtqueue with `iodepth` requests in flight.  This module
only parses arguments, runs it in a helper thread (so Ctrl-C stops the run
cleanly instead of killing it) and prints the result, as text or as one JSON
object.

Exit status: 0 success, 1 a request failed / verify mismatch / the backend
misbehaved, 2 bad arguments or no backend at the socket, 130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import threading
from dataclasses import dataclass

from blkserve.sizes import parse_size

PROG = "blkserve bench"
RW_MODES = ("read", "write", "randread", "randwrite", "randrw")
MAX_BS = 8 << 20
MAX_DEPTH = 1024
MAX_QUEUES = 64
# Backend errors that mean "these arguments do not fit this device".
_USAGE_ERRNOS = {errno.EINVAL, errno.EROFS, errno.E2BIG, errno.ENAMETOOLONG}


class BenchError(Exception):
    """A failure with a sentence for the user and the exit status to use."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return v


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be zero or a positive number")
    return v


def _int_range(lo: int, hi: int):
    def conv(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is not in {lo}..{hi}")
        return v
    return conv


def _parse_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _block_size(text: str) -> int:
    v = _parse_size(text)
    if v < 512 or v % 512 or v > MAX_BS:
        raise argparse.ArgumentTypeError(
            f"block size {text} must be a multiple of 512 bytes, at most {MAX_BS >> 20}M")
    return v


def _size(text: str) -> int:
    v = _parse_size(text)
    if v == 0 or v % 512:
        raise argparse.ArgumentTypeError(f"size {text} must be a positive multiple of 512")
    return v


@dataclass
class BenchOptions:
    socket: str
    rw: str = "randread"
    bs: int = 4096
    iodepth: int = 32
    queues: int = 1
    runtime: float = 10.0
    ramp: float = 0.0
    size: int = 0
    verify: bool = False
    rwmixread: int = 50
    poll_us: float = 50.0
    indirect: bool = False
    dirty_log: bool = False
    seed: int = 0
    timeout: float = 30.0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register the `bench` subcommand on the CLI's subparsers."""
    p = sub.add_parser(
        "bench",
        help="measure a vhost-user-blk backend with a built-in frontend",
        description=(
            "Connect to a vhost-user-blk backend's unix socket as the frontend "
            "(the part QEMU and the guest play), keep IODEPTH requests in flight on "
            "each of QUEUES virtqueues for RUNTIME seconds and report IOPS, bandwidth "
            "and latency percentiles.  Works with any vhost-user-blk backend "
            "(blkserve export, qemu-storage-daemon, ...).  Write workloads and "
            "--verify overwrite the device's data.  Exit status: 0 ok, 1 request "
            "errors or backend failure, 2 bad arguments or no backend."
        ),
    )
    p.add_argument("--socket", required=True, metavar="PATH",
                   help="unix socket of the vhost-user-blk backend")
    p.add_argument("--rw", choices=RW_MODES, default="randread",
                   help="workload (default: randread); randrw mixes per --rwmixread")
    p.add_argument("--bs", type=_block_size, default=4096, metavar="SIZE",
                   help="bytes per request, a multiple of 512 (default: 4k)")
    p.add_argument("--iodepth", type=_int_range(1, MAX_DEPTH), default=32, metavar="N",
                   help="requests kept in flight per queue (default: 32)")
    p.add_argument("--queues", type=_int_range(1, MAX_QUEUES), default=1, metavar="N",
                   help="virtqueues, each driven by its own thread (default: 1)")
    p.add_argument("--runtime", type=_positive_float, default=10.0, metavar="SECONDS",
                   help="measured time (default: 10)")
    p.add_argument("--ramp", type=_nonneg_float, default=0.0, metavar="SECONDS",
                   help="unmeasured warm-up before the measured time (default: 0)")
    p.add_argument("--size", type=_size, default=0, metavar="BYTES",
                   help="use only the first BYTES of the device (default: all of it)")
    p.add_argument("--verify", action="store_true",
                   help="first write a per-sector pattern (block number + seed) over "
                        "the used range, check every read against it, and after a "
                        "workload that writes read the whole range back; mismatches "
                        "count as errors")
    p.add_argument("--rwmixread", type=_int_range(0, 100), default=50, metavar="PCT",
                   help="randrw: percentage of reads (default: 50)")
    p.add_argument("--poll-us", type=_nonneg_float, default=50.0, metavar="US",
                   help="busy-poll the used ring this long before sleeping on the "
                        "call eventfd; 0 = always sleep (default: 50)")
    p.add_argument("--indirect", action="store_true",
                   help="send each request as one indirect descriptor")
    p.add_argument("--dirty-log", action="store_true",
                   help="run as during a live migration: hand the backend a dirty "
                        "log (SET_LOG_BASE) and turn VHOST_F_LOG_ALL on, so it marks "
                        "every page it writes (the backend must offer LOG_ALL and "
                        "LOG_SHMFD)")
    p.add_argument("--seed", type=_int_range(0, 2**64 - 1), default=0, metavar="N",
                   help="random offsets and verify pattern seed (default: random)")
    p.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="fail when no request completes for this long (default: 30)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object instead of text")

    errors_in_one_line(p, PROG)
    p.set_defaults(func=_cli)
    return p


def errors_in_one_line(p: argparse.ArgumentParser, prog: str) -> None:
    """Bad arguments: one line on stderr and status 2, no usage dump."""
    def one_line_error(message: str):
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)

    p.error = one_line_error


def _cli(args: argparse.Namespace) -> int:
    opts = BenchOptions(
        socket=args.socket, rw=args.rw, bs=args.bs, iodepth=args.iodepth,
        queues=args.queues, runtime=args.runtime, ramp=args.ramp, size=args.size,
        verify=args.verify, rwmixread=args.rwmixread, poll_us=args.poll_us,
        indirect=args.indirect, dirty_log=args.dirty_log, seed=args.seed,
        timeout=args.timeout,
    )
    try:
        result = run(opts)
    except BenchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.status
    if args.json:
        print(json.dumps(result, sort_keys=False))
    else:
        print(format_text(result))
    if result["interrupted"]:
        return 130
    return 1 if result["errors"] else 0


def _check_socket(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise BenchError(f"cannot connect to {path}: {e.strerror}", 2) from None
    if not stat.S_ISSOCK(st.st_mode):
        raise BenchError(f"cannot connect to {path}: not a unix socket", 2)


def _latency(s) -> dict:
    return {
        "min": int(s.lat_min_ns), "mean": int(s.lat_mean_ns), "p50": int(s.lat_p50_ns),
        "p90": int(s.lat_p90_ns), "p99": int(s.lat_p99_ns), "p999": int(s.lat_p999_ns),
        "max": int(s.lat_max_ns),
    }


def _stats_dict(s) -> dict:
    elapsed = s.elapsed_ns / 1e9
    return {
        "iops": round(s.ios / elapsed, 1) if elapsed > 0 else 0.0,
        "bw_bytes": int(s.bytes / elapsed) if elapsed > 0 else 0,
        "ios": int(s.ios),
        "read_ios": int(s.ios_read),
        "write_ios": int(s.ios_write),
        "runtime_s": round(elapsed, 6),
        "lat_ns": _latency(s),
        "errors": int(s.errors),
        "io_errors": int(s.io_errors),
        "verify_errors": int(s.verify_errors),
        "first_bad_offset": None if s.first_bad_offset < 0 else int(s.first_bad_offset),
        "kicks": int(s.kicks),
        "calls": int(s.calls),
        "sleeps": int(s.sleeps),
        "rescue_kicks": int(s.rescue_kicks),
        "ios_all": int(s.ios_all),
        "wait_s": round(s.wait_ns / 1e9, 6),
    }


def run(opts: BenchOptions) -> dict:
    """Run one benchmark; returns the JSON-ready result.  Raises BenchError."""
    try:
        from blkserve._native import ffi, lib
    except ImportError as e:
        raise BenchError(f"the native extension is not built ({e}); run `make setup`") from None

    _check_socket(opts.socket)
    path = ffi.new("char[]", os.fsencode(opts.socket))
    cfg = ffi.new("struct bs_bench_cfg *")
    cfg.socket_path = path
    cfg.rw = RW_MODES.index(opts.rw)
    cfg.rwmix_read = opts.rwmixread
    cfg.bs = opts.bs
    cfg.iodepth = opts.iodepth
    cfg.queues = opts.queues
    cfg.verify = int(opts.verify)
    cfg.indirect = int(opts.indirect)
    cfg.dirty_log = int(opts.dirty_log)
    cfg.size = opts.size
    cfg.runtime_ns = int(opts.runtime * 1e9)
    cfg.ramp_ns = int(opts.ramp * 1e9)
    cfg.poll_ns = int(opts.poll_us * 1e3)
    cfg.timeout_ns = int(opts.timeout * 1e9)
    cfg.seed = opts.seed

    out = ffi.new("bs_bench **")
    ret = lib.bs_bench_new(cfg, out)
    h = out[0]
    if h == ffi.NULL:
        raise BenchError(f"cannot allocate the frontend: {os.strerror(-ret)}")

    def message(ret: int) -> str:
        buf = ffi.new("char[256]")
        lib.bs_bench_error(h, buf, 256)
        text = ffi.string(buf).decode(errors="replace")
        return text or os.strerror(-ret)

    try:
        if ret < 0:
            raise BenchError(message(ret), 2)
        ret = lib.bs_bench_connect(h)
        if ret < 0:
            raise BenchError(message(ret), 2)
        ret = lib.bs_bench_setup(h)
        if ret < 0:
            raise BenchError(message(ret), 2 if -ret in _USAGE_ERRNOS else 1)
        info = ffi.new("struct bs_bench_info *")
        lib.bs_bench_get_info(h, info)

        rc: list[int] = []
        worker = threading.Thread(target=lambda: rc.append(lib.bs_bench_run(h)),
                                  name="bench", daemon=True)
        interrupted = False
        worker.start()
        while worker.is_alive():
            try:
                worker.join(0.2)
            except KeyboardInterrupt:
                interrupted = True
                lib.bs_bench_stop(h)
        if rc and rc[0] < 0:
            raise BenchError(message(rc[0]), 1)

        total = ffi.new("struct bs_bench_stats *")
        lib.bs_bench_get_stats(h, -1, total)
        lib.bs_bench_get_info(h, info)  # again: the pages marked in the dirty log
        per_queue = []
        for q in range(opts.queues):
            s = ffi.new("struct bs_bench_stats *")
            lib.bs_bench_get_stats(h, q, s)
            per_queue.append(_stats_dict(s))
    finally:
        lib.bs_bench_free(h)

    result = {
        "rw": opts.rw,
        "bs": opts.bs,
        "iodepth": opts.iodepth,
        "queues": opts.queues,
        "size": int(info.size),
        "verify": opts.verify,
        **_stats_dict(total),
        "interrupted": interrupted,
        "per_queue": per_queue,
        "frontend": {
            "poll_us": opts.poll_us,
            "indirect": bool(info.indirect),
            "dirty_log": bool(info.dirty_log),
            "dirty_pages": int(info.dirty_pages),
            "event_idx": bool(info.event_idx),
            "queue_size": int(info.queue_size),
            "seed": int(info.seed),
            "ramp_s": opts.ramp,
        },
        "backend": {
            "socket": opts.socket,
            "capacity": int(info.capacity),
            "max_queues": int(info.max_queues),
            "blk_size": int(info.blk_size),
            "features": f"{info.offered_features:#x}",
            "protocol_features": f"{info.offered_protocol_features:#x}",
            "acked_features": f"{info.features:#x}",
            "acked_protocol_features": f"{info.protocol_features:#x}",
        },
    }
    if opts.rw == "randrw":
        result["rwmixread"] = opts.rwmixread
    return result


def _us(ns: int) -> str:
    return f"{ns / 1000:.1f}"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _share(r: dict) -> float:
    """Share of the run the queue threads spent waiting on the backend."""
    busy = r["runtime_s"] + r["frontend"]["ramp_s"]
    return min(100.0, 100.0 * r["wait_s"] / (busy * r["queues"])) if busy > 0 else 0.0


def format_text(r: dict) -> str:
    lat = r["lat_ns"]
    fe, be = r["frontend"], r["backend"]
    lines = [
        f"{r['rw']}: bs={_bytes(r['bs'])} iodepth={r['iodepth']} queues={r['queues']} "
        f"size={_bytes(r['size'])} runtime={r['runtime_s']:.2f}s"
        + (" verify" if r["verify"] else "") + (" (interrupted)" if r["interrupted"] else ""),
        f"  backend : {be['socket']} capacity={_bytes(be['capacity'])} "
        f"max_queues={be['max_queues']} features={be['features']} "
        f"event_idx={'yes' if fe['event_idx'] else 'no'} "
        f"indirect={'yes' if fe['indirect'] else 'no'} queue_size={fe['queue_size']}"
        + (f" dirty_log=yes ({fe['dirty_pages']} pages marked)" if fe["dirty_log"] else ""),
        f"  iops    : {r['iops']:.0f}  (reads {r['read_ios']}, writes {r['write_ios']} "
        f"in {r['ios']} requests)",
        f"  bw      : {_bytes(r['bw_bytes'])}/s",
        f"  lat (us): mean {_us(lat['mean'])}  p50 {_us(lat['p50'])}  p99 {_us(lat['p99'])}  "
        f"p99.9 {_us(lat['p999'])}  min {_us(lat['min'])}  max {_us(lat['max'])}",
        f"  errors  : {r['errors']} (io {r['io_errors']}, verify {r['verify_errors']})"
        + (f", first at byte {r['first_bad_offset']}" if r["first_bad_offset"] is not None
           else ""),
        f"  notify  : kicks {r['kicks']}  calls {r['calls']}  sleeps {r['sleeps']}  "
        f"rescue kicks {r['rescue_kicks']}  (poll {fe['poll_us']:g} us)",
        f"  frontend: waited for completions {_share(r):.0f}% of the time "
        "(near 0%: the frontend, not the backend, is the limit)",
    ]
    if r["queues"] > 1:
        for i, q in enumerate(r["per_queue"]):
            ql = q["lat_ns"]
            lines.append(f"  queue {i} : iops {q['iops']:.0f}  p50 {_us(ql['p50'])} us  "
                         f"p99 {_us(ql['p99'])} us  errors {q['errors']}")
    return "\n".join(lines)
