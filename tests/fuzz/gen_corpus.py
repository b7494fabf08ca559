#!/usr/bin/env python3
"""Write the seed corpus of tests/fuzz/fuzz_protocol.py into tests/fuzz/corpus/.

Each seed is a frontend's byte stream in the harness's format (a byte of
session options, then { u8 fd count; header; payload } per message): the
start-up sequence QEMU's vhost-user-blk sends, memory hot-plug with memory
slots, config-space reads and the write-cache switch, a reconnect-style
queue stop, and a few malformed messages.  Deterministic.

    python tests/fuzz/gen_corpus.py [OUTDIR]
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from blkserve.vhost import protocol as p
from blkserve.vhost.protocol import Feature, ProtocolFeature, Req

UVA = 0x7F00_0000_0000
REGION = 0x10000  # the harness's memfds are 64 KiB
NUM = 16
DESC, AVAIL, USED = UVA + 0x1000, UVA + 0x1800, UVA + 0x1C00

FEATURES = p.bits(Feature.VERSION_1, Feature.PROTOCOL_FEATURES, Feature.RING_EVENT_IDX,
                  Feature.RING_INDIRECT_DESC, Feature.BLK_SEG_MAX, Feature.BLK_BLK_SIZE,
                  Feature.BLK_FLUSH, Feature.BLK_MQ, Feature.BLK_CONFIG_WCE)
PROTOCOL_FEATURES = p.bits(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                           ProtocolFeature.CONFIG, ProtocolFeature.CONFIGURE_MEM_SLOTS)


def msg(req: int, payload: bytes = b"", nfds: int = 0, flags: int = p.VERSION,
        size: int | None = None) -> bytes:
    size = len(payload) if size is None else size
    return bytes([nfds]) + p.HEADER.pack(req, flags, size) + payload


def u64(req: int, value: int, nfds: int = 0, flags: int = p.VERSION) -> bytes:
    return msg(req, struct.pack("<Q", value), nfds, flags)


def state(req: int, index: int, num: int) -> bytes:
    return msg(req, struct.pack("<II", index, num))


def mem_table(regions: list[tuple[int, int, int, int]], full: bool = False) -> bytes:
    body = struct.pack("<II", len(regions), 0)
    body += b"".join(struct.pack("<QQQQ", *r) for r in regions)
    if full:
        body += bytes(32 * (p.MAX_MEM_REGIONS - len(regions)))
    return msg(Req.SET_MEM_TABLE, body, nfds=len(regions))


def single_region(req: int, gpa: int, size: int, uva: int, nfds: int) -> bytes:
    return msg(req, struct.pack("<QQQQQ", 0, gpa, size, uva, 0), nfds)


def vring_addr(index: int, desc: int = DESC, used: int = USED, avail: int = AVAIL) -> bytes:
    return msg(Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", index, 0, desc, used, avail, 0))


def config(req: int, offset: int, size: int, data: bytes = b"",
           flags: int = p.VERSION) -> bytes:
    return msg(req, struct.pack("<III", offset, size, 0) + data, flags=flags)


def handshake() -> bytes:
    return b"".join([
        msg(Req.GET_FEATURES),
        msg(Req.GET_PROTOCOL_FEATURES),
        u64(Req.SET_PROTOCOL_FEATURES, PROTOCOL_FEATURES),
        msg(Req.GET_QUEUE_NUM),
        msg(Req.SET_OWNER),
        config(Req.GET_CONFIG, 0, 60, bytes(60)),
    ])


def queue_setup(index: int, num: int = NUM, base: int = 0) -> bytes:
    return b"".join([
        state(Req.SET_VRING_NUM, index, num),
        state(Req.SET_VRING_BASE, index, base),
        vring_addr(index),
        u64(Req.SET_VRING_KICK, index, nfds=1),
        u64(Req.SET_VRING_CALL, index, nfds=1),
        u64(Req.SET_VRING_ERR, index | p.VRING_NOFD),
        state(Req.SET_VRING_ENABLE, index, 1),
    ])


def seeds() -> dict[str, bytes]:
    s: dict[str, bytes] = {}
    region = (0, REGION, UVA, 0)
    start = (handshake() + u64(Req.SET_FEATURES, FEATURES)
             + mem_table([region], full=True) + queue_setup(0) + queue_setup(1))
    s["qemu_start"] = b"\0" + start
    s["qemu_start_read_only"] = b"\1" + start
    s["qemu_start_stop"] = b"\0" + start + b"".join([
        state(Req.GET_VRING_BASE, 0, 0),
        state(Req.GET_VRING_BASE, 1, 0),
        msg(Req.RESET_OWNER),
    ])
    s["mem_table_swap"] = b"\0" + start + mem_table(
        [(0, 0x8000, UVA, 0), (0x100000, 0x8000, UVA + 0x100000, 0x8000)])
    s["mem_slots"] = b"\0" + handshake() + b"".join([
        u64(Req.SET_FEATURES, FEATURES),
        msg(Req.GET_MAX_MEM_SLOTS),
        single_region(Req.ADD_MEM_REG, 0, 0x8000, UVA, 1),
        single_region(Req.ADD_MEM_REG, 0x8000, 0x8000, UVA + 0x8000, 1),
        queue_setup(0),
        single_region(Req.REM_MEM_REG, 0x8000, 0x8000, UVA + 0x8000, 0),
        single_region(Req.REM_MEM_REG, 0, 0x8000, UVA, 1),
    ])
    s["config_wce"] = b"\0" + handshake() + b"".join([
        u64(Req.SET_FEATURES, FEATURES, flags=p.VERSION | p.FLAG_NEED_REPLY),
        config(Req.SET_CONFIG, 32, 1, b"\0", flags=p.VERSION | p.FLAG_NEED_REPLY),
        config(Req.GET_CONFIG, 32, 4, bytes(4)),
        config(Req.SET_CONFIG, 32, 1, b"\1", flags=p.VERSION | p.FLAG_NEED_REPLY),
        config(Req.SET_CONFIG, 0, 8, bytes(8), flags=p.VERSION | p.FLAG_NEED_REPLY),
        config(Req.GET_CONFIG, 90, 16, bytes(16)),
    ])
    packed = FEATURES | p.bits(Feature.RING_PACKED)
    # QEMU's packed base: avail position | wrap << 15, used likewise << 16.
    s["packed_start"] = b"\0" + handshake() + u64(Req.SET_FEATURES, packed) \
        + mem_table([region]) + queue_setup(0, num=24, base=0x80058005) \
        + state(Req.GET_VRING_BASE, 0, 0)
    # A size only a packed ring may have, then the frontend switches to split.
    s["packed_then_split"] = b"\0" + handshake() + u64(Req.SET_FEATURES, packed) \
        + mem_table([region]) + state(Req.SET_VRING_NUM, 0, 24) \
        + u64(Req.SET_FEATURES, FEATURES) + vring_addr(0) + u64(Req.SET_VRING_KICK, 0, nfds=1)
    s["no_protocol_features"] = b"\0" + b"".join([
        msg(Req.GET_FEATURES),
        u64(Req.SET_FEATURES, FEATURES & ~p.bits(Feature.PROTOCOL_FEATURES)),
        mem_table([region]),
        queue_setup(0),
    ])
    # Malformed: each ends the connection at its last message.
    s["bad_version"] = b"\0" + msg(Req.GET_FEATURES, flags=2)
    s["reply_flag"] = b"\0" + msg(Req.GET_FEATURES, flags=p.VERSION | p.FLAG_REPLY)
    s["huge_size"] = b"\0" + msg(Req.SET_FEATURES, size=0xFFFFFFFF)
    s["truncated_payload"] = b"\0" + msg(Req.SET_FEATURES, b"\1\2\3", size=8)
    s["unknown_request"] = b"\0" + msg(99) + msg(Req.SET_LOG_BASE, bytes(8))
    two = mem_table([region, (0x100000, 0x1000, UVA * 2, 0)])
    s["mem_table_fd_mismatch"] = b"\0" + bytes([1]) + two[1:]  # 2 regions, 1 fd
    s["mem_table_overlap"] = b"\0" + mem_table([region, (0x8000, REGION, UVA * 2, 0)])
    s["mem_table_zero_regions"] = b"\0" + msg(Req.SET_MEM_TABLE, bytes(8))
    s["vring_index_out_of_range"] = b"\0" + state(Req.SET_VRING_NUM, 7, NUM)
    s["vring_num_not_power_of_two"] = b"\0" + state(Req.SET_VRING_NUM, 0, 24)
    s["vring_base_too_big"] = b"\0" + state(Req.SET_VRING_BASE, 0, 0x10000)
    s["vring_kick_reserved_bits"] = b"\0" + u64(Req.SET_VRING_KICK, 0x200, nfds=1)
    s["vring_kick_no_fd"] = b"\0" + u64(Req.SET_VRING_KICK, p.VRING_NOFD)
    s["unoffered_features"] = b"\0" + u64(Req.SET_FEATURES, 1 << 63)
    s["ring_outside_memory"] = b"\0" + handshake() + mem_table([region]) + b"".join([
        state(Req.SET_VRING_NUM, 0, 1024),
        vring_addr(0, desc=UVA + 0xF000),
        u64(Req.SET_VRING_KICK, 0, nfds=1),
    ])
    s["rem_before_add"] = b"\0" + single_region(Req.REM_MEM_REG, 0, 0x1000, UVA, 0)
    s["config_size_mismatch"] = b"\0" + config(Req.GET_CONFIG, 0, 60, bytes(10))
    return s


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    main()
