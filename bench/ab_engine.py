#!/usr/bin/env python3
"""A/B two builds of the engine on the same workload (not part of make test).

    .venv/bin/python bench/ab_engine.py --base REV [--rounds 5] [--trace]

Builds the engine of git revision REV in a temporary worktree, then runs
`blkserve export` of REV and of the working tree alternately (A B A B ...)
on one RAM-backed file (/dev/shm), backend pinned to CPU 0 and the C bench
frontend to CPU 1: 4k randread, QD 32, one queue.  Prints median IOPS and
backend CPU microseconds per request for both, and their ratio.  --trace also
runs the working tree with `blkserve trace` attached (the cost of tracing);
--dirty-log also runs it with the frontend's dirty log on (`blkserve bench
--dirty-log`: every page the backend writes is marked, as during a live
migration).  --qos also runs it under a QoS limit far above what the run
reaches (`--qos iops_total=100000000`): the cost of the budget check itself,
every request asking the token bucket and never waiting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = str(REPO / ".venv" / "bin" / "python")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def run_once(tree: Path, img: str, sock: str, runtime: float, trace: bool,
             dirty_log: bool = False, qos: bool = False) -> tuple[float, float]:
    exp = subprocess.Popen(["taskset", "-c", "0", PY, "-m", "blkserve", "export", img,
                            "--socket", sock,
                            *(["--qos", "iops_total=100000000"] if qos else [])],
                           cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tracer = None
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        if trace:
            tracer = subprocess.Popen([PY, "-m", "blkserve", "trace", "--duration",
                                       str(runtime + 30)], cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(6)  # compile and attach
        t0 = cpu_ticks(exp.pid)
        out = subprocess.run(["taskset", "-c", "1", PY, "-m", "blkserve", "bench", "--socket",
                              sock, "--rw", "randread", "--iodepth", "32", "--runtime",
                              str(runtime), "--ramp", "0.5", "--json",
                              *(["--dirty-log"] if dirty_log else [])], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
        ticks = cpu_ticks(exp.pid) - t0
        r = json.loads(out.strip().splitlines()[0])
        ios = r["ios"]
        cpu_us = ticks * 1e6 / os.sysconf("SC_CLK_TCK") / max(ios, 1)
        return r["iops"], cpu_us
    finally:
        if tracer:
            tracer.terminate()
            tracer.wait()
        exp.terminate()
        exp.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--dirty-log", action="store_true")
    ap.add_argument("--qos", action="store_true")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bs-ab-"))
    base = work / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(base), a.base],
                   check=True, capture_output=True)
    try:
        # built in a scratch directory: cffi reads the packaging metadata of
        # the directory it builds in, and an old tree's may not suit today's
        # setuptools
        scratch = work / "build"
        scratch.mkdir()
        subprocess.run([PY, str(base / "blkserve" / "_native_build.py"), str(scratch)],
                       cwd=scratch, check=True, capture_output=True)
        for so in (scratch / "blkserve").glob("_native*.so"):
            shutil.copy(so, base / "blkserve" / so.name)
        img = "/dev/shm/bs-ab.img"
        with open(img, "wb") as f:
            f.truncate(256 << 20)
        systems = {"base": (base, False, False, False), "head": (REPO, False, False, False)}
        if a.trace:
            systems["head+trace"] = (REPO, True, False, False)
        if a.dirty_log:
            systems["head+log"] = (REPO, False, True, False)
        if a.qos:
            systems["head+qos"] = (REPO, False, False, True)
        res: dict[str, list[tuple[float, float]]] = {k: [] for k in systems}
        for rnd in range(a.rounds):
            for name, (tree, trace, dirty_log, qos) in systems.items():
                res[name].append(run_once(tree, img, str(work / f"{name}.sock"), a.runtime,
                                          trace, dirty_log, qos))
                print(f"round {rnd + 1} {name}: {res[name][-1][0]:.0f} IOPS, "
                      f"{res[name][-1][1]:.2f} us CPU/req", file=sys.stderr)
        med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
               for k, v in res.items()}
        print(f"{'system':<12} {'IOPS (median)':>14} {'CPU us/req':>11} {'IOPS vs base':>13}")
        for k, (iops, cpu) in med.items():
            print(f"{k:<12} {iops:>14.0f} {cpu:>11.2f} {iops / med['base'][0]:>12.3f}x")
        os.unlink(img)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base)],
                       capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
