#!/usr/bin/env python3
"""atheris fuzzer of the vhost-user message path (blkserve/vhost/).

One input is what a frontend could write on the socket: a byte of session
options, then messages, each { u8 fd count; 12-byte header; payload }, the
payload as long as the header says (cut short at the end of the input).
Three stages run on it:

1. every decoder of blkserve.vhost.protocol on every payload (and on the
   whole input), whatever the message type;
2. parse_header + check_message on every message;
3. a Session (blkserve.vhost.session) replaying the stream the way
   VhostUserServer._serve_conn does, with real GuestMemory over memfds but
   fake queues and target (no engine threads), until the connection would
   be dropped; then Session.close().

ProtocolError is the only exception the vhost-user code may raise; anything
else escapes and atheris reports it with the input that caused it.  The
harness also checks what each stage promises (decoded values in range,
replies well formed, no fd leaked, guest memory never unmapped or swapped
under a running queue, queues only ever given values the C boundary takes).

    python tests/fuzz/fuzz_protocol.py [libFuzzer flags] [CORPUS_DIR...]
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import sys

import atheris

with atheris.instrument_imports(include=["blkserve"]):
    from blkserve.native import GuestMemory, VringConfig
    from blkserve.vhost import protocol as p
    from blkserve.vhost import server, session
    from blkserve.vhost.blk import BlkDeviceModel
    from blkserve.vhost.protocol import ProtocolError

MEMFD_NAME = "blkserve-fuzz"
MEMFD_SIZE = 1 << 16
NUM_QUEUES = 2
U64 = 1 << 64


class FuzzBug(AssertionError):
    """A broken promise of the code under test (not a harness problem)."""


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise FuzzBug(what)


# ---- input stream ----

def split_messages(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(fd count, header bytes, payload) for each message of the stream; the
    last may be short of its header or payload (the frontend hung up)."""
    msgs = []
    pos = 0
    while pos < len(data):
        nfds = data[pos] % (p.MAX_FDS + 1)
        hdr = data[pos + 1:pos + 1 + p.HEADER.size]
        pos += 1 + p.HEADER.size
        size = struct.unpack("<I", hdr[8:12])[0] if len(hdr) == p.HEADER.size else 0
        payload = data[pos:pos + min(size, p.MAX_PAYLOAD)]
        pos += len(payload)
        msgs.append((nfds, hdr, payload))
    return msgs


# ---- stage 1: decoders on arbitrary bytes ----

def decoders(payload: bytes) -> None:
    def attempt(fn, *args):
        try:
            return fn(*args)
        except ProtocolError:
            return None

    v = attempt(p.decode_u64, payload)
    expect(v is None or 0 <= v < U64, "decode_u64 out of range")
    st = attempt(p.decode_vring_state, payload)
    expect(st is None or all(0 <= x < 1 << 32 for x in st), "vring state out of range")
    fd = attempt(p.decode_vring_fd, payload)
    expect(fd is None or (0 <= fd[0] <= p.VRING_IDX_MASK and isinstance(fd[1], bool)),
           f"decode_vring_fd gave {fd}")
    addr = attempt(p.decode_vring_addr, payload)
    expect(addr is None or all(0 <= x < U64 for x in (addr.desc, addr.used, addr.avail,
                                                      addr.log)), "vring address range")
    n = attempt(p.decode_mem_table_count, payload)
    expect(n is None or 1 <= n <= p.MAX_MEM_REGIONS, f"memory table count {n}")
    regions = attempt(p.decode_mem_table, payload)
    if regions is not None:
        expect(1 <= len(regions) <= p.MAX_MEM_REGIONS, "region count")
        for r in regions:
            expect(r.size > 0 and r.gpa + r.size <= U64 and r.uva + r.size <= U64,
                   f"accepted region {r}")
        ordered = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(ordered, ordered[1:], strict=False):
            expect(a.gpa + a.size <= b.gpa, "accepted overlapping regions")
    one = attempt(p.decode_single_region, payload)
    expect(one is None or (one.size > 0 and one.gpa + one.size <= U64), f"region {one}")
    cfg = attempt(p.decode_config, payload)
    expect(cfg is None or len(cfg[3]) == cfg[1], "config data length")
    if len(payload) >= 8:
        mask = struct.unpack_from("<Q", payload)[0]
        p.names(mask, p.Feature)
        p.names(mask, p.ProtocolFeature)


