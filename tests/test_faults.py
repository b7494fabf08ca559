"""Backing-store faults injected on cue (tests/faultfs.py, a FUSE file that
stalls or fails per byte range and operation) under a real `blkserve export`
driven by the Python vhost-user frontend: bounded stops (SIGTERM,
GET_VRING_BASE, RESET_DEVICE) with a backing that does not answer, the next
backend redoing what a stop gave up on, and EIO failing exactly its request,
counted in the stats block and on /metrics.

The exports here use `--io-engine io_uring`: `auto` picks plain syscalls for
a FUSE file (no RWF_NOWAIT), and a blocking syscall cannot be cancelled (the
README's "not covered")."""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_export as export_tests  # noqa: E402
import vhost_client as vc  # noqa: E402
from apiserver import ApiServer  # noqa: E402
from faultfs import FaultFS  # noqa: E402
from test_export import Export, stop_export  # noqa: E402

from blkserve import stats as bstats  # noqa: E402

IMG_SIZE = 64 << 20
DRAIN = 1.0    # --drain-timeout of the exports that are stopped while stalled
GRACE = 1.0    # the engine's cancellation grace after the drain timeout
SLACK = 3.0    # process start/exit, scheduling on a loaded 2-core CI machine
KiB = 1024


@pytest.fixture
def fs():
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    pytest.importorskip("pyfuse3", reason="pyfuse3 missing (make setup installs it)")
    with FaultFS({"disk.img": IMG_SIZE}) as f:
        yield f


def start_export(fs: FaultFS, tmp_path: Path, *args: str, name: str = "export") -> Export:
    """An export of the FUSE file (io_uring: a blocking syscall in the sync
    engine could not be cancelled); the test reads what it wrote from the
    file under it."""
    return export_tests.start_export(tmp_path, "--io-engine", "io_uring", *args,
                                     backing=fs.path("disk.img"),
                                     image=str(fs.backing("disk.img")), name=name)


def kill(e: Export) -> None:
    if e.proc.poll() is None:
        e.proc.kill()
        e.proc.wait()


