"""Load and soak: 16 volumes exported at once by `blkserve serve`, each
driven by its own `blkserve bench --verify` for BLKSERVE_SOAK_SECONDS (60 in
`make test`, 600 in `make soak`): zero verify or I/O errors, no worker
restarts, and the resident memory of the daemon and of every worker flat
between the warm-up and the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx

try:
    from .apiserver import REPO, ApiServer
except ImportError:
    from apiserver import REPO, ApiServer

VOLUMES = 16
SECONDS = float(os.environ.get("BLKSERVE_SOAK_SECONDS", "60"))
WARMUP = min(10.0, SECONDS / 4)
RSS_SLACK = 8 << 20  # bytes a process may grow after warm-up (allocator noise)


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_sixteen_volumes_soak():
    with ApiServer() as api:
        http = api.client()
        socks = {}
        for i in range(VOLUMES):
            name = f"soak{i:02d}"
            r = http.post("/v1/volumes", json={"name": name, "size_bytes": 32 << 20,
                                               "queues": 1 + i % 2})
            assert r.status_code == 201, r.text
            r = http.put(f"/v1/volumes/{name}/export")
            assert r.status_code == 201, r.text
            socks[name] = (r.json()["socket"], r.json()["pid"], 1 + i % 2)
        benches = {
            name: subprocess.Popen(
                [sys.executable, "-m", "blkserve", "bench", "--socket", sock, "--json",
                 "--rw", "randrw" if i % 3 else "randwrite", "--verify", "--size", "16M",
                 "--queues", str(q), "--iodepth", "4", "--runtime", str(SECONDS),
                 "--timeout", "60"],
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, (name, (sock, _, q)) in enumerate(socks.items())}
        try:
            time.sleep(WARMUP)
            pids = {"daemon": api.proc.pid, **{n: pid for n, (_, pid, _) in socks.items()}}
            before = {n: rss(p) for n, p in pids.items()}
            # scrape while the load runs, as Prometheus would
            while any(b.poll() is None for b in benches.values()):
                assert httpx.get(api.url + "/metrics", timeout=10).status_code == 200
                time.sleep(2)
            after = {n: rss(p) for n, p in pids.items()}  # workers still run
        finally:
            results = {}
            for name, b in benches.items():
                out, err = b.communicate(timeout=SECONDS + 120)
                results[name] = (b.returncode, out, err)
        for name, (rc, out, err) in results.items():
            assert rc == 0, f"{name}: bench exit {rc}: {err[-2000:]}"
            r = json.loads(out.strip().splitlines()[0])
            assert r["ios"] > 0 and r["verify"] is True, (name, r)
            assert r.get("errors", 0) == 0 and r.get("verify_errors", 0) == 0, (name, r)
        for name in socks:
            e = http.get(f"/v1/volumes/{name}/export").json()
            assert e["restarts"] == 0 and e["state"] == "running", (name, e)
            assert e["pid"] == socks[name][1]
        grown = {n: after[n] - before[n] for n in pids if after[n] - before[n] > RSS_SLACK}
        assert not grown, f"RSS grew by more than {RSS_SLACK >> 20} MiB: {grown}"
        m = httpx.get(api.url + "/metrics", timeout=10).text
        assert 'blkserve_errors_total{op="write",status="ioerr",volume="soak00"} 0.0' in m
