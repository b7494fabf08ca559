"""RBD backings: `blkserve export rbd:POOL/IMAGE` against a real Ceph cluster
(one monitor, one BlueStore OSD, cephx; tests/ceph.py), driven by the
Python vhost-user frontend and by `blkserve bench --verify`.  What a guest
writes is read back through `rbd export` (another client), what another
client writes is read through the export; the exclusive lock keeps a second
export's rings off a served image; an OSD that stops stalls the requests
and they complete when it returns, or fail with IOERR after --rbd-timeout;
bad cluster input is a one-line exit 2 within a bounded time."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_client as vc  # noqa: E402
from ceph import CephCluster, CephError  # noqa: E402

from blkserve.stats import StatsError  # noqa: E402
from blkserve.stats import read as read_stats  # noqa: E402

IMG = 64 << 20
SECTORS = IMG // 512


class RbdExport:
    def __init__(self, proc: subprocess.Popen, sock: str, log: Path, stats: str):
        self.proc, self.sock, self.log, self.stats = proc, sock, log, stats

    def device(self, **kw) -> vc.BlkDevice:
        kw.setdefault("queues", 2)
        kw.setdefault("connect_retry", 2.0)
        return vc.BlkDevice(self.sock, **kw)

    def logtext(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode


def export_cmd(ceph: CephCluster, image: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "blkserve", "export", f"rbd:{ceph.pool}/{image}",
            "--ceph-conf", ceph.conf, *args]


def start(ceph: CephCluster, image: str, tmp_path: Path, *args: str,
          name: str = "export") -> RbdExport:
    sock = os.path.join(tempfile.mkdtemp(prefix="bsrbd-"), "blk.sock")
    log = tmp_path / f"{name}.log"
    stats = str(tmp_path / f"{name}.stats")
    proc = subprocess.Popen(
        [*export_cmd(ceph, image, *args), "--socket", sock, "--stats-file", stats],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    deadline = time.monotonic() + 40
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"export did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return RbdExport(proc, sock, log, stats)


@pytest.fixture
def image(ceph, request):
    name = "t-" + request.node.name.replace("[", "-").replace("]", "")[:40]
    ceph.create_image(name, IMG)
    yield name
    ceph.remove_image(name)


@pytest.fixture
def export(ceph, image, tmp_path):
    e = start(ceph, image, tmp_path, "--queues", "2")
    yield e
    assert e.stop() == 0, e.logtext()


def wait_for(cond, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def test_io_reaches_the_cluster_and_back(ceph, image, export):
    """Writes on both queues land in the image (read by another client,
    `rbd export`); what another client wrote before the rings started
    (`rbd import-diff`) is read through the export, and while they run the
    export holds the image's exclusive lock: another client's write is
    refused (EROFS); multi-segment and indirect requests; FLUSH; the
    capacity is the image's."""
    c = os.urandom(12288)
    ceph.write_image(image, 20000 * 512, c)
    d = export.device()
    try:
        cfg = vc.BlkConfig.parse(d.client.get_config(0, vc.BLK_CONFIG_SIZE))
        assert cfg.capacity == SECTORS
        a, b = os.urandom(8192), os.urandom(64 << 10)
        assert d.write(16, a, queue=0) == vc.BLK_S_OK
        assert d.write(4096, b, queue=1, indirect=True, seg_size=4096) == vc.BLK_S_OK
        assert d.flush() == vc.BLK_S_OK
        assert d.read(16, len(a), queue=1) == (vc.BLK_S_OK, a)
        assert d.read(4096, len(b), seg_size=512, indirect=True) == (vc.BLK_S_OK, b)
        data = ceph.export_image(image)
        assert data[16 * 512:16 * 512 + len(a)] == a
        assert data[4096 * 512:4096 * 512 + len(b)] == b
        assert d.read(20000, len(c)) == (vc.BLK_S_OK, c)
        with pytest.raises(CephError, match="Read-only file system"):
            ceph.write_image(image, 0, b"x" * 4096)
        assert d.read(SECTORS, 512)[0] == vc.BLK_S_IOERR     # past the end
        serial = d.get_id()
        assert serial.startswith(b"bs-")
    finally:
        d.close()
    st = read_stats(export.stats)
    # op 0 read, 1 write, 2 flush; [0]: completed OK
    total = [sum(q.op_status[op][0] for q in st.queues) for op in (0, 1, 2)]
    assert total[0] >= 3 and total[1] >= 2 and total[2] >= 1, total