# ---- stage 2: header and per-message validation ----

def check(nfds: int, raw_hdr: bytes, payload: bytes) -> p.Header | None:
    try:
        hdr = p.parse_header(raw_hdr)
    except ProtocolError:
        return None
    expect(hdr.size <= p.MAX_PAYLOAD and hdr.flags & p.FLAG_VERSION_MASK == p.VERSION
           and not hdr.flags & p.FLAG_REPLY, f"accepted header {hdr}")
    expect(isinstance(hdr.name, str), "header name")
    try:
        spec = p.check_message(hdr, payload, nfds)
    except ProtocolError:
        return hdr
    expect(len(payload) == hdr.size, "check_message accepted a truncated payload")
    expect(spec.size is None or spec.size == hdr.size, "check_message size")
    expect(0 <= nfds <= p.MAX_FDS, "fd count")
    return hdr


# ---- stage 3: a Session over fake queues ----

def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def in_region(regions: list[tuple[int, int, int]], uva: int, length: int) -> bool:
    return any(u <= uva and uva + length <= u + size for _, size, u in regions)


class CheckedGuestMemory(GuestMemory):
    """The real table (bs_mem_add validates, maps the memfd), plus a check
    that no running queue uses it when it is changed or unmapped."""

    queues: list[FakeQueue] = []

    def __init__(self) -> None:
        super().__init__()
        self.regions: list[tuple[int, int, int]] = []

    def _unused(self, what: str) -> None:
        for q in self.queues:
            expect(not (q.running and q.mem is self),
                   f"guest memory {what} while queue {q.index} runs on it")

    def add(self, fd: int, gpa: int, size: int, uva: int, mmap_offset: int) -> None:
        self._unused("grown")
        super().add(fd, gpa, size, uva, mmap_offset)
        self.regions.append((gpa, size, uva))

    def remove(self, gpa: int, size: int, uva: int) -> None:
        self._unused("shrunk")
        super().remove(gpa, size, uva)
        self.regions.remove((gpa, size, uva))

    def close(self) -> None:
        self._unused("unmapped")
        super().close()


