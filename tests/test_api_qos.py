"""QoS through the REST API, against a real `blkserve serve`, its export
workers and `blkserve bench` as the frontend:

- a volume created with limits is held to them; PATCH changes them on the
  running export (same worker process) and `{"qos": null}` lifts them;
- a QoS group: two volumes driven at once hold the group's limit in sum,
  a group PATCH applies live, a group with members cannot be deleted;
- /metrics: limits in force, throttled requests and their wait histogram,
  per volume and per group;
- limits and groups survive a kill -9 of the daemon, whose successor
  adopts the same workers and still changes their limits live;
- invalid limits get 422 with a one-line message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from blkserve import qos

try:
    from .apiserver import ApiServer, serving
except ImportError:
    from apiserver import ApiServer, serving

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def ok(r, status=200):
    assert r.status_code == status, f"{r.status_code}: {r.text}"
    return r.json() if r.content else None


def bench(sock: str, runtime: float = 3, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "blkserve", "bench", "--socket", sock, "--json",
                        "--iodepth", "32", "--runtime", str(runtime), "--size", "32M", *args],
                       capture_output=True, text=True, timeout=runtime + 120, cwd=ROOT,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["errors"] == 0
    return out


def near(got: float, want: float, tol: float = 0.05) -> bool:
    return abs(got - want) / want <= tol


@pytest.fixture(scope="module")
def srv():
    with serving() as s:
        yield s


@pytest.fixture
def http(srv):
    with srv.client() as c:
        yield c


def _volume(http, name: str, **extra) -> str:
    ok(http.post("/v1/volumes", json={"name": name, "size_bytes": 64 * MiB, **extra}), 201)
    return ok(http.put(f"/v1/volumes/{name}/export"), 201)["socket"]


def _pid(http, name: str) -> int:
    return ok(http.get(f"/v1/volumes/{name}"))["export"]["pid"]


def test_volume_limits_apply_live_and_lift(http):
    sock = _volume(http, "q1", qos={"iops_total": 2000})
    v = ok(http.get("/v1/volumes/q1"))
    assert v["qos"] == {"iops_total": 2000} and v["qos_group"] is None
    pid = _pid(http, "q1")
    got = bench(sock)["iops"]
    assert near(got, 2000), got
    v = ok(http.patch("/v1/volumes/q1", json={"qos": {"iops_total": 5000}}))
    assert v["qos"] == {"iops_total": 5000}
    got = bench(sock)["iops"]
    assert near(got, 5000), got
    # a burst, and bandwidth, through the API
    v = ok(http.patch("/v1/volumes/q1", json={"qos": {
        "bps_read": 16 * MiB, "iops_write": 100, "iops_write_max": 400,
        "iops_write_max_length": 1.5}}))
    assert v["qos"] == {"bps_read": 16 * MiB, "iops_write": 100, "iops_write_max": 400,
                        "iops_write_max_length": 1.5}
    got = bench(sock, 3, "--bs", "64k")["bw_bytes"]
    assert near(got, 16 * MiB), got
    unlimited = None
    v = ok(http.patch("/v1/volumes/q1", json={"qos": None}))
    assert v["qos"] is None
    unlimited = bench(sock, 2)["iops"]
    assert unlimited > 3 * 5000, unlimited
    assert _pid(http, "q1") == pid    # never restarted


def test_group_holds_its_limit_in_sum_and_changes_live(srv, http):
    g = ok(http.post("/v1/qos-groups", json={"name": "tenant-a",
                                             "qos": {"iops_total": 3000}}), 201)
    assert g == {"name": "tenant-a", "qos": {"iops_total": 3000}, "members": [],
                 "created_at": g["created_at"]}
    a = _volume(http, "ga", qos_group="tenant-a")
    b = _volume(http, "gb")
    pid_b = _pid(http, "gb")
    ok(http.patch("/v1/volumes/gb", json={"qos_group": "tenant-a"}))
    assert ok(http.get("/v1/qos-groups/tenant-a"))["members"] == ["ga", "gb"]

    def both() -> tuple[float, float]:
        res: dict[str, float] = {}
        ts = [threading.Thread(target=lambda k, s: res.__setitem__(k, bench(s, 6)["iops"]),
                               args=(k, s)) for k, s in (("a", a), ("b", b))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return res["a"], res["b"]

    ia, ib = both()
    # the runs start a moment apart: each had the budget alone for a bit
    assert near(ia + ib, 3000, 0.08), (ia, ib)
    assert min(ia, ib) > 0.3 * (ia + ib), (ia, ib)
    ok(http.patch("/v1/qos-groups/tenant-a", json={"qos": {"iops_total": 6000}}))
    ia, ib = both()
    assert near(ia + ib, 6000, 0.08), (ia, ib)
    r = http.delete("/v1/qos-groups/tenant-a")
    assert r.status_code == 409 and "ga, gb" in r.json()["detail"], r.text
    # leaving the group: gb is unthrottled at once (its worker re-reads the
    # group through SIGHUP; same process)
    ok(http.patch("/v1/volumes/gb", json={"qos_group": None}))
    assert bench(b, 2)["iops"] > 3 * 6000
    assert _pid(http, "gb") == pid_b
    text = http.get("/metrics").text
    assert 'blkserve_qos_group_limit{group="tenant-a",kind="iops_total"} 6000.0' in text
    thr = [ln for ln in text.splitlines()
           if ln.startswith('blkserve_qos_group_throttled_requests_total{group="tenant-a"}')]
    assert thr and float(thr[0].split()[-1]) > 0, thr
    assert 'blkserve_throttle_wait_seconds_count{volume="ga"}' in text
    vol_thr = [ln for ln in text.splitlines()
               if ln.startswith('blkserve_throttled_requests_total{volume="ga"}')]
    assert vol_thr and float(vol_thr[0].split()[-1]) > 0, vol_thr


def test_metrics_show_a_volumes_limits(http):
    _volume(http, "qm", qos={"iops_read": 700, "iops_read_max": 900})
    text = http.get("/metrics").text
    assert 'blkserve_qos_limit{kind="iops_read",volume="qm"} 700.0' in text
    assert 'blkserve_qos_burst_limit{kind="iops_read",volume="qm"} 900.0' in text


@pytest.mark.parametrize("body,msg", [
    ({"qos": {"iops_total": -1}}, "qos.iops_total: Input should be greater than 0"),
    ({"qos": {"iops_total": 0}}, "qos.iops_total: Input should be greater than 0"),
    ({"qos": {"iops_total_max": 10}}, "iops_total_max needs iops_total"),
    ({"qos": {"iops_total": 10, "iops_total_max": 5}}, "must be above iops_total"),
    ({"qos": {"iops_totl": 10}}, "qos.iops_totl: Extra inputs are not permitted"),
    ({"qos": {"iops_total": "5000"}}, "qos.iops_total: Input should be a valid integer"),
    ({"qos_group": "nope"}, "no QoS group 'nope'"),
    ({}, "give size_bytes, qos or qos_group"),
])
def test_invalid_limits_are_422_with_one_line(http, body, msg):
    if http.get("/v1/volumes/qv").status_code == 404:
        ok(http.post("/v1/volumes", json={"name": "qv", "size_bytes": MiB}), 201)
    r = http.patch("/v1/volumes/qv", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert msg in detail and "\n" not in detail, detail
    r = http.post("/v1/qos-groups", json={"name": "bad", "qos": body.get("qos", {"x": 1})})
    assert r.status_code == 422, r.text


KILLS = 20


def test_limits_survive_a_daemon_kill_and_stay_live(tmp_path):
    """20 kill -9 / restarts of the daemon: each successor adopts the same
    worker with its limits and group, and its PATCH reaches the worker's
    block; then the worker is measured to hold the last limit."""
    state = tmp_path / "st"
    srv = ApiServer(state_dir=state).start()
    try:
        with srv.client() as http:
            ok(http.post("/v1/qos-groups", json={"name": "t", "qos": {"iops_total": 50000}}),
               201)
            sock = _volume(http, "k1", qos={"iops_total": 2000}, qos_group="t")
            pid = _pid(http, "k1")
        limit = 2000
        for rnd in range(KILLS):
            srv.stop(signal.SIGKILL)
            srv.start()
            with srv.client() as http:
                v = ok(http.get("/v1/volumes/k1"))
                assert v["qos"] == {"iops_total": limit} and v["qos_group"] == "t", (rnd, v)
                assert v["export"]["pid"] == pid, rnd   # adopted, not restarted
                limit = 2000 + 100 * (rnd + 1)
                ok(http.patch("/v1/volumes/k1", json={"qos": {"iops_total": limit}}))
            blk = qos.QosBlock(str(state / "qos" / "k1.qos"), create=False)
            assert qos.to_flat(blk.limits()) == {"iops_total": limit} and blk.group == "t"
            blk.close()
        with srv.client() as http:
            got = bench(sock)["iops"]
            assert near(got, limit), (got, limit)
            # the group holds too (tighter than the volume's own now)
            ok(http.patch("/v1/qos-groups/t", json={"qos": {"iops_total": 1000}}))
            got = bench(sock)["iops"]
            assert near(got, 1000), got
            assert _pid(http, "k1") == pid
        log = srv.log()
        assert "Traceback" not in log, log
    finally:
        srv.cleanup()
