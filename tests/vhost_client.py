"""A pure-Python vhost-user *frontend* (the driver side) for testing
vhost-user-blk backends.

Stdlib only.  Three layers:

* :class:`VhostUserClient` -- the control-plane socket: message framing,
  SCM_RIGHTS fd passing, typed helpers for every request, REPLY_ACK handling,
  and ``send_raw`` for deliberately malformed messages.
* :class:`GuestMemory` / :class:`GuestMemoryMap` / :class:`Virtqueue` -- fake
  guest RAM (memfd + mmap, bump allocator) and split virtqueues living in it.
  Vring addresses given to the backend are fake "userspace addresses"
  (``UVA_BASE + gpa`` by default); descriptors carry guest-physical addresses.
* :class:`BlkDevice` -- a vhost-user-blk device driven the way QEMU 7.2's
  vhost-user-blk-pci drives it, with block-level helpers (read/write/flush/
  get_id/discard/write_zeroes), batch submission and raw request crafting.

Ring memory ordering: the test process runs on x86 (TSO), and every ring
update is a separate memcpy into the shared mapping done in program order
(descriptors, then avail ring entry, then avail idx), which is sufficient.
"""

from __future__ import annotations

import array
import collections
import mmap
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

# ---------------------------------------------------------------------------
# vhost-user message types (frontend -> backend)
# ---------------------------------------------------------------------------
NONE = 0
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
SET_SLAVE_REQ_FD = SET_BACKEND_REQ_FD
IOTLB_MSG = 22
SET_VRING_ENDIAN = 23
GET_CONFIG = 24
SET_CONFIG = 25
CREATE_CRYPTO_SESSION = 26
CLOSE_CRYPTO_SESSION = 27
POSTCOPY_ADVISE = 28
POSTCOPY_LISTEN = 29
POSTCOPY_END = 30
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
GPU_SET_SOCKET = 33
RESET_DEVICE = 34
VRING_KICK = 35
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38
SET_STATUS = 39
GET_STATUS = 40

REQUEST_NAMES = {
    v: k
    for k, v in dict(globals()).items()
    if isinstance(v, int) and k.isupper() and k not in ("NONE", "SET_SLAVE_REQ_FD")
}
REQUEST_NAMES[NONE] = "NONE"

# Requests the backend always answers with a reply message (REPLY_ACK's
# need_reply flag is ignored for these: the reply itself is the ack).
REPLY_REQUESTS = frozenset(
    {
        GET_FEATURES,
        GET_PROTOCOL_FEATURES,
        GET_VRING_BASE,
        GET_QUEUE_NUM,
        GET_CONFIG,
        GET_INFLIGHT_FD,
        GET_MAX_MEM_SLOTS,
        GET_STATUS,
        CREATE_CRYPTO_SESSION,
        POSTCOPY_ADVISE,
        POSTCOPY_END,
    }
)

# Header flags
HDR = struct.Struct("<III")
HDR_SIZE = HDR.size  # 12
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_FDS = 8  # fds per message (VHOST_MEMORY_BASELINE_NREGIONS)
VRING_IDX_MASK = 0xFF
VRING_NOFD = 1 << 8
VRING_F_LOG = 0  # bit in SET_VRING_ADDR flags
MAX_PAYLOAD = 1 << 20  # sanity bound on replies we accept

# ---------------------------------------------------------------------------
# virtio feature bits (bit numbers; use bit() to get masks)
# ---------------------------------------------------------------------------
F_NOTIFY_ON_EMPTY = 24
F_LOG_ALL = 26  # VHOST_F_LOG_ALL
F_ANY_LAYOUT = 27
F_INDIRECT_DESC = 28
F_RING_EVENT_IDX = 29
F_PROTOCOL_FEATURES = 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34
F_IN_ORDER = 35
F_ORDER_PLATFORM = 36
F_SR_IOV = 37
F_NOTIFICATION_DATA = 38
F_RING_RESET = 40

# virtio-blk feature bits
BLK_F_BARRIER = 0
BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_GEOMETRY = 4
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_SCSI = 7
BLK_F_FLUSH = 9
BLK_F_TOPOLOGY = 10
BLK_F_CONFIG_WCE = 11
BLK_F_MQ = 12
BLK_F_DISCARD = 13
BLK_F_WRITE_ZEROES = 14
BLK_F_LIFETIME = 15
BLK_F_SECURE_ERASE = 16

# Short aliases matching the virtio spec names.
VERSION_1 = F_VERSION_1
RING_EVENT_IDX = F_RING_EVENT_IDX
INDIRECT_DESC = F_INDIRECT_DESC
PROTOCOL_FEATURES = F_PROTOCOL_FEATURES
RING_PACKED = F_RING_PACKED

FEATURE_NAMES = {
    F_NOTIFY_ON_EMPTY: "NOTIFY_ON_EMPTY",
    F_LOG_ALL: "LOG_ALL",
    F_ANY_LAYOUT: "ANY_LAYOUT",
    F_INDIRECT_DESC: "INDIRECT_DESC",
    F_RING_EVENT_IDX: "RING_EVENT_IDX",
    F_PROTOCOL_FEATURES: "PROTOCOL_FEATURES",
    F_VERSION_1: "VERSION_1",
    F_ACCESS_PLATFORM: "ACCESS_PLATFORM",
    F_RING_PACKED: "RING_PACKED",
    F_IN_ORDER: "IN_ORDER",
    F_ORDER_PLATFORM: "ORDER_PLATFORM",
    F_SR_IOV: "SR_IOV",
    F_NOTIFICATION_DATA: "NOTIFICATION_DATA",
    F_RING_RESET: "RING_RESET",
}
BLK_FEATURE_NAMES = {
    BLK_F_BARRIER: "BLK_F_BARRIER",
    BLK_F_SIZE_MAX: "BLK_F_SIZE_MAX",
    BLK_F_SEG_MAX: "BLK_F_SEG_MAX",
    BLK_F_GEOMETRY: "BLK_F_GEOMETRY",
    BLK_F_RO: "BLK_F_RO",
    BLK_F_BLK_SIZE: "BLK_F_BLK_SIZE",
    BLK_F_SCSI: "BLK_F_SCSI",
    BLK_F_FLUSH: "BLK_F_FLUSH",
    BLK_F_TOPOLOGY: "BLK_F_TOPOLOGY",
    BLK_F_CONFIG_WCE: "BLK_F_CONFIG_WCE",
    BLK_F_MQ: "BLK_F_MQ",
    BLK_F_DISCARD: "BLK_F_DISCARD",
    BLK_F_WRITE_ZEROES: "BLK_F_WRITE_ZEROES",
    BLK_F_LIFETIME: "BLK_F_LIFETIME",
    BLK_F_SECURE_ERASE: "BLK_F_SECURE_ERASE",
}

# vhost-user protocol feature bits
PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_RARP = 2
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_NET_MTU = 4
PROTOCOL_F_BACKEND_REQ = 5
PROTOCOL_F_CROSS_ENDIAN = 6
PROTOCOL_F_CRYPTO_SESSION = 7
PROTOCOL_F_PAGEFAULT = 8
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_BACKEND_SEND_FD = 10
PROTOCOL_F_HOST_NOTIFIER = 11
PROTOCOL_F_INFLIGHT_SHMFD = 12
PROTOCOL_F_RESET_DEVICE = 13
PROTOCOL_F_INBAND_NOTIFICATIONS = 14
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15
PROTOCOL_F_STATUS = 16

