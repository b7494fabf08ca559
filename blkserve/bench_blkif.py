"""`blkserve bench-blkif`: the Xen blkif transport measured without Xen.

The engine serves BACKING (a file, a block device or null:SIZE) from its own
thread, as `blkserve export --xen-domain` does, while a blkfront written in C
(native/bench_blkif.c) drives the shared ring from this process: the guest's
pages are a memfd, the grant table and event channel stand-ins over it, and
persistent grants (as Linux's blkfront negotiates them) make each data page
mapped once.  What remains is the transport's own work per request, to set
beside `blkserve bench` against `blkserve export` (virtio) on the same file
and core.  Write workloads overwrite BACKING's data.

Exit status: 0 success, 1 a request failed, 2 bad arguments or backing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from blkserve.bench import (
    _int_range,
    _nonneg_float,
    _positive_float,
    _size,
    _stats_dict,
    errors_in_one_line,
)
from blkserve.export import ExportError, ExportOptions, is_path, open_target

PROG = "blkserve bench-blkif"
RW = {"randread": 2, "randwrite": 3, "randrw": 4}   # enum bs_bench_rw
MAX_DEPTH = 32          # one ring page
MAX_BS = 11 * 4096      # BLKIF_MAX_SEGMENTS_PER_REQUEST pages


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench-blkif",
        help="measure the Xen blkif transport without Xen (an in-process blkfront)",
        description=__doc__.split("\n\n")[1].replace("\n", " "),
    )
    p.add_argument("backing", metavar="BACKING",
                   help="regular file, block device or null:SIZE (written to by write "
                        "workloads)")
    p.add_argument("--rw", choices=tuple(RW), default="randread")
    p.add_argument("--rwmixread", type=_int_range(0, 100), default=50, metavar="PCT",
                   help="randrw: percentage of reads (default: 50)")
    p.add_argument("--bs", type=_size, default=4096, metavar="SIZE",
                   help="bytes per request, a multiple of 512, at most 44 KiB (default: 4k)")
    p.add_argument("--iodepth", type=_int_range(1, MAX_DEPTH), default=32, metavar="N",
                   help="requests in flight, at most 32: one ring page (default: 32)")
    p.add_argument("--runtime", type=_positive_float, default=10.0, metavar="SECONDS")
    p.add_argument("--ramp", type=_nonneg_float, default=0.0, metavar="SECONDS")
    p.add_argument("--size", type=_size, default=0, metavar="BYTES",
                   help="use only the first BYTES of the backing (default: all of it)")
    p.add_argument("--poll-us", type=_nonneg_float, default=50.0, metavar="US",
                   help="the frontend polls the response ring this long before sleeping "
                        "on its event channel (default: 50)")
    p.add_argument("--cache", choices=("none", "writeback"), default="none",
                   help="as blkserve export --cache (default: none, O_DIRECT)")
    p.add_argument("--io-engine", choices=("auto", "io_uring", "sync"), default="auto",
                   help="as blkserve export --io-engine")
    p.add_argument("--frontend-cpu", type=int, default=-1, metavar="CPU",
                   help="pin the frontend to this CPU (default: not pinned)")
    p.add_argument("--backend-cpu", type=int, default=-1, metavar="CPU",
                   help="pin the engine thread to this CPU (default: not pinned)")
    p.add_argument("--seed", type=_int_range(0, 2**64 - 1), default=0, metavar="N")
    p.add_argument("--timeout", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="fail when no response comes for this long (default: 30)")
    p.add_argument("--json", action="store_true",
                   help="print exactly one JSON object instead of text")

    errors_in_one_line(p, PROG)
    p.set_defaults(func=_cli)
    return p


def run(args: argparse.Namespace) -> dict:
    from blkserve._native import ffi, lib

    if args.bs % 512 or args.bs > MAX_BS:
        raise ExportError(f"--bs must be a multiple of 512 and at most {MAX_BS}")
    ncpu = os.cpu_count() or 1
    for opt in ("frontend_cpu", "backend_cpu"):
        if not -1 <= getattr(args, opt) < ncpu:
            raise ExportError(f"--{opt.replace('_', '-')} must be -1 or a CPU below {ncpu}")
    backing = args.backing if not is_path(args.backing) else os.path.realpath(args.backing)
    target, opened = open_target(ExportOptions(
        backing=backing, socket=None, queues=1, cache=args.cache, io_engine=args.io_engine))
    try:
        cfg = ffi.new("struct bs_bench_blkif_cfg *")
        cfg.rw = RW[args.rw]
        cfg.rwmix_read = args.rwmixread
        cfg.bs = args.bs
        cfg.iodepth = args.iodepth
        cfg.size = args.size
        cfg.runtime_ns = int(args.runtime * 1e9)
        cfg.ramp_ns = int(args.ramp * 1e9)
        cfg.poll_ns = int(args.poll_us * 1000)
        cfg.timeout_ns = int(args.timeout * 1e9)
        cfg.seed = args.seed
        cfg.frontend_cpu = args.frontend_cpu
        cfg.backend_cpu = args.backend_cpu
        out = ffi.new("struct bs_bench_blkif_result *")
        ret = lib.bs_bench_blkif(target.handle, cfg, out)
        if ret < 0:
            raise ExportError(f"the run failed: {os.strerror(-ret)}")
        result = {"transport": "blkif", "backing": args.backing, "rw": args.rw,
                  "bs": args.bs, "iodepth": args.iodepth, "queues": 1,
                  **_stats_dict(out.stats),
                  "sync_io": bool(target.config.sync_io)}
        cpu_s = out.backend_cpu_ns / 1e9
        result["backend_cpu_s"] = round(cpu_s, 6)
        result["cpu_s_per_mreq"] = (round(cpu_s / (out.stats.ios / 1e6), 4)
                                    if out.stats.ios else None)
        return result
    finally:
        target.close()
        opened.close()


def _cli(args: argparse.Namespace) -> int:
    try:
        r = run(args)
    except ExportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
    else:
        lat = r["lat_ns"]
        print(f"{r['rw']} over blkif: bs={r['bs']} iodepth={r['iodepth']} "
              f"runtime={r['runtime_s']:.2f}s backing={r['backing']}"
              f"{' (sync engine)' if r['sync_io'] else ''}\n"
              f"  iops    : {r['iops']:.0f}  (reads {r['read_ios']}, writes {r['write_ios']})\n"
              f"  lat (us): mean {lat['mean'] / 1000:.1f}  p50 {lat['p50'] / 1000:.1f}  "
              f"p99 {lat['p99'] / 1000:.1f}  max {lat['max'] / 1000:.1f}\n"
              f"  backend : {r['backend_cpu_s']:.3f} s CPU, "
              f"{r['cpu_s_per_mreq'] or 0:.3f} s per million requests\n"
              f"  errors  : {r['errors']}  notify: kicks {r['kicks']}  calls {r['calls']}")
    return 1 if r["errors"] else 0