def test_read_only_export(ceph, image, tmp_path):
    """--read-only opens the image read-only (no lock is taken): reads are
    served, writes and write-zeroes fail with IOERR, BLK_RO is offered."""
    ceph.write_image(image, 0, b"\x42" * 4096)
    e = start(ceph, image, tmp_path, "--queues", "1", "--read-only")
    d = e.device(queues=1)
    try:
        assert d.offered_features >> vc.BLK_F_RO & 1
        assert d.read(0, 4096) == (vc.BLK_S_OK, b"\x42" * 4096)
        assert d.write(0, b"x" * 4096) == vc.BLK_S_IOERR
        # another client may still write: a read-only export holds no lock
        ceph.write_image(image, 8192, b"\x43" * 4096)
        assert d.read(16, 4096) == (vc.BLK_S_OK, b"\x43" * 4096)
    finally:
        d.close()
        assert e.stop() == 0, e.logtext()
    assert ceph.export_image(image)[:4096] == b"\x42" * 4096


def test_write_zeroes_reads_back_zeroes_and_discard_is_accepted(ceph, image, export):
    """WRITE_ZEROES (with and without unmap) reads back zeroes, through the
    export and in the image; DISCARD answers OK (librbd treats it as a hint:
    no promise of zeroes, so none is checked)."""
    d = export.device()
    try:
        pattern = b"\xa5" * (1 << 20)
        assert d.write(0, pattern) == vc.BLK_S_OK
        assert d.write_zeroes(8, 256, unmap=True) == vc.BLK_S_OK
        assert d.write_zeroes(512, 256, unmap=False) == vc.BLK_S_OK
        assert d.read(8, 256 * 512) == (vc.BLK_S_OK, bytes(256 * 512))
        assert d.read(512, 256 * 512) == (vc.BLK_S_OK, bytes(256 * 512))
        assert d.read(0, 8 * 512) == (vc.BLK_S_OK, b"\xa5" * 8 * 512)   # untouched
        assert d.discard(1024, 1024) == vc.BLK_S_OK
        assert d.discard(SECTORS - 4, 8) == vc.BLK_S_IOERR
    finally:
        d.close()
    data = ceph.export_image(image)
    assert data[8 * 512:264 * 512] == bytes(256 * 512)
    assert data[512 * 512:768 * 512] == bytes(256 * 512)
    assert data[:8 * 512] == b"\xa5" * 8 * 512


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_bench_verify_two_queues(ceph, image, tmp_path, cache):
    """`blkserve bench --verify`, random mixed I/O at QD32 on two queues:
    every read matches what was written, no request fails."""
    e = start(ceph, image, tmp_path, "--queues", "2", "--cache", cache)
    try:
        r = subprocess.run([sys.executable, "-m", "blkserve", "bench", "--socket", e.sock,
                            "--rw", "randrw", "--verify", "--queues", "2", "--runtime", "3",
                            "--size", "16M", "--json"], capture_output=True, text=True,
                           timeout=180)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        assert e.stop() == 0, e.logtext()


def test_online_resize(ceph, image, tmp_path):
    """`rbd resize` by another client, then SIGHUP: the export serves the new
    capacity and tells the frontend (CONFIG_CHANGE_MSG)."""
    e = start(ceph, image, tmp_path, "--queues", "1")
    d = vc.BlkDevice(e.sock, queues=1, connect_retry=2.0, setup=False,
                     protocol_features=vc.BlkDevice.WANTED_PROTOCOL_FEATURES
                     | vc.bit(vc.PROTOCOL_F_BACKEND_REQ))
    ours, theirs = socket.socketpair()
    try:
        d.negotiate()
        d.client.set_backend_req_fd(theirs.fileno())
        theirs.close()
        d.setup_memory()
        d.setup_queue(0)
        assert d.read(SECTORS, 512)[0] == vc.BLK_S_IOERR
        ceph.run("rbd", "resize", "--no-progress", "--size", f"{2 * IMG}B",
                 f"{ceph.pool}/{image}")
        e.proc.send_signal(signal.SIGHUP)
        ours.settimeout(20)
        request, flags, size = struct.unpack_from("<III", ours.recv(64))
        assert (request, flags & 0x3, size) == (2, 1, 0)  # CONFIG_CHANGE_MSG
        cfg = vc.BlkConfig.parse(d.client.get_config(0, vc.BLK_CONFIG_SIZE))
        assert cfg.capacity == 2 * SECTORS
        assert d.write(SECTORS + 8, b"\x5a" * 4096) == vc.BLK_S_OK
        assert d.read(SECTORS + 8, 4096) == (vc.BLK_S_OK, b"\x5a" * 4096)
    finally:
        ours.close()
        d.close()
        assert e.stop() == 0, e.logtext()
    assert "capacity grown from" in e.logtext()