PROTOCOL_FEATURE_NAMES = {
    v: k[len("PROTOCOL_F_") :]
    for k, v in dict(globals()).items()
    if k.startswith("PROTOCOL_F_") and isinstance(v, int)
}

# ---------------------------------------------------------------------------
# split virtqueue layout
# ---------------------------------------------------------------------------
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_SIZE = DESC.size  # 16
USED_ELEM = struct.Struct("<II")  # id, len

# ---------------------------------------------------------------------------
# virtio-blk request layout
# ---------------------------------------------------------------------------
BLK_T_IN = 0
BLK_T_OUT = 1
BLK_T_FLUSH = 4
BLK_T_GET_ID = 8
BLK_T_GET_LIFETIME = 10
BLK_T_DISCARD = 11
BLK_T_WRITE_ZEROES = 13
BLK_T_SECURE_ERASE = 14

BLK_S_OK = 0
BLK_S_IOERR = 1
BLK_S_UNSUPP = 2
STATUS_UNSET = 0xFF  # sentinel pre-filled in status bytes

BLK_ID_BYTES = 20
SECTOR_SIZE = 512
BLK_REQ_HDR = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
BLK_DISCARD_SEG = struct.Struct("<QII")  # sector, num_sectors, flags
BLK_WRITE_ZEROES_F_UNMAP = 1
BLK_CONFIG_SIZE = 60

UVA_BASE = 0x7F00_0000_0000


def bit(n: int) -> int:
    """Mask for feature bit number *n*."""
    return 1 << n


def bits(*ns: int) -> int:
    m = 0
    for n in ns:
        m |= 1 << n
    return m


def decode_bits(mask: int, names: dict[int, str]) -> list[str]:
    """Names for the bits set in *mask* (unknown bits as ``bit<N>``)."""
    out = []
    n = 0
    while mask >> n:
        if mask >> n & 1:
            out.append(names.get(n, f"bit{n}"))
        n += 1
    return out


def decode_features(mask: int) -> list[str]:
    """Decode a virtio-blk device feature mask."""
    return decode_bits(mask, {**BLK_FEATURE_NAMES, **FEATURE_NAMES})


def decode_protocol_features(mask: int) -> list[str]:
    return decode_bits(mask, PROTOCOL_FEATURE_NAMES)


def request_name(req: int) -> str:
    return REQUEST_NAMES.get(req, f"REQ{req}")


# ---------------------------------------------------------------------------
# payload packing
# ---------------------------------------------------------------------------
def pack_u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def unpack_u64(b: bytes) -> int:
    if len(b) != 8:
        raise VhostProtocolError(f"expected u64 payload, got {len(b)} bytes")
    return struct.unpack("<Q", b)[0]


def pack_vring_state(index: int, num: int) -> bytes:
    return struct.pack("<II", index, num)


def pack_vring_addr(
    index: int, desc: int, used: int, avail: int, flags: int = 0, log: int = 0
) -> bytes:
    """struct vhost_vring_addr: u32 index, u32 flags, u64 desc, used, avail, log (uvas)."""
    return struct.pack("<IIQQQQ", index, flags, desc, used, avail, log)


def pack_mem_region(gpa: int, size: int, uva: int, mmap_offset: int = 0) -> bytes:
    return struct.pack("<QQQQ", gpa, size, uva, mmap_offset)


def pack_mem_table(regions) -> bytes:
    """SET_MEM_TABLE payload: u32 nregions, u32 padding, regions[]."""
    regions = list(regions)
    return struct.pack("<II", len(regions), 0) + b"".join(r.region_payload() for r in regions)


def pack_single_mem_region(region) -> bytes:
    """ADD_MEM_REG / REM_MEM_REG payload: u64 padding + one region."""
    return pack_u64(0) + region.region_payload()


def pack_vring_file(index: int, has_fd: bool = True) -> bytes:
    return pack_u64((index & VRING_IDX_MASK) | (0 if has_fd else VRING_NOFD))


def pack_config(offset: int, data: bytes, flags: int = 0, size: int | None = None) -> bytes:
    """GET/SET_CONFIG payload: u32 offset, u32 size, u32 flags, u8 payload[size]."""
    return struct.pack("<III", offset, len(data) if size is None else size, flags) + bytes(data)


def pack_inflight(
    mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int, padded: bool = True
) -> bytes:
    """GET/SET_INFLIGHT_FD payload.  The spec lists 20 bytes of fields, but
    QEMU sends sizeof(VhostUserInflight) == 24 (tail padding) and
    libvhost-user rejects anything else, so pad by default."""
    b = struct.pack("<QQHH", mmap_size, mmap_offset, num_queues, queue_size)
    return b + bytes(4) if padded else b


def unpack_inflight(b: bytes) -> tuple[int, int, int, int]:
    if len(b) < 20:
        raise VhostProtocolError(f"inflight payload too short ({len(b)})")
    return struct.unpack_from("<QQHH", b)


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
class VhostError(Exception):
    pass


class VhostProtocolError(VhostError):
    """The backend sent something that violates the protocol."""


class VhostDisconnected(VhostError, ConnectionError):
    """The backend closed the connection."""


class VhostAckError(VhostError):
    """REPLY_ACK returned a non-zero status."""

    def __init__(self, request: int, code: int):
        super().__init__(f"{request_name(request)} nacked with {code:#x}")
        self.request = request
        self.code = code


class RingFull(VhostError):
    pass


class BlkStatusError(VhostError):
    def __init__(self, status):
        super().__init__(f"virtio-blk request failed with status {status}")
        self.status = status


# ---------------------------------------------------------------------------
# control socket
# ---------------------------------------------------------------------------
@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)


