"""Validate tests/vhost_client.py against a known-good vhost-user-blk backend:
qemu-storage-daemon.  If these pass, failures of the same client against
blkserve point at blkserve, not at the client.

    python3 -m pytest tests/test_vhost_client_qsd.py -v [-s]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_client as vc  # noqa: E402

QSD = shutil.which("qemu-storage-daemon")
pytestmark = pytest.mark.skipif(QSD is None, reason="qemu-storage-daemon not installed")

IMG_SIZE = 64 << 20
SECTORS = IMG_SIZE // vc.SECTOR_SIZE
NUM_QUEUES = 2


class Qsd:
    def __init__(self, img: Path, sock: str, proc: subprocess.Popen, log: Path):
        self.img, self.sock, self.proc, self.log = img, sock, proc, log

    def device(self, **kw) -> vc.BlkDevice:
        kw.setdefault("queues", NUM_QUEUES)
        kw.setdefault("connect_retry", 2.0)
        return vc.BlkDevice(self.sock, **kw)

    def read_image(self, sector: int, n: int) -> bytes:
        with open(self.img, "rb") as f:
            f.seek(sector * vc.SECTOR_SIZE)
            return f.read(n)


@pytest.fixture
def qsd(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    # Short directory: sun_path is limited to 108 bytes.
    sockdir = tempfile.mkdtemp(prefix="vuc-")
    sock = os.path.join(sockdir, "blk.sock")
    log = tmp_path / "qsd.log"
    cmd = [
        QSD,
        "--blockdev",
        f"driver=file,node-name=file0,filename={img},cache.direct=off",
        "--export",
        "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,"
        f"addr.path={sock},writable=on,num-queues={NUM_QUEUES}",
    ]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None:
                pytest.fail(f"qemu-storage-daemon exited {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("qemu-storage-daemon socket did not appear")
            time.sleep(0.01)
        yield Qsd(img, sock, proc, log)
        assert proc.poll() is None, f"qemu-storage-daemon died: {log.read_text()}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture
def dev(qsd):
    d = qsd.device()
    yield d
    d.close()


def test_handshake_and_config(dev):
    """Handshake + config; prints what qsd offers (run with -s)."""
    cfg = dev.config
    assert cfg is not None
    assert cfg.capacity == SECTORS
    assert cfg.num_queues == NUM_QUEUES
    assert dev.max_queues == NUM_QUEUES
    assert cfg.blk_size == 512
    assert dev.offered_features & vc.bit(vc.F_VERSION_1)
    assert dev.protocol_features & vc.bit(vc.PROTOCOL_F_REPLY_ACK)
    assert dev.client.default_ack  # every control message below was acked
    print()
    print(
        f"qsd offered features  {dev.offered_features:#x}: "
        f"{' '.join(vc.decode_features(dev.offered_features))}"
    )
    print(
        f"qsd protocol features {dev.offered_protocol_features:#x}: "
        f"{' '.join(vc.decode_protocol_features(dev.offered_protocol_features))}"
    )
    print(f"negotiated features   {dev.features:#x}: {' '.join(vc.decode_features(dev.features))}")
    print(
        f"negotiated protocol   {dev.protocol_features:#x}: "
        f"{' '.join(vc.decode_protocol_features(dev.protocol_features))}"
    )
    print(f"GET_QUEUE_NUM         {dev.max_queues}")
    if dev.offered_protocol_features & vc.bit(vc.PROTOCOL_F_CONFIGURE_MEM_SLOTS):
        print(f"GET_MAX_MEM_SLOTS     {dev.client.get_max_mem_slots()}")
    print(f"GET_ID                {dev.get_id()!r}")
    print(f"config ({len(cfg.raw)} bytes) {cfg.as_dict()}")
    # Short config reads work.  (qsd 7.2 ignores the offset field -- it always
    # copies from offset 0 -- so only offset 0 is portable.)
    assert dev.client.get_config(0, 8) == SECTORS.to_bytes(8, "little")
    assert dev.client.get_config(34, 2) == cfg.raw[:2]


@pytest.mark.parametrize("queue", [0, 1])
@pytest.mark.parametrize("nbytes", [512, 4096, 128 << 10])
def test_write_read_roundtrip(qsd, dev, queue, nbytes):
    for sector in (0, 1, 4097, SECTORS - nbytes // 512):
        data = os.urandom(nbytes)
        assert dev.write(sector, data, queue=queue) == vc.BLK_S_OK
        status, back = dev.read(sector, nbytes, queue=queue)
        assert status == vc.BLK_S_OK
        assert back == data
        # The other queue sees it too, and it landed at the right file offset.
        assert dev.read(sector, nbytes, queue=1 - queue) == (vc.BLK_S_OK, data)
        assert dev.flush(queue) == vc.BLK_S_OK
        assert qsd.read_image(sector, nbytes) == data


def test_split_data_segments(qsd, dev):
    """Data spread over several descriptors (seg_size) round-trips."""
    data = os.urandom(32 << 10)  # 64 x 512-byte segments <= seg_max (126)
    assert dev.write(100, data, seg_size=4096) == vc.BLK_S_OK
    assert dev.read(100, len(data), seg_size=512) == (vc.BLK_S_OK, data)
    assert dev.read(100, len(data)) == (vc.BLK_S_OK, data)


def test_indirect_descriptors(qsd, dev):
    assert dev.has_feature(vc.F_INDIRECT_DESC)
    data = os.urandom(16 << 10)
    assert dev.write(2048, data, indirect=True, seg_size=4096) == vc.BLK_S_OK
    assert dev.read(2048, len(data)) == (vc.BLK_S_OK, data)
    assert dev.read(2048, len(data), indirect=True, queue=1) == (vc.BLK_S_OK, data)
    req = dev.wait(dev.submit(vc.BLK_T_IN, 2048, in_len=4096, indirect=True))
    # The ring slot holds a single INDIRECT descriptor.
    _, length, flags, _ = dev.vqs[0].read_desc(req.head)
    assert flags == vc.VRING_DESC_F_INDIRECT and length == 3 * vc.DESC_SIZE
    assert req.status == vc.BLK_S_OK and req.data == data[:4096]


def test_flush(dev):
    assert dev.has_feature(vc.BLK_F_FLUSH)
    assert dev.flush(0) == vc.BLK_S_OK
    assert dev.flush(1) == vc.BLK_S_OK


def test_get_id(dev):
    ident = dev.get_id()
    assert 0 < len(ident) <= vc.BLK_ID_BYTES
    assert ident == b"vhost_user_blk"  # qsd 7.2's fixed serial


def test_read_past_capacity_ioerr(dev):
    cap = dev.capacity
    assert dev.read(cap, 512)[0] == vc.BLK_S_IOERR
    assert dev.read(cap - 1, 1024)[0] == vc.BLK_S_IOERR  # straddles the end
    assert dev.write(cap, bytes(512)) == vc.BLK_S_IOERR
    assert dev.read(cap - 1, 512)[0] == vc.BLK_S_OK


def test_unknown_type_unsupp(dev):
    req = dev.wait(dev.submit_raw([(vc.blk_header(0x77), False), (1, True)]))
    assert req.status == vc.BLK_S_UNSUPP
    assert req.used_len == 1
    # The device still works afterwards.
    assert dev.flush() == vc.BLK_S_OK


def test_status_sentinel_overwritten(dev):
    """The client pre-fills status with STATUS_UNSET; the backend overwrites it.
    (Checked before the request is published: once it is, the backend may
    complete it before the test looks, as a busy CI machine showed.)"""
    req = dev.prepare(vc.BLK_T_IN, 0, in_len=512)
    assert dev.mem.read(req.status_gpa, 1)[0] == vc.STATUS_UNSET
    dev._publish([req], kick=True)
    dev.wait(req)
    assert req.status == vc.BLK_S_OK and req.used_len == 513


@pytest.mark.parametrize("queue", [0, 1])
def test_batch_32_writes_32_reads(qsd, dev, queue):
    sectors = [i * 64 + 7 for i in range(32)]
    blobs = [os.urandom(4096) for _ in sectors]
    notif_before = dev.vqs[queue].notifications
    writes = dev.submit_many(
        [(vc.BLK_T_OUT, s, b) for s, b in zip(sectors, blobs, strict=True)], queue=queue
    )
    assert [r.status for r in writes] == [vc.BLK_S_OK] * 32
    reads = dev.submit_many([(vc.BLK_T_IN, s, 4096) for s in sectors], queue=queue)
    assert [r.status for r in reads] == [vc.BLK_S_OK] * 32
    assert [r.data for r in reads] == blobs
    if dev.vqs[queue].notifications == notif_before:
        # every completion was in the used ring before the client looked at
        # the call eventfd (a busy host): the signal is still pending there
        dev.vqs[queue].wait_notification(5.0)
    assert dev.vqs[queue].notifications > notif_before
    # 64 requests at once only fit a 128-entry ring with indirect descriptors.
    mixed = [(vc.BLK_T_OUT, s + 8, b) for s, b in zip(sectors, blobs, strict=True)]
    mixed += [(vc.BLK_T_IN, s, 4096) for s in sectors]
    reqs = dev.submit_many(mixed, queue=queue, indirect=True)
    assert all(r.status == vc.BLK_S_OK for r in reqs)
    assert [r.data for r in reqs[32:]] == blobs
    assert dev.vqs[queue].num_free == dev.queue_size
    assert not dev.unexpected_used and not dev.vqs[queue].bad_used


def test_reconnect_after_close(qsd):
    data = os.urandom(8192)
    d1 = qsd.device()
    assert d1.write(333, data, queue=1) == vc.BLK_S_OK
    d1.close()
    for _ in range(3):
        d2 = qsd.device()
        try:
            assert d2.read(333, len(data)) == (vc.BLK_S_OK, data)
            assert d2.get_vring_base(0) == 1  # fresh rings on every connection
        finally:
            d2.close()


def test_get_vring_base_counts_requests(dev):
    for i in range(5):
        assert dev.write(i, bytes(512), queue=0) == vc.BLK_S_OK
    for _ in range(3):
        assert dev.read(0, 512, queue=1)[0] == vc.BLK_S_OK
    dev.submit_many([(vc.BLK_T_IN, 0, 512)] * 10, queue=1)
    assert dev.get_vring_base(0) == 5
    assert dev.get_vring_base(1) == 13


def test_no_event_idx_and_no_reply_ack(qsd):
    """The client also works with EVENT_IDX and REPLY_ACK off (plain notifications)."""
    feats = vc.bits(vc.F_VERSION_1, vc.F_PROTOCOL_FEATURES, vc.BLK_F_FLUSH, vc.BLK_F_MQ)
    pfeats = vc.bits(vc.PROTOCOL_F_MQ, vc.PROTOCOL_F_CONFIG)
    d = qsd.device(features=feats, protocol_features=pfeats)
    try:
        assert not d.vqs[0].event_idx and not d.client.default_ack
        data = os.urandom(4096)
        assert d.write(10, data, queue=1) == vc.BLK_S_OK
        assert d.read(10, 4096, queue=0) == (vc.BLK_S_OK, data)
        reqs = d.submit_many([(vc.BLK_T_IN, 10, 4096)] * 20)
        assert all(r.data == data for r in reqs)
        # the client may have seen every completion in the used ring before
        # reading the call eventfd: then the signal is still pending there
        assert d.vqs[0].notifications >= 1 or d.vqs[0].wait_notification(5.0)
    finally:
        d.close()


def test_multi_region_memory(qsd):
    """Rings in one region, data buffers in another, non-contiguous gpas."""
    regions = [vc.GuestMemory(1 << 20, gpa=0), vc.GuestMemory(4 << 20, gpa=0x1_0000_0000)]
    d = qsd.device(regions=regions, setup=False)
    try:
        d.negotiate()
        d.setup_memory()
        for q in range(NUM_QUEUES):
            d.setup_queue(q, region=0)
        region1 = d.mem.regions[1]
        data = os.urandom(8192)
        buf = region1.alloc(8192)
        region1.write(buf, data)
        st = d.mem.regions[0].alloc(1)
        req = d.wait(
            d.submit_raw(
                [(vc.blk_header(vc.BLK_T_OUT, 40), False), (buf, 8192, False), (st, 1, True)]
            )
        )
        assert req.status == vc.BLK_S_OK
        rbuf = region1.alloc(8192)
        req = d.wait(
            d.submit_raw(
                [(vc.blk_header(vc.BLK_T_IN, 40), False), (rbuf, 8192, True), (st, 1, True)],
                queue=1,
            )
        )
        assert req.status == vc.BLK_S_OK
        assert region1.read(rbuf, 8192) == data
        assert qsd.read_image(40, 8192) == data
    finally:
        d.close()


def test_low_level_messages(qsd):
    """Raw client: GET_FEATURES via call(), header flags, ack on a set message."""
    c = vc.VhostUserClient(qsd.sock, connect_retry=2.0)
    try:
        c.send(vc.GET_FEATURES)
        req, flags, payload = c.recv()
        assert req == vc.GET_FEATURES
        assert flags == vc.VERSION | vc.FLAG_REPLY
        assert len(payload) == 8 and vc.unpack_u64(payload) & vc.bit(vc.F_PROTOCOL_FEATURES)
        pf = c.get_protocol_features()
        c.set_protocol_features(pf & vc.bits(vc.PROTOCOL_F_REPLY_ACK, vc.PROTOCOL_F_MQ))
        assert c.call(vc.SET_OWNER, ack=True) == 0
        assert c.get_queue_num() == NUM_QUEUES
        c.expect_no_message(0.1)
    finally:
        c.close()


# ---------------------------------------------------------------------------
# The crafting API really produces the malformed input it claims to: qsd
# (libvhost-user) detects each one, vu_panic()s and drops the connection.
# qsd itself must survive and accept a new client.
# ---------------------------------------------------------------------------
def _loop_chain(dev):
    vq = dev.vqs[0]
    a, b = vq.alloc_descs(2)
    hdr = dev.mem.alloc(16)
    dev.mem.write(hdr, vc.blk_header(vc.BLK_T_IN))
    vq.add_raw_descriptors(
        [(a, hdr, 16, vc.VRING_DESC_F_NEXT, b), (b, hdr, 16, vc.VRING_DESC_F_NEXT, a)]
    )
    vq.kick()


def _next_out_of_range(dev):
    vq = dev.vqs[0]
    (a,) = vq.alloc_descs(1)
    vq.add_raw_descriptors([(a, dev.mem.alloc(16), 16, vc.VRING_DESC_F_NEXT, dev.queue_size + 5)])
    vq.kick()


def _unmapped_buffer(dev):
    dev.submit_raw([(vc.blk_header(vc.BLK_T_IN), False), (0xDEAD_0000_0000, 512, True), (1, True)])


def _head_out_of_range(dev):
    dev.vqs[1].publish(dev.queue_size + 1)
    dev.vqs[1].kick()


def _oversized_payload(dev):
    dev.client.send(vc.GET_FEATURES, bytes(4096))


def _kick_without_fd(dev):
    dev.client.send(
        vc.SET_VRING_KICK, vc.pack_vring_file(0, has_fd=True)
    )  # claims an fd, sends none


def _call_with_two_fds(dev):
    dev.client.send(
        vc.SET_VRING_CALL, vc.pack_vring_file(0), fds=(dev.vqs[0].call_fd, dev.vqs[1].call_fd)
    )


def _unknown_request(dev):
    dev.client.send(99)


def _indirect_table_bad_length(dev):
    vq = dev.vqs[0]
    tbl, _ = vq.write_indirect_table([(dev.mem.alloc(16), 16, 0, 0)] * 2)
    (h,) = vq.alloc_descs(1)
    vq.add_raw_descriptors([(h, tbl, 24, vc.VRING_DESC_F_INDIRECT, 0)])  # not a multiple of 16
    vq.kick()


@pytest.mark.parametrize(
    "attack",
    [
        _loop_chain,
        _next_out_of_range,
        _unmapped_buffer,
        _head_out_of_range,
        _oversized_payload,
        _kick_without_fd,
        _call_with_two_fds,
        _unknown_request,
        _indirect_table_bad_length,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_malformed_input_detected_by_qsd(qsd, attack):
    d = qsd.device()
    try:
        attack(d)
        assert d.client.wait_disconnect(2.0), "qsd did not reject the malformed input"
    finally:
        d.close()
    d = qsd.device()  # the daemon survives and serves the next client
    try:
        assert d.read(0, 512)[0] == vc.BLK_S_OK
    finally:
        d.close()


def test_raw_header_bytes(qsd):
    """send_raw with a truncated header: qsd waits for the rest, we time out cleanly."""
    c = vc.VhostUserClient(qsd.sock, connect_retry=2.0, timeout=0.3)
    try:
        c.send_raw(vc.HDR.pack(vc.GET_FEATURES, vc.VERSION, 0)[:6])
        with pytest.raises(TimeoutError):
            c.recv()
        c.send_raw(vc.HDR.pack(vc.GET_FEATURES, vc.VERSION, 0)[6:])  # complete it
        req, flags, payload = c.recv()
        assert req == vc.GET_FEATURES and flags & vc.FLAG_REPLY and len(payload) == 8
    finally:
        c.close()


def test_inflight_fd_payload_is_24_bytes(qsd):
    """libvhost-user only accepts the padded 24-byte VhostUserInflight payload."""
    d = qsd.device(setup=False)
    try:
        d.negotiate()
        size, off, fd = d.client.get_inflight_fd(NUM_QUEUES, 128)
        # qsd 7.2 does not offer INFLIGHT_SHMFD; it still answers (size 0, no fd)
        # as long as the payload size is right.
        assert d.client.is_connected(0.1)
        if fd is not None:
            os.close(fd)
    finally:
        d.close()


def test_ring_stopped_after_get_vring_base(dev):
    assert dev.read(0, 512, queue=1)[0] == vc.BLK_S_OK
    assert dev.get_vring_base(1) == 1
    req = dev.submit(vc.BLK_T_IN, 0, in_len=512, queue=1)
    with pytest.raises(TimeoutError):
        dev.wait(req, timeout=0.2)
    # queue 0 is unaffected
    assert dev.read(0, 512, queue=0)[0] == vc.BLK_S_OK


def test_add_rem_mem_reg(qsd):
    """CONFIGURE_MEM_SLOTS path: ADD_MEM_REG instead of SET_MEM_TABLE, then REM_MEM_REG."""
    pf = vc.bits(
        vc.PROTOCOL_F_MQ,
        vc.PROTOCOL_F_REPLY_ACK,
        vc.PROTOCOL_F_CONFIG,
        vc.PROTOCOL_F_CONFIGURE_MEM_SLOTS,
    )
    regions = [vc.GuestMemory(1 << 20, gpa=0), vc.GuestMemory(1 << 20, gpa=0x4000_0000)]
    d = qsd.device(regions=regions, protocol_features=pf, setup=False)
    try:
        d.negotiate()
        assert d.client.get_max_mem_slots() >= 2
        for r in d.mem.regions:
            assert d.client.add_mem_reg(r, ack=True) == 0
        for q in range(NUM_QUEUES):
            d.setup_queue(q)
        data = os.urandom(4096)
        assert d.write(8, data) == vc.BLK_S_OK
        assert d.client.rem_mem_reg(d.mem.regions[1], ack=True) == 0
        assert d.read(8, 4096, queue=1) == (vc.BLK_S_OK, data)
    finally:
        d.close()