def test_second_export_waits_for_the_exclusive_lock(ceph, image, tmp_path):
    """Two exports of one image (a migration's source and destination, or
    an accidental second VM): the second starts, but its rings are refused
    with a clear error while the first runs rings; once the first's rings
    stop (its last GET_VRING_BASE), the second serves, and sees the data."""
    first = start(ceph, image, tmp_path, "--queues", "1", name="first")
    second = start(ceph, image, tmp_path, "--queues", "1", name="second")
    try:
        d1 = first.device(queues=1)
        data = os.urandom(4096)
        assert d1.write(8, data) == vc.BLK_S_OK
        with pytest.raises(vc.VhostError):
            d2 = second.device(queues=1)
            d2.read(8, 4096)
        wait_for(lambda: "exclusive lock" in second.logtext(), 10, "the refusal's log line")
        assert second.proc.poll() is None
        # the source stops its rings as QEMU does at a migration's end: the
        # lock is let go before the last GET_VRING_BASE is answered (a bare
        # disconnect lets go too, but after it: a retry could race it)
        d1.stop()
        d1.close()
        d2 = second.device(queues=1)
        try:
            assert d2.read(8, 4096) == (vc.BLK_S_OK, data)
        finally:
            d2.close()
    finally:
        assert first.stop() == 0, first.logtext()
        assert second.stop() == 0, second.logtext()