class VhostUserClient:
    """Frontend end of a vhost-user unix socket.

    ``default_ack`` -- when True, helpers that do not have a reply set
    NEED_REPLY and check the u64 ack (set it only once REPLY_ACK is negotiated;
    :class:`BlkDevice` does that).  ``connect_retry`` -- seconds to keep
    retrying connect() on ENOENT/ECONNREFUSED.
    """

    def __init__(self, path: str, timeout: float = 5.0, connect_retry: float = 0.0):
        self.path = str(path)
        self.timeout = timeout
        self.default_ack = False
        self.protocol_features = 0  # as last sent with SET_PROTOCOL_FEATURES
        self.last_fds: list[int] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + connect_retry
        while True:
            try:
                self.sock.connect(self.path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= deadline:
                    self.sock.close()
                    raise
                time.sleep(0.02)

    # -- framing ----------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def send_raw(self, data: bytes, fds=()) -> None:
        """Send bytes verbatim (any framing), with *fds* attached to the first chunk."""
        fds = list(fds)
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        view = memoryview(bytes(data))
        sent = self.sock.sendmsg([view], anc)
        while sent < len(view):
            sent += self.sock.send(view[sent:])

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds=(),
        flags: int | None = None,
        need_reply: bool = False,
        size: int | None = None,
    ) -> None:
        """Send one message.  *flags* overrides the header flags entirely
        (default: version 1, plus NEED_REPLY if *need_reply*); *size*
        overrides the header size field (to lie about the payload length)."""
        if flags is None:
            flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
        elif need_reply:
            flags |= FLAG_NEED_REPLY
        payload = bytes(payload)
        hdr = HDR.pack(request, flags, len(payload) if size is None else size)
        self.send_raw(hdr + payload, fds)

    def _recv_exact(self, n: int, deadline: float, fds_out: list[int] | None) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out waiting for {n - len(buf)} more bytes from backend")
            self.sock.settimeout(remaining)
            try:
                if fds_out is not None:
                    data, anc, msg_flags, _ = self.sock.recvmsg(
                        n - len(buf), socket.CMSG_SPACE(MAX_FDS * 4)
                    )
                    for level, typ, cdata in anc:
                        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                            a = array.array("i")
                            a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                            fds_out.extend(a)
                    if msg_flags & socket.MSG_CTRUNC:
                        raise VhostProtocolError("ancillary data truncated (too many fds)")
                else:
                    data = self.sock.recv(n - len(buf))
            except TimeoutError:
                raise TimeoutError(
                    f"timed out waiting for {n - len(buf)} more bytes from backend"
                ) from None
            except ConnectionResetError as e:
                raise VhostDisconnected("backend reset the connection") from e
            if not data:
                raise VhostDisconnected("backend closed the connection")
            buf += data
        return bytes(buf)

    def recv_msg(self, timeout: float | None = None) -> Message:
        """Receive one message including any fds passed with it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        fds: list[int] = []
        hdr = self._recv_exact(HDR_SIZE, deadline, fds)
        request, flags, size = HDR.unpack(hdr)
        if size > MAX_PAYLOAD:
            raise VhostProtocolError(f"reply payload size {size} too large")
        payload = self._recv_exact(size, deadline, fds) if size else b""
        self.last_fds = fds
        return Message(request, flags, payload, fds)

    def recv(self, timeout: float | None = None) -> tuple[int, int, bytes]:
        """Receive one message -> (request, flags, payload); fds in ``last_fds``."""
        m = self.recv_msg(timeout)
        return m.request, m.flags, m.payload

    def expect_no_message(self, timeout: float = 0.2) -> None:
        """Assert the backend sends nothing (and does not hang up) for *timeout* s."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if r:
            data = self.sock.recv(4096, socket.MSG_PEEK)
            if not data:
                raise VhostDisconnected("backend closed the connection")
            raise VhostProtocolError(f"unexpected data from backend: {data[:32].hex()}")

    def is_connected(self, timeout: float = 0.0) -> bool:
        """False if the backend has closed the socket (pending data is not consumed)."""
        r, _, _ = select.select([self.sock], [], [], timeout)
        if not r:
            return True
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False

    def wait_disconnect(self, timeout: float = 1.0) -> bool:
        """Wait until the backend closes the socket (discarding anything it
        sends meanwhile); False if still connected after *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            r, _, _ = select.select([self.sock], [], [], remaining)
            if not r:
                return False
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(MAX_FDS * 4))
            except (ConnectionResetError, BrokenPipeError):
                return True
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                    for fd in a:
                        os.close(fd)
            if not data:
                return True

    def call(
        self,
        request: int,
        payload: bytes = b"",
        fds=(),
        ack: bool | None = None,
        timeout: float | None = None,
    ):
        """Send a request and read its reply.

        For requests in REPLY_REQUESTS returns the reply payload.  For others,
        if *ack* (default: ``self.default_ack``) sets NEED_REPLY, waits for
        the u64 ack, raises VhostAckError if non-zero and returns 0; without
        ack returns None immediately.
        """
        has_reply = request in REPLY_REQUESTS
        if ack is None:
            ack = self.default_ack and not has_reply
        self.send(request, payload, fds, need_reply=ack)
        if not has_reply and not ack:
            return None
        m = self.recv_msg(timeout)
        if m.request != request:
            raise VhostProtocolError(
                f"reply to {request_name(request)} has request {request_name(m.request)}"
            )
        if not m.flags & FLAG_REPLY:
            raise VhostProtocolError(
                f"reply to {request_name(request)} lacks the reply flag ({m.flags:#x})"
            )
        if m.flags & FLAG_VERSION_MASK != VERSION:
            raise VhostProtocolError(f"reply to {request_name(request)} has version {m.flags & 3}")
        if has_reply:
            return m.payload
        code = unpack_u64(m.payload)
        if code:
            raise VhostAckError(request, code)
        return 0

    # -- typed helpers ------------------------------------------------------
    def get_features(self) -> int:
        return unpack_u64(self.call(GET_FEATURES))

    def set_features(self, features: int, ack: bool | None = None):
        return self.call(SET_FEATURES, pack_u64(features), ack=ack)

    def get_protocol_features(self) -> int:
        return unpack_u64(self.call(GET_PROTOCOL_FEATURES))

    def set_protocol_features(self, features: int, ack: bool | None = None):
        r = self.call(SET_PROTOCOL_FEATURES, pack_u64(features), ack=ack)
        self.protocol_features = features
        return r

    def get_queue_num(self) -> int:
        return unpack_u64(self.call(GET_QUEUE_NUM))

    def set_owner(self, ack: bool | None = None):
        return self.call(SET_OWNER, ack=ack)

    def reset_owner(self, ack: bool | None = None):
        return self.call(RESET_OWNER, ack=ack)

    def reset_device(self, ack: bool | None = None):
        return self.call(RESET_DEVICE, ack=ack)

    def get_config(self, offset: int = 0, size: int = BLK_CONFIG_SIZE, flags: int = 0) -> bytes:
        """Returns the config bytes of the reply (after its 12-byte header)."""
        r = self.call(GET_CONFIG, pack_config(offset, bytes(size), flags))
        if len(r) < 12:
            raise VhostProtocolError(f"GET_CONFIG reply too short ({len(r)})")
        return r[12:]

    def set_config(self, offset: int, data: bytes, flags: int = 0, ack: bool | None = None):
        return self.call(SET_CONFIG, pack_config(offset, data, flags), ack=ack)

    def set_mem_table(self, regions, ack: bool | None = None):
        regions = list(regions)
        return self.call(
            SET_MEM_TABLE, pack_mem_table(regions), fds=[r.fd for r in regions], ack=ack
        )

    def get_max_mem_slots(self) -> int:
        return unpack_u64(self.call(GET_MAX_MEM_SLOTS))

    def add_mem_reg(self, region, ack: bool | None = None):
        return self.call(ADD_MEM_REG, pack_single_mem_region(region), fds=[region.fd], ack=ack)

    def rem_mem_reg(self, region, fds=(), ack: bool | None = None):
        return self.call(REM_MEM_REG, pack_single_mem_region(region), fds=fds, ack=ack)

    def set_vring_num(self, index: int, num: int, ack: bool | None = None):
        return self.call(SET_VRING_NUM, pack_vring_state(index, num), ack=ack)

    def set_vring_base(self, index: int, base: int, ack: bool | None = None):
        return self.call(SET_VRING_BASE, pack_vring_state(index, base), ack=ack)

    def get_vring_base(self, index: int) -> int:
        r = self.call(GET_VRING_BASE, pack_vring_state(index, 0))
        if len(r) != 8:
            raise VhostProtocolError(f"GET_VRING_BASE reply has {len(r)} bytes")
        ridx, num = struct.unpack("<II", r)
        if ridx != index:
            raise VhostProtocolError(f"GET_VRING_BASE reply for ring {ridx}, asked {index}")
        return num

    def set_vring_addr(
        self,
        index: int,
        desc_uva: int,
        used_uva: int,
        avail_uva: int,
        flags: int = 0,
        log: int = 0,
        ack: bool | None = None,
    ):
        return self.call(
            SET_VRING_ADDR,
            pack_vring_addr(index, desc_uva, used_uva, avail_uva, flags, log),
            ack=ack,
        )

    def _vring_file(self, request: int, index: int, fd: int | None, ack):
        fds = () if fd is None else (fd,)
        return self.call(request, pack_vring_file(index, fd is not None), fds=fds, ack=ack)

    def set_vring_kick(self, index: int, fd: int | None, ack: bool | None = None):
        return self._vring_file(SET_VRING_KICK, index, fd, ack)

    def set_vring_call(self, index: int, fd: int | None, ack: bool | None = None):
        return self._vring_file(SET_VRING_CALL, index, fd, ack)

    def set_vring_err(self, index: int, fd: int | None, ack: bool | None = None):
        return self._vring_file(SET_VRING_ERR, index, fd, ack)

    def set_vring_enable(self, index: int, enable: bool = True, ack: bool | None = None):
        return self.call(SET_VRING_ENABLE, pack_vring_state(index, int(enable)), ack=ack)

    def set_backend_req_fd(self, fd: int, ack: bool | None = None):
        return self.call(SET_BACKEND_REQ_FD, fds=(fd,), ack=ack)

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, int, int | None]:
        """-> (mmap_size, mmap_offset, fd or None)."""
        r = self.call(GET_INFLIGHT_FD, pack_inflight(0, 0, num_queues, queue_size))
        size, off, _, _ = unpack_inflight(r)
        fds = self.last_fds
        return size, off, (fds[0] if fds else None)

    def set_inflight_fd(
        self,
        fd: int,
        mmap_size: int,
        mmap_offset: int,
        num_queues: int,
        queue_size: int,
        ack: bool | None = None,
    ):
        return self.call(
            SET_INFLIGHT_FD,
            pack_inflight(mmap_size, mmap_offset, num_queues, queue_size),
            fds=(fd,),
            ack=ack,
        )

    def close(self) -> None:
        if self.sock.fileno() != -1:
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# guest memory
# ---------------------------------------------------------------------------
class GuestMemory:
    """One guest RAM region: a memfd of *size* bytes at guest address *gpa*.

    The fake userspace address defaults to ``UVA_BASE + gpa``.
    """

    def __init__(
        self,
        size: int,
        gpa: int = 0,
        uva: int | None = None,
        mmap_offset: int = 0,
        name: str = "vhost-client-guest",
        memfd_flags: int = 0,
        path: str | os.PathLike | None = None,
    ):
        """*memfd_flags*: extra memfd_create flags, e.g. os.MFD_HUGETLB |
        os.MFD_HUGE_2MB for hugetlbfs-backed guest RAM; *path*: back the
        region with that file instead of a memfd."""
        self.size = size
        self.gpa = gpa
        self.uva = UVA_BASE + gpa if uva is None else uva
        self.mmap_offset = mmap_offset  # offset into the fd where the region starts
        if path is None:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC | memfd_flags)
        else:  # a plain file, like QEMU's memory-backend-file
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.ftruncate(self.fd, size + mmap_offset)
        self._map = mmap.mmap(
            self.fd, size + mmap_offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._next = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, n: int = 1) -> bool:
        return self.gpa <= gpa and gpa + n <= self.end

    def _off(self, gpa: int, n: int) -> int:
        if not self.contains(gpa, n):
            raise ValueError(
                f"gpa range {gpa:#x}+{n:#x} outside region {self.gpa:#x}+{self.size:#x}"
            )
        return gpa - self.gpa + self.mmap_offset

    def alloc(self, size: int, align: int = 16) -> int:
        """Bump-allocate *size* bytes; returns the gpa."""
        start = (self._next + align - 1) // align * align
        if start + size > self.size:
            raise MemoryError(f"guest region at {self.gpa:#x} exhausted ({size} bytes wanted)")
        self._next = start + size
        return self.gpa + start

    def mark(self) -> int:
        return self._next

    def release(self, mark: int) -> None:
        self._next = mark

    def read(self, gpa: int, n: int) -> bytes:
        off = self._off(gpa, n)
        return self._map[off : off + n]

    def write(self, gpa: int, data: bytes) -> None:
        off = self._off(gpa, len(data))
        self._map[off : off + len(data)] = bytes(data)

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * n)

    def store_u16(self, gpa: int, value: int) -> None:
        """One 16-bit store, for ring fields a backend thread reads while we
        write.  struct.pack_into zeroes its destination before packing, so a
        polling backend could see a transient 0 index through it."""
        off = self._off(gpa, 2)
        with memoryview(self._map) as mv, mv[off:off + 2] as b, b.cast("H") as h:
            h[0] = value & 0xFFFF

    def pack_into(self, fmt: struct.Struct, gpa: int, *values) -> None:
        fmt.pack_into(self._map, self._off(gpa, fmt.size), *values)

    def unpack_from(self, fmt: struct.Struct, gpa: int) -> tuple:
        return fmt.unpack_from(self._map, self._off(gpa, fmt.size))

    def gpa_to_uva(self, gpa: int) -> int:
        if not self.contains(gpa):
            raise ValueError(f"gpa {gpa:#x} outside region")
        return gpa - self.gpa + self.uva

    def region_payload(self) -> bytes:
        return pack_mem_region(self.gpa, self.size, self.uva, self.mmap_offset)

    @property
    def regions(self) -> list[GuestMemory]:
        return [self]

    def close(self) -> None:
        if self.fd >= 0:
            self._map.close()
            os.close(self.fd)
            self.fd = -1


class GuestMemoryMap:
    """Several :class:`GuestMemory` regions behind one gpa-addressed interface."""

    def __init__(self, regions):
        self.regions: list[GuestMemory] = list(regions)

    def region_for(self, gpa: int, n: int = 1) -> GuestMemory:
        for r in self.regions:
            if r.contains(gpa, n):
                return r
        raise ValueError(f"gpa range {gpa:#x}+{n:#x} is not inside a single region")

    def alloc(self, size: int, align: int = 16, region: int | None = None) -> int:
        if region is not None:
            return self.regions[region].alloc(size, align)
        for r in self.regions:
            try:
                return r.alloc(size, align)
            except MemoryError:
                continue
        raise MemoryError(f"guest memory exhausted ({size} bytes wanted)")

    def mark(self) -> tuple[int, ...]:
        return tuple(r.mark() for r in self.regions)

    def release(self, mark) -> None:
        for r, m in zip(self.regions, mark, strict=True):
            r.release(m)

    def read(self, gpa: int, n: int) -> bytes:
        return self.region_for(gpa, n).read(gpa, n) if n else b""

    def write(self, gpa: int, data: bytes) -> None:
        if data:
            self.region_for(gpa, len(data)).write(gpa, data)

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * n)

    def store_u16(self, gpa: int, value: int) -> None:
        self.region_for(gpa, 2).store_u16(gpa, value)

    def pack_into(self, fmt: struct.Struct, gpa: int, *values) -> None:
        self.region_for(gpa, fmt.size).pack_into(fmt, gpa, *values)

    def unpack_from(self, fmt: struct.Struct, gpa: int) -> tuple:
        return self.region_for(gpa, fmt.size).unpack_from(fmt, gpa)

    def gpa_to_uva(self, gpa: int) -> int:
        return self.region_for(gpa).gpa_to_uva(gpa)

    @property
    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    def close(self) -> None:
        for r in self.regions:
            r.close()


def as_memory_map(mem) -> GuestMemoryMap:
    return mem if isinstance(mem, GuestMemoryMap) else GuestMemoryMap(mem.regions)


# ---------------------------------------------------------------------------
# split virtqueue
# ---------------------------------------------------------------------------
_U16 = struct.Struct("<H")


class Virtqueue:
    """A split virtqueue in guest memory plus its kick/call eventfds.

    Layout: desc table (16*size, align 16), avail ring (6+2*size, align 2),
    used ring (6+8*size, align 4; *used_align* may raise that).
    """

    def __init__(
        self,
        mem,
        index: int = 0,
        size: int = 128,
        event_idx: bool = False,
        region: int | None = None,
        used_align: int = 4,
    ):
        self.mem = as_memory_map(mem)
        self.index = index
        self.size = size
        self.event_idx = event_idx
        kw = {} if region is None else {"region": region}
        self.desc_gpa = self.mem.alloc(DESC_SIZE * size, 16, **kw)
        self.avail_gpa = self.mem.alloc(6 + 2 * size, 2, **kw)
        self.used_gpa = self.mem.alloc(6 + USED_ELEM.size * size, used_align, **kw)
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.reset()

    def reset(self) -> None:
        """Zero the rings and forget all driver state (fds are kept)."""
        self.mem.fill(self.desc_gpa, DESC_SIZE * self.size)
        self.mem.fill(self.avail_gpa, 6 + 2 * self.size)
        self.mem.fill(self.used_gpa, 6 + USED_ELEM.size * self.size)
        self.free = collections.deque(range(self.size))
        self.chains: dict[int, list[int]] = {}
        self.avail_idx = 0  # free-running u16 shadow of avail->idx
        self.last_used_idx = 0
        self.notifications = 0  # call eventfd signals seen
        self.bad_used: list[tuple[int, int]] = []  # used elems with ids we never published

    # -- addresses ------------------------------------------------------------
    @property
    def desc_uva(self) -> int:
        return self.mem.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.mem.gpa_to_uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        return self.mem.gpa_to_uva(self.used_gpa)

    @property
    def used_event_gpa(self) -> int:
        return self.avail_gpa + 4 + 2 * self.size

    @property
    def avail_event_gpa(self) -> int:
        return self.used_gpa + 4 + USED_ELEM.size * self.size

    # -- descriptors ----------------------------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next_: int = 0) -> None:
        """Write descriptor *i* verbatim (no validation)."""
        self.mem.pack_into(DESC, self.desc_gpa + DESC_SIZE * i, addr, length, flags, next_)

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return self.mem.unpack_from(DESC, self.desc_gpa + DESC_SIZE * i)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def alloc_descs(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RingFull(f"need {n} descriptors, {len(self.free)} free")
        return [self.free.popleft() for _ in range(n)]

    @staticmethod
    def _chain_flags(bufs, i: int) -> int:
        flags = VRING_DESC_F_WRITE if bufs[i][2] else 0
        if i + 1 < len(bufs):
            flags |= VRING_DESC_F_NEXT
        return flags

    def add_chain(self, bufs, publish: bool = True) -> int:
        """Add a chain of (gpa, len, writable) buffers; returns the head id."""
        if not bufs:
            raise ValueError("empty chain")
        ids = self.alloc_descs(len(bufs))
        for i, (addr, length, _w) in enumerate(bufs):
            nxt = ids[i + 1] if i + 1 < len(bufs) else 0
            self.write_desc(ids[i], addr, length, self._chain_flags(bufs, i), nxt)
        self.chains[ids[0]] = ids
        if publish:
            self.publish(ids[0])
        return ids[0]

    def write_indirect_table(self, entries) -> tuple[int, int]:
        """Write raw (addr, len, flags, next) entries into a fresh table -> (gpa, nbytes)."""
        entries = list(entries)
        nbytes = DESC_SIZE * len(entries)
        gpa = self.mem.alloc(max(nbytes, 1), 16)
        for i, e in enumerate(entries):
            self.mem.pack_into(DESC, gpa + DESC_SIZE * i, *e)
        return gpa, nbytes

    def add_indirect(self, bufs, publish: bool = True, head_flags: int = 0) -> int:
        """Put (gpa, len, writable) buffers in an indirect table referenced by
        one ring descriptor; returns the head id."""
        bufs = list(bufs)
        entries = [
            (a, n, self._chain_flags(bufs, i), i + 1 if i + 1 < len(bufs) else 0)
            for i, (a, n, _w) in enumerate(bufs)
        ]
        gpa, nbytes = self.write_indirect_table(entries)
        (head,) = self.alloc_descs(1)
        self.write_desc(head, gpa, nbytes, VRING_DESC_F_INDIRECT | head_flags, 0)
        self.chains[head] = [head]
        if publish:
            self.publish(head)
        return head

    def add_raw_descriptors(self, descs, head: int | None = None, publish: bool = True) -> int:
        """Write raw (index, addr, len, flags, next) descriptors verbatim and
        (optionally) publish *head* (default: the first index) -- for loops,
        out-of-range next, bad addresses, etc.  Indices are taken out of the
        free list; when the backend returns *head* they are freed again."""
        descs = list(descs)
        ids = []
        for idx, addr, length, flags, nxt in descs:
            self.write_desc(idx, addr, length, flags, nxt)
            if idx in self.free:
                self.free.remove(idx)
            ids.append(idx)
        if head is None:
            head = descs[0][0]
        self.chains[head] = ids
        if publish:
            self.publish(head)
        return head

    # -- avail ring -----------------------------------------------------------
    def publish(self, *heads: int, idx_delta: int | None = None) -> None:
        """Place *heads* in the avail ring and then bump avail->idx once
        (by len(heads), or by *idx_delta* to lie about it)."""
        for j, h in enumerate(heads):
            slot = (self.avail_idx + j) % self.size
            self.mem.pack_into(_U16, self.avail_gpa + 4 + 2 * slot, h & 0xFFFF)
        if self.event_idx:
            self.set_used_event(self.last_used_idx)
        delta = len(heads) if idx_delta is None else idx_delta
        self.set_avail_idx((self.avail_idx + delta) & 0xFFFF)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.mem.store_u16(self.avail_gpa + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.mem.store_u16(self.avail_gpa, flags)

    def set_used_event(self, value: int) -> None:
        self.mem.store_u16(self.used_event_gpa, value)

    def kick(self) -> None:
        os.eventfd_write(self.kick_fd, 1)

    # -- used ring ------------------------------------------------------------
    @property
    def used_idx(self) -> int:
        return self.mem.unpack_from(_U16, self.used_gpa + 2)[0]

    @property
    def used_flags(self) -> int:
        return self.mem.unpack_from(_U16, self.used_gpa)[0]

    @property
    def avail_event(self) -> int:
        return self.mem.unpack_from(_U16, self.avail_event_gpa)[0]

    def need_kick(self, old_avail_idx: int) -> bool:
        """Whether the device asked to be kicked for avail entries old..avail_idx."""
        if self.event_idx:
            ev, new = self.avail_event, self.avail_idx
            return (new - ev - 1) & 0xFFFF < (new - old_avail_idx) & 0xFFFF
        return not self.used_flags & VRING_USED_F_NO_NOTIFY

    def poll_used(self) -> list[tuple[int, int]]:
        """Consume new used elements without waiting -> [(id, len), ...]."""
        out = []
        while True:
            used = self.used_idx
            if used == self.last_used_idx:
                break
            if (used - self.last_used_idx) & 0xFFFF > self.size:
                raise VhostProtocolError(
                    f"vq {self.index}: used idx jumped from {self.last_used_idx} to {used}"
                )
            while self.last_used_idx != used:
                slot = self.last_used_idx % self.size
                uid, ulen = self.mem.unpack_from(
                    USED_ELEM, self.used_gpa + 4 + USED_ELEM.size * slot
                )
                ids = self.chains.pop(uid, None)
                if ids is None:
                    self.bad_used.append((uid, ulen))
                else:
                    self.free.extend(ids)
                out.append((uid, ulen))
                self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
            if self.event_idx:
                # Ask to be notified when the next element is published, then
                # re-check to close the race with a concurrent publish.
                self.set_used_event(self.last_used_idx)
        return out

    def _drain_call(self) -> bool:
        try:
            os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return False
        self.notifications += 1
        return True

    def wait_used(
        self, n: int = 1, timeout: float = 5.0, poll_interval: float = 0.05
    ) -> list[tuple[int, int]]:
        """Wait until at least *n* used elements arrived -> list of (id, len).

        Waits on the call eventfd, and also polls the used ring every
        *poll_interval* (notifications may be suppressed or missing)."""
        deadline = time.monotonic() + timeout
        got = self.poll_used()
        while len(got) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"vq {self.index}: {len(got)}/{n} used elements after {timeout}s "
                    f"(avail_idx={self.avail_idx}, used_idx={self.used_idx})"
                )
            r, _, _ = select.select([self.call_fd], [], [], min(remaining, poll_interval))
            if r:
                self._drain_call()
            got += self.poll_used()
        return got

    def wait_notification(self, timeout: float = 1.0) -> bool:
        """Wait for a call eventfd signal (without touching the used ring)."""
        r, _, _ = select.select([self.call_fd], [], [], timeout)
        return bool(r) and self._drain_call()

    @property
    def in_flight(self) -> int:
        return len(self.chains)

    def close(self) -> None:
        for name in ("kick_fd", "call_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


# ---------------------------------------------------------------------------
# virtio-blk
# ---------------------------------------------------------------------------
_BLK_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")
assert _BLK_CONFIG.size == BLK_CONFIG_SIZE


@dataclass
class BlkConfig:
    capacity: int
    size_max: int
    seg_max: int
    cylinders: int
    heads: int
    sectors: int
    blk_size: int
    physical_block_exp: int
    alignment_offset: int
    min_io_size: int
    opt_io_size: int
    writeback: int
    unused0: int
    num_queues: int
    max_discard_sectors: int
    max_discard_seg: int
    discard_sector_alignment: int
    max_write_zeroes_sectors: int
    max_write_zeroes_seg: int
    write_zeroes_may_unmap: int
    raw: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> BlkConfig:
        padded = bytes(data[:BLK_CONFIG_SIZE]).ljust(BLK_CONFIG_SIZE, b"\0")
        return cls(*_BLK_CONFIG.unpack(padded), raw=bytes(data))

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("raw")
        d.pop("unused0")
        return d


def blk_header(type_: int, sector: int = 0, reserved: int = 0) -> bytes:
    return BLK_REQ_HDR.pack(type_, reserved, sector)


def blk_discard_segment(sector: int, num_sectors: int, flags: int = 0) -> bytes:
    return BLK_DISCARD_SEG.pack(sector, num_sectors, flags)


@dataclass
class Request:
    """One submitted virtio-blk (or raw) request."""

    queue: int
    head: int
    segments: list[tuple[int, int, bool]]  # (gpa, len, writable) as given to the ring
    type: int | None = None
    sector: int = 0
    status_gpa: int | None = None
    done: bool = False
    used_len: int | None = None
    status: int | None = None
    data: bytes = b""  # device-writable data segments (status excluded) at completion
    segment_data: list[bytes] = field(default_factory=list)  # every segment at completion


class BlkDevice:
    """vhost-user-blk device driven like QEMU 7.2 vhost-user-blk-pci."""

    WANTED_FEATURES = bits(
        F_VERSION_1,
        F_RING_EVENT_IDX,
        F_INDIRECT_DESC,
        BLK_F_SEG_MAX,
        BLK_F_BLK_SIZE,
        BLK_F_FLUSH,
        BLK_F_MQ,
        F_PROTOCOL_FEATURES,
    )
    WANTED_PROTOCOL_FEATURES = bits(PROTOCOL_F_MQ, PROTOCOL_F_REPLY_ACK, PROTOCOL_F_CONFIG)

    def __init__(
        self,
        path: str,
        queues: int = 1,
        queue_size: int = 128,
        mem_size: int = 64 << 20,
        features: int | None = None,
        protocol_features: int | None = None,
        regions=None,
        timeout: float = 5.0,
        use_ack: bool = True,
        setup: bool = True,
        connect_retry: float = 0.0,
    ):
        """*features* / *protocol_features*: exact masks to SET (default: the
        wanted set intersected with the offer).  *regions*: list of
        GuestMemory (default: one region of *mem_size* at gpa 0).
        setup=False only connects; call negotiate()/setup_memory()/
        setup_queue() (or setup()) yourself."""
        self.path = str(path)
        self.num_queues = queues
        self.queue_size = queue_size
        self.timeout = timeout
        self.use_ack = use_ack
        self.requested_features = features
        self.requested_protocol_features = protocol_features
        self.client = VhostUserClient(path, timeout=timeout, connect_retry=connect_retry)
        self.mem = GuestMemoryMap(regions if regions is not None else [GuestMemory(mem_size)])
        self.vqs: list[Virtqueue] = []
        self.offered_features = 0
        self.offered_protocol_features = 0
        self.features = 0
        self.protocol_features = 0
        self.max_queues = None
        self.config: BlkConfig | None = None
        self.inflight: dict[tuple[int, int], Request] = {}
        self.unexpected_used: list[tuple[int, int, int]] = []  # (queue, id, len)
        self._scratch_mark = None
        self.closed = False
        if setup:
            try:
                self.setup()
            except BaseException:
                self.close()
                raise

    # -- handshake ------------------------------------------------------------
    def setup(self) -> None:
        self.negotiate()
        self.setup_memory()
        for q in range(self.num_queues):
            self.setup_queue(q)
        self._scratch_mark = self.mem.mark()

    def negotiate(self) -> None:
        """GET_FEATURES .. SET_FEATURES, in QEMU's order."""
        c = self.client
        self.offered_features = c.get_features()
        if self.offered_features & bit(F_PROTOCOL_FEATURES):
            self.offered_protocol_features = c.get_protocol_features()
            want = self.requested_protocol_features
            if want is None:
                want = self.WANTED_PROTOCOL_FEATURES & self.offered_protocol_features
            c.set_protocol_features(want)
            self.protocol_features = want
            if self.use_ack and want & bit(PROTOCOL_F_REPLY_ACK):
                c.default_ack = True
            if want & bit(PROTOCOL_F_MQ):
                self.max_queues = c.get_queue_num()
                if self.num_queues > self.max_queues:
                    raise VhostError(
                        f"backend supports {self.max_queues} queues, {self.num_queues} wanted"
                    )
        c.set_owner()
        if self.protocol_features & bit(PROTOCOL_F_CONFIG):
            self.config = BlkConfig.parse(c.get_config(0, BLK_CONFIG_SIZE))
        feats = self.requested_features
        if feats is None:
            feats = self.WANTED_FEATURES & self.offered_features
        c.set_features(feats)
        self.features = feats

    def setup_memory(self) -> None:
        self.client.set_mem_table(self.mem.regions)

    def setup_queue(self, q: int, size: int | None = None, region: int | None = None) -> Virtqueue:
        size = self.queue_size if size is None else size
        vq = Virtqueue(
            self.mem, q, size, event_idx=bool(self.features & bit(F_RING_EVENT_IDX)), region=region
        )
        while len(self.vqs) <= q:
            self.vqs.append(None)
        self.vqs[q] = vq
        c = self.client
        c.set_vring_num(q, size)
        c.set_vring_base(q, 0)
        c.set_vring_addr(q, vq.desc_uva, vq.used_uva, vq.avail_uva)
        c.set_vring_kick(q, vq.kick_fd)
        c.set_vring_call(q, vq.call_fd)
        if self.features & bit(F_PROTOCOL_FEATURES):
            c.set_vring_enable(q, True)
        return vq

    # -- inflight region and reconnection (QEMU's vhost-user-blk) -------------
    inflight_region: tuple[int, int, int] | None = None  # (fd, mmap_size, mmap_offset)

    def setup_inflight(self, fd: int | None = None, mmap_size: int = 0,
                       mmap_offset: int = 0) -> tuple[int, int, int]:
        """Hand the backend an inflight region before the rings start, as
        QEMU does (needs PROTOCOL_F_INFLIGHT_SHMFD): the region given, else
        the one this device already has, else a new one from
        GET_INFLIGHT_FD.  -> (fd, mmap_size, mmap_offset)."""
        if fd is None and self.inflight_region is not None:
            fd, mmap_size, mmap_offset = self.inflight_region
        if fd is None:
            mmap_size, mmap_offset, fd = self.client.get_inflight_fd(self.num_queues,
                                                                     self.queue_size)
            if fd is None:
                raise VhostProtocolError("GET_INFLIGHT_FD reply carried no fd")
        self.client.set_inflight_fd(fd, mmap_size, mmap_offset, self.num_queues,
                                    self.queue_size)
        self.inflight_region = (fd, mmap_size, mmap_offset)
        return self.inflight_region

    def reconnect(self, path: str | None = None, connect_retry: float = 5.0,
                  inflight: bool = True) -> None:
        """Connect to a new backend (the old one died or was stopped) and go
        on with the same guest memory, rings and submitted requests, the way
        QEMU's vhost-user-blk does after a reconnect: negotiate again, hand
        back the inflight region (unless *inflight* is False), and restart
        every ring at its used index (QEMU's last_avail_idx after a backend
        it could not stop cleanly).  Requests the region marks are the new
        backend's to redo; their completions land on the old Request objects."""
        self.client.close()
        self.client = VhostUserClient(path or self.path, timeout=self.timeout,
                                      connect_retry=connect_retry)
        self.negotiate()
        if inflight and self.inflight_region is not None:
            self.setup_inflight()
        self.setup_memory()
        c = self.client
        for vq in self.vqs:
            if vq is None:
                continue
            q = vq.index
            c.set_vring_num(q, vq.size)
            c.set_vring_base(q, vq.used_idx)
            c.set_vring_addr(q, vq.desc_uva, vq.used_uva, vq.avail_uva)
            c.set_vring_kick(q, vq.kick_fd)
            c.set_vring_call(q, vq.call_fd)
            if self.features & bit(F_PROTOCOL_FEATURES):
                c.set_vring_enable(q, True)
            vq.kick()

    @property
    def capacity(self) -> int | None:
        return None if self.config is None else self.config.capacity

    def has_feature(self, b: int) -> bool:
        return bool(self.features >> b & 1)

    # -- request plumbing -----------------------------------------------------
    def _recycle_scratch(self) -> None:
        """Reuse request buffer memory once nothing is in flight."""
        if not self.inflight and self._scratch_mark is not None:
            self.mem.release(self._scratch_mark)

    data_align = 16  # alignment of device-readable data buffers after the header

    def _alloc(self, size: int, align: int = 16) -> int:
        return self.mem.alloc(max(size, 1), align)

    def _publish(self, reqs: list[Request], kick: bool) -> None:
        by_q: dict[int, list[int]] = {}
        for r in reqs:
            by_q.setdefault(r.queue, []).append(r.head)
        for q, heads in by_q.items():
            self.vqs[q].publish(*heads)
            if kick:
                self.vqs[q].kick()

    def prepare_raw(self, segments, queue: int = 0, indirect: bool = False) -> Request:
        """Build (but do not publish) a request from *segments*:
        ``(bytes, writable)`` -> a new buffer holding those bytes;
        ``(int, writable)`` -> a new zero-filled buffer of that length
        (if it is the last writable one, pre-filled with STATUS_UNSET);
        ``(gpa, len, writable)`` -> used verbatim (no allocation).
        The status is read from the last byte of the last segment if that
        segment is writable (``Request.data`` then excludes that segment)."""
        self._recycle_scratch()
        bufs = []
        segs = list(segments)
        for i, s in enumerate(segs):
            if len(s) == 3:
                bufs.append((int(s[0]), int(s[1]), bool(s[2])))
                continue
            content, writable = s
            if isinstance(content, int):
                gpa = self._alloc(content)
                fill = STATUS_UNSET if (i == len(segs) - 1 and writable) else 0
                self.mem.fill(gpa, content, fill)
                bufs.append((gpa, content, bool(writable)))
            else:
                content = bytes(content)
                # data buffers (not the 16-byte header) may be asked to be
                # aligned, e.g. for O_DIRECT on the backend's side
                gpa = self._alloc(len(content), self.data_align if i else 16)
                self.mem.write(gpa, content)
                bufs.append((gpa, len(content), bool(writable)))
        vq = self.vqs[queue]
        if not indirect and len(bufs) > vq.num_free:
            raise RingFull(f"queue {queue}: {len(bufs)} descriptors needed, {vq.num_free} free")
        if indirect:  # the indirect table comes from the scratch area too
            head = vq.add_indirect(bufs, publish=False)
        else:
            head = vq.add_chain(bufs, publish=False)
        req = Request(queue=queue, head=head, segments=bufs)
        if bufs and bufs[-1][2] and bufs[-1][1] >= 1:
            req.status_gpa = bufs[-1][0] + bufs[-1][1] - 1  # last device-writable byte
        first = segs[0] if segs else None
        if (
            first is not None
            and len(first) == 2
            and isinstance(first[0], (bytes, bytearray))
            and len(first[0]) >= BLK_REQ_HDR.size
        ):
            req.type, _, req.sector = BLK_REQ_HDR.unpack_from(first[0])
        self.inflight[(queue, head)] = req
        return req

    def submit_raw(
        self,
        segments,
        queue: int = 0,
        indirect: bool = False,
        kick: bool = True,
        publish: bool = True,
    ) -> Request:
        """Build and publish a crafted request (see prepare_raw for *segments*)."""
        req = self.prepare_raw(segments, queue, indirect)
        if publish:
            self._publish([req], kick)
        return req

    def prepare(
        self,
        type_: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        indirect: bool = False,
        reserved: int = 0,
        seg_size: int | None = None,
        status_len: int = 1,
    ) -> Request:
        """Build a well-formed request: header, device-readable *out* data,
        *in_len* bytes of device-writable data, status byte.  *seg_size*
        splits data into descriptors of at most that many bytes."""
        segs: list = [(blk_header(type_, sector, reserved), False)]
        out = bytes(out)
        step = seg_size or max(len(out), in_len, 1)
        for off in range(0, len(out), step):
            segs.append((out[off : off + step], False))
        for off in range(0, in_len, step):
            segs.append((min(step, in_len - off), True))
        if status_len:
            segs.append((status_len, True))
        return self.prepare_raw(segs, queue, indirect)

    def submit(
        self,
        type_: int,
        sector: int = 0,
        out: bytes = b"",
        in_len: int = 0,
        queue: int = 0,
        indirect: bool = False,
        kick: bool = True,
        **kw,
    ) -> Request:
        req = self.prepare(type_, sector, out, in_len, queue, indirect, **kw)
        self._publish([req], kick)
        return req

    def _complete(self, q: int, uid: int, ulen: int) -> None:
        req = self.inflight.pop((q, uid), None)
        if req is None:
            self.unexpected_used.append((q, uid, ulen))
            return
        req.used_len = ulen
        req.segment_data = [self.mem.read(g, n) for g, n, _ in req.segments]
        if req.status_gpa is not None:
            req.status = req.segment_data[-1][-1]
            req.data = b"".join(
                d for d, s in zip(req.segment_data[:-1], req.segments[:-1], strict=True) if s[2]
            )
        else:
            req.data = b"".join(
                d for d, s in zip(req.segment_data, req.segments, strict=True) if s[2]
            )
        req.done = True

    def poll(self) -> int:
        """Reap completions on every queue without waiting; returns how many."""
        n = 0
        for vq in self.vqs:
            if vq is None:
                continue
            for uid, ulen in vq.poll_used():
                self._complete(vq.index, uid, ulen)
                n += 1
        return n

    def wait(self, reqs, timeout: float | None = None) -> list[Request]:
        """Wait until every request in *reqs* (one or a list) completed."""
        single = isinstance(reqs, Request)
        reqs = [reqs] if single else list(reqs)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            self.poll()
            pending = [r for r in reqs if not r.done]
            if not pending:
                return reqs[0] if single else reqs
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{len(pending)} of {len(reqs)} requests not completed; first: "
                    f"queue {pending[0].queue} head {pending[0].head}"
                )
            fds = {r.queue: self.vqs[r.queue].call_fd for r in pending}
            ready, _, _ = select.select(list(fds.values()), [], [], min(remaining, 0.05))
            for q, fd in fds.items():
                if fd in ready:
                    self.vqs[q]._drain_call()

    def submit_many(
        self,
        ops,
        queue: int = 0,
        indirect: bool = False,
        wait: bool = True,
        timeout: float | None = None,
    ) -> list[Request]:
        """Publish several requests with one avail-idx update and one kick.

        *ops*: iterable of (type, sector, payload): payload is bytes for
        device-readable data (OUT) or an int length of device-writable data (IN)."""
        reqs = []
        for type_, sector, payload in ops:
            if isinstance(payload, int):
                reqs.append(
                    self.prepare(type_, sector, in_len=payload, queue=queue, indirect=indirect)
                )
            else:
                reqs.append(
                    self.prepare(type_, sector, out=payload, queue=queue, indirect=indirect)
                )
        self._publish(reqs, kick=True)
        if wait:
            self.wait(reqs, timeout)
        return reqs

    # -- block operations -----------------------------------------------------
    def read(
        self,
        sector: int,
        nbytes: int,
        queue: int = 0,
        indirect: bool = False,
        timeout: float | None = None,
        **kw,
    ) -> tuple[int, bytes]:
        r = self.wait(
            self.submit(BLK_T_IN, sector, in_len=nbytes, queue=queue, indirect=indirect, **kw),
            timeout,
        )
        return r.status, r.data

    def write(
        self,
        sector: int,
        data: bytes,
        queue: int = 0,
        indirect: bool = False,
        timeout: float | None = None,
        **kw,
    ) -> int:
        return self.wait(
            self.submit(BLK_T_OUT, sector, out=data, queue=queue, indirect=indirect, **kw), timeout
        ).status

    def flush(self, queue: int = 0, timeout: float | None = None) -> int:
        return self.wait(self.submit(BLK_T_FLUSH, 0, queue=queue), timeout).status

    def get_id(self, queue: int = 0, timeout: float | None = None) -> bytes:
        """Device serial (up to 20 bytes, NUL-terminated if shorter)."""
        r = self.wait(self.submit(BLK_T_GET_ID, 0, in_len=BLK_ID_BYTES, queue=queue), timeout)
        if r.status != BLK_S_OK:
            raise BlkStatusError(r.status)
        return r.data.split(b"\0", 1)[0]

    def discard(
        self,
        sector: int,
        nsectors: int,
        flags: int = 0,
        queue: int = 0,
        timeout: float | None = None,
    ) -> int:
        seg = blk_discard_segment(sector, nsectors, flags)
        return self.wait(self.submit(BLK_T_DISCARD, 0, out=seg, queue=queue), timeout).status

    def write_zeroes(
        self,
        sector: int,
        nsectors: int,
        unmap: bool = False,
        queue: int = 0,
        timeout: float | None = None,
    ) -> int:
        seg = blk_discard_segment(sector, nsectors, BLK_WRITE_ZEROES_F_UNMAP if unmap else 0)
        return self.wait(self.submit(BLK_T_WRITE_ZEROES, 0, out=seg, queue=queue), timeout).status

    # -- teardown -------------------------------------------------------------
    def get_vring_base(self, q: int) -> int:
        """GET_VRING_BASE (stops the ring in the backend) -> last avail idx."""
        return self.client.get_vring_base(q)

    def stop(self) -> list[int]:
        """GET_VRING_BASE on every queue, as QEMU does on device stop."""
        return [self.get_vring_base(vq.index) for vq in self.vqs if vq is not None]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.close()
        for vq in self.vqs:
            if vq is not None:
                vq.close()
        self.mem.close()
        if self.inflight_region is not None:
            os.close(self.inflight_region[0])
            self.inflight_region = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# Malformed chains a hostile driver queues (each kicked at once)
