#!/usr/bin/env python3
"""Write the seed corpus of native/fuzz/fuzz_chain.c into native/fuzz/corpus/.

Each seed is one guest in the harness's input format (documented at the top
of fuzz_chain.c): valid read/write/flush/get-id requests, direct and
indirect, across GPA-contiguous regions, and the classic malformed chains,
so the fuzzer starts from every branch a real driver or a hostile guest
takes.  Deterministic: re-running rewrites the same files.

    python3 native/fuzz/gen_corpus.py [OUTDIR]
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

NEXT, WRITE, INDIRECT = 1, 2, 4
P_AVAIL = 1 << 7  # packed ring: available with wrap counter 1 (USED bit clear)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
WZ_UNMAP = 1
CAPACITY = 1 << 20
UVA = 0x7F00_0000_0000

# Layout of the default single region (offsets are GPAs: region 0 at GPA 0).
DESC, AVAIL, USED = 0x1000, 0x1800, 0x1C00
HDR, DATA, STATUS, TABLE = 0x2000, 0x4000, 0x3000, 0x3800


@dataclass
class Region:
    gpa: int = 0
    size: int = 0x10000
    uva: int = UVA
    mmap_offset: int = 0


@dataclass
class Guest:
    regions: list[Region] = field(default_factory=lambda: [Region()])
    capacity: int = CAPACITY
    qsz: int = 4  # v < 16: 1 << v queue entries; 255: 65536; else v - 16
    head: int = 0
    read_only: bool = False
    gpa_contiguous: bool = False
    block_4k: bool = False
    packed: bool = False
    wrap: bool = False
    # (region, uva offset) of desc, avail, used
    rings: tuple = ((0, DESC), (0, AVAIL), (0, USED))
    writes: list[tuple[int, int, bytes]] = field(default_factory=list)

    def put(self, gpa: int, data: bytes) -> None:
        """Write data at a guest-physical address (inside one region)."""
        for i, r in enumerate(self.regions):
            if r.gpa <= gpa < r.gpa + r.size:
                self.writes.append((i, gpa - r.gpa, data))
                return
        raise ValueError(f"GPA {gpa:#x} is in no region")

    def descs(self, table_gpa: int, descs: list[tuple[int, int, int, int]]) -> None:
        self.put(table_gpa, b"".join(struct.pack("<QIHH", *d) for d in descs))

    def pdescs(self, table_gpa: int, descs: list[tuple[int, int, int, int]]) -> None:
        """Packed descriptors: (addr, len, id, flags)."""
        self.put(table_gpa, b"".join(struct.pack("<QIHH", *d) for d in descs))

    def blk_header(self, gpa: int, type_: int, sector: int) -> None:
        self.put(gpa, struct.pack("<IIQ", type_, 0, sector))

    def encode(self) -> bytes:
        flags = len(self.regions) - 1
        flags |= 4 if self.gpa_contiguous else 0
        flags |= 8 if self.read_only else 0
        flags |= 32 if self.block_4k else 0
        flags |= (64 if self.packed else 0) | (128 if self.wrap else 0)
        out = struct.pack("<BQBH", flags, self.capacity, self.qsz, self.head)
        regions = self.regions + [Region(0, 1, 0, 0)] * (3 - len(self.regions))
        for r in regions:
            out += struct.pack("<QIQH", r.gpa, r.size - 1, r.uva, r.mmap_offset)
        for sel, off in self.rings:
            out += struct.pack("<BI", sel, off)
        for region, off, data in self.writes:
            out += struct.pack("<BHH", region, off, len(data)) + data
        return out


def request(type_: int, sector: int = 8, length: int = 4096,
            data_flags: int | None = None) -> Guest:
    """header -> data -> status, as a Linux guest lays out a request."""
    g = Guest()
    g.blk_header(HDR, type_, sector)
    if data_flags is None:
        data_flags = WRITE if type_ in (T_IN, T_GET_ID) else 0
    if length:
        g.descs(DESC, [(HDR, 16, NEXT, 1), (DATA, length, NEXT | data_flags, 2),
                       (STATUS, 1, WRITE, 0)])
    else:
        g.descs(DESC, [(HDR, 16, NEXT, 1), (STATUS, 1, WRITE, 0)])
    return g


def indirect(type_: int, length: int = 4096) -> Guest:
    g = Guest()
    g.blk_header(HDR, type_, 16)
    data_flags = WRITE if type_ == T_IN else 0
    g.descs(TABLE, [(HDR, 16, NEXT, 1), (DATA, length, NEXT | data_flags, 2),
                    (STATUS, 1, WRITE, 0)])
    g.descs(DESC, [(TABLE, 48, INDIRECT, 0)])
    return g


def discard_like(type_: int, segs: list[tuple[int, int, int]]) -> Guest:
    """DISCARD / WRITE_ZEROES: header, then (sector, num_sectors, flags) segments."""
    g = request(type_, sector=0, length=16 * len(segs), data_flags=0)
    g.put(DATA, b"".join(struct.pack("<QII", *seg) for seg in segs))
    return g


def seeds() -> dict[str, Guest]:
    s: dict[str, Guest] = {}
    s["read"] = request(T_IN)
    s["write"] = request(T_OUT)
    s["flush"] = request(T_FLUSH, length=0)
    s["get_id"] = request(T_GET_ID, length=20)
    s["unsupported_type"] = request(0x99, length=0)
    s["read_zero_len"] = request(T_IN, length=0)
    s["read_unaligned_len"] = request(T_IN, length=100)
    s["read_past_capacity"] = request(T_IN, sector=CAPACITY // 512 - 1, length=1024)
    s["read_huge_sector"] = request(T_IN, sector=(1 << 64) - 1)
    s["write_read_only"] = request(T_OUT)
    s["write_read_only"].read_only = True
    s["flush_read_only"] = request(T_FLUSH, length=0)
    s["flush_read_only"].read_only = True
    s["write_with_writable_data"] = request(T_OUT, data_flags=WRITE)
    s["read_with_readable_data"] = request(T_IN, data_flags=0)
    s["discard"] = discard_like(T_DISCARD, [(0, 8, 0), (64, 16, 0)])
    s["write_zeroes_unmap"] = discard_like(T_WRITE_ZEROES, [(8, 8, WZ_UNMAP)])
    s["discard_with_unmap"] = discard_like(T_DISCARD, [(8, 8, WZ_UNMAP)])
    s["write_zeroes_zero_sectors"] = discard_like(T_WRITE_ZEROES, [(8, 0, 0)])
    s["discard_too_many_segments"] = discard_like(T_DISCARD, [(8 * i, 8, 0) for i in range(33)])
    s["write_zeroes_segment_too_big"] = discard_like(T_WRITE_ZEROES, [(0, (1 << 22) + 1, 0)])
    s["discard_past_capacity"] = discard_like(T_DISCARD, [(CAPACITY // 512 - 8, 16, 0)])
    g = discard_like(T_DISCARD, [(0, 8, 0)])
    g.descs(DESC, [(HDR, 16, NEXT, 1), (DATA, 16, NEXT, 2), (STATUS, 2, WRITE, 0)])
    s["discard_with_writable_byte"] = g
    g = request(T_IN)
    g.descs(DESC, [(HDR, 8, NEXT, 1), (STATUS, 1, WRITE, 0)])
    s["short_header"] = g
    s["read_4k_block_512_bytes"] = request(T_IN, sector=8, length=512)
    s["read_4k_block_512_bytes"].block_4k = True
    s["read_4k_block"] = request(T_IN, sector=8)
    s["read_4k_block"].block_4k = True
    s["write_4k_block_misaligned"] = request(T_OUT, sector=1)
    s["write_4k_block_misaligned"].block_4k = True
    s["indirect_read"] = indirect(T_IN)
    s["indirect_write"] = indirect(T_OUT, 8192)

    g = Guest()  # header split over two descriptors; status shares data's buffer
    g.blk_header(HDR, T_IN, 0)
    g.descs(DESC, [(HDR, 8, NEXT, 1), (HDR + 8, 8, NEXT, 2), (DATA, 513, WRITE, 0)])
    s["split_header_status_in_data"] = g

    g = request(T_IN)  # writable buffer before a readable one
    g.descs(DESC, [(HDR, 16, NEXT | WRITE, 1), (DATA, 16, NEXT, 2), (STATUS, 1, WRITE, 0)])
    s["writable_before_readable"] = g

    g = request(T_IN)
    g.descs(DESC, [(HDR, 16, NEXT, 1), (DATA, 512, NEXT | WRITE, 0)])
    s["loop"] = g

    g = request(T_IN)
    g.descs(DESC, [(HDR, 16, NEXT, 0xFFF0)])
    s["next_out_of_range"] = g

    s["head_out_of_range"] = request(T_IN)
    s["head_out_of_range"].head = 16

    g = request(T_IN)
    g.descs(DESC, [(HDR, 16, NEXT, 1), (DATA, 0xFFFFFFFF, NEXT | WRITE, 2),
                   (STATUS, 1, WRITE, 0)])
    s["huge_length"] = g

    g = request(T_IN)
    g.descs(DESC, [(HDR, 16, NEXT, 1), ((1 << 64) - 0x100, 0x200, NEXT | WRITE, 2),
                   (STATUS, 1, WRITE, 0)])
    s["wraparound_address"] = g

    g = indirect(T_IN)  # an indirect table naming another indirect table
    g.descs(TABLE, [(TABLE + 0x100, 48, INDIRECT, 0)])
    s["nested_indirect"] = g

    g = indirect(T_IN)
    g.descs(DESC, [(TABLE, 48, INDIRECT | NEXT, 1)])
    s["indirect_with_next"] = g

    g = indirect(T_IN)
    g.descs(DESC, [(TABLE, 40, INDIRECT, 0)])
    s["indirect_bad_length"] = g

    g = request(T_IN)
    g.descs(DESC, [(HDR, 16, NEXT, 1), (DATA, 0, NEXT | WRITE, 2), (STATUS, 1, WRITE, 0)])
    s["zero_length_descriptor"] = g

    # 200 data buffers through an indirect table: more than BS_MAX_IOV.
    g = Guest()
    g.blk_header(HDR, T_IN, 0)
    n = 200
    table = [(HDR, 16, NEXT, 1)]
    table += [(DATA + 16 * i, 16, NEXT | WRITE, i + 2) for i in range(n)]
    table += [(STATUS, 1, WRITE, 0)]
    g.descs(0x8000, table)
    g.descs(DESC, [(0x8000, 16 * len(table), INDIRECT, 0)])
    s["too_many_segments"] = g

    # Three GPA-contiguous regions; the data buffer straddles two of them.
    g = Guest(regions=[Region(0x100000, 0x4000, UVA, 0),
                       Region(0x104000, 0x4000, UVA + 0x100000, 0x4000),
                       Region(0x108000, 0x4000, UVA + 0x200000, 0x8000)],
              gpa_contiguous=True, rings=((0, 0x1000), (0, 0x1800), (0, 0x1C00)))
    g.blk_header(0x102000, T_OUT, 0)
    g.descs(0x101000, [(0x102000, 16, NEXT, 1), (0x103800, 0x1000, NEXT, 2),
                       (0x109000, 1, WRITE, 0)])
    s["three_regions_straddle"] = g

    # The ring in the second of two regions, the request in the first.
    g = Guest(regions=[Region(0, 0x8000, UVA, 0), Region(0x40000000, 0x1000, UVA + 0x8000, 0)],
              rings=((1, 0), (1, 0x400), (1, 0x800)))
    g.blk_header(HDR, T_IN, 0)
    g.descs(0x40000000, [(HDR, 16, NEXT, 1), (DATA, 1024, NEXT | WRITE, 2),
                         (STATUS, 1, WRITE, 0)])
    s["ring_in_second_region"] = g

    g = request(T_IN)
    g.rings = ((0, DESC + 8), (0, AVAIL), (0, USED))
    s["misaligned_desc_ring"] = g

    g = request(T_IN)
    g.rings = ((0, 0xFFF0), (0, AVAIL), (0, USED))
    s["desc_ring_past_region"] = g

    g = indirect(T_IN)
    g.capacity = (1 << 64) - 512
    g.qsz = 0
    s["queue_size_1_indirect_huge_capacity"] = g

    s.update(packed_seeds())
    return s


def packed(type_: int, length: int = 4096, size_code: int = 4) -> Guest:
    """A packed ring (descriptor ring at DESC, event areas at AVAIL/USED)."""
    g = Guest(packed=True, wrap=True, qsz=size_code)
    g.blk_header(HDR, type_, 8)
    data_flags = WRITE if type_ == T_IN else 0
    g.pdescs(DESC, [(HDR, 16, 7, P_AVAIL | NEXT), (DATA, length, 7, P_AVAIL | NEXT | data_flags),
                    (STATUS, 1, 7, P_AVAIL | WRITE)])
    return g


def packed_seeds() -> dict[str, Guest]:
    s: dict[str, Guest] = {}
    s["packed_read"] = packed(T_IN)
    s["packed_write"] = packed(T_OUT)
    s["packed_not_available"] = packed(T_IN)
    s["packed_not_available"].wrap = False

    g = packed(T_IN, size_code=16 + 20)  # 20 entries: not a power of two
    g.head = 18  # the chain wraps from the end of the ring to its start
    g.pdescs(DESC + 18 * 16, [(HDR, 16, 3, P_AVAIL | NEXT), (DATA, 512, 3, P_AVAIL | NEXT | WRITE)])
    g.pdescs(DESC, [(STATUS, 1, 3, P_AVAIL | WRITE)])
    s["packed_wraps_around"] = g

    g = packed(T_IN)
    g.pdescs(DESC, [(HDR, 16, 1, P_AVAIL | NEXT)] * 16)
    s["packed_next_all_around"] = g

    g = packed(T_OUT)
    g.pdescs(TABLE, [(HDR, 16, 0, 0), (DATA, 4096, 0, 0), (STATUS, 1, 0, WRITE)])
    g.pdescs(DESC, [(TABLE, 48, 9, P_AVAIL | INDIRECT)])
    s["packed_indirect_write"] = g

    g = packed(T_IN)
    g.pdescs(DESC, [(HDR, 16, 1, P_AVAIL | NEXT), (TABLE, 48, 1, P_AVAIL | INDIRECT)])
    s["packed_indirect_not_first"] = g

    g = packed(T_IN)
    g.pdescs(DESC, [(HDR, 16, 1, P_AVAIL | NEXT), (1 << 63, 512, 1, P_AVAIL | NEXT | WRITE),
                    (STATUS, 1, 1, P_AVAIL | WRITE)])
    s["packed_bad_buffer"] = g
    return s


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "corpus"
    out.mkdir(parents=True, exist_ok=True)
    for name, guest in seeds().items():
        (out / name).write_bytes(guest.encode())


if __name__ == "__main__":
    main()
