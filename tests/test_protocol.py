"""Unit tests of vhost-user message parsing and validation (no socket)."""

import struct

import pytest

from blkserve.vhost import protocol as p
from blkserve.vhost.blk import CONFIG_SIZE, BlkDeviceModel
from blkserve.vhost.protocol import ProtocolError, Req


def hdr(req, size, flags=p.VERSION):
    return p.HEADER.pack(req, flags, size)


def test_header_roundtrip_and_flags():
    h = p.parse_header(hdr(Req.SET_FEATURES, 8, p.VERSION | p.FLAG_NEED_REPLY))
    assert (h.request, h.size, h.need_reply, h.name) == (2, 8, True, "SET_FEATURES")
    assert not p.parse_header(hdr(Req.GET_FEATURES, 0)).need_reply


@pytest.mark.parametrize("data, msg", [
    (b"\x01\x00\x00", "truncated"),
    (hdr(1, 0, flags=0), "version"),
    (hdr(1, 0, flags=2), "version"),
    (hdr(1, 0, flags=p.VERSION | p.FLAG_REPLY), "reply"),
    (hdr(1, p.MAX_PAYLOAD + 1), "exceeds"),
    (hdr(1, 0xFFFFFFFF), "exceeds"),
])
def test_bad_headers(data, msg):
    with pytest.raises(ProtocolError, match=msg):
        p.parse_header(data)


def check(req, payload, nfds=0):
    return p.check_message(p.Header(req, p.VERSION, len(payload)), payload, nfds)


def test_check_message_sizes_and_fds():
    assert check(Req.GET_FEATURES, b"").reply
    assert not check(Req.SET_FEATURES, p.pack_u64(1)).reply
    with pytest.raises(ProtocolError, match="expected 8"):
        check(Req.SET_FEATURES, b"\0" * 4)
    with pytest.raises(ProtocolError, match="expected 0"):
        check(Req.GET_FEATURES, b"\0" * 8)
    with pytest.raises(ProtocolError, match="unsupported message"):
        check(99, b"")
    with pytest.raises(ProtocolError, match="unsupported message"):
        check(Req.SET_STATUS, b"\0" * 8)
    # the dirty log comes with its fd, and its reply is awaited
    assert check(Req.SET_LOG_BASE, b"\0" * 16, 1).reply
    with pytest.raises(ProtocolError, match="expected 1"):
        check(Req.SET_LOG_BASE, b"\0" * 16)
    # vring fds: one fd unless the NOFD bit is set
    assert check(Req.SET_VRING_KICK, p.pack_u64(0), 1)
    assert check(Req.SET_VRING_CALL, p.pack_u64(p.VRING_NOFD), 0)
    with pytest.raises(ProtocolError, match="expected 1"):
        check(Req.SET_VRING_KICK, p.pack_u64(0), 0)
    with pytest.raises(ProtocolError, match="expected 0"):
        check(Req.SET_VRING_CALL, p.pack_u64(p.VRING_NOFD), 1)
    with pytest.raises(ProtocolError, match="expected 0"):
        check(Req.SET_FEATURES, p.pack_u64(0), 2)


def test_payload_shorter_than_header_says():
    with pytest.raises(ProtocolError, match="truncated"):
        p.check_message(p.Header(Req.SET_FEATURES, p.VERSION, 8), b"\0" * 7, 0)


def mem_table(regions, pad_to=None):
    body = b"".join(p.MEM_REGION.pack(*r) for r in regions)
    n = len(regions) if pad_to is None else pad_to
    body += b"\0" * (p.MEM_REGION.size * (n - len(regions)))
    return struct.pack("<II", len(regions), 0) + body


def test_mem_table_decoding():
    t = mem_table([(0, 1 << 20, 0x7000_0000, 0), (1 << 32, 1 << 20, 0x8000_0000, 4096)])
    regions = p.decode_mem_table(t)
    assert regions[1] == p.MemRegion(1 << 32, 1 << 20, 0x8000_0000, 4096)
    assert check(Req.SET_MEM_TABLE, t, 2)
    with pytest.raises(ProtocolError, match="expected 2"):
        check(Req.SET_MEM_TABLE, t, 1)
    # the full fixed-size array is accepted too
    assert len(p.decode_mem_table(mem_table([(0, 4096, 0, 0)], pad_to=8))) == 1


@pytest.mark.parametrize("payload, msg", [
    (b"\0" * 4, "shorter"),
    (struct.pack("<II", 0, 0), "0 regions"),
    (struct.pack("<II", 9, 0) + b"\0" * 9 * 32, "9 regions"),
    (struct.pack("<II", 2, 0) + b"\0" * 40, "payload of"),
    (mem_table([(0, 0, 0, 0)]), "invalid range"),
    (mem_table([(2**64 - 4096, 8192, 0, 0)]), "invalid range"),
    (mem_table([(0, 8192, 0, 0), (4096, 8192, 1 << 40, 0)]), "overlap"),
])
def test_bad_mem_tables(payload, msg):
    with pytest.raises(ProtocolError, match=msg):
        p.decode_mem_table(payload)


def test_vring_payloads():
    assert p.decode_vring_state(struct.pack("<II", 1, 256)) == (1, 256)
    addr = p.decode_vring_addr(p.VRING_ADDR.pack(0, 0, 0x1000, 0x3000, 0x2000, 0))
    assert (addr.desc, addr.used, addr.avail) == (0x1000, 0x3000, 0x2000)
    assert p.decode_vring_fd(p.pack_u64(3)) == (3, True)
    assert p.decode_vring_fd(p.pack_u64(3 | p.VRING_NOFD)) == (3, False)
    with pytest.raises(ProtocolError, match="reserved bits"):
        p.decode_vring_fd(p.pack_u64(1 << 20))
    with pytest.raises(ProtocolError):
        p.decode_vring_addr(b"\0" * 39)


def test_config_payloads():
    assert p.decode_config(struct.pack("<III", 0, 4, 0) + b"abcd") == (0, 4, 0, b"abcd")
    with pytest.raises(ProtocolError, match="header says"):
        p.decode_config(struct.pack("<III", 0, 8, 0) + b"abcd")
    with pytest.raises(ProtocolError, match="shorter"):
        p.decode_config(b"\0" * 11)


def test_device_model_features_and_config():
    m = BlkDeviceModel(capacity=1 << 30, num_queues=2, read_only=True)
    f = m.features
    for feat in (p.Feature.VERSION_1, p.Feature.RING_EVENT_IDX, p.Feature.RING_INDIRECT_DESC,
                 p.Feature.BLK_SEG_MAX, p.Feature.BLK_BLK_SIZE, p.Feature.BLK_FLUSH,
                 p.Feature.BLK_MQ, p.Feature.BLK_RO, p.Feature.PROTOCOL_FEATURES):
        assert f & (1 << feat), feat.name
    assert not BlkDeviceModel(1 << 30, 1, False).features & (1 << p.Feature.BLK_RO)
    assert "CONFIG" in p.names(m.protocol_features, p.ProtocolFeature)
    cfg = m.config()
    assert len(cfg) == CONFIG_SIZE
    assert struct.unpack_from("<Q", cfg, 0)[0] == (1 << 30) // 512
    assert struct.unpack_from("<I", cfg, 12)[0] == 126
    assert struct.unpack_from("<I", cfg, 20)[0] == 512
    assert struct.unpack_from("<H", cfg, 34)[0] == 2