# ---------------------------------------------------------------------------

def queue_read_outside_memory(dev: BlkDevice, queue: int = 0) -> tuple[int, int]:
    """A read whose data buffer lies outside guest memory; its status byte is
    pre-set to OK (what a driver that does not pre-set it could read).
    Returns (head, status gpa)."""
    vq = dev.vqs[queue]
    hdr, st = dev.mem.alloc(16), dev.mem.alloc(1)
    dev.mem.write(hdr, blk_header(BLK_T_IN))
    dev.mem.write(st, bytes([BLK_S_OK]))
    a, b, c = vq.alloc_descs(3)
    vq.add_raw_descriptors([
        (a, hdr, 16, VRING_DESC_F_NEXT, b),
        (b, 0xDEAD_0000_0000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, c),
        (c, st, 1, VRING_DESC_F_WRITE, 0),
    ], head=a)
    vq.kick()
    return a, st


def queue_looping_chain(dev: BlkDevice, queue: int = 0) -> int:
    """A one-descriptor chain whose next is itself (no status byte can be
    located).  Returns its head."""
    vq = dev.vqs[queue]
    (a,) = vq.alloc_descs(1)
    vq.add_raw_descriptors([(a, dev.mem.alloc(16), 16, VRING_DESC_F_NEXT, a)])
    vq.kick()
    return a
