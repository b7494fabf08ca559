"""Dirty logging for live migration (VHOST_F_LOG_ALL, LOG_SHMFD), against a
real `blkserve export` driven by tests/vhost_client.py as QEMU drives it:
SET_FEATURES with LOG_ALL, SET_LOG_BASE with the log's memfd (acked), and
the backend's writes into guest memory show up in the log; malformed log
messages end the connection, never the export."""

from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_client as vc  # noqa: E402
from test_export import start_export, stop_export  # noqa: E402

PAGE = 4096
MEM = 16 << 20  # vhost_client's default guest RAM
LOG_BYTES = MEM // PAGE // 8


@pytest.fixture
def export(tmp_path):
    e = start_export(tmp_path, "--queues", "1")
    yield e
    assert stop_export(e) == 0, e.logtext()


def _device(export, log_shmfd: bool = True) -> vc.BlkDevice:
    want = vc.BlkDevice.WANTED_PROTOCOL_FEATURES
    if log_shmfd:
        want |= vc.bit(vc.PROTOCOL_F_LOG_SHMFD)
    return export.device(queues=1, mem_size=MEM, protocol_features=want)


def _log_fd(size: int) -> int:
    fd = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _set_log_base(d: vc.BlkDevice, fd: int, size: int, offset: int = 0):
    d.client.send(vc.SET_LOG_BASE, struct.pack("<QQ", size, offset), fds=(fd,))
    return d.client.recv_msg()


def _request(d: vc.BlkDevice, type_: int, data_len: int) -> tuple[int, int, int]:
    """One request whose data buffer has pages of its own (the status byte
    and the rings live elsewhere): (data gpa, status gpa, used len)."""
    vq = d.vqs[0]
    hdr = d.mem.alloc(16)
    d.mem.write(hdr, vc.blk_header(type_, 0))
    st = d.mem.alloc(1)
    d.mem.write(st, b"\xff")
    data = d.mem.alloc(data_len + PAGE, align=PAGE)
    if type_ == vc.BLK_T_OUT:
        d.mem.write(data, os.urandom(data_len))
    a, b, c = vq.alloc_descs(3)
    dflag = vc.VRING_DESC_F_WRITE if type_ == vc.BLK_T_IN else 0
    vq.add_raw_descriptors([
        (a, hdr, 16, vc.VRING_DESC_F_NEXT, b),
        (b, data, data_len, vc.VRING_DESC_F_NEXT | dflag, c),
        (c, st, 1, vc.VRING_DESC_F_WRITE, 0),
    ], head=a)
    vq.kick()
    (_, used_len), = vq.wait_used(1)
    assert d.mem.read(st, 1) == bytes([vc.BLK_S_OK])
    return data, st, used_len


