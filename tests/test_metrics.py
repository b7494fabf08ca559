"""Metrics end to end: real I/O (the C bench frontend) through an export
managed by `blkserve serve` moves the engine counters and latency histograms
seen on /metrics; promtool accepts the exposition and the deploy/ files; a
real Prometheus server scrapes blkserve; the engine carries its USDT notes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest

try:
    from . import vhost_client as vc
    from .apiserver import REPO, ApiServer, free_port
except ImportError:
    import vhost_client as vc
    from apiserver import REPO, ApiServer, free_port

from prometheus_client.parser import text_string_to_metric_families

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None,
                                    reason="promtool missing (Debian package prometheus)")


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def api():
    with ApiServer() as srv:
        http = srv.client()
        for name, q in (("m1", 2), ("m2", 1)):
            r = http.post("/v1/volumes", json={"name": name, "size_bytes": 64 << 20,
                                               "queues": q})
            assert r.status_code == 201, r.text
        srv.sockets = {n: http.put(f"/v1/volumes/{n}/export").json()["socket"]
                       for n in ("m1", "m2")}
        yield srv


def bench(sock: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "blkserve", "bench", "--socket", sock,
                        "--json", *args], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[0])


def scrape(api) -> str:
    r = httpx.get(api.url + "/metrics", timeout=10)  # no token: /metrics is open
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def test_io_moves_counters_and_histograms(api):
    before = samples(scrape(api))
    assert value(before, "blkserve_requests_total", volume="m1", op="read") == 0
    r = bench(api.sockets["m1"], "--rw", "randrw", "--queues", "2", "--verify",
              "--size", "8M", "--runtime", "1")
    assert r["ios"] > 0
    m = samples(scrape(api))
    reads = value(m, "blkserve_requests_total", volume="m1", op="read")
    writes = value(m, "blkserve_requests_total", volume="m1", op="write")
    assert reads > 0 and writes > 0 and reads + writes >= r["ios"]
    assert value(m, "blkserve_bytes_total", volume="m1", op="read") >= reads * 512
    for op, n in (("read", reads), ("write", writes)):
        # every completed request is in the histogram, buckets are cumulative
        assert value(m, "blkserve_request_duration_seconds_count", volume="m1", op=op) == n
        inf = value(m, "blkserve_request_duration_seconds_bucket", volume="m1", op=op,
                    le="+Inf")
        assert inf == n
        bounds = sorted((float(dict(k[1])["le"]), v) for k, v in m.items()
                        if k[0] == "blkserve_request_duration_seconds_bucket"
                        and dict(k[1]).get("op") == op and dict(k[1])["volume"] == "m1"
                        and dict(k[1])["le"] != "+Inf")
        assert bounds[0][0] == pytest.approx(8.192e-6) and bounds[-1][0] > 1.0
        assert all(a[1] <= b[1] for a, b in zip(bounds, bounds[1:], strict=False))
        assert value(m, "blkserve_request_duration_seconds_sum", volume="m1", op=op) > 0
    assert value(m, "blkserve_errors_total", volume="m1", op="read", status="ioerr") == 0
    assert value(m, "blkserve_inflight_requests", volume="m1") == 0
    assert value(m, "blkserve_guest_kicks_total", volume="m1") > 0
    # polling's counters are there (whether it paid depends on the machine)
    polls = [value(m, "blkserve_polls_total", volume="m1", outcome=o) for o in ("hit", "miss")]
    assert all(p >= 0 for p in polls)
    assert value(m, "blkserve_poll_seconds_total", volume="m1") >= 0
    # the other volume saw nothing
    assert value(m, "blkserve_requests_total", volume="m2", op="read") == 0
    assert value(m, "blkserve_export_up", volume="m1") == 1
    assert value(m, "blkserve_volume_size_bytes", volume="m2") == 64 << 20
    assert value(m, "blkserve_worker_restarts_total", volume="m1") == 0
    assert ("process_resident_memory_bytes", ()) in m


def test_counters_read_while_io_runs(api):
    """The stats block is read while queues serve I/O (no stop, no lock)."""
    p = subprocess.Popen([sys.executable, "-m", "blkserve", "bench", "--socket",
                          api.sockets["m2"], "--rw", "randread", "--runtime", "3",
                          "--iodepth", "8"], cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and p.poll() is None:
            m = samples(scrape(api))
            seen.append(value(m, "blkserve_requests_total", volume="m2", op="read"))
            time.sleep(0.3)
    finally:
        p.wait(60)
    assert p.returncode == 0
    growing = [b for a, b in zip(seen, seen[1:], strict=False) if b > a]
    assert len(growing) >= 2, seen  # the counter moved between scrapes mid-run


def test_engine_errors_are_counted(api):
    """Requests the device answers with an error are counted by op and status:
    writes to a read-only volume and reads past the end (IOERR), an unknown
    request type (UNSUPP); GET_ID counts as its own op."""
    http = api.client()
    assert http.post("/v1/volumes", json={"name": "mro", "size_bytes": 8 << 20,
                                          "read_only": True}).status_code == 201
    sock = http.put("/v1/volumes/mro/export").json()["socket"]
    with vc.BlkDevice(sock, queues=1, connect_retry=2.0) as dev:
        for _ in range(3):
            assert dev.write(0, b"x" * 4096) == vc.BLK_S_IOERR
        assert dev.read((8 << 20) // 512, 512)[0] == vc.BLK_S_IOERR
        assert dev.read(0, 4096)[0] == vc.BLK_S_OK
        assert dev.wait(dev.submit(99, 0, in_len=512)).status == vc.BLK_S_UNSUPP
        assert dev.get_id() == b"mro"
    m = samples(scrape(api))
    assert value(m, "blkserve_errors_total", volume="mro", op="write", status="ioerr") == 3
    assert value(m, "blkserve_errors_total", volume="mro", op="read", status="ioerr") == 1
    assert value(m, "blkserve_requests_total", volume="mro", op="read") == 2
    assert value(m, "blkserve_bytes_total", volume="mro", op="read") == 4096
    assert value(m, "blkserve_bytes_total", volume="mro", op="write") == 0
    assert value(m, "blkserve_errors_total", volume="mro", op="other", status="unsupp") == 1
    assert value(m, "blkserve_requests_total", volume="mro", op="get_id") == 1
    assert http.delete("/v1/volumes/mro/export").status_code == 204


@needs_promtool
def test_promtool_accepts_metrics(api):
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape(api), text=True,
                       capture_output=True)
    assert p.returncode == 0, p.stdout + p.stderr


@needs_promtool
def test_deploy_prometheus_config_and_rules_are_valid():
    d = REPO / "deploy" / "prometheus"
    for args in (["check", "config", str(d / "prometheus.yml")],
                 ["check", "rules", str(d / "blkserve-alerts.yml")]):
        p = subprocess.run([PROMTOOL, *args], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
    dash = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for panel in dash["panels"] for t in panel["targets"])
    for metric in ("blkserve_requests_total", "blkserve_bytes_total",
                   "blkserve_request_duration_seconds_bucket", "blkserve_inflight_requests",
                   "blkserve_errors_total", "blkserve_throttle_wait_seconds_sum",
                   "blkserve_throttled_requests_total", "blkserve_qos_limit"):
        assert metric in exprs


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus server missing (Debian package)")
def test_real_prometheus_scrapes_blkserve(api, tmp_path):
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    host = api.url.removeprefix("http://")
    cfg.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n"
                   f"  - job_name: blkserve\n    static_configs:\n"
                   f"      - targets: ['{host}']\n")
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        q = f"http://127.0.0.1:{port}/api/v1/query"
        up = series = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                up = httpx.get(q, params={"query": 'up{job="blkserve"}'}, timeout=5).json()
                series = httpx.get(q, params={
                    "query": 'blkserve_requests_total{volume="m1",op="read"}'}, timeout=5
                ).json()
                if up["data"]["result"] and up["data"]["result"][0]["value"][1] == "1" \
                        and series["data"]["result"]:
                    break
            except (httpx.TransportError, ValueError, KeyError):
                pass
            time.sleep(1)
        assert up and up["data"]["result"][0]["value"][1] == "1", \
            (up, (tmp_path / "prometheus.log").read_text()[-3000:])
        assert float(series["data"]["result"][0]["value"][1]) > 0, series
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def test_engine_library_carries_usdt_probes():
    import blkserve._native as native

    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf missing (binutils)")
    out = subprocess.run([readelf, "-n", native.__file__], capture_output=True,
                         text=True).stdout
    probes = set(re.findall(r"Provider: blkserve\s+Name: (\w+)", out))
    assert probes >= {"request_start", "request_done", "kick", "notify", "queue_start",
                      "queue_stop"}, out[-2000:]
