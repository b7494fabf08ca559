"""README promises that had no test of their own, each proved against real
processes: `blkserve serve` (tests/apiserver.py), its `blkserve export`
workers, and the Python vhost-user frontend (tests/vhost_client.py).

- a worker's pid reused by another process is neither adopted nor killed;
- a worker that keeps dying young is restarted after a growing back-off;
- /metrics counts bad descriptor chains, broken queues, guest kicks and
  notifications, attachments by state, and shows `export_up 0` for a
  worker that is not running;
- the serial (GET_ID) is stable across export restarts, and under
  `blkserve serve` it is the volume name;
- `--io-engine auto` picks io_uring for a backing that can do non-blocking
  I/O (a file on ext4, a block device) and plain syscalls for one that
  cannot (tmpfs), seen in the syscalls and io_uring submissions the export
  really makes."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tracefs  # noqa: E402
import vhost_client as vc  # noqa: E402
from apiserver import ApiServer, wait_for, worker_pids  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_export import start_export, stop_export  # noqa: E402

from blkserve.api.workers import proc_start_time  # noqa: E402

MiB = 1 << 20


# -- helpers -------------------------------------------------------------------

def ok(r: httpx.Response, status: int = 200):
    assert r.status_code == status, f"{r.request.method} {r.request.url.path} -> " \
                                    f"{r.status_code}: {r.text}"
    return r.json() if r.content else None


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def listening(path: str) -> bool:
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7].rstrip("\n") == path and \
                    int(fields[3], 16) & 0x10000:
                return True
    return False


def serial_of(sock: str) -> bytes:
    with vc.BlkDevice(sock, queues=1, connect_retry=5.0) as dev:
        return dev.get_id()


def scrape(api: ApiServer) -> dict[tuple, float]:
    r = httpx.get(api.url + "/metrics", timeout=10)
    assert r.status_code == 200, r.text
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m: dict, name: str, **labels) -> float | None:
    return m.get((name, tuple(sorted(labels.items()))))


# -- supervision -----------------------------------------------------------------

def test_a_worker_pid_reused_by_another_process_is_neither_adopted_nor_killed(fresh_state):
    """The daemon is down, the worker it left dies, and its pid now belongs
    to another process that looks like that worker in every way the daemon
    can check but one: its command line names `export` and the socket, it
    holds the volume's backing open, but it started at another time.  The
    next daemon must start a new worker and leave that process alone."""
    d, new = fresh_state
    s1 = new()
    with s1.client() as c:
        vol = ok(c.post("/v1/volumes", json={"name": "reuse1", "size_bytes": 8 * MiB}), 201)
        exp = ok(c.put("/v1/volumes/reuse1/export"), 201)
    s1.stop()
    db = sqlite3.connect(d / "blkserve.db")
    try:
        pid, start = db.execute("SELECT pid, pid_start FROM exports "
                                "WHERE volume = 'reuse1'").fetchone()
        assert (pid, start) == (exp["pid"], proc_start_time(exp["pid"]))  # what it records
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not running(pid), 5, "the worker to die")
        impostor = subprocess.Popen(
            [sys.executable, "-c", "import sys, time; f = open(sys.argv[3], 'rb'); "
             "time.sleep(600)", "export", exp["socket"], vol["backing"]])
        try:
            wait_for(lambda: str(Path(vol["backing"]).resolve()) in
                     [os.path.realpath(f"/proc/{impostor.pid}/fd/{fd}")
                      for fd in os.listdir(f"/proc/{impostor.pid}/fd")],
                     10, "the impostor to open the backing")
            assert proc_start_time(impostor.pid) != start
            with db:  # the worker's row, as if the impostor had got its pid
                db.execute("UPDATE exports SET pid = ? WHERE volume = 'reuse1'",
                           (impostor.pid,))
            s2 = new()
            with s2.client() as c:
                e = wait_for(lambda: (x := ok(c.get("/v1/volumes/reuse1/export")))["state"]
                             == "running" and x, 20, "a new worker")
                assert e["pid"] not in (None, pid, impostor.pid), e
                assert listening(e["socket"]) and e["pid"] in worker_pids(d)
                assert serial_of(e["socket"]) == b"reuse1"
            assert impostor.poll() is None and running(impostor.pid), "the impostor was killed"
            assert "worker.adopted" not in s2.log()
        finally:
            impostor.kill()
            impostor.wait()
    finally:
        db.close()


def test_a_worker_that_keeps_dying_is_restarted_with_a_growing_back_off(fresh_state):
    """README: restarted after 0.2 s, backing off up to 30 s while it keeps
    dying young.  The backing is removed, then the worker killed: every
    restart fails at once.  The times at which the supervisor restarts it
    (the export's `restarts` count moving, polled through the API) are
    further and further apart: 0.2, 0.4, 0.8, 1.6, 3.2 s of back-off, each
    plus the short life of a worker that cannot open its backing."""
    d, new = fresh_state
    api = new()
    with api.client() as c:
        vol = ok(c.post("/v1/volumes", json={"name": "loop1", "size_bytes": 8 * MiB}), 201)
        exp = ok(c.put("/v1/volumes/loop1/export"), 201)
        os.unlink(vol["backing"])
        os.kill(exp["pid"], signal.SIGKILL)
        seen = [(time.monotonic(), 0)]
        deadline = time.monotonic() + 30
        while seen[-1][1] < 5:
            assert time.monotonic() < deadline, seen
            n = ok(c.get("/v1/volumes/loop1/export"))["restarts"]
            if n != seen[-1][1]:
                seen.append((time.monotonic(), n))
            time.sleep(0.02)
        view = ok(c.get("/v1/volumes/loop1/export"))
        ok(c.delete("/v1/volumes/loop1/export"), 204)
    counts = [n for _, n in seen]
    assert counts == list(range(6)), f"restarts seen {counts}: polled too slowly"
    gaps = [b[0] - a[0] for a, b in zip(seen[1:], seen[2:], strict=False)]
    backoff = [0.4, 0.8, 1.6, 3.2]  # before restarts 2..5
    for gap, b in zip(gaps, backoff, strict=True):
        assert b - 0.05 <= gap <= b + 5, (gaps, backoff)
    assert all(b > a for a, b in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] - gaps[0] >= 1.5, gaps
    assert view["state"] in ("backoff", "starting"), view


# -- /metrics --------------------------------------------------------------------

@pytest.fixture(scope="module")
def api():
    with ApiServer() as srv:
        yield srv


def test_metrics_count_kicks_notifications_bad_chains_and_broken_queues(api):
    http = api.client()
    ok(http.post("/v1/volumes", json={"name": "pm1", "size_bytes": 16 * MiB, "queues": 2}), 201)
    sock = ok(http.put("/v1/volumes/pm1/export"), 201)["socket"]
    m0 = scrape(api)
    for name in ("blkserve_guest_kicks_total", "blkserve_guest_notifications_total",
                 "blkserve_bad_descriptor_chains_total", "blkserve_queues_broken"):
        assert metric(m0, name, volume="pm1") == 0, name
    with vc.BlkDevice(sock, queues=2, connect_retry=5.0) as dev:
        for _ in range(3):
            assert dev.read(0, 4096, queue=1)[0] == vc.BLK_S_OK
        m1 = scrape(api)
        assert metric(m1, "blkserve_guest_kicks_total", volume="pm1") >= 3
        assert metric(m1, "blkserve_guest_notifications_total", volume="pm1") >= 3
        assert metric(m1, "blkserve_bad_descriptor_chains_total", volume="pm1") == 0

        # a bad chain: its data buffer lies outside guest memory -> IOERR, counted
        vq = dev.vqs[0]
        a, st = vc.queue_read_outside_memory(dev)
        assert vq.wait_used(1)[0] == (a, 1)
        assert dev.mem.read(st, 1) == bytes([vc.BLK_S_IOERR])
        m2 = scrape(api)
        assert metric(m2, "blkserve_bad_descriptor_chains_total", volume="pm1") == 1
        assert metric(m2, "blkserve_queues_broken", volume="pm1") == 0

        # a chain that loops: no status byte to answer through, the queue stops
        vc.queue_looping_chain(dev)
        m3 = wait_for(lambda: (m := scrape(api)) and
                      metric(m, "blkserve_queues_broken", volume="pm1") == 1 and m,
                      10, "blkserve_queues_broken to be 1")
        assert metric(m3, "blkserve_bad_descriptor_chains_total", volume="pm1") >= 1
        assert dev.read(0, 512, queue=1)[0] == vc.BLK_S_OK  # the other queue serves on
    ok(http.delete("/v1/volumes/pm1/export"), 204)


def test_metrics_export_up_is_0_while_the_worker_is_not_running(api):
    http = api.client()
    vol = ok(http.post("/v1/volumes", json={"name": "pm2", "size_bytes": 8 * MiB}), 201)
    exp = ok(http.put("/v1/volumes/pm2/export"), 201)
    assert metric(scrape(api), "blkserve_export_up", volume="pm2") == 1
    os.unlink(vol["backing"])  # every restart fails: the worker stays down
    os.kill(exp["pid"], signal.SIGKILL)
    wait_for(lambda: metric(scrape(api), "blkserve_export_up", volume="pm2") == 0, 10,
             "blkserve_export_up to be 0")
    view = ok(http.get("/v1/volumes/pm2/export"))
    assert view["state"] != "running" and not running(exp["pid"]), view
    ok(http.delete("/v1/volumes/pm2/export"), 204)


def test_metrics_count_attachments_by_state(fresh_state):
    """An attachment to a QEMU that is not there: `attached` as the database
    says, then `stale` once the daemon's check finds no VM, then gone when
    it is deleted; the gauge follows the API's view at every step."""
    d, new = fresh_state
    s1 = new()
    with s1.client() as c:
        ok(c.post("/v1/volumes", json={"name": "pa1", "size_bytes": 8 * MiB}), 201)
    s1.stop()
    db = sqlite3.connect(d / "blkserve.db")
    with db:
        db.execute("INSERT INTO attachments (id, volume, hypervisor, qmp_socket, bus, "
                   "device_id, chardev_id, state, created_at) VALUES ('att1', 'pa1', "
                   "'qemu', ?, 'hp0', 'blkserve-att1', 'blkserve-att1', 'attached', "
                   "'2026-01-01T00:00:00Z')", (str(d / "no-vm-qmp.sock"),))
    db.close()
    s2 = new()
    with s2.client() as c:
        def consistent():
            before = [a["state"] for a in ok(c.get("/v1/volumes/pa1/attachments"))]
            m = scrape(s2)
            after = [a["state"] for a in ok(c.get("/v1/volumes/pa1/attachments"))]
            return (before, m) if before == after else None
        states, m = consistent() or consistent()
        assert states in (["attached"], ["stale"]), states
        assert metric(m, "blkserve_attachments", volume="pa1", state=states[0]) == 1
        wait_for(lambda: [a["state"] for a in ok(c.get("/v1/volumes/pa1/attachments"))]
                 == ["stale"], 15, "the attachment to turn stale")
        m = scrape(s2)
        assert metric(m, "blkserve_attachments", volume="pa1", state="stale") == 1
        assert metric(m, "blkserve_attachments", volume="pa1", state="attached") is None
        ok(c.delete("/v1/volumes/pa1/attachments/att1"), 204)
        m = scrape(s2)
        assert not [k for k in m if k[0] == "blkserve_attachments"
                    and ("volume", "pa1") in k[1]], m


# -- serial ----------------------------------------------------------------------

def test_serial_is_stable_across_export_restarts_and_per_backing(tmp_path):
    e = start_export(tmp_path)
    try:
        first = serial_of(e.sock)
    finally:
        assert stop_export(e) == 0
    assert first.startswith(b"bs-") and len(first) == 20
    e = start_export(tmp_path)  # the same backing, a new process
    try:
        assert serial_of(e.sock) == first
    finally:
        assert stop_export(e) == 0
    other = tmp_path / "other"
    other.mkdir()
    e = start_export(other)
    try:
        assert serial_of(e.sock) != first  # another backing, another disk
    finally:
        assert stop_export(e) == 0


def test_serial_under_serve_is_the_volume_name_across_worker_restarts(api):
    http = api.client()
    ok(http.post("/v1/volumes", json={"name": "serial-vol.1", "size_bytes": 8 * MiB}), 201)
    exp = ok(http.put("/v1/volumes/serial-vol.1/export"), 201)
    assert serial_of(exp["socket"]) == b"serial-vol.1"
    os.kill(exp["pid"], signal.SIGKILL)
    e = wait_for(lambda: (x := ok(http.get("/v1/volumes/serial-vol.1/export")))["pid"]
                 not in (None, exp["pid"]) and listening(x["socket"]) and x, 15,
                 "the worker to be restarted")
    assert serial_of(e["socket"]) == b"serial-vol.1"
    ok(http.delete("/v1/volumes/serial-vol.1/export"), 204)


# -- --io-engine auto ------------------------------------------------------------

def _engine_used(e) -> str:
    """Which engine served a read: io_uring if the export's threads submitted
    an io_uring READ, sync if they called pread64; both or neither fails."""
    dev = e.device(queues=1)
    try:
        dev.data_align = 4096
        with tracefs.Instance("blkserve-engine") as t:
            threads = tracefs.pid_filter(e.proc.pid)
            t.enable("io_uring/io_uring_submit_req", threads)
            t.enable("syscalls/sys_enter_pread64", threads)
            for i in range(4):
                assert dev.read(8 * i, 4096)[0] == vc.BLK_S_OK
            ev = t.events()
    finally:
        dev.close()
    sqe_reads = [x for x in ev if x.name == "io_uring_submit_req"
                 and x.field("opcode") in ("READ", "READV")]
    preads = [x for x in ev if x.name == "sys_pread64"]
    if len(sqe_reads) >= 4 and not preads:
        return "io_uring"
    if len(preads) >= 4 and not sqe_reads:
        return "sync"
    raise AssertionError(f"no clear engine: {len(sqe_reads)} io_uring reads, "
                         f"{len(preads)} pread64 calls: {ev}")


NOWAIT_LOG = "cannot do non-blocking I/O"


@pytest.fixture
def engine_tracing():
    why = tracefs.unavailable("io_uring/io_uring_submit_req", "syscalls/sys_enter_pread64")
    if why:
        pytest.skip(why)


def test_auto_engine_is_io_uring_on_ext4_and_sync_on_tmpfs(tmp_path, engine_tracing):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no tmpfs at /dev/shm")
    shm = Path(tempfile.mkdtemp(prefix="bs-auto-", dir="/dev/shm"))
    try:
        for where, want in ((tmp_path, "io_uring"), (shm, "sync")):
            e = start_export(where, "--queues", "1", size=8 * MiB)
            try:
                assert _engine_used(e) == want, where
            finally:
                assert stop_export(e) == 0
            assert (NOWAIT_LOG in e.logtext()) == (want == "sync"), e.logtext()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_auto_engine_is_io_uring_on_a_block_device(tmp_path, engine_tracing):
    if shutil.which("losetup") is None:
        pytest.skip("losetup is not installed")
    img = tmp_path / "loop.img"
    with open(img, "wb") as f:
        f.truncate(8 * MiB)
    p = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {p.stderr.strip()}")
    loop = p.stdout.strip()
    try:
        sock = os.path.join(tempfile.mkdtemp(prefix="bs-"), "blk.sock")
        log = tmp_path / "export.log"
        proc = subprocess.Popen([sys.executable, "-m", "blkserve", "export", loop,
                                 "--socket", sock, "--queues", "1"],
                                stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        e = type("E", (), {})()
        e.proc, e.sock, e.logtext = proc, sock, log.read_text
        e.device = lambda **kw: vc.BlkDevice(sock, connect_retry=5.0, **kw)
        try:
            wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, 10,
                     "the export's socket")
            assert proc.poll() is None, log.read_text()
            assert _engine_used(e) == "io_uring"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, log.read_text()
        assert NOWAIT_LOG not in log.read_text()
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