def _bit(log: bytes, gpa: int) -> bool:
    return bool(log[gpa // PAGE // 8] >> (gpa // PAGE % 8) & 1)


def test_backend_writes_are_marked_in_the_dirty_log(export):
    d = _device(export)
    fd = _log_fd(LOG_BYTES)
    try:
        assert d.offered_features & vc.bit(vc.F_LOG_ALL)
        assert d.offered_protocol_features & vc.bit(vc.PROTOCOL_F_LOG_SHMFD)
        # what QEMU does when a migration starts: LOG_ALL on, then the log
        d.client.set_features(d.features | vc.bit(vc.F_LOG_ALL))
        reply = _set_log_base(d, fd, LOG_BYTES)
        assert reply.request == vc.SET_LOG_BASE and reply.payload == vc.pack_u64(0)
        # a write: the device only reads its data pages
        data, st, _ = _request(d, vc.BLK_T_OUT, 2 * PAGE)
        log = os.pread(fd, LOG_BYTES, 0)
        assert not _bit(log, data) and not _bit(log, data + PAGE), "write data marked"
        assert _bit(log, st), "status byte not marked"
        assert _bit(log, d.vqs[0].used_gpa), "used ring not marked"
        os.pwrite(fd, bytes(LOG_BYTES), 0)  # the frontend clears what it copied
        data, st, used_len = _request(d, vc.BLK_T_IN, 2 * PAGE)
        assert used_len == 2 * PAGE + 1
        log = os.pread(fd, LOG_BYTES, 0)
        assert _bit(log, data) and _bit(log, data + 2 * PAGE - 1), "read data not marked"
        assert _bit(log, st) and _bit(log, d.vqs[0].used_gpa)
        # migration over: LOG_ALL off, nothing is marked any more
        d.client.set_features(d.features)
        os.pwrite(fd, bytes(LOG_BYTES), 0)
        _request(d, vc.BLK_T_IN, PAGE)
        assert os.pread(fd, LOG_BYTES, 0) == bytes(LOG_BYTES)
    finally:
        os.close(fd)
        d.close()


@pytest.mark.parametrize("engine", ["sync", "io_uring"])
def test_a_read_the_backing_splits_marks_every_page_it_filled(tmp_path, engine):
    """A read the backing answers piecemeal (here at most 3000 bytes per
    call, a FUSE file) moves the engine's iovecs on after each piece; the
    log must still get every page the whole read filled, the first
    buffer's included, not only those of the last piece."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    pytest.importorskip("pyfuse3", reason="pyfuse3 missing (make setup installs it)")
    from faultfs import FaultFS

    content = os.urandom(4 * PAGE)
    with FaultFS({"disk.img": 1 << 20}) as fs:
        with open(fs.backing("disk.img"), "r+b") as f:
            f.write(content)
        e = start_export(tmp_path, "--queues", "1", "--io-engine", engine,
                         backing=fs.path("disk.img"), image=str(fs.backing("disk.img")))
        fd = _log_fd(LOG_BYTES)
        d = None
        try:
            d = _device(e)
            d.client.set_features(d.features | vc.bit(vc.F_LOG_ALL))
            assert _set_log_base(d, fd, LOG_BYTES).payload == vc.pack_u64(0)
            fs.short(3000)
            before = fs.calls("read")
            vq = d.vqs[0]
            hdr = d.mem.alloc(16)
            d.mem.write(hdr, vc.blk_header(vc.BLK_T_IN, 0))
            st = d.mem.alloc(1)
            d.mem.write(st, b"\xff")
            # two buffers of two pages each, far apart, a page between them
            one = d.mem.alloc(3 * PAGE, align=PAGE)
            two = d.mem.alloc(3 * PAGE, align=PAGE) + PAGE
            a, b, c, x = vq.alloc_descs(4)
            W = vc.VRING_DESC_F_WRITE
            vq.add_raw_descriptors([
                (a, hdr, 16, vc.VRING_DESC_F_NEXT, b),
                (b, one, 2 * PAGE, vc.VRING_DESC_F_NEXT | W, c),
                (c, two, 2 * PAGE, vc.VRING_DESC_F_NEXT | W, x),
                (x, st, 1, W, 0),
            ], head=a)
            vq.kick()
            (_, used_len), = vq.wait_used(1)
            assert d.mem.read(st, 1) == bytes([vc.BLK_S_OK])
            assert used_len == 4 * PAGE + 1
            assert d.mem.read(one, 2 * PAGE) + d.mem.read(two, 2 * PAGE) == content
            # the backing really split it: 16 KiB in pieces of 3000 bytes
            assert fs.calls("read") - before >= 6
            log = os.pread(fd, LOG_BYTES, 0)
            unmarked = [hex(g) for g in (one, one + PAGE, two, two + PAGE) if not _bit(log, g)]
            marked = [hex(g) for g in range(0, MEM, PAGE) if _bit(log, g)]
            assert not unmarked, (f"pages the read filled but the log misses: {unmarked} "
                                  f"(buffers at {one:#x} and {two:#x}; marked: {marked})")
            assert not _bit(log, one + 2 * PAGE), "a page the read never touched is marked"
            assert _bit(log, st) and _bit(log, vq.used_gpa)
        finally:
            if d is not None:
                d.close()
            os.close(fd)
            assert stop_export(e) == 0, e.logtext()


def test_a_log_shrunk_under_the_backend_stops_the_queue_not_the_export(export):
    """The frontend truncates its dirty-log file while logging is on: the
    backend's next mark would SIGBUS the worker.  The export lives, says why
    the queue stopped, and serves the next connection."""
    d = _device(export)
    fd = _log_fd(LOG_BYTES)
    try:
        d.client.set_features(d.features | vc.bit(vc.F_LOG_ALL))
        assert _set_log_base(d, fd, LOG_BYTES).payload == vc.pack_u64(0)
        os.ftruncate(fd, 0)
        hdr = d.mem.alloc(16)
        d.mem.write(hdr, vc.blk_header(vc.BLK_T_IN, 0))
        st, data = d.mem.alloc(1), d.mem.alloc(PAGE, align=PAGE)
        vq = d.vqs[0]
        a, b, c = vq.alloc_descs(3)
        vq.add_raw_descriptors([
            (a, hdr, 16, vc.VRING_DESC_F_NEXT, b),
            (b, data, PAGE, vc.VRING_DESC_F_NEXT | vc.VRING_DESC_F_WRITE, c),
            (c, st, 1, vc.VRING_DESC_F_WRITE, 0),
        ], head=a)
        vq.kick()
        deadline = time.monotonic() + 10
        while "dirty-log file under the backend" not in export.logtext():
            assert export.alive(), export.logtext()
            assert time.monotonic() < deadline, export.logtext()
            time.sleep(0.1)
    finally:
        os.close(fd)
        d.close()
    assert export.alive()
    d2 = export.device(queues=1)
    try:
        assert d2.read(0, 512)[0] == vc.BLK_S_OK
    finally:
        d2.close()


def _without_shmfd(d, fd):
    d.client.send(vc.SET_LOG_BASE, struct.pack("<QQ", LOG_BYTES, 0), fds=(fd,))


def _size_zero(d, fd):
    d.client.send(vc.SET_LOG_BASE, struct.pack("<QQ", 0, 0), fds=(fd,))


def _fd_too_small(d, fd):
    os.ftruncate(fd, LOG_BYTES // 2)
    d.client.send(vc.SET_LOG_BASE, struct.pack("<QQ", LOG_BYTES, 0), fds=(fd,))


def _offset_past_fd(d, fd):
    d.client.send(vc.SET_LOG_BASE, struct.pack("<QQ", LOG_BYTES, 1 << 40), fds=(fd,))


def _size_overflows(d, fd):
    d.client.send(vc.SET_LOG_BASE, struct.pack("<QQ", LOG_BYTES, 2**64 - 4096), fds=(fd,))


def _too_small_for_memory(d, fd):
    d.client.send(vc.SET_LOG_BASE, struct.pack("<QQ", LOG_BYTES // 4, 0), fds=(fd,))


def _fd_not_a_file(d, fd):
    r, w = os.pipe()
    try:
        d.client.send(vc.SET_LOG_BASE, struct.pack("<QQ", LOG_BYTES, 0), fds=(r,))
    finally:
        os.close(r)
        os.close(w)


def _no_fd(d, fd):
    d.client.send(vc.SET_LOG_BASE, struct.pack("<QQ", LOG_BYTES, 0))


def _bad_vring_flags(d, fd):
    vq = d.vqs[0]
    d.client.send(vc.SET_VRING_ADDR, vc.pack_vring_addr(
        0, vq.desc_uva, vq.used_uva, vq.avail_uva, flags=0x2))


def _memory_grows_past_the_log(d, fd):
    d.client.set_features(d.features | vc.bit(vc.F_LOG_ALL))
    assert _set_log_base(d, fd, LOG_BYTES).payload == vc.pack_u64(0)
    extra = vc.GuestMemory(1 << 20, gpa=1 << 30)  # hot-added RAM the log does not cover
    region = d.mem.regions[0]
    d.client.send(vc.SET_MEM_TABLE, struct.pack("<II", 2, 0) + region.region_payload()
                  + extra.region_payload(), fds=(region.fd, extra.fd))


MALFORMED_LOG = {
    "without_log_shmfd": _without_shmfd,
    "size_zero": _size_zero,
    "fd_smaller_than_the_log": _fd_too_small,
    "offset_past_the_fd": _offset_past_fd,
    "offset_plus_size_overflows": _size_overflows,
    "log_too_small_for_guest_memory": _too_small_for_memory,
    "no_fd": _no_fd,
    "fd_is_a_pipe": _fd_not_a_file,
    "unknown_vring_address_flag": _bad_vring_flags,
    "memory_grows_past_the_log": _memory_grows_past_the_log,
}


@pytest.mark.parametrize("case", sorted(MALFORMED_LOG))
def test_malformed_log_messages_end_the_connection_not_the_export(export, case):
    d = _device(export, log_shmfd=case != "without_log_shmfd")
    fd = _log_fd(LOG_BYTES)
    try:
        MALFORMED_LOG[case](d, fd)
        assert d.client.wait_disconnect(5.0), f"{case}: the backend kept the connection"
    finally:
        os.close(fd)
        d.close()
    assert export.alive(), export.logtext()
    d2 = export.device(queues=1)
    try:
        assert d2.read(0, 512)[0] == vc.BLK_S_OK
    finally:
        d2.close()


REFUSED = (vc.VhostError, OSError, TimeoutError)
HANDOVERS = 20


def _refused(e) -> None:
    """A frontend on export E gets no rings: its setup fails, or (its last
    messages did not wait for the refusal) its first request does."""
    try:
        d = e.device(queues=1, connect_retry=0)
    except REFUSED:
        return
    try:
        with pytest.raises(REFUSED):
            d.read(0, 512)
    finally:
        d.close()


def _served_once_free(e, sector: int) -> bytes:
    """Read SECTOR through export E as soon as the other export has let go
    (it stops its rings when it sees its frontend's connection close)."""
    deadline = time.monotonic() + 15
    while True:
        d = None
        try:
            d = e.device(queues=1, connect_retry=0)
            status, data = d.read(sector, 4096)
            assert status == vc.BLK_S_OK
            return data
        except REFUSED:
            assert time.monotonic() < deadline, e.logtext()
            time.sleep(0.2)
        finally:
            if d is not None:
                d.close()


def test_two_exports_of_one_backing_never_run_rings_at_once(export, tmp_path):
    """A second export of a backing starts (that is how a migration's
    destination is prepared), but its rings are refused with a clear error
    while the first export's run; once those stopped (the source QEMU let
    go), the second serves and sees what the first wrote.  Handed back and
    forth HANDOVERS times: the hand-over races a connection's close."""
    (tmp_path / "second").mkdir()
    second = start_export(tmp_path / "second", "--queues", "1",
                          backing=str(tmp_path / "disk.img"))
    try:
        holder, other = export, second
        for rnd in range(HANDOVERS):
            d = None
            deadline = time.monotonic() + 15
            while d is None:  # the previous holder may still be letting go
                try:
                    d = holder.device(queues=1, connect_retry=0)
                    blob = os.urandom(4096)
                    assert d.write(8 + rnd * 8, blob) == vc.BLK_S_OK
                except REFUSED:
                    if d is not None:
                        d.close()
                    d = None
                    assert time.monotonic() < deadline, holder.logtext()
                    time.sleep(0.2)
            try:
                _refused(other)
                assert other.alive()
            finally:
                d.close()  # the holder's frontend lets go
            assert _served_once_free(other, 8 + rnd * 8) == blob, f"round {rnd}"
            holder, other = other, holder
        deadline = time.monotonic() + 10
        while "the backing is in use" not in second.logtext():
            assert time.monotonic() < deadline, second.logtext()
            time.sleep(0.05)
    finally:
        assert stop_export(second) == 0, second.logtext()
