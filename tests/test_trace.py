"""eBPF tracing with bcc: the programs in ebpf/ load, and while `blkserve
bench` drives I/O through exports managed by `blkserve serve` they report
per-volume, per-op latency histograms, the per-stage breakdown (USDT probes
plus the io_uring tracepoints) and block-layer time for a loop-device
backing; through `blkserve trace` and through POST /v1/tracing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

try:
    from .apiserver import REPO, ApiServer
except ImportError:
    from apiserver import REPO, ApiServer


def _bcc_missing() -> str | None:
    if os.geteuid() != 0:
        return "tracing needs root"
    if not os.path.isdir("/sys/kernel/tracing/events/io_uring"):
        return "no tracefs with io_uring tracepoints at /sys/kernel/tracing"
    if not os.path.isdir("/usr/lib/python3/dist-packages/bcc"):
        return "bcc missing (Debian python3-bpfcc)"
    if not os.path.exists(f"/lib/modules/{os.uname().release}/build/include"):
        return "no kernel headers for bcc (make setup links Debian's)"
    return None


pytestmark = pytest.mark.skipif(_bcc_missing() is not None, reason=str(_bcc_missing()))


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    work = tmp_path_factory.mktemp("trace")
    img = work / "loop.img"
    with open(img, "wb") as f:
        f.truncate(64 << 20)
    loop = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                          text=True)
    loopdev = loop.stdout.strip() if loop.returncode == 0 else None
    cfg = work / "blkserve.toml"
    cfg.write_text(f"allowed_backings = [{json.dumps(loopdev or '/nonexistent')}]\n"
                   "[export]\nio_engine = \"io_uring\"\n")
    srv = ApiServer(config=cfg).start()
    try:
        http = srv.client()
        assert http.post("/v1/volumes", json={"name": "t1", "size_bytes": 64 << 20,
                                              "queues": 2}).status_code == 201
        srv.sockets = {"t1": http.put("/v1/volumes/t1/export").json()["socket"]}
        srv.loopdev = loopdev
        if loopdev:
            r = http.post("/v1/volumes", json={"name": "tb", "backing": loopdev})
            assert r.status_code == 201, r.text
            srv.sockets["tb"] = http.put("/v1/volumes/tb/export").json()["socket"]
        yield srv
    finally:
        srv.cleanup()
        if loopdev:
            subprocess.run(["losetup", "-d", loopdev], check=False)


class Load:
    """`blkserve bench` on SOCK for SECONDS in the background."""

    def __init__(self, sock: str, seconds: float, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blkserve", "bench", "--socket", sock, "--rw", "randrw",
             "--runtime", str(seconds), "--iodepth", "4", *args],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        assert self.proc.returncode == 0, err


def test_cli_trace_histograms_and_breakdown(api):
    with Load(api.sockets["t1"], 12, "--queues", "2"):
        p = subprocess.run([sys.executable, "-m", "blkserve", "trace", "--volume", "t1",
                            "--duration", "3", "--breakdown", "--json"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    vol = r["volumes"]["t1"]
    for op in ("read", "write"):
        h = vol["latency"][op]
        assert h["count"] > 0 and sum(b["count"] for b in h["buckets"]) == h["count"]
        assert h["p50_us_upper"] <= h["p99_us_upper"]
    bd = vol["breakdown"]
    # every stage of a request's life was seen, io_uring's included
    for stage in ("pop->submit", "submit->complete", "complete->used", "used->notify",
                  "kick->pop"):
        assert bd[stage]["count"] > 0, (stage, bd)
    # nearly every request went through io_uring (the probes stop counting
    # before the tables are read: they differ by what was in flight then)
    done = vol["latency"]["read"]["count"] + vol["latency"]["write"]["count"]
    assert 0.8 * done < bd["submit->complete"]["count"] < 1.2 * done + 100
    assert list(r["volumes"]) == ["t1"]  # --volume filtered


def test_cli_trace_text_is_biolatency_style(api):
    with Load(api.sockets["t1"], 10):
        p = subprocess.run([sys.executable, "-m", "blkserve", "trace", "--duration", "2"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    assert "volume t1, op read" in out and "usecs" in out and "distribution" in out
    rows = [line for line in out.splitlines() if " -> " in line and "|" in line]
    assert rows and all(line.count("|") == 2 for line in rows)


def test_block_device_backing_block_layer_time(api):
    if not api.loopdev:
        pytest.skip("losetup could not create a loop device")
    with Load(api.sockets["tb"], 10):
        p = subprocess.run([sys.executable, "-m", "blkserve", "trace", "--volume", "tb",
                            "--duration", "3", "--json"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout)
    name = os.path.basename(api.loopdev)
    assert r["block_devices"][name]["count"] > 0, r.get("block_devices")
    assert r["volumes"]["tb"]["latency"]["read"]["count"] > 0


def test_api_tracing(api):
    http = api.client()
    assert http.post("/v1/tracing", json={"duration_s": 301}).status_code == 422
    assert http.post("/v1/tracing", json={"duration_s": 0}).status_code == 422
    r = http.post("/v1/tracing", json={"duration_s": 1, "volume": "nope"})
    assert r.status_code == 404, r.text
    results = {}

    def first():
        results["first"] = http.post("/v1/tracing", json={"duration_s": 4, "volume": "t1",
                                                          "breakdown": True})

    with Load(api.sockets["t1"], 14):
        t = threading.Thread(target=first)
        t.start()
        time.sleep(1.0)
        # the first trace is compiling or running: one trace at a time
        second = api.client().post("/v1/tracing", json={"duration_s": 1})
        t.join(120)
    assert second.status_code == 409, second.text
    r = results["first"]
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["volumes"]["t1"]["latency"]["read"]["count"] > 0
    assert body["volumes"]["t1"]["breakdown"]["submit->complete"]["count"] > 0
    assert http.post("/v1/tracing", json={"duration_s": 1}).status_code == 200


def test_workers_of_another_install_are_named_not_traced(api, tmp_path):
    """Workers that map another copy of the engine library (a second install,
    or an upgrade whose old workers still run): one BPF program serves one
    library, so the trace covers the library most workers run and names the
    others instead of failing."""
    import shutil

    other = tmp_path / "other-install"
    shutil.copytree(REPO / "blkserve", other / "blkserve",
                    ignore=shutil.ignore_patterns("__pycache__"))
    img = tmp_path / "other.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    sock = str(tmp_path / "other.sock")
    exp = subprocess.Popen([sys.executable, "-m", "blkserve", "export", str(img), "--socket",
                            sock, "--serial", "other"], cwd=other,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.path.exists(sock), "the second install's export did not start"
        with Load(api.sockets["t1"], 6):
            p = subprocess.run([sys.executable, "-m", "blkserve", "trace", "--duration", "2",
                                "--json"], cwd=REPO, capture_output=True, text=True,
                               timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        r = json.loads(p.stdout)
        assert r["volumes"]["t1"]["latency"]["read"]["count"] > 0
        skipped = {w["volume"]: w for w in r["not_traced"]}
        # (exports of other tests or installs on this host may be listed too)
        assert "other" in skipped and not {"t1", "tb"} & set(skipped), r["not_traced"]
        assert skipped["other"]["pid"] == exp.pid
        assert str(other) in skipped["other"]["engine_library"]
        # on its own it is traced
        p = subprocess.run([sys.executable, "-m", "blkserve", "trace", "--duration", "1",
                            "--volume", "other", "--json"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-3000:]
        assert "not_traced" not in json.loads(p.stdout)
    finally:
        exp.terminate()
        exp.wait(15)
