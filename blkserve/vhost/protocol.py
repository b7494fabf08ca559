"""vhost-user wire format: constants, and pure decoders that validate every
field of a message before the device acts on it.

Everything here is a pure function of bytes and fd counts, so it is unit
tested without a socket. A message that fails validation raises
ProtocolError; the connection handler logs it and drops that connection.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<III")
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
# Nothing this backend accepts is larger than a 256-byte config write; refuse
# absurd sizes before reading them.
MAX_PAYLOAD = 4096
MAX_FDS = 8
# Regions a SET_MEM_TABLE may carry (VHOST_MEMORY_BASELINE_NREGIONS).
MAX_MEM_REGIONS = 8
# Memory slots offered with CONFIGURE_MEM_SLOTS (the engine's table size).
MAX_MEM_SLOTS = 32
MAX_QUEUE_SIZE = 32768
VRING_NOFD = 1 << 8
VRING_IDX_MASK = 0xFF


class Req(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class Feature(enum.IntEnum):
    """virtio and vhost-user feature bit numbers used here."""

    BLK_SIZE_MAX = 1
    BLK_SEG_MAX = 2
    BLK_RO = 5
    BLK_BLK_SIZE = 6
    BLK_FLUSH = 9
    BLK_TOPOLOGY = 10
    BLK_CONFIG_WCE = 11
    BLK_MQ = 12
    BLK_DISCARD = 13
    BLK_WRITE_ZEROES = 14
    LOG_ALL = 26  # VHOST_F_LOG_ALL: dirty logging for live migration
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    RING_PACKED = 34


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


def bits(*features: int) -> int:
    mask = 0
    for f in features:
        mask |= 1 << int(f)
    return mask


def names(mask: int, enum_cls: type[enum.IntEnum]) -> list[str]:
    """Decode a feature mask into names (unknown bits as 'bitN')."""
    out = []
    for bit in range(64):
        if mask & (1 << bit):
            try:
                out.append(enum_cls(bit).name)
            except ValueError:
                out.append(f"bit{bit}")
    return out


class ProtocolError(Exception):
    """A malformed or unexpected message: the connection must be dropped."""


@dataclass(frozen=True)
class Header:
    request: int
    flags: int
    size: int

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        try:
            return Req(self.request).name
        except ValueError:
            return f"request {self.request}"


def parse_header(data: bytes) -> Header:
    if len(data) != HEADER.size:
        raise ProtocolError(f"truncated header ({len(data)} bytes)")
    request, flags, size = HEADER.unpack(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise ProtocolError(f"unsupported protocol version {flags & FLAG_VERSION_MASK}")
    if flags & FLAG_REPLY:
        raise ProtocolError("frontend sent a message flagged as a reply")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {size} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return Header(request, flags, size)


BACKEND_CONFIG_CHANGE_MSG = 2  # backend -> frontend: re-read the config space


def pack_backend_request(request: int, payload: bytes = b"") -> bytes:
    """A message on the backend channel (SET_BACKEND_REQ_FD), no reply wanted."""
    return HEADER.pack(request, VERSION, len(payload)) + payload


def pack_reply(request: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload


def pack_u64(value: int) -> bytes:
    return struct.pack("<Q", value)


# ---- per-message expectations (validated before dispatch) ----

@dataclass(frozen=True)
class Spec:
    size: int | None  # exact payload size; None: checked by the decoder
    fds: int | str    # exact fd count, "vring" (0 or 1 by the NOFD bit), "regions"
    reply: bool = False


SPECS: dict[int, Spec] = {
    Req.GET_FEATURES: Spec(0, 0, reply=True),
    Req.SET_FEATURES: Spec(8, 0),
    Req.SET_OWNER: Spec(0, 0),
    Req.RESET_OWNER: Spec(0, 0),
    Req.RESET_DEVICE: Spec(0, 0),
    Req.GET_INFLIGHT_FD: Spec(None, 0, reply=True),
    Req.SET_INFLIGHT_FD: Spec(None, 1),
    Req.SET_MEM_TABLE: Spec(None, "regions"),
    Req.SET_VRING_NUM: Spec(8, 0),
    Req.SET_VRING_ADDR: Spec(40, 0),
    Req.SET_VRING_BASE: Spec(8, 0),
    Req.GET_VRING_BASE: Spec(8, 0, reply=True),
    Req.SET_VRING_KICK: Spec(8, "vring"),
    Req.SET_VRING_CALL: Spec(8, "vring"),
    Req.SET_VRING_ERR: Spec(8, "vring"),
    Req.GET_PROTOCOL_FEATURES: Spec(0, 0, reply=True),
    Req.SET_PROTOCOL_FEATURES: Spec(8, 0),
    Req.GET_QUEUE_NUM: Spec(0, 0, reply=True),
    Req.SET_VRING_ENABLE: Spec(8, 0),
    Req.GET_CONFIG: Spec(None, 0, reply=True),
    Req.SET_CONFIG: Spec(None, 0),
    Req.SET_BACKEND_REQ_FD: Spec(0, 1),
    Req.SET_LOG_BASE: Spec(16, 1, reply=True),
    # no payload in QEMU's and libvhost-user's use; a u64 in older texts
    Req.SET_LOG_FD: Spec(None, 1),
    Req.GET_MAX_MEM_SLOTS: Spec(0, 0, reply=True),
    Req.ADD_MEM_REG: Spec(40, 1),
    # QEMU sends REM_MEM_REG without an fd; the spec's text has one: take either.
    Req.REM_MEM_REG: Spec(40, "0or1"),
}


def check_message(hdr: Header, payload: bytes, nfds: int) -> Spec:
    """Validate size and fd count of a message against its spec."""
    spec = SPECS.get(hdr.request)
    if spec is None:
        raise ProtocolError(f"unsupported message {hdr.name}")
    if len(payload) != hdr.size:
        raise ProtocolError(f"{hdr.name}: payload truncated")
    if spec.size is not None and hdr.size != spec.size:
        raise ProtocolError(f"{hdr.name}: payload is {hdr.size} bytes, expected {spec.size}")
    if spec.fds == "vring":
        want = 0 if decode_u64(payload) & VRING_NOFD else 1
    elif spec.fds == "regions":
        want = decode_mem_table_count(payload)
    elif spec.fds == "0or1":
        want = min(nfds, 1)
    else:
        want = int(spec.fds)
    if nfds != want:
        raise ProtocolError(f"{hdr.name}: {nfds} file descriptor(s) attached, expected {want}")
    return spec


# ---- payload decoders ----

INFLIGHT = struct.Struct("<QQHH")  # mmap_size, mmap_offset, num_queues, queue_size


def decode_inflight(payload: bytes) -> tuple[int, int, int, int]:
    """GET/SET_INFLIGHT_FD: 20 bytes of fields; QEMU sends 24 (tail padding)."""
    if len(payload) not in (20, 24):
        raise ProtocolError(f"inflight payload is {len(payload)} bytes, expected 20 or 24")
    return INFLIGHT.unpack_from(payload)


def pack_inflight(mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int) -> bytes:
    return INFLIGHT.pack(mmap_size, mmap_offset, num_queues, queue_size) + bytes(4)

LOG_PAGE = 4096  # one bit of the dirty log per guest page of this size
VRING_F_LOG = 1  # SET_VRING_ADDR flags: log used-ring writes at log_guest_addr


def decode_log(payload: bytes) -> tuple[int, int]:
    """SET_LOG_BASE: (mmap_size, mmap_offset) of the log in its fd."""
    size, offset = struct.unpack("<QQ", payload)
    if size == 0 or size > 1 << 40:
        raise ProtocolError(f"dirty log of {size} bytes: out of range")
    if offset + size > 1 << 62:
        raise ProtocolError(f"dirty log at offset {offset:#x}: out of range")
    return size, offset


def log_bytes_for(end_gpa: int) -> int:
    """Bytes of dirty log that cover guest memory up to END_GPA."""
    pages = (end_gpa + LOG_PAGE - 1) // LOG_PAGE
    return (pages + 7) // 8


def decode_u64(payload: bytes) -> int:
    if len(payload) != 8:
        raise ProtocolError(f"expected a 64-bit payload, got {len(payload)} bytes")
    return struct.unpack("<Q", payload)[0]


def decode_vring_state(payload: bytes) -> tuple[int, int]:
    if len(payload) != 8:
        raise ProtocolError("vring state payload must be 8 bytes")
    index, num = struct.unpack("<II", payload)
    return index, num


def decode_vring_fd(payload: bytes) -> tuple[int, bool]:
    """(queue index, has_fd) of SET_VRING_KICK/CALL/ERR."""
    value = decode_u64(payload)
    if value & ~(VRING_IDX_MASK | VRING_NOFD):
        raise ProtocolError(f"reserved bits set in vring fd payload {value:#x}")
    return value & VRING_IDX_MASK, not value & VRING_NOFD


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


VRING_ADDR = struct.Struct("<IIQQQQ")


def decode_vring_addr(payload: bytes) -> VringAddr:
    if len(payload) != VRING_ADDR.size:
        raise ProtocolError("vring address payload must be 40 bytes")
    return VringAddr(*VRING_ADDR.unpack(payload))


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    uva: int
    mmap_offset: int


MEM_REGION = struct.Struct("<QQQQ")


def decode_mem_table_count(payload: bytes) -> int:
    if len(payload) < 8:
        raise ProtocolError("memory table payload shorter than its header")
    (n,) = struct.unpack_from("<I", payload)
    if n == 0 or n > MAX_MEM_REGIONS:
        raise ProtocolError(f"memory table with {n} regions (1..{MAX_MEM_REGIONS} allowed)")
    return n


def decode_mem_table(payload: bytes) -> list[MemRegion]:
    n = decode_mem_table_count(payload)
    # The frontend always sends the full fixed-size array; accept exactly
    # either that or just the regions in use.
    if len(payload) not in (8 + MEM_REGION.size * n, 8 + MEM_REGION.size * MAX_MEM_REGIONS):
        raise ProtocolError(f"memory table payload of {len(payload)} bytes for {n} regions")
    regions = []
    for i in range(n):
        r = MemRegion(*MEM_REGION.unpack_from(payload, 8 + MEM_REGION.size * i))
        if r.size == 0 or r.gpa + r.size > 2**64 or r.uva + r.size > 2**64:
            raise ProtocolError(f"memory region {i} has an invalid range")
        regions.append(r)
    ordered = sorted(regions, key=lambda r: r.gpa)
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.gpa + a.size > b.gpa:
            raise ProtocolError("memory regions overlap")
    return regions


def decode_single_region(payload: bytes) -> MemRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""
    if len(payload) != 8 + MEM_REGION.size:
        raise ProtocolError(f"single memory region payload of {len(payload)} bytes")
    r = MemRegion(*MEM_REGION.unpack_from(payload, 8))
    if r.size == 0 or r.gpa + r.size > 2**64 or r.uva + r.size > 2**64:
        raise ProtocolError("memory region has an invalid range")
    return r


CONFIG_HDR = struct.Struct("<III")


def decode_config(payload: bytes) -> tuple[int, int, int, bytes]:
    """(offset, size, flags, data) of GET_CONFIG / SET_CONFIG."""
    if len(payload) < CONFIG_HDR.size:
        raise ProtocolError("config payload shorter than its header")
    offset, size, flags = CONFIG_HDR.unpack_from(payload)
    data = payload[CONFIG_HDR.size:]
    if len(data) != size:
        raise ProtocolError(f"config payload carries {len(data)} bytes, header says {size}")
    return offset, size, flags, data