def test_a_cut_off_holder_is_fenced(ceph, image, tmp_path):
    """Two exports of one image, as on two hosts: the first runs rings and
    is then cut off (SIGSTOP: it holds the lock but answers nobody).  The
    second's ring start waits until the cluster has given up on the first
    (its watch times out: 5 s in the test cluster, 30 s by default), then
    breaks the lock and blocklists it; when the first wakes up, its write
    fails with IOERR and never reaches the image (fenced)."""
    a = start(ceph, image, tmp_path, "--queues", "1", name="a")
    b = start(ceph, image, tmp_path, "--queues", "1", name="b")
    try:
        da = a.device(queues=1)
        assert da.write(8, b"A" * 4096) == vc.BLK_S_OK
        os.kill(a.proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        db = b.device(queues=1)
        assert db.write(16, b"B" * 4096, timeout=60) == vc.BLK_S_OK
        took = time.monotonic() - t0
        assert 2 <= took < 40, took    # it did wait for the watch to time out
        os.kill(a.proc.pid, signal.SIGCONT)
        assert da.write(8, b"Z" * 4096, timeout=60) == vc.BLK_S_IOERR
        assert db.read(8, 4096) == (vc.BLK_S_OK, b"A" * 4096)
        db.close()
        data = ceph.export_image(image)
        assert data[8 * 512:9 * 512] == b"A" * 512 and data[16 * 512:17 * 512] == b"B" * 512
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
        a.stop()
        assert b.stop() == 0, b.logtext()


def _bench(sock: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blkserve", "bench", "--socket", sock,
                             "--queues", "1", "--iodepth", "8", "--size", "8M", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _inflight(e: RbdExport) -> int:
    try:
        return sum(q.inflight for q in read_stats(e.stats).queues)
    except StatsError:
        return 0


def _completed(e: RbdExport) -> int:
    st = read_stats(e.stats)
    return sum(sum(q.op_status[0]) + sum(q.op_status[1]) for q in st.queues)


def test_osd_stop_stalls_requests_and_they_complete_when_it_returns(ceph, image, tmp_path):
    """The OSD stops under I/O: the requests wait (no error reaches the
    frontend) and complete once it is back; bench --verify sees every byte."""
    e = start(ceph, image, tmp_path, "--queues", "1", "--rbd-timeout", "120")
    try:
        b = _bench(e.sock, "--rw", "randrw", "--verify", "--runtime", "20",
                   "--timeout", "110")
        wait_for(lambda: _completed(e) > 2000 and _inflight(e) > 0, 60, "I/O running")
        ceph.stop_osd()
        # the precondition: requests are held by the stopped cluster
        stalled = _completed(e)
        wait_for(lambda: _inflight(e) == 8, 20, "8 requests in flight at the stall")
        time.sleep(3)
        assert _completed(e) - stalled <= 8, "requests completed without an OSD"
        ceph.start_osd()
        out, _ = b.communicate(timeout=150)
        assert b.returncode == 0, out
        assert "errors  : 0" in out, out
        assert sum(q.io_errors for q in read_stats(e.stats).queues) == 0
    finally:
        if ceph.osd_pid is None:
            ceph.start_osd()
        assert e.stop() == 0, e.logtext()


def test_requests_fail_after_the_rbd_timeout_and_the_export_recovers(ceph, image, tmp_path):
    """With --rbd-timeout 3 and the OSD away longer, the waiting requests
    fail with IOERR (counted, logged), the export keeps running, and once
    the OSD is back the same export serves reads and writes again.  A stop
    while librbd holds requests waits for them (librbd cannot cancel) for
    at most the timeout."""
    e = start(ceph, image, tmp_path, "--queues", "1", "--rbd-timeout", "3",
              "--drain-timeout", "1")
    d = e.device(queues=1)
    try:
        data = os.urandom(4096)
        assert d.write(64, data) == vc.BLK_S_OK
        ceph.stop_osd()
        t0 = time.monotonic()
        assert d.write(64, os.urandom(4096), timeout=30) == vc.BLK_S_IOERR
        took = time.monotonic() - t0
        assert 2 <= took < 20, took
        assert e.proc.poll() is None
        st = read_stats(e.stats)
        assert sum(q.io_errors for q in st.queues) >= 1
        ceph.start_osd()
        # the cluster is back: the same export serves again (the first
        # requests may still meet a peering OSD: retried until they pass)
        wait_for(lambda: d.write(64, data, timeout=30) == vc.BLK_S_OK, 90, "a write to pass")
        assert d.read(64, 4096, timeout=30) == (vc.BLK_S_OK, data)
    finally:
        if ceph.osd_pid is None:
            ceph.start_osd()
        d.close()
        assert e.stop() == 0, e.logtext()
    assert "backing-store I/O error" in e.logtext(), e.logtext()


@pytest.mark.parametrize("case", ["pool", "image", "key", "monitor", "spec"])
def test_bad_cluster_input_is_one_line_exit_2_in_bounded_time(ceph, tmp_path, case):
    """Unknown pool or image, a wrong key, monitors nobody listens on, a
    malformed spec: exit 2 with one line naming the problem, within the
    connection bound (--rbd-timeout 5 here), never a hang."""
    conf = ceph.conf
    target = f"rbd:{ceph.pool}/nosuchimage"
    extra: list[str] = []
    if case == "pool":
        target = "rbd:nosuchpool/x"
    elif case == "key":
        bad = tmp_path / "bad.keyring"
        bad.write_text("[client.admin]\n\tkey = AQBmT0VlAAAAABAAnv9fRGJbm3qOIEszpPNDyg==\n")
        extra = ["--ceph-keyring", str(bad)]
    elif case == "monitor":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        text = Path(ceph.conf).read_text()
        lines = [f"mon host = v2:127.0.0.1:{port}" if ln.strip().startswith("mon host")
                 else ln for ln in text.splitlines()]
        conf = str(tmp_path / "nomon.conf")
        Path(conf).write_text("\n".join(lines) + "\n")
    elif case == "spec":
        target = "rbd:only-a-pool"
    sock = os.path.join(tempfile.mkdtemp(prefix="bsrbd-"), "blk.sock")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "blkserve", "export", target, "--ceph-conf", conf,
                        "--rbd-timeout", "5", "--socket", sock, *extra],
                       capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blkserve export: error: "), r.stderr
    expect = {"pool": "no such pool", "image": "no such image", "key": "cannot connect",
              "monitor": "cannot connect", "spec": "rbd:POOL/IMAGE"}[case]
    assert expect in lines[0], lines[0]
    assert took < 30, took
    assert not os.path.exists(sock)


def test_stop_waits_for_librbd_at_most_the_timeout(ceph, image, tmp_path):
    """SIGTERM while librbd holds requests (the OSD is stopped): librbd
    cannot cancel, and a request it holds may still write into guest
    memory, so the stop waits, but no longer than --rbd-timeout."""
    e = start(ceph, image, tmp_path, "--queues", "1", "--rbd-timeout", "4",
              "--drain-timeout", "1")
    b = _bench(e.sock, "--rw", "randwrite", "--runtime", "60", "--timeout", "60")
    try:
        wait_for(lambda: _completed(e) > 200, 60, "I/O running")
        ceph.stop_osd()
        wait_for(lambda: _inflight(e) == 8, 20, "8 requests held by librbd")
        t0 = time.monotonic()
        rc = e.stop(timeout=30)
        took = time.monotonic() - t0
        assert rc == 0, e.logtext()
        assert took < 15, (took, e.logtext())
    finally:
        b.kill()
        b.wait()
        if ceph.osd_pid is None:
            ceph.start_osd()
        e.stop()


def test_sigterm_while_a_ring_stop_waits(ceph, image, tmp_path):
    """The frontend goes away while librbd holds a request (the OSD is
    away), so the connection's cleanup stops the ring and waits for librbd;
    SIGTERM comes meanwhile and cancels that cleanup: the stop already
    running is let finish before the export stops and frees the queue
    itself, and the export exits 0 within the bound (`make asan` runs this
    file: a stop thread left running under a freed queue is reported)."""
    e = start(ceph, image, tmp_path, "--queues", "1", "--rbd-timeout", "4",
              "--drain-timeout", "1")
    d = e.device(queues=1)
    try:
        assert d.write(8, b"x" * 4096) == vc.BLK_S_OK
        ceph.stop_osd()
        d.submit(vc.BLK_T_OUT, 16, out=b"y" * 4096)
        wait_for(lambda: _inflight(e) == 1, 20, "a request held by librbd")
        d.client.close()     # the frontend is gone: the cleanup stops the ring
        time.sleep(1)        # ... and waits for librbd (up to 4 s)
        assert _inflight(e) == 1
        t0 = time.monotonic()
        rc = e.stop(timeout=30)
        assert rc == 0, e.logtext()
        assert time.monotonic() - t0 < 15
    finally:
        if ceph.osd_pid is None:
            ceph.start_osd()
        e.stop()


def test_help_names_the_rbd_options():
    out = subprocess.run([sys.executable, "-m", "blkserve", "export", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--ceph-conf", "--ceph-id", "--ceph-keyring", "--rbd-timeout", "rbd:POOL/IMAGE"):
        assert opt in out, opt



def test_trace_breakdown_covers_rbd_requests(ceph, image, tmp_path):
    """`blkserve trace --breakdown` on an RBD export: submit->complete runs
    from the hand-over to librbd to its completion (USDT rbd_submit,
    rbd_complete), for nearly every request; pop->submit and complete->used
    are seen too."""
    if os.geteuid() != 0 or not os.path.isdir("/usr/lib/python3/dist-packages/bcc") or \
            not os.path.exists(f"/lib/modules/{os.uname().release}/build/include"):
        pytest.skip("tracing needs root, bcc (python3-bpfcc) and kernel headers")
    e = start(ceph, image, tmp_path, "--queues", "1", name="rbdtrace")
    try:
        b = _bench(e.sock, "--rw", "randrw", "--runtime", "12", "--iodepth", "4")
        wait_for(lambda: _completed(e) > 100, 30, "I/O running")
        p = subprocess.run([sys.executable, "-m", "blkserve", "trace", "--volume", "rbdtrace",
                            "--duration", "3", "--breakdown", "--json"],
                           capture_output=True, text=True, timeout=120)
        out, _ = b.communicate(timeout=120)
        assert b.returncode == 0, out
    finally:
        assert e.stop() == 0, e.logtext()
    assert p.returncode == 0, p.stderr[-3000:]
    vol = json.loads(p.stdout)["volumes"]["rbdtrace"]
    bd = vol["breakdown"]
    for stage in ("pop->submit", "submit->complete", "complete->used"):
        assert bd[stage]["count"] > 0, (stage, bd)
    done = vol["latency"]["read"]["count"] + vol["latency"]["write"]["count"]
    assert 0.8 * done < bd["submit->complete"]["count"] < 1.2 * done + 100, (done, bd)


def test_blkif_transport_on_rbd(ceph, image):
    """The Xen blkif transport on an RBD image: the engine's blkif test
    frontend (native/tests/test_blkif.c: the ring over shared memory, a fake
    grant table) writes, reads back, flushes, discards and does indirect
    I/O through the real ring code, request core and librbd.  (A Xen guest
    in the Xen testbed cannot reach this cluster: dom0 runs under QEMU with
    user networking, and the cluster's monitor map names 127.0.0.1, which
    there is dom0's own loopback.)"""
    root = Path(__file__).resolve().parent.parent
    subprocess.run(["make", "-s", "build/test_blkif"], cwd=root, check=True)
    r = subprocess.run([str(root / "build" / "test_blkif"), "--rbd", ceph.conf, ceph.pool,
                        image], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "test_blkif --rbd: all checks passed" in r.stdout
