"""`blkserve trace`: eBPF (bcc) latency histograms and per-stage breakdowns of
the requests blkserve export workers serve, from the engine's USDT probes and
the io_uring and block tracepoints (ebpf/blkserve.bpf.c).  Needs root, BTF-
less bcc with kernel headers (make setup), no kprobes."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

# ebpf/ installs as blkserve.ebpf (package data): found in a checkout and in
# an installed package alike
BPF_SOURCE = Path(str(resources.files("blkserve.ebpf").joinpath("blkserve.bpf.c")))
OPS = ("read", "write", "flush", "discard", "write_zeroes", "get_id", "other")
STAGES = ("kick->pop", "pop->submit", "submit->complete", "complete->used", "used->notify")
MAX_DURATION_S = 300
NSLOTS = 32        # as in ebpf/blkserve.bpf.c
MAX_WORKERS = 64
MAX_DEVS = 16


class TraceError(Exception):
    pass


def import_bcc():
    """bcc is Debian's python3-bpfcc (not on PyPI): import it from the
    distribution's site directory when the venv does not have it."""
    try:
        import bcc
    except ImportError:
        dist = "/usr/lib/python3/dist-packages"
        if dist not in sys.path and os.path.isdir(os.path.join(dist, "bcc")):
            sys.path.append(dist)
        try:
            import bcc
        except ImportError as e:
            raise TraceError("bcc is not installed (Debian package python3-bpfcc; "
                             "make setup installs it)") from e
    return bcc


@dataclass
class Worker:
    pid: int
    volume: str
    native_lib: str | None = None
    block_dev: int | None = None      # kernel dev_t (major << 20 | minor)
    block_name: str | None = None


def _arg_after(argv: list[str], flag: str) -> str | None:
    try:
        return argv[argv.index(flag) + 1]
    except (ValueError, IndexError):
        return None


def _kernel_dev(rdev: int) -> int:
    return os.major(rdev) << 20 | os.minor(rdev)