def wait_popped(vq: vc.Virtqueue, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while vq.avail_event < n:
        assert time.monotonic() < deadline, f"backend popped {vq.avail_event} of {n}"
        time.sleep(0.005)


def pattern(i: int, n: int = 4096) -> bytes:
    return bytes([(i * 37 + 11) % 251 + 1]) * n


def written_device(e: Export) -> vc.BlkDevice:
    """A one-queue frontend on E (O_DIRECT-able buffers) that has written
    block 0 while the backing answered."""
    d = e.device(queues=1, timeout=60)
    d.data_align = 4096
    assert d.write(0, pattern(0)) == vc.BLK_S_OK
    return d


def assert_next_frontend_served(e: Export) -> None:
    """The same export serves the next frontend: a write and its read-back."""
    with e.device(queues=1) as d:
        d.data_align = 4096
        assert d.write(64, pattern(9)) == vc.BLK_S_OK
        assert d.read(64, 4096) == (vc.BLK_S_OK, pattern(9))


GAVE_UP = "stopped with requests still in flight after the drain timeout"
RESUBMITTED = "2 request(s) a previous backend left in flight, resubmitted"


# -- bounded stops ------------------------------------------------------------

def test_sigterm_with_stalled_queues_exits_within_the_drain_timeout(fs, tmp_path):
    """Reads and writes held by the backing on two queues: SIGTERM gives up
    on them after --drain-timeout (+ the cancellation grace), not once per
    queue, and the export exits 0 with its socket removed, no request answered."""
    drain = 2.0  # long enough that a drain per queue shows
    e = start_export(fs, tmp_path, "--queues", "2", "--drain-timeout", str(drain))
    try:
        d = e.device(queues=2)
        d.data_align = 4096
        fs.stall("write")
        fs.stall("read")
        reqs = d.submit_many([(vc.BLK_T_OUT, 8 * i, pattern(i)) for i in range(6)],
                             queue=0, wait=False)
        reqs += d.submit_many([(vc.BLK_T_IN, 8 * i, 4096) for i in range(6)],
                              queue=1, wait=False)
        # every request really blocked in the backing before the stop
        assert fs.wait_stalled(len(reqs)) == len(reqs)
        t0 = time.monotonic()
        e.proc.send_signal(signal.SIGTERM)
        rc = e.proc.wait(drain + GRACE + 30)
        took = time.monotonic() - t0
        d.poll()
        assert not any(r.done for r in reqs), "a held request got a status"
        d.close()
    finally:
        kill(e)
    assert rc == 0, e.logtext()
    assert took < drain + GRACE + 2, (took, e.logtext())
    assert not os.path.exists(e.sock)
    assert GAVE_UP in e.logtext()


def test_get_vring_base_with_a_stalled_backing_returns_within_the_drain_timeout(fs, tmp_path):
    """GET_VRING_BASE (QEMU stopping the device) with writes held by the
    backing answers after the drain timeout with the ring's position past
    the popped requests; the export keeps serving once the backing answers."""
    e = start_export(fs, tmp_path, "--drain-timeout", str(DRAIN))
    try:
        d = written_device(e)
        fs.stall("write")
        reqs = d.submit_many([(vc.BLK_T_OUT, 8 * i, pattern(i)) for i in range(1, 5)],
                             wait=False)
        assert fs.wait_stalled(4) == 4
        t0 = time.monotonic()
        base = d.get_vring_base(0)
        took = time.monotonic() - t0
        d.poll()
        assert not any(r.done for r in reqs)
        assert base == 5, base  # resumes after the 4 it gave up on
        assert took < DRAIN + GRACE + SLACK, took
        fs.release()
        d.close()
        assert_next_frontend_served(e)
        assert e.alive()
    finally:
        fs.release()
        assert stop_export(e) == 0, e.logtext()
    assert GAVE_UP in e.logtext()


def test_last_ring_stop_with_a_stalled_sync_answers_within_the_drain_timeout(fs, tmp_path):
    """The last ring's stop makes the backing durable (fdatasync) before it
    answers; a backing whose sync hangs holds the answer for the drain
    timeout, not for ever: logged, and the export serves the next frontend
    once the backing is back."""
    e = start_export(fs, tmp_path, "--drain-timeout", str(DRAIN))
    try:
        d = written_device(e)
        fs.stall("fsync")
        t0 = time.monotonic()
        d.get_vring_base(0)
        took = time.monotonic() - t0
        assert fs.stalled() == 1  # the sync reached the backing and is held there
        assert DRAIN <= took < DRAIN + SLACK, took
        fs.release()
        d.close()
        assert_next_frontend_served(e)
    finally:
        fs.release()
        assert stop_export(e) == 0, e.logtext()
    assert "did not sync within" in e.logtext()


def test_reset_device_with_a_stalled_backing_returns_within_the_drain_timeout(fs, tmp_path):
    """RESET_DEVICE with writes held by the backing is acknowledged after the
    drain timeout; the frontend sets the ring up again on the same connection
    and I/O works once the backing answers."""
    e = start_export(fs, tmp_path, "--drain-timeout", str(DRAIN))
    try:
        d = vc.BlkDevice(e.sock, queues=1, connect_retry=2.0, setup=False, timeout=60,
                         protocol_features=vc.BlkDevice.WANTED_PROTOCOL_FEATURES
                         | vc.bit(vc.PROTOCOL_F_RESET_DEVICE))
        try:
            d.setup()
            d.data_align = 4096
            fs.stall("write")
            reqs = d.submit_many([(vc.BLK_T_OUT, 8 * i, pattern(i)) for i in range(4)],
                                 wait=False)
            assert fs.wait_stalled(4) == 4
            t0 = time.monotonic()
            d.client.reset_device()  # REPLY_ACK: returns when the backend is done
            took = time.monotonic() - t0
            assert took < DRAIN + GRACE + SLACK, took
            d.poll()
            assert not any(r.done for r in reqs)
            fs.release()
            d.inflight.clear()
            d.client.set_features(d.features)
            d.setup_queue(0)
            assert d.write(80, pattern(7)) == vc.BLK_S_OK
            assert d.read(80, 4096) == (vc.BLK_S_OK, pattern(7))
        finally:
            d.close()
    finally:
        fs.release()
        assert stop_export(e) == 0, e.logtext()
    log = e.logtext()
    assert GAVE_UP in log and "device reset by the frontend" in log, log


def test_next_backend_redoes_what_a_timed_out_stop_left_in_flight(fs, tmp_path):
    """A stop that gave up on held requests leaves them marked in the
    frontend's inflight region (INFLIGHT_SHMFD); the next backend on the same
    backing, given that region back, redoes exactly them: the frontend gets
    their completions, the data is right, nothing is done twice.  The held
    requests completed out of order (later ones of the batch finished), so
    restarting the ring at the used index alone would redo the wrong ones;
    and the held requests never reach the backing (released with EIO), so
    what is there was redone."""
    e1 = start_export(fs, tmp_path, "--drain-timeout", str(DRAIN), name="export1")
    e2 = None
    d = vc.BlkDevice(e1.sock, queues=1, connect_retry=2.0, setup=False,
                     protocol_features=vc.BlkDevice.WANTED_PROTOCOL_FEATURES
                     | vc.bit(vc.PROTOCOL_F_INFLIGHT_SHMFD))
    try:
        d.data_align = 4096
        d.negotiate()
        d.setup_inflight()
        d.setup_memory()
        d.setup_queue(0)
        # the reads want data that is on the backing already
        for i in range(4):
            assert d.write(1024 + 8 * i, pattern(100 + i)) == vc.BLK_S_OK
        fs.stall("write", 0, 4096)              # the first write of the batch
        fs.stall("read", 1024 * 512, 1025 * 512)  # the first read
        writes = d.submit_many([(vc.BLK_T_OUT, 8 * i, pattern(i)) for i in range(4)],
                               wait=False)
        reads = d.submit_many([(vc.BLK_T_IN, 1024 + 8 * i, 4096) for i in range(4)],
                              wait=False)
        held = [writes[0], reads[0]]
        d.wait(writes[1:] + reads[1:])  # the others finish before them
        assert fs.wait_stalled(2) == 2
        e1.proc.send_signal(signal.SIGTERM)
        assert e1.proc.wait(DRAIN + GRACE + 30) == 0, e1.logtext()
        assert GAVE_UP in e1.logtext()
        d.poll()
        assert not any(r.done for r in held)
        # the old backend's requests are lost in the backing, not done late
        fs.release(err=errno.EIO)
        assert fs.stalled() == 0
        assert fs.backing("disk.img").read_bytes()[:4096] == bytes(4096)
        writes_before = fs.calls("write")

        e2 = start_export(fs, tmp_path, name="export2")
        d.reconnect(e2.sock)
        d.wait(held, timeout=20)
        assert [r.status for r in held] == [vc.BLK_S_OK] * 2
        assert reads[0].data == pattern(100)
        assert fs.backing("disk.img").read_bytes()[:4096] == pattern(0)
        assert fs.calls("write") == writes_before + 1  # W0 again, nothing else
        # it goes on serving after them, and nothing was completed twice
        assert d.write(2048, pattern(50)) == vc.BLK_S_OK
        assert d.read(2048, 4096) == (vc.BLK_S_OK, pattern(50))
        assert d.unexpected_used == [] and d.vqs[0].bad_used == []
        # the export's once-a-second monitor reports the resubmissions
        deadline = time.monotonic() + 10
        while RESUBMITTED not in e2.logtext():
            assert time.monotonic() < deadline, e2.logtext()
            time.sleep(0.05)
    finally:
        d.close()
        fs.release()
        kill(e1)
        if e2 is not None:
            assert stop_export(e2) == 0, e2.logtext()


# -- backing-store errors -----------------------------------------------------

def _io_mix(d: vc.BlkDevice) -> tuple[list[vc.Request], list[vc.Request]]:
    """Writes to sectors 0, 8, 16, 24 and reads of 64, 72, 80, 88, in one batch."""
    writes = d.submit_many([(vc.BLK_T_OUT, 8 * i, pattern(i)) for i in range(4)], wait=False)
    reads = d.submit_many([(vc.BLK_T_IN, 64 + 8 * i, 4096) for i in range(4)], wait=False)
    d.wait(writes + reads)
    return writes, reads


def test_eio_fails_exactly_that_request_and_is_counted(fs, tmp_path):
    """EIO from the backing for one write's range and one read's range: those
    two requests get VIRTIO_BLK_S_IOERR, every other request of the same
    batch succeeds, the export keeps serving, and the stats block counts
    exactly two I/O errors (one write, one read)."""
    with open(fs.backing("disk.img"), "r+b") as f:
        f.seek(64 * 512)
        f.write(b"".join(pattern(200 + i) for i in range(4)))
    st_path = str(tmp_path / "export.stats")
    e = start_export(fs, tmp_path, "--stats-file", st_path)
    try:
        with e.device(queues=1) as d:
            d.data_align = 4096
            fs.fail("write", errno.EIO, 8 * 512, 9 * 512)       # the write of sector 8
            fs.fail("read", errno.EIO, 80 * 512, 80 * 512 + 1)  # the read of sector 80
            writes, reads = _io_mix(d)
            assert [r.status for r in writes] == [0, vc.BLK_S_IOERR, 0, 0]
            assert [r.status for r in reads] == [0, 0, vc.BLK_S_IOERR, 0]
            assert [r.data for i, r in enumerate(reads) if i != 2] == \
                [pattern(200 + i) for i in (0, 1, 3)]
            image = fs.backing("disk.img").read_bytes()
            assert image[4096:8192] == bytes(4096)  # the failed write wrote nothing
            assert [image[4096 * i:4096 * (i + 1)] for i in (0, 2, 3)] == \
                [pattern(i) for i in (0, 2, 3)]
            q = bstats.read(st_path).queues[0]
            w, r, ioerr = bstats.OPS.index("write"), bstats.OPS.index("read"), \
                bstats.STATUSES.index("ioerr")
            assert (q.io_errors, q.op_status[w][ioerr], q.op_status[r][ioerr]) == (2, 1, 1)
            assert (q.op_status[w][0], q.op_status[r][0]) == (3, 3), q.op_status
            # logged once for the burst, with the backing's error
            deadline = time.monotonic() + 10
            while "2 backing-store I/O error(s) (last error: Input/output error)" \
                    not in e.logtext():
                assert time.monotonic() < deadline, e.logtext()
                time.sleep(0.05)
            # the backing answers again: so does the export
            fs.clear()
            assert d.write(8, pattern(1)) == vc.BLK_S_OK
            assert d.read(80, 4096) == (vc.BLK_S_OK, pattern(202))
        assert e.alive()
    finally:
        assert stop_export(e) == 0, e.logtext()


def test_eio_is_counted_in_blkserve_errors_total(fs, tmp_path):
    """The same faults through `blkserve serve`: a volume on an allow-listed
    backing (the FUSE file), exported; GET /metrics shows
    blkserve_errors_total{op, status="ioerr"} at exactly the failed requests."""
    from prometheus_client.parser import text_string_to_metric_families

    cfg = tmp_path / "blkserve.toml"
    cfg.write_text(f'allowed_backings = ["{fs.mountpoint}/*"]\nworker_start_timeout_s = 20\n')

    def errors(api: ApiServer) -> dict[str, float]:
        text = httpx.get(api.url + "/metrics", timeout=10).text
        return {s.labels["op"]: s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples
                if s.name == "blkserve_errors_total" and s.labels.get("volume") == "ff1"
                and s.labels.get("status") == "ioerr"}

    with ApiServer(config=cfg) as api:
        http = api.client()
        r = http.post("/v1/volumes", json={"name": "ff1", "backing": fs.path("disk.img")})
        assert r.status_code == 201, r.text
        r = http.put("/v1/volumes/ff1/export", json={})
        assert r.status_code == 201, r.text
        assert set(errors(api).values()) == {0}
        with vc.BlkDevice(r.json()["socket"], queues=1, connect_retry=5.0) as d:
            d.data_align = 4096
            fs.fail("write", errno.EIO, 8 * 512, 9 * 512)
            fs.fail("read", errno.EIO, 80 * 512, 80 * 512 + 1)
            writes, reads = _io_mix(d)
            assert [r.status for r in writes] == [0, vc.BLK_S_IOERR, 0, 0]
            assert [r.status for r in reads] == [0, 0, vc.BLK_S_IOERR, 0]
            got = errors(api)
            assert got == {**dict.fromkeys(got, 0), "write": 1, "read": 1}, got
        assert http.delete("/v1/volumes/ff1/export").status_code == 204
        log = api.log()
    assert "Traceback" not in log, log
