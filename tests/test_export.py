"""`blkserve export` as a real process, driven by the Python vhost-user
frontend of tests/vhost_client.py (itself proven against qemu-storage-daemon
in test_vhost_client_qsd.py): protocol, I/O, errors, malformed input,
reconnects, signals and CLI errors."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_client as vc  # noqa: E402

from blkserve.export import is_null  # noqa: E402

IMG_SIZE = 64 << 20
SECTORS = IMG_SIZE // 512


class Export:
    def __init__(self, img: Path, sock: str, proc: subprocess.Popen, log: Path):
        self.img, self.sock, self.proc, self.log = img, sock, proc, log

    def device(self, **kw) -> vc.BlkDevice:
        kw.setdefault("queues", 2)
        kw.setdefault("connect_retry", 2.0)
        return vc.BlkDevice(self.sock, **kw)

    def image(self, sector: int, n: int) -> bytes:
        with open(self.img, "rb") as f:
            f.seek(sector * 512)
            return f.read(n)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logtext(self) -> str:
        return self.log.read_text()


def start_export(tmp_path: Path, *args: str, size: int = IMG_SIZE,
                 backing: str | None = None, image: str | None = None,
                 name: str = "export") -> Export:
    """*backing*: serve that file (e.g. a faultfs one) or null:SIZE instead
    of tmp_path/disk.img; *image*: where the test reads what was written (the
    file under a faultfs one); the log is tmp_path/NAME.log."""
    null = is_null(backing)
    img = Path(os.devnull) if null else Path(backing) if backing else tmp_path / "disk.img"
    if not null and not img.exists():
        with open(img, "wb") as f:
            f.truncate(size)
    sock = os.path.join(tempfile.mkdtemp(prefix="bs-"), "blk.sock")
    log = tmp_path / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blkserve", "export", backing if null else str(img),
         "--socket", sock, *args],
        stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
    )
    deadline = time.monotonic() + 10
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"export did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return Export(Path(image) if image else img, sock, proc, log)


def stop_export(e: Export) -> int:
    if e.proc.poll() is None:
        e.proc.send_signal(signal.SIGTERM)
        try:
            return e.proc.wait(10)
        except subprocess.TimeoutExpired:
            e.proc.kill()
            raise
    return e.proc.returncode


@pytest.fixture
def export(tmp_path):
    e = start_export(tmp_path, "--queues", "2")
    yield e
    rc = stop_export(e)
    assert rc == 0, e.logtext()


@pytest.fixture
def dev(export):
    d = export.device()
    yield d
    d.close()


def test_handshake_and_config(dev):
    names = set(vc.decode_features(dev.features))
    for want in ("VERSION_1", "RING_EVENT_IDX", "INDIRECT_DESC", "BLK_F_SEG_MAX",
                 "BLK_F_BLK_SIZE", "BLK_F_FLUSH", "BLK_F_MQ"):
        assert any(want in n for n in names), (want, names)
    assert dev.max_queues == 2
    assert dev.config.capacity == SECTORS
    assert dev.config.num_queues == 2
    assert dev.config.blk_size == 512
    assert dev.config.seg_max == 126


def test_partial_config_reads(dev):
    """Frontends read the config space in pieces; any in-range window works."""
    full = dev.client.get_config(0, 60)
    assert dev.client.get_config(0, 8) == full[:8]
    assert dev.client.get_config(34, 2) == full[34:36]
    # outside the config space: an empty answer, and the connection stays up
    for offset, size in ((0, 4096 - 12), (200, 8), (90, 8)):
        assert dev.client.call(vc.GET_CONFIG, vc.pack_config(offset, bytes(size))) == b""
    assert dev.read(0, 512)[0] == vc.BLK_S_OK


@pytest.mark.parametrize("size", [512, 4096, 65536, 128 << 10])
def test_write_read_both_queues(export, dev, size):
    for q in (0, 1):
        sector = 1000 + q * 512
        data = os.urandom(size)
        assert dev.write(sector, data, queue=q) == vc.BLK_S_OK
        status, back = dev.read(sector, size, queue=q)
        assert status == vc.BLK_S_OK and back == data
        assert export.image(sector, size) == data


def test_indirect_and_segmented(dev):
    data = os.urandom(64 << 10)
    assert dev.write(4096, data, indirect=True, seg_size=4096) == vc.BLK_S_OK
    status, back = dev.read(4096, len(data), indirect=True, seg_size=512)
    assert status == vc.BLK_S_OK and back == data


def test_batches(dev):
    blocks = {i: os.urandom(4096) for i in range(32)}
    reqs = dev.submit_many([(vc.BLK_T_OUT, 8 * i, b) for i, b in blocks.items()],
                           indirect=True)
    assert [r.status for r in reqs] == [vc.BLK_S_OK] * 32
    reqs = dev.submit_many([(vc.BLK_T_IN, 8 * i, 4096) for i in blocks], queue=1,
                           indirect=True)
    assert [r.data for r in reqs] == list(blocks.values())


def test_flush_get_id_and_last_avail(dev):
    assert dev.flush() == vc.BLK_S_OK
    serial = dev.get_id()
    assert serial.startswith(b"bs-") and len(serial.rstrip(b"\0")) == 20
    assert dev.get_id() == serial  # stable
    assert dev.read(0, 512, queue=1)[0] == vc.BLK_S_OK
    assert dev.get_vring_base(1) == 1
    assert dev.get_vring_base(0) == 3


def test_error_statuses(dev):
    assert dev.read(SECTORS, 512)[0] == vc.BLK_S_IOERR           # past the end
    assert dev.read(SECTORS - 1, 1024)[0] == vc.BLK_S_IOERR      # straddles the end
    assert dev.read(2**64 - 1, 512)[0] == vc.BLK_S_IOERR         # sector*512 overflows
    assert dev.write(SECTORS, b"x" * 512) == vc.BLK_S_IOERR
    assert dev.wait(dev.submit(77, 0, in_len=512)).status == vc.BLK_S_UNSUPP
    # a device-writable data buffer on a write, a readable one on a read
    r = dev.submit_raw([(vc.blk_header(vc.BLK_T_OUT), False), (512, True), (1, True)])
    assert dev.wait(r).status == vc.BLK_S_IOERR
    r = dev.submit_raw([(vc.blk_header(vc.BLK_T_IN), False), (b"\0" * 512, False), (1, True)])
    assert dev.wait(r).status == vc.BLK_S_IOERR
    r = dev.submit_raw([(vc.blk_header(vc.BLK_T_IN)[:8], False), (1, True)])
    assert dev.wait(r).status == vc.BLK_S_IOERR                     # short header
    assert dev.read(0, 512)[0] == vc.BLK_S_OK


def test_bad_chains_get_ioerr_or_stop_the_queue(export, dev):
    """A chain with a bad buffer whose status byte can be located is
    answered IOERR through it (never left as the driver wrote it: a driver
    that does not pre-set it would read OK); one whose status cannot be
    located (a loop) gets no used entry at all: its queue stops until the
    frontend resets it, the other queues go on."""
    vq = dev.vqs[0]
    a, st = vc.queue_read_outside_memory(dev)  # status pre-set to OK
    assert vq.wait_used(1)[0] == (a, 1)
    assert dev.mem.read(st, 1) == bytes([vc.BLK_S_IOERR])
    assert dev.read(0, 512)[0] == vc.BLK_S_OK
    used_before = vq.used_idx
    vc.queue_looping_chain(dev)
    deadline = time.monotonic() + 10
    while "queue stopped until the frontend resets it" not in export.logtext():
        assert time.monotonic() < deadline, export.logtext()
        time.sleep(0.2)
    assert vq.used_idx == used_before        # no used entry for the loop
    assert dev.read(0, 512, queue=1)[0] == vc.BLK_S_OK
    assert "malformed descriptor chain" in export.logtext()


def test_truncated_guest_memory_stops_the_queue_not_the_export(export, dev):
    """The frontend shrinks its guest-RAM memfd under a running queue, then
    queues a request whose buffers lie past the new end: the backend's
    touch of a vanished page would SIGBUS the worker (every volume queue
    with it).  The export lives, says why the queue stopped, and serves a
    new connection."""
    assert dev.read(0, 512)[0] == vc.BLK_S_OK
    vq = dev.vqs[0]
    hdr = dev.mem.alloc(16)
    dev.mem.write(hdr, vc.blk_header(vc.BLK_T_GET_ID))
    region = dev.mem.regions[0]
    keep = (region.mark() + 4095) // 4096 * 4096 + 4096  # rings and hdr stay
    far = region.gpa + keep + 8192
    a, b, c = vq.alloc_descs(3)
    vq.add_raw_descriptors([
        (a, hdr, 16, vc.VRING_DESC_F_NEXT, b),
        (b, far, 20, vc.VRING_DESC_F_NEXT | vc.VRING_DESC_F_WRITE, c),  # GET_ID copies here
        (c, far + 64, 1, vc.VRING_DESC_F_WRITE, 0),
    ], head=a)
    os.ftruncate(region.fd, keep + region.mmap_offset)
    try:
        vq.kick()
        deadline = time.monotonic() + 10
        while "shrank the guest memory" not in export.logtext():
            assert export.alive(), export.logtext()
            assert time.monotonic() < deadline, export.logtext()
            time.sleep(0.1)
    finally:
        os.ftruncate(region.fd, region.size + region.mmap_offset)
    assert export.alive()
    dev.close()
    d2 = export.device()
    try:
        assert d2.read(0, 512)[0] == vc.BLK_S_OK
    finally:
        d2.close()


def _kick_without_fd(d):
    d.client.send(vc.SET_VRING_KICK, vc.pack_vring_file(0, has_fd=True))


def _call_with_two_fds(d):
    d.client.send(vc.SET_VRING_CALL, vc.pack_vring_file(0),
                  fds=(d.vqs[0].call_fd, d.vqs[1].call_fd))


def _mem_region_larger_than_fd(d):
    region = vc.pack_mem_region(0, 1 << 40, 0x7F00_0000_0000)
    d.client.send(vc.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region, fds=(d.mem.fds[0],))


def _vring_addr_outside_memory(d):
    d.client.send(vc.SET_VRING_ADDR, vc.pack_vring_addr(0, 0x10, 0x20, 0x30))
    d.client.send(vc.SET_VRING_KICK, vc.pack_vring_file(0), fds=(d.vqs[0].kick_fd,))


def _too_many_regions(d):
    regions = b"".join(vc.pack_mem_region(i << 20, 1 << 20, 0x7000_0000_0000 + (i << 20))
                       for i in range(9))
    d.client.send(vc.SET_MEM_TABLE, struct.pack("<II", 9, 0) + regions,
                  fds=[d.mem.fds[0]] * 8)


def _too_many_slots(d):
    fd = os.memfd_create("slot")
    os.ftruncate(fd, 4096)
    try:
        for i in range(40):
            d.client.send(vc.ADD_MEM_REG, struct.pack("<Q", 0) + vc.pack_mem_region(
                (1 << 32) + (i << 20), 4096, 0x6000_0000_0000 + (i << 20)), fds=(fd,))
    except (vc.VhostDisconnected, OSError):
        pass
    finally:
        os.close(fd)


def _config_write_truncated(d):
    d.client.send(vc.SET_CONFIG, struct.pack("<III", 32, 8, 0) + b"\0")


MALFORMED = {
    "oversized_payload": lambda d: d.client.send(vc.GET_FEATURES, bytes(8192)),
    "truncated_payload": lambda d: d.client.send(vc.SET_VRING_NUM, b"\0" * 3),
    "unknown_request": lambda d: d.client.send(99),
    "bad_version": lambda d: d.client.send_raw(vc.HDR.pack(vc.GET_FEATURES, 2, 0)),
    "kick_without_fd": _kick_without_fd,
    "call_with_two_fds": _call_with_two_fds,
    "queue_index_out_of_range": lambda d: d.client.send(
        vc.SET_VRING_NUM, vc.pack_vring_state(7, 128)),
    "queue_size_not_power_of_two": lambda d: d.client.send(
        vc.SET_VRING_NUM, vc.pack_vring_state(0, 100)),
    "queue_size_too_big": lambda d: d.client.send(
        vc.SET_VRING_NUM, vc.pack_vring_state(0, 65536)),
    "features_never_offered": lambda d: d.client.send(
        vc.SET_FEATURES, vc.pack_u64(1 << 63)),
    "mem_region_larger_than_fd": _mem_region_larger_than_fd,
    "vring_addr_outside_memory": _vring_addr_outside_memory,
    "more_regions_than_advertised": _too_many_regions,
    "more_slots_than_advertised": _too_many_slots,
    "config_write_truncated": _config_write_truncated,
    "reply_flag_from_frontend": lambda d: d.client.send_raw(
        vc.HDR.pack(vc.GET_FEATURES, vc.VERSION | vc.FLAG_REPLY, 0)),
    "vring_fd_reserved_bits": lambda d: d.client.send(
        vc.SET_VRING_CALL, vc.pack_u64(1 << 40 | vc.VRING_NOFD)),
}


@pytest.mark.parametrize("attack", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_input_drops_connection_not_process(export, attack):
    d = export.device()
    try:
        assert d.write(0, b"\x5a" * 512) == vc.BLK_S_OK
        MALFORMED[attack](d)
        assert d.client.wait_disconnect(3.0), "malformed input was not rejected"
    finally:
        d.close()
    assert export.alive()
    d = export.device()  # a fresh connection is served normally
    try:
        status, data = d.read(0, 512)
        assert status == vc.BLK_S_OK and data == b"\x5a" * 512
    finally:
        d.close()


def test_ring_corruption_stops_only_that_queue(export):
    d = export.device()
    try:
        d.vqs[1].publish(d.queue_size + 1)  # a head index beyond the ring
        d.vqs[1].kick()
        req = d.submit(vc.BLK_T_IN, 0, in_len=512, queue=1)
        with pytest.raises(TimeoutError):
            d.wait(req, timeout=0.5)
        assert d.read(0, 512, queue=0)[0] == vc.BLK_S_OK  # the other queue serves
    finally:
        d.close()
    deadline = time.monotonic() + 5
    while "corrupted the ring" not in export.logtext():
        assert time.monotonic() < deadline, export.logtext()
        time.sleep(0.2)
    d = export.device()  # a new connection resets the device
    try:
        assert d.read(0, 512, queue=1)[0] == vc.BLK_S_OK
    finally:
        d.close()


def test_second_frontend_refused_while_one_is_served(export, dev):
    c = vc.VhostUserClient(export.sock, timeout=2.0)
    try:
        assert c.wait_disconnect(3.0)
    finally:
        c.close()
    assert dev.read(0, 512)[0] == vc.BLK_S_OK


def test_reconnect_after_disconnect_with_io_in_flight(export):
    d = export.device()
    d.submit_many([(vc.BLK_T_OUT, 8 * i, os.urandom(4096)) for i in range(16)],
                  indirect=True, wait=False)
    d.close()  # vanish with requests possibly in flight
    for _ in range(3):
        d = export.device()
        try:
            data = os.urandom(4096)
            assert d.write(64, data) == vc.BLK_S_OK
            assert d.read(64, 4096) == (vc.BLK_S_OK, data)
        finally:
            d.close()
    assert export.alive()


def test_read_only_export(tmp_path):
    e = start_export(tmp_path, "--read-only", "--serial", "my-disk-01")
    try:
        d = e.device(queues=1)
        try:
            assert d.offered_features >> vc.BLK_F_RO & 1
            assert d.write(0, b"\xff" * 512) == vc.BLK_S_IOERR
            assert d.read(0, 512) == (vc.BLK_S_OK, b"\0" * 512)
            assert d.flush() == vc.BLK_S_OK
            assert d.get_id().rstrip(b"\0") == b"my-disk-01"
        finally:
            d.close()
        assert e.image(0, 512) == b"\0" * 512
    finally:
        assert stop_export(e) == 0


def test_writeback_cache_and_block_count(tmp_path):
    e = start_export(tmp_path, "--cache", "writeback", size=(8 << 20) + 100)
    try:
        d = e.device(queues=1)
        try:
            assert d.capacity == (8 << 20) // 512  # rounded down to whole sectors
            data = os.urandom(1536)
            assert d.write(3, data) == vc.BLK_S_OK
            assert d.read(3, 1536) == (vc.BLK_S_OK, data)
        finally:
            d.close()
    finally:
        assert stop_export(e) == 0


def test_sigterm_drains_and_removes_socket(tmp_path):
    e = start_export(tmp_path)
    d = e.device(queues=1)
    reqs = d.submit_many([(vc.BLK_T_OUT, 8 * i, b"\x11" * 4096) for i in range(16)],
                         indirect=True, wait=False)
    vq = d.vqs[0]
    # SIGTERM only once the backend popped all 16 (avail_event is where its
    # last pass over the ring stopped): else `used == avail_event` held with
    # nothing popped at all, and the test could not fail
    deadline = time.monotonic() + 10
    while vq.avail_event != len(reqs):
        assert time.monotonic() < deadline, (vq.avail_event, e.logtext())
        time.sleep(0.001)
    e.proc.send_signal(signal.SIGTERM)
    assert e.proc.wait(10) == 0
    assert not os.path.exists(e.sock)
    d.poll()
    # drained: every request the backend popped was completed before it exited
    assert vq.avail_event == vq.used_idx == len(reqs)
    assert all(r.done and r.status == vc.BLK_S_OK for r in reqs)
    d.close()
    assert "socket removed" in e.logtext()
    # every request the backend acknowledged reached the file
    for i, r in enumerate(reqs):
        if r.done and r.status == vc.BLK_S_OK:
            assert e.image(8 * i, 4096) == b"\x11" * 4096


def test_sigterm_is_bounded_when_the_backing_stalls(tmp_path):
    """A backing store that stops answering must not hold SIGTERM forever:
    12 writes held by the backing (a faultfs file stalling every write) would
    never drain; --drain-timeout 0.5 gives up on them after 0.5 s plus a 1 s
    cancellation grace and the export exits 0, none of them answered."""
    from faultfs import MAX_HELD_ASYNC, FaultFS

    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    pytest.importorskip("pyfuse3", reason="pyfuse3 missing (make setup installs it)")
    with FaultFS({"disk.img": IMG_SIZE}) as fs:
        # io_uring: `auto` serves a FUSE file with blocking syscalls, which no
        # stop can cancel (README: not covered)
        e = start_export(tmp_path, "--drain-timeout", "0.5", "--io-engine", "io_uring",
                         backing=fs.path("disk.img"))
        try:
            d = e.device(queues=1)
            d.data_align = 4096
            fs.stall("write")
            reqs = d.submit_many([(vc.BLK_T_OUT, 8 * i, b"\x22" * 4096)
                                  for i in range(MAX_HELD_ASYNC)], indirect=True, wait=False)
            # every write really is held in the backing before the stop
            assert fs.wait_stalled(len(reqs)) == len(reqs)
            t0 = time.monotonic()
            e.proc.send_signal(signal.SIGTERM)
            rc = e.proc.wait(30)
            took = time.monotonic() - t0
            d.poll()
            done = sum(1 for r in reqs if r.done)
            d.close()
        finally:
            if e.proc.poll() is None:
                e.proc.kill()
    assert rc == 0, e.logtext()
    assert done == 0, f"{done} held write(s) got a status"
    assert took < 0.5 + 1 + 3, took
    assert "stopped with requests still in flight after the drain timeout" in e.logtext()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blkserve", *args],
                          capture_output=True, text=True, timeout=30)


def test_cli_errors_are_one_line_exit_2(tmp_path, export):
    img = tmp_path / "x.img"
    img.write_bytes(b"\0" * 4096)
    cases = [
        (["export", str(tmp_path / "missing.img"), "--socket", str(tmp_path / "a.sock")],
         "No such file"),
        (["export", str(img), "--socket", export.sock], "in use"),
        (["export", str(tmp_path), "--socket", str(tmp_path / "b.sock")],
         "neither a regular file nor a block device"),
        (["export", str(img), "--socket", str(tmp_path / "c.sock"), "--queues", "0"],
         "--queues"),
        (["export", str(img), "--socket", str(tmp_path / "d.sock"), "--serial", "x" * 21],
         "--serial"),
        (["export", str(img), "--socket", "/nonexistent-dir/e.sock"], "No such file"),
    ]
    for args, msg in cases:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
    r = run_cli("export", str(img))  # argparse: missing --socket
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_help_lists_options():
    r = run_cli("export", "--help")
    assert r.returncode == 0
    for opt in ("--socket", "--queues", "--read-only", "--cache", "--serial"):
        assert opt in r.stdout


# ---- the complete device (issue 3): config space, discard, write zeroes,
# write cache, block size, memory of every kind ----

def test_config_space_is_truthful(export, dev):
    c = dev.config
    blksize = os.stat(export.img).st_blksize
    assert c.size_max == 4 << 20 and c.seg_max == 126 and c.blk_size == 512
    assert 512 << c.physical_block_exp == blksize  # the file's allocation unit
    assert c.min_io_size == blksize // 512 and c.alignment_offset == 0
    assert c.writeback == 1
    assert c.max_discard_sectors == 1 << 22 and c.max_discard_seg == 32
    assert c.discard_sector_alignment == blksize // 512
    assert c.max_write_zeroes_sectors == 1 << 22 and c.max_write_zeroes_seg == 32
    assert c.write_zeroes_may_unmap == 1
    for bit in (vc.BLK_F_DISCARD, vc.BLK_F_WRITE_ZEROES, vc.BLK_F_TOPOLOGY,
                vc.BLK_F_CONFIG_WCE, vc.BLK_F_SIZE_MAX):
        assert dev.offered_features >> bit & 1, bit


def test_discard_and_write_zeroes_read_back_zeroes(export, dev):
    data = b"\xa5" * (1 << 20)
    assert dev.write(0, data) == vc.BLK_S_OK
    os.sync()
    before = os.stat(export.img).st_blocks
    assert dev.discard(0, 1024) == vc.BLK_S_OK                  # first 512 KiB
    assert dev.read(0, 1 << 19) == (vc.BLK_S_OK, bytes(1 << 19))
    assert os.stat(export.img).st_blocks < before               # a real hole
    assert dev.write_zeroes(1024, 256, unmap=True) == vc.BLK_S_OK
    assert dev.write_zeroes(1280, 256, unmap=False) == vc.BLK_S_OK
    assert dev.read(1024, 1 << 18) == (vc.BLK_S_OK, bytes(1 << 18))
    assert dev.read(1536, 512) == (vc.BLK_S_OK, b"\xa5" * 512)  # untouched
    # multi-segment, in one request
    segs = vc.blk_discard_segment(1536, 8) + vc.blk_discard_segment(1600, 8)
    r = dev.wait(dev.submit(vc.BLK_T_DISCARD, 0, out=segs))
    assert r.status == vc.BLK_S_OK
    assert dev.read(1600, 4096) == (vc.BLK_S_OK, bytes(4096))
    # rejected: unmap flag on discard, unknown flag, range past the end, too many segments
    assert dev.discard(0, 8, flags=1) == vc.BLK_S_UNSUPP
    assert dev.write_zeroes(0, 8) == vc.BLK_S_OK
    seg = vc.blk_discard_segment(0, 8, 2)
    assert dev.wait(dev.submit(vc.BLK_T_WRITE_ZEROES, 0, out=seg)).status == vc.BLK_S_UNSUPP
    assert dev.discard(SECTORS - 4, 8) == vc.BLK_S_IOERR
    many = b"".join(vc.blk_discard_segment(i * 8, 8) for i in range(33))
    assert dev.wait(dev.submit(vc.BLK_T_DISCARD, 0, out=many)).status == vc.BLK_S_IOERR


def test_guest_switches_write_cache(export):
    dev = export.device(features=vc.BlkDevice.WANTED_FEATURES | vc.bit(vc.BLK_F_CONFIG_WCE))
    assert dev.client.get_config(32, 1) == b"\x01"
    assert dev.client.set_config(32, b"\x00", ack=True) == 0
    assert dev.client.get_config(32, 1) == b"\x00"
    data = os.urandom(8192)
    assert dev.write(40, data) == vc.BLK_S_OK  # writethrough: RWF_DSYNC
    assert dev.read(40, 8192) == (vc.BLK_S_OK, data)
    assert dev.client.set_config(32, b"\x01", ack=True) == 0
    with pytest.raises(vc.VhostAckError):
        dev.client.set_config(0, b"\0" * 8, ack=True)  # capacity is not writable
    assert dev.client.get_config(0, 8) == struct.pack("<Q", SECTORS)
    dev.close()
    # without CONFIG_WCE negotiated the byte is read-only
    dev = export.device()
    with pytest.raises(vc.VhostAckError):
        dev.client.set_config(32, b"\x00", ack=True)
    dev.close()


def test_block_size_4096(tmp_path):
    e = start_export(tmp_path, "--block-size", "4096")
    try:
        d = e.device(queues=1)
        try:
            assert d.config.blk_size == 4096
            data = os.urandom(8192)
            assert d.write(8, data) == vc.BLK_S_OK
            assert d.read(8, 8192) == (vc.BLK_S_OK, data)
            assert d.write(1, data) == vc.BLK_S_IOERR           # not 4 KiB aligned
            assert d.read(8, 512)[0] == vc.BLK_S_IOERR
        finally:
            d.close()
    finally:
        assert stop_export(e) == 0


def test_memory_slots_add_and_remove(export):
    pf = vc.bits(vc.PROTOCOL_F_MQ, vc.PROTOCOL_F_REPLY_ACK, vc.PROTOCOL_F_CONFIG,
                 vc.PROTOCOL_F_CONFIGURE_MEM_SLOTS)
    regions = [vc.GuestMemory(8 << 20, gpa=0), vc.GuestMemory(8 << 20, gpa=0x4000_0000)]
    d = export.device(regions=regions, protocol_features=pf, setup=False)
    try:
        d.negotiate()
        assert d.client.get_max_mem_slots() == 32
        for r in d.mem.regions:
            assert d.client.add_mem_reg(r, ack=True) == 0
        for q in range(2):
            d.setup_queue(q)
        data = os.urandom(4096)
        assert d.write(8, data) == vc.BLK_S_OK
        # hot-add a third region while the queues run, do I/O from it
        extra = vc.GuestMemory(4 << 20, gpa=0x8000_0000)
        assert d.client.add_mem_reg(extra, ack=True) == 0
        assert d.client.rem_mem_reg(regions[1], ack=True) == 0
        assert d.read(8, 4096, queue=1) == (vc.BLK_S_OK, data)
        # removing a region that is not there ends the connection, not the export
        d.client.send(vc.REM_MEM_REG, vc.pack_single_mem_region(regions[1]))
        assert d.client.wait_disconnect(3.0)
        extra.close()
    finally:
        d.close()
    assert export.alive()


def _reserve_hugepages(size_kb: int, count: int) -> int | None:
    """Grow the huge page pool to count pages; returns the previous size to
    restore, or None if the pool cannot hold that many."""
    path = f"/sys/kernel/mm/hugepages/hugepages-{size_kb}kB/nr_hugepages"
    try:
        with open(path) as f:
            have = int(f.read())
        if have < count:
            with open(path, "w") as f:
                f.write(str(count))
        with open(path) as f:
            if int(f.read()) >= count:
                return have
        _set_hugepages(size_kb, have)
    except OSError:
        pass
    return None


def _set_hugepages(size_kb: int, count: int) -> None:
    with open(f"/sys/kernel/mm/hugepages/hugepages-{size_kb}kB/nr_hugepages", "w") as f:
        f.write(str(count))


@pytest.mark.parametrize("page_kb, flag", [
    (2048, getattr(os, "MFD_HUGE_2MB", 21 << 26)),
    (1 << 20, getattr(os, "MFD_HUGE_1GB", 30 << 26)),
], ids=["2M", "1G"])
def test_hugetlbfs_guest_memory(export, page_kb, flag, request):
    page = page_kb << 10
    previous = _reserve_hugepages(page_kb, 2)
    if previous is None:
        pytest.skip(f"the kernel could not reserve 2 huge pages of {page_kb} kB "
                    "(hugetlbfs pool not growable)")
    request.addfinalizer(lambda: _set_hugepages(page_kb, previous))
    # one huge page of guest RAM at a huge-page-aligned offset into its fd,
    # as hugepage-backed frontends send it
    regions = [vc.GuestMemory(page, gpa=page * 4, mmap_offset=page,
                              memfd_flags=os.MFD_HUGETLB | flag)]
    d = export.device(regions=regions)
    try:
        data = os.urandom(64 << 10)
        assert d.write(0, data) == vc.BLK_S_OK
        assert d.read(0, len(data), queue=1) == (vc.BLK_S_OK, data)
    finally:
        d.close()
    assert export.alive()


def test_file_backed_guest_memory(export, tmp_path):
    """Guest RAM in plain files (QEMU's memory-backend-file), two regions, one
    at an offset into its file: I/O lands in and comes from those files."""
    regions = [vc.GuestMemory(4 << 20, gpa=0, path=tmp_path / "ram0"),
               vc.GuestMemory(4 << 20, gpa=1 << 32, mmap_offset=1 << 20,
                              path=tmp_path / "ram1")]
    d = export.device(regions=regions)
    try:
        data = os.urandom(256 << 10)
        assert d.write(2048, data, queue=0) == vc.BLK_S_OK
        assert d.read(2048, len(data), queue=1) == (vc.BLK_S_OK, data)
        assert export.image(2048, len(data)) == data
    finally:
        d.close()


def test_poll_mode_serves_correctly(tmp_path):
    """--poll-us: kicks suppressed while the queue polls; no request may be
    missed when polling stops (kicks back on, then a last look)."""
    e = start_export(tmp_path, "--poll-us", "200", "--queues", "2")
    try:
        d = e.device()
        try:
            for round_ in range(3):
                blocks = {i: os.urandom(4096) for i in range(24)}
                reqs = d.submit_many([(vc.BLK_T_OUT, 8 * i, b) for i, b in blocks.items()],
                                     queue=round_ % 2, indirect=True)
                assert all(r.status == vc.BLK_S_OK for r in reqs)
                for i, b in blocks.items():
                    assert d.read(8 * i, 4096, queue=1 - round_ % 2) == (vc.BLK_S_OK, b)
                time.sleep(0.01)  # let the poll window lapse: the next request needs a kick
        finally:
            d.close()
    finally:
        assert stop_export(e) == 0


@pytest.fixture
def loop_device(tmp_path, request):
    """A loop block device over a file; param = its logical sector size."""
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(64 << 20)
    r = subprocess.run(["losetup", "--find", "--show", "--sector-size", str(request.param),
                        str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop block device could be set up: {r.stderr.strip()}")
    dev = r.stdout.strip()
    yield dev, request.param
    subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("loop_device", [512, 4096], indirect=True, ids=["512n", "4Kn"])
def test_block_device_backing(tmp_path, loop_device):
    dev, sector = loop_device
    sock = os.path.join(tempfile.mkdtemp(prefix="bs-"), "blk.sock")
    log = tmp_path / "export.log"
    proc = subprocess.Popen([sys.executable, "-m", "blkserve", "export", dev, "--socket", sock],
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    e = Export(Path(dev), sock, proc, log)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        d = e.device(queues=1)
        try:
            assert d.capacity == (64 << 20) // 512
            assert d.config.blk_size == sector            # the device's logical block
            data = os.urandom(64 << 10)
            assert d.write(4096, data) == vc.BLK_S_OK
            assert d.read(4096, len(data)) == (vc.BLK_S_OK, data)
            assert d.discard(4096, 64) == vc.BLK_S_OK
            assert d.write_zeroes(4096 + 64, 64, unmap=False) == vc.BLK_S_OK
            assert d.read(4096, 64 << 10) == (vc.BLK_S_OK, bytes(64 << 10))
            if sector == 4096:
                assert d.write(1, b"x" * 512) == vc.BLK_S_IOERR  # below the device block
            assert d.flush() == vc.BLK_S_OK
        finally:
            d.close()
    finally:
        assert stop_export(e) == 0


@pytest.mark.parametrize("engine", ["sync", "io_uring"])
def test_io_engines_serve_the_same(tmp_path, engine):
    """Both engines behind the one interface: rw, flush, discard, bad range."""
    e = start_export(tmp_path, "--io-engine", engine, "--queues", "2")
    try:
        d = e.device()
        try:
            data = os.urandom(128 << 10)
            assert d.write(64, data, queue=1, seg_size=4096) == vc.BLK_S_OK
            assert d.read(64, len(data), seg_size=2048, indirect=True) == (vc.BLK_S_OK, data)
            assert d.flush() == vc.BLK_S_OK
            assert d.discard(64, 16) == vc.BLK_S_OK
            assert d.write_zeroes(80, 16, unmap=True) == vc.BLK_S_OK
            assert d.read(64, 16384) == (vc.BLK_S_OK, bytes(16384))
            assert d.read(SECTORS, 512)[0] == vc.BLK_S_IOERR
            batch = [(vc.BLK_T_OUT, 4096 + 8 * i, os.urandom(4096)) for i in range(40)]
            reqs = d.submit_many(batch, indirect=True)
            assert [r.status for r in reqs] == [vc.BLK_S_OK] * 40
        finally:
            d.close()
        assert e.image(64 + 32, 512) == data[16384:16384 + 512]
    finally:
        assert stop_export(e) == 0


def test_sighup_grow_notifies_frontend_and_serves_new_capacity(tmp_path):
    """Online resize: the backing grows, SIGHUP makes the export re-read its
    size, serve it and send CONFIG_CHANGE_MSG on the backend channel; the
    frontend's GET_CONFIG then reports the new capacity and I/O past the old
    end succeeds.  A shrink is not served (logged)."""
    import socket

    e = start_export(tmp_path, "--queues", "1")
    try:
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
            assert d.read(SECTORS, 512)[0] == vc.BLK_S_IOERR  # past the end
            with open(e.img, "r+b") as f:
                f.truncate(IMG_SIZE * 2)
            e.proc.send_signal(signal.SIGHUP)
            ours.settimeout(10)
            msg = ours.recv(64)
            request, flags, size = struct.unpack_from("<III", msg)
            assert (request, flags & 0x3, size) == (2, 1, 0), msg  # CONFIG_CHANGE_MSG
            cfg = vc.BlkConfig.parse(d.client.get_config(0, vc.BLK_CONFIG_SIZE))
            assert cfg.capacity == 2 * SECTORS
            assert d.write(SECTORS + 8, b"\x5a" * 4096) == vc.BLK_S_OK
            st, data = d.read(SECTORS + 8, 4096)
            assert st == vc.BLK_S_OK and data == b"\x5a" * 4096
            # a backing that shrinks under the export is not followed
            with open(e.img, "r+b") as f:
                f.truncate(IMG_SIZE)
            e.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            cfg = vc.BlkConfig.parse(d.client.get_config(0, vc.BLK_CONFIG_SIZE))
            assert cfg.capacity == 2 * SECTORS
        finally:
            ours.close()
            d.close()
    finally:
        assert stop_export(e) == 0
    log = e.log.read_text()
    assert "capacity grown from" in log and "frontend notified" in log, log
    assert "shrank" in log, log


@pytest.mark.parametrize("engine", ["sync", "io_uring"])
def test_enospc_is_an_ioerr_then_writes_recover(tmp_path, engine):
    """A sparse backing on a full filesystem: the write that finds no space
    gets VIRTIO_BLK_S_IOERR, the export keeps serving (reads, and writes
    into already allocated blocks), the errors are logged once per burst, and
    once space is freed the same write succeeds; nothing acknowledged is lost."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr}")
    try:
        img = mnt / "disk.img"
        with open(img, "wb") as f:
            f.truncate(IMG_SIZE)  # 64 MiB sparse on a 4 MiB filesystem
        sock = os.path.join(tempfile.mkdtemp(prefix="bs-"), "blk.sock")
        log = tmp_path / "export.log"
        proc = subprocess.Popen([sys.executable, "-m", "blkserve", "export", str(img),
                                 "--socket", sock, "--io-engine", engine],
                                stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
        e = Export(img, sock, proc, log)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        try:
            with e.device(queues=1) as d:
                written = {}
                failed_at = None
                for i in range(2048):  # 8 MiB of 4 KiB writes: more than fits
                    data = bytes([i % 251 + 1]) * 4096
                    st = d.write(i * 8, data)
                    if st != vc.BLK_S_OK:
                        assert st == vc.BLK_S_IOERR
                        failed_at = i
                        break
                    written[i] = data
                assert failed_at is not None and failed_at > 100, failed_at
                # still serving: everything acknowledged reads back
                for i in (0, failed_at // 2, failed_at - 1):
                    st, got = d.read(i * 8, 4096)
                    assert st == vc.BLK_S_OK and got == written[i]
                assert d.flush() == vc.BLK_S_OK
                # rewriting allocated blocks needs no new space
                assert d.write(0, b"\xee" * 4096) == vc.BLK_S_OK
                assert d.write(failed_at * 8, b"\x77" * 4096) == vc.BLK_S_IOERR
                time.sleep(1.5)  # the monitor's once-per-burst summary
                # space comes back (an operator grows the filesystem)
                subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True)
                assert d.write(failed_at * 8, b"\x77" * 4096) == vc.BLK_S_OK
                st, got = d.read(failed_at * 8, 4096)
                assert st == vc.BLK_S_OK and got == b"\x77" * 4096
                st, got = d.read(0, 4096)
                assert got == b"\xee" * 4096
        finally:
            assert stop_export(e) == 0
        text = log.read_text()
        lines = [ln for ln in text.splitlines() if "backing-store I/O error" in ln]
        assert lines and "No space left on device" in lines[0], text
        assert len(lines) <= 3, text  # a summary per burst, not a line per request
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_reset_device_stops_rings_and_allows_reinit(export):
    """VHOST_USER_RESET_DEVICE (with the protocol feature): in-flight I/O
    completes, rings stop; the frontend re-initialises them on the same
    connection and I/O works again, on the same guest memory."""
    d = vc.BlkDevice(export.sock, queues=1, connect_retry=2.0, setup=False,
                     protocol_features=vc.BlkDevice.WANTED_PROTOCOL_FEATURES
                     | vc.bit(vc.PROTOCOL_F_RESET_DEVICE))
    try:
        d.setup()
        assert d.write(16, b"\x42" * 4096) == vc.BLK_S_OK
        d.client.reset_device()
        # the ring is stopped and forgotten: base 0, set up anew
        d.client.set_features(d.features)
        d.setup_queue(0)
        st, data = d.read(16, 4096)
        assert st == vc.BLK_S_OK and data == b"\x42" * 4096
    finally:
        d.close()
    assert "device reset by the frontend" in export.logtext()


def test_reset_device_without_the_feature_drops_the_connection(export):
    d = export.device(queues=1)
    try:
        d.client.send(vc.RESET_DEVICE, b"")
        assert d.client.wait_disconnect(2.0)
    finally:
        d.close()
    # the export itself keeps serving
    with export.device(queues=1) as d2:
        assert d2.read(0, 512)[0] == vc.BLK_S_OK


def test_inflight_fd_region_tracks_requests(export):
    """INFLIGHT_SHMFD as QEMU drives it: GET_INFLIGHT_FD hands out zeroed
    shared memory, SET_INFLIGHT_FD gives it back, and the engine keeps it
    current (version, ring size, used index, no request left marked)."""
    import mmap as _mmap

    d = vc.BlkDevice(export.sock, queues=2, connect_retry=2.0, setup=False,
                     protocol_features=vc.BlkDevice.WANTED_PROTOCOL_FEATURES
                     | vc.bit(vc.PROTOCOL_F_INFLIGHT_SHMFD))
    try:
        d.negotiate()
        size, off, fd = d.client.get_inflight_fd(2, d.queue_size)
        assert fd is not None and off == 0 and size >= 2 * (16 + 16 * d.queue_size)
        region = _mmap.mmap(fd, size)
        assert region[:] == bytes(size)
        d.client.set_inflight_fd(fd, size, 0, 2, d.queue_size)
        d.setup_memory()
        d.setup_queue(0)
        d.setup_queue(1)
        for i in range(20):
            assert d.write(i * 8, bytes([i + 1]) * 4096, queue=i % 2) == vc.BLK_S_OK
        per_queue = size // 2
        for q in (0, 1):
            base = q * per_queue
            version, num, _, used = struct.unpack_from("<HHHH", region, base + 8)
            assert (version, num, used) == (1, d.queue_size, 10), (q, version, num, used)
            marks = [region[base + 16 + 16 * h] for h in range(d.queue_size)]
            assert not any(marks)
        region.close()
        os.close(fd)
    finally:
        d.close()


def test_inflight_fd_malformed_is_refused(export):
    d = vc.BlkDevice(export.sock, queues=1, connect_retry=2.0, setup=False,
                     protocol_features=vc.BlkDevice.WANTED_PROTOCOL_FEATURES
                     | vc.bit(vc.PROTOCOL_F_INFLIGHT_SHMFD))
    try:
        d.negotiate()
        size, _, fd = d.client.get_inflight_fd(1, 128)
        # announces more memory than the fd has: the connection is dropped
        d.client.send(vc.SET_INFLIGHT_FD, vc.pack_inflight(size * 64, 0, 1, 128), fds=(fd,))
        assert d.client.wait_disconnect(2.0)
        os.close(fd)
    finally:
        d.close()
    with export.device(queues=1) as d2:  # the export keeps serving
        assert d2.read(0, 512)[0] == vc.BLK_S_OK