def describe_worker(pid: int, volume: str | None = None) -> Worker | None:
    """A running `blkserve export` process, or None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if "export" not in argv or not any("blkserve" in a for a in argv):
        return None
    i = argv.index("export")
    backing = argv[i + 1] if i + 1 < len(argv) else ""
    if volume is None:
        stats_file = _arg_after(argv, "--stats-file")
        volume = (Path(stats_file).name.removesuffix(".stats") if stats_file
                  else _arg_after(argv, "--serial")
                  or Path(_arg_after(argv, "--socket") or f"pid{pid}").stem)
    w = Worker(pid, volume)
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                m = re.search(r"(/\S*_native\S*\.so)$", line.strip())
                if m:
                    w.native_lib = m.group(1)
                    break
    except OSError:
        return None
    try:
        st = os.stat(backing)
        if stat.S_ISBLK(st.st_mode):
            w.block_dev = _kernel_dev(st.st_rdev)
            w.block_name = os.path.basename(os.path.realpath(backing))
    except OSError:
        pass
    return w


def find_workers() -> list[Worker]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != os.getpid():
            w = describe_worker(int(d))
            if w is not None:
                out.append(w)
    return sorted(out, key=lambda w: (w.volume, w.pid))


def _hist_rows(counts: dict[int, int]) -> list[dict]:
    """log2 slots (slot s = [2^(s-1), 2^s) us; slot 0 = below 1 us) as rows
    from the first to the last nonzero slot."""
    if not counts or not any(counts.values()):
        return []
    lo = min(s for s, c in counts.items() if c)
    hi = max(s for s, c in counts.items() if c)
    rows = []
    for s in range(lo, hi + 1):
        low = 0 if s == 0 else 1 << (s - 1)
        rows.append({"low_us": low, "high_us": (1 << s) - 1 if s else 0,
                     "count": counts.get(s, 0)})
    return rows


def _summary(rows: list[dict]) -> dict:
    total = sum(r["count"] for r in rows)
    out = {"count": total, "buckets": rows}
    if total:
        for q in (50, 99):
            need, acc = total * q / 100, 0
            for r in rows:
                acc += r["count"]
                if acc >= need:
                    out[f"p{q}_us_upper"] = r["high_us"] + 1
                    break
    return out


@dataclass
class Tracer:
    workers: list[Worker]
    breakdown: bool = False
    block: bool = True
    _bpf: object = field(default=None, repr=False)
    _devs: list[int] = field(default_factory=list, repr=False)
    not_traced: list[Worker] = field(default_factory=list)

    def start(self) -> None:
        if os.geteuid() != 0:
            raise TraceError("tracing needs root (BPF and uprobes)")
        if not self.workers:
            raise TraceError("no blkserve export worker is running")
        self.workers = self.workers[:MAX_WORKERS]
        bcc = import_bcc()
        if not os.path.isdir("/sys/kernel/tracing/events"):
            raise TraceError("tracefs is not mounted on /sys/kernel/tracing "
                             "(mount -t tracefs nodev /sys/kernel/tracing)")
        libs = sorted({w.native_lib for w in self.workers if w.native_lib})
        if not libs:
            raise TraceError("the workers have no blkserve engine library mapped")
        if len(libs) > 1:
            # Workers of two installs (or of an upgraded one still running
            # the old library): bcc names each USDT argument reader after
            # its probe function, so one program can serve one library.
            # Trace the library most workers run; name the others.
            lib = max(libs, key=lambda p: sum(w.native_lib == p for w in self.workers))
            self.not_traced = [w for w in self.workers if w.native_lib != lib]
            self.workers = [w for w in self.workers if w.native_lib == lib]
            libs = [lib]
        # the workers' pids are this process's view: the programs compare
        # them in this pid namespace (a container's differs from the kernel's)
        ns = os.stat("/proc/self/ns/pid")
        cflags = ["-Wno-visibility", f"-DPIDNS_DEV={ns.st_dev}ULL", f"-DPIDNS_INO={ns.st_ino}ULL"]
        if self.breakdown:
            cflags.append("-DBREAKDOWN")
        devs = {w.block_dev for w in self.workers if w.block_dev is not None}
        if self.block and devs:
            cflags.append("-DBLOCK")
        contexts = []
        for lib in libs:
            u = bcc.USDT(path=lib)
            u.enable_probe(probe="request_done", fn_name="on_request_done")
            if self.breakdown:
                u.enable_probe(probe="request_start", fn_name="on_request_start")
                u.enable_probe(probe="notify", fn_name="on_notify")
                try:   # RBD requests (an engine from before RBD has no such probes)
                    u.enable_probe(probe="rbd_submit", fn_name="on_rbd_submit")
                    u.enable_probe(probe="rbd_complete", fn_name="on_rbd_complete")
                    cflags.append("-DRBD")
                except Exception:  # noqa: BLE001 - bcc raises bare Exceptions
                    pass
            contexts.append(u)
        try:
            self._bpf = bcc.BPF(src_file=str(BPF_SOURCE), cflags=cflags,
                                usdt_contexts=contexts)
        except Exception as e:  # bcc raises bare Exceptions
            raise TraceError(f"cannot load the BPF programs: {e}") from None
        ct = self._bpf.get_table("workers")
        for i, w in enumerate(self.workers):
            ct[ct.Key(w.pid)] = ct.Leaf(i)
        self._devs = sorted(devs)[:MAX_DEVS]
        if self.block and devs:
            bt = self._bpf.get_table("block_devs")
            for i, d in enumerate(self._devs):
                bt[bt.Key(d)] = bt.Leaf(i)

    def _read_array(self, name: str, groups: int) -> list[list[dict[int, int]]]:
        """A per-CPU histogram array as [row][group] -> {slot: count}."""
        out: list[list[dict[int, int]]] = []
        for k, v in self._bpf.get_table(name).items():
            total = sum(int(x) for x in v)
            if not total:
                continue
            row, rest = divmod(k.value, groups * NSLOTS)
            group, slot = divmod(rest, NSLOTS)
            while len(out) <= row:
                out.append([{} for _ in range(groups)])
            out[row][group][slot] = total
        return out

    def collect(self, duration: float) -> dict:
        t0 = time.monotonic()
        time.sleep(duration)
        # every probe counts only processes (and block devices) in these
        # tables: emptied, the histograms stop changing, and the tables read
        # one after the other below describe the same moment
        self._bpf.get_table("workers").clear()
        if self.block and self._devs:
            self._bpf.get_table("block_devs").clear()
        elapsed = time.monotonic() - t0
        result: dict = {"duration_s": round(elapsed, 3), "volumes": {}}
        if self.not_traced:
            result["not_traced"] = [
                {"volume": w.volume, "pid": w.pid, "engine_library": w.native_lib,
                 "why": "runs another engine library than the traced workers; "
                        "trace it on its own with its volume"} for w in self.not_traced]
        for w in self.workers:
            result["volumes"].setdefault(w.volume, {"pids": [], "latency": {}})
            result["volumes"][w.volume]["pids"].append(w.pid)

        def merged(rows, i_worker_groups, names):
            per_vol: dict[str, dict[str, dict[int, int]]] = {}
            for wi, groups in enumerate(rows):
                if wi >= len(self.workers):
                    break
                vol = self.workers[wi].volume
                for g, counts in enumerate(groups):
                    if counts:
                        acc = per_vol.setdefault(vol, {}).setdefault(names[g], {})
                        for slot, c in counts.items():
                            acc[slot] = acc.get(slot, 0) + c
            return per_vol

        lat = merged(self._read_array("lat_hist", len(OPS)), len(OPS), OPS)
        for vol, ops in lat.items():
            result["volumes"][vol]["latency"] = {
                op: _summary(_hist_rows(ops[op])) for op in OPS if op in ops}
        if self.breakdown:
            stages = merged(self._read_array("stage_hist", len(STAGES)), len(STAGES), STAGES)
            for vol in result["volumes"]:
                st = stages.get(vol, {})
                result["volumes"][vol]["breakdown"] = {
                    s: _summary(_hist_rows(st.get(s, {}))) for s in STAGES}
        if self.block and self._devs:
            names = {w.block_dev: w.block_name for w in self.workers if w.block_dev}
            rows = self._read_array("blk_hist", 1)
            result["block_devices"] = {}
            for i, d in enumerate(self._devs):
                counts = rows[i][0] if i < len(rows) else {}
                result["block_devices"][names.get(d, str(d))] = _summary(_hist_rows(counts))
        return result

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None


def run_trace(workers: list[Worker], duration: float, breakdown: bool) -> dict:
    if not 0 < duration <= MAX_DURATION_S:
        raise TraceError(f"duration must be more than 0 and at most {MAX_DURATION_S} s")
    tracer = Tracer(workers, breakdown=breakdown)
    tracer.start()
    try:
        return tracer.collect(duration)
    finally:
        tracer.close()


# -- text output -------------------------------------------------------------

def _print_hist(title: str, summary: dict, out) -> None:
    rows = summary["buckets"]
    print(title, file=out)
    if not rows:
        print("     (no requests)", file=out)
        return
    peak = max(r["count"] for r in rows) or 1
    print(f"{'usecs':>21} : {'count':<8} {'distribution':<40}", file=out)
    for r in rows:
        bar = "*" * (r["count"] * 40 // peak)
        print(f"{r['low_us']:>10} -> {r['high_us']:<8}: {r['count']:<8} |{bar:<40}|",
              file=out)


def print_result(result: dict, out=sys.stdout) -> None:
    print(f"traced for {result['duration_s']} s", file=out)
    for w in result.get("not_traced", []):
        print(f"not traced: volume {w['volume']} (pid {w['pid']}) runs another engine "
              f"library ({w['engine_library']}); trace it with --volume {w['volume']}",
              file=out)
    for vol, entry in sorted(result["volumes"].items()):
        if not entry["latency"]:
            print(f"\nvolume {vol}: no requests", file=out)
        for op, summary in entry["latency"].items():
            print(file=out)
            _print_hist(f"volume {vol}, op {op}: {summary['count']} requests, "
                        "descriptor pop -> used-ring entry", summary, out)
        if "breakdown" in entry:
            print(f"\nvolume {vol}: where the time goes (per stage)", file=out)
            print(f"  {'stage':<18} {'count':>9} {'p50 <= us':>10} {'p99 <= us':>10}",
                  file=out)
            for s, summary in entry["breakdown"].items():
                print(f"  {s:<18} {summary['count']:>9} "
                      f"{summary.get('p50_us_upper', '-'):>10} "
                      f"{summary.get('p99_us_upper', '-'):>10}", file=out)
            for s, summary in entry["breakdown"].items():
                if summary["count"]:
                    print(file=out)
                    _print_hist(f"volume {vol}, stage {s}", summary, out)
    for dev, summary in result.get("block_devices", {}).items():
        print(file=out)
        _print_hist(f"block device {dev}: block_rq_issue -> block_rq_complete", summary, out)


# -- CLI -----------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser(
        "trace",
        help="eBPF latency histograms (and a per-stage breakdown) of running exports",
        description=(
            "Trace the requests served by running `blkserve export` workers with eBPF "
            "(bcc): per volume and op, a log2 histogram of the time from descriptor pop "
            "to used-ring entry, aggregated in the kernel; with --breakdown, the time of "
            "each stage (guest kick -> pop -> io_uring submit -> completion -> used "
            "entry -> guest notify); for block-device backings, block-layer time. "
            "Needs root. The volume of a worker is its --stats-file name (as "
            "`blkserve serve` starts them), else its --serial."),
    )
    p.add_argument("--volume", metavar="NAME", help="only this volume (default: all)")
    p.add_argument("--duration", type=float, default=5.0, metavar="S",
                   help=f"seconds to trace (default 5, at most {MAX_DURATION_S})")
    p.add_argument("--breakdown", action="store_true",
                   help="also measure each stage of a request's life")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    workers = find_workers()
    if args.volume:
        workers = [w for w in workers if w.volume == args.volume]
        if not workers:
            print(f"blkserve trace: error: no running export of volume {args.volume!r}",
                  file=sys.stderr)
            return 1
    try:
        result = run_trace(workers, args.duration, args.breakdown)
    except TraceError as e:
        print(f"blkserve trace: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_result(result)
    return 0