class FakeQueue:
    """Stands in for blkserve.native.Queue: checks that start() gets what the
    C boundary accepts and refuses rings outside guest memory like the
    engine (bs_vring_map), without a thread."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.running = False
        self.mem: CheckedGuestMemory | None = None
        self.base = 0

    def start(self, mem: CheckedGuestMemory, vc: VringConfig) -> None:
        expect(not self.running, f"queue {self.index} started twice")
        expect(isinstance(mem, CheckedGuestMemory) and mem.handle is not None,
               "queue started on closed guest memory")
        num = vc.num
        expect(0 < num <= p.MAX_QUEUE_SIZE, f"queue size {num}")
        expect(all(0 <= a < U64 for a in (vc.desc, vc.avail, vc.used)), "ring address range")
        expect(0 <= vc.base < 1 << 32, f"ring base {vc.base:#x}")
        expect(is_open(vc.kick_fd), f"queue {self.index} started with a closed kick fd")
        expect(vc.call_fd == -1 or is_open(vc.call_fd),
               f"queue {self.index} started with a closed call fd")
        # What bs_vring_map and bs_queue_start refuse.
        if vc.packed:
            sizes = (16 * num, 4, 4)
            bad = (vc.desc & 15 or vc.avail & 3 or vc.used & 3
                   or (vc.base & 0x7FFF) >= num or (vc.base >> 16 & 0x7FFF) >= num)
        else:
            sizes = (16 * num, 6 + 2 * num, 6 + 8 * num)
            bad = num & (num - 1) or vc.desc & 15 or vc.avail & 1 or vc.used & 3
        if bad:
            raise OSError(errno.EINVAL, "bad ring size, alignment or base")
        if not all(in_region(mem.regions, a, n)
                   for a, n in zip((vc.desc, vc.avail, vc.used), sizes, strict=True)):
            raise OSError(errno.EFAULT, "ring outside guest memory")
        # A split ring's base is its 16-bit next avail index: the engine
        # would silently drop higher bits.
        expect(vc.packed or vc.base <= 0xFFFF,
               f"split queue {self.index} started with base {vc.base:#x} (> 16 bits)")
        self.running = True
        self.mem = mem
        self.base = vc.base

    def stop(self) -> int:
        self.running = False
        self.mem = None
        return self.base


class FakeBacking:
    """What the session reads of its target's config: the backing fd it
    locks while rings run and syncs when the last stops (one memfd for every
    input: an OFD lock of its own never conflicts), whether it is read-only,
    and the bound on that sync."""

    fd = -1

    def __init__(self) -> None:
        if FakeBacking.fd < 0:
            FakeBacking.fd = os.memfd_create("fuzz-backing", os.MFD_CLOEXEC)
        self.fd_buffered = FakeBacking.fd
        self.read_only = False
        self.drain_timeout_ms = 1000
        self.rbd = None  # a file backing, not an RBD image
        self.null_io = False  # ... nor the null one


class FakeTarget:
    def __init__(self) -> None:
        self.writethrough: bool | None = None
        self.config = FakeBacking()

    def set_writethrough(self, on: bool) -> None:
        expect(isinstance(on, bool), "set_writethrough wants a bool")
        self.writethrough = on


def new_fd() -> int:
    fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
    os.ftruncate(fd, MEMFD_SIZE)
    return fd


def open_fuzz_fds() -> list[int]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith(f"/memfd:{MEMFD_NAME}"):
                out.append(int(name))
        except OSError:
            pass  # the fd listdir itself used
    return out


def check_session(session: server.Session, queues: list[FakeQueue]) -> None:
    for i, (v, q) in enumerate(zip(session.vrings, queues, strict=True)):
        expect(v.started == q.running, f"queue {i}: session and engine disagree on running")
        if q.running:
            expect(q.mem is session.mem, f"queue {i} runs on a replaced memory table")


async def replay(opts: int, msgs: list[tuple[int, bytes, bytes]]) -> None:
    model = BlkDeviceModel(capacity=1 << 30, num_queues=NUM_QUEUES, read_only=bool(opts & 1))
    queues = [FakeQueue(i) for i in range(NUM_QUEUES)]
    CheckedGuestMemory.queues = queues
    target = FakeTarget()
    session = server.Session(model, queues, target)
    expect(target.writethrough is not None, "a new session sets the cache mode")
    try:
        for nfds, raw_hdr, payload in msgs:
            # What VhostUserServer._serve_conn does with one message.
            fds = [new_fd() for _ in range(nfds)]
            try:
                if len(raw_hdr) < p.HEADER.size:
                    return  # EOF inside the header
                hdr = p.parse_header(raw_hdr)
                if len(payload) < hdr.size:
                    return  # EOF inside the payload
                spec = p.check_message(hdr, payload, len(fds))
                result = await session.handlers[hdr.request](payload, fds)
            except ProtocolError:
                return  # the server drops the connection
            finally:
                for fd in fds:
                    os.close(fd)
            if spec.reply:
                expect(isinstance(result, bytes), f"{hdr.name} reply is {type(result)}")
                reply = p.pack_reply(hdr.request, result)
                expect(len(reply) == p.HEADER.size + len(result), "reply length")
                if hdr.request == p.Req.GET_CONFIG:
                    # the request's own header and size, or empty (refused)
                    expect(len(result) in (0, len(payload)), "GET_CONFIG reply size")
            else:
                expect(result in (None, True, False), f"{hdr.name} returned {result!r}")
                if hdr.need_reply and session.reply_ack:
                    p.pack_reply(hdr.request, p.pack_u64(1 if result is False else 0))
            check_session(session, queues)
    finally:
        await session.close()
        expect(not any(q.running for q in queues), "a queue still runs after close()")
        expect(session.mem is None, "guest memory mapped after close()")
        leaked = open_fuzz_fds()
        for fd in leaked:
            os.close(fd)
        expect(not leaked, f"{len(leaked)} frontend fd(s) left open after close()")


LOOP: asyncio.AbstractEventLoop | None = None


def one_input(data: bytes) -> None:
    global LOOP
    decoders(data)
    msgs = split_messages(data[1:])
    for nfds, raw_hdr, payload in msgs:
        decoders(payload)
        check(nfds, raw_hdr, payload)
    if LOOP is None:
        LOOP = asyncio.new_event_loop()
    LOOP.run_until_complete(replay(data[0] if data else 0, msgs))


def main() -> None:
    # Session logs every refusal; the fuzzer's own output is what matters.
    logging.disable(logging.CRITICAL)
    session.GuestMemory = CheckedGuestMemory
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
