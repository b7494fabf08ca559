"""One vhost-user frontend connection: the state it sets up (features, guest
memory, vrings, inflight regions, config space) and the handler of each
message, which configures, starts and stops the C engine's queues.  The
server (server.py) accepts the connection, validates each message and
dispatches it here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import fcntl
import functools
import logging
import mmap
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from blkserve._native import ffi
from blkserve.native import GuestMemory, Queue, Target, VringConfig, inflight_queue_bytes
from blkserve.vhost import protocol as p
from blkserve.vhost.blk import OFF_WCE, BlkDeviceModel
from blkserve.vhost.protocol import Feature, ProtocolError, Req

log = logging.getLogger("blkserve.vhost")


@dataclass
class VringState:
    num: int = 0
    addr: p.VringAddr | None = None
    base: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enable_msg: bool | None = None  # last SET_VRING_ENABLE, if any
    started: bool = False

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)


def _replace_fd(old: int | None, new: int | None) -> int | None:
    if old is not None:
        os.close(old)
    return new


FLOCK = struct.Struct("hhxxxxqqi4x")  # struct flock on x86-64 / arm64 Linux


def _ofd_lock(fd: int, kind: int) -> None:
    """A whole-file open-file-description lock (F_OFD_SETLK): KIND is
    F_RDLCK, F_WRLCK or F_UNLCK; BlockingIOError if another holds it."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, FLOCK.pack(kind, 0, 0, 0, 0))


class Session:
    """The state of one frontend connection and its message handlers."""

    def __init__(self, model: BlkDeviceModel, queues: list[Queue], target: Target) -> None:
        self.model = model
        self.queues = queues
        self.target = target
        # A new connection is a device reset: the write cache mode returns
        # to its default.
        self.writeback = model.default_writeback
        target.set_writethrough(not self.writeback)
        self.vrings = [VringState() for _ in queues]
        self.features = 0
        self.protocol_features = 0
        self.mem: GuestMemory | None = None
        self.mem_end = 0  # guest memory's highest address + 1 (dirty log coverage)
        self.handlers: dict[int, Callable] = {
            Req.GET_FEATURES: self.get_features,
            Req.SET_FEATURES: self.set_features,
            Req.SET_OWNER: self.set_owner,
            Req.RESET_OWNER: self.reset_owner,
            Req.SET_MEM_TABLE: self.set_mem_table,
            Req.SET_VRING_NUM: self.set_vring_num,
            Req.SET_VRING_ADDR: self.set_vring_addr,
            Req.SET_VRING_BASE: self.set_vring_base,
            Req.GET_VRING_BASE: self.get_vring_base,
            Req.SET_VRING_KICK: self.set_vring_kick,
            Req.SET_VRING_CALL: self.set_vring_call,
            Req.SET_VRING_ERR: self.set_vring_err,
            Req.GET_PROTOCOL_FEATURES: self.get_protocol_features,
            Req.SET_PROTOCOL_FEATURES: self.set_protocol_features,
            Req.GET_QUEUE_NUM: self.get_queue_num,
            Req.SET_VRING_ENABLE: self.set_vring_enable,
            Req.GET_CONFIG: self.get_config,
            Req.SET_CONFIG: self.set_config,
            Req.GET_MAX_MEM_SLOTS: self.get_max_mem_slots,
            Req.ADD_MEM_REG: self.add_mem_reg,
            Req.REM_MEM_REG: self.rem_mem_reg,
            Req.SET_BACKEND_REQ_FD: self.set_backend_req_fd,
            Req.RESET_DEVICE: self.reset_device,
            Req.GET_INFLIGHT_FD: self.get_inflight_fd,
            Req.SET_INFLIGHT_FD: self.set_inflight_fd,
            Req.SET_LOG_BASE: self.set_log_base,
            Req.SET_LOG_FD: self.set_log_fd,
        }
        # the frontend's dirty log (live migration): mapped at SET_LOG_BASE,
        # handed to the engine while VHOST_F_LOG_ALL is negotiated; replaced
        # maps stay mapped until no queue can still be writing to them
        self.log: mmap.mmap | None = None
        self._log_view = None
        self._old_logs: list[mmap.mmap] = []
        self._backing_locked = False  # an OFD lock while any ring runs
        self.inflight: mmap.mmap | None = None  # the frontend's inflight region
        self._inflight_buf = None
        self.reply_fds: list[int] = []  # fds to send with the next reply
        self.backend_fd: int | None = None  # the backend -> frontend channel

    # ---- helpers ----

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & p.bits(p.ProtocolFeature.REPLY_ACK))

    @property
    def packed(self) -> bool:
        return bool(self.features & p.bits(Feature.RING_PACKED))

    def _vring(self, index: int) -> VringState:
        if index >= len(self.vrings):
            raise ProtocolError(f"queue index {index} out of range (device has "
                                f"{len(self.vrings)} queues)")
        return self.vrings[index]

    def _enabled(self, v: VringState) -> bool:
        # Without VHOST_USER_F_PROTOCOL_FEATURES rings start enabled.
        if not self.features & p.bits(Feature.PROTOCOL_FEATURES):
            return v.enable_msg is not False
        return bool(v.enable_msg)

    async def _stop(self, i: int) -> None:
        v = self.vrings[i]
        if v.started:
            stop = asyncio.ensure_future(asyncio.to_thread(self.queues[i].stop))
            try:
                v.base = await asyncio.shield(stop)
            except asyncio.CancelledError:
                # a thread cannot be cancelled: the stop runs to its end
                # before the cancel goes on (the connection's cleanup would
                # otherwise stop the queue again, and the server free it,
                # under this stop: a use-after-free make asan caught)
                v.base = await stop
                v.started = False
                raise
            v.started = False
            await self._release_backing()

    async def _stop_every(self) -> None:
        """Stop all running queues at once, each in a thread of its own: each
        stop may wait up to --drain-timeout for a stalled backing, and the
        whole device must not take that once per queue."""
        running = [i for i, v in enumerate(self.vrings) if v.started]
        if len(running) <= 1:
            for i in running:
                await self._stop(i)
            return
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(running),
                                                   thread_name_prefix="bs-stop") as pool:
            bases = await asyncio.gather(
                *(loop.run_in_executor(pool, self.queues[i].stop) for i in running),
                return_exceptions=True)
        for i, base in zip(running, bases, strict=True):
            if isinstance(base, BaseException):
                raise base
            self.vrings[i].base = base
            self.vrings[i].started = False
        await self._release_backing()

    def _maybe_start(self, i: int) -> None:
        v = self.vrings[i]
        if (v.started or self.mem is None or v.addr is None or v.num == 0
                or v.kick is None or not self._enabled(v)):
            return
        # SET_FEATURES may have changed the ring format after SET_VRING_NUM /
        # SET_VRING_BASE: check them against the format the ring starts with.
        if not self.packed and (v.base > 0xFFFF or v.num & (v.num - 1)):
            raise ProtocolError(f"queue {i}: size {v.num} / base {v.base} do not fit "
                                "a split ring")
        vc = VringConfig(
            num=v.num, desc=v.addr.desc, avail=v.addr.avail, used=v.addr.used,
            base=v.base, kick_fd=v.kick, call_fd=-1 if v.call is None else v.call,
            event_idx=bool(self.features & p.bits(Feature.RING_EVENT_IDX)),
            packed=self.packed,
        )
        self._lock_backing()
        try:
            self.queues[i].start(self.mem, vc)
        except OSError as e:
            self._unlock_backing()
            raise ProtocolError(f"queue {i} cannot start: {e.strerror}") from None
        v.started = True
        log.debug("queue %d started (size %d, base %d)", i, v.num, v.base)

    async def close(self) -> None:
        """Stop every queue (in-flight I/O completes first), then unmap."""
        await self._stop_every()
        for i in range(len(self.vrings)):
            self.vrings[i].close_fds()
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        self.backend_fd = _replace_fd(self.backend_fd, None)
        self._drop_inflight()
        self._log_view = None
        for m in [*self._old_logs, *([self.log] if self.log is not None else [])]:
            m.close()
        self.log = None
        self._old_logs.clear()

    @property
    def logging(self) -> bool:
        return bool(self.features & p.bits(Feature.LOG_ALL))

    def _apply_log(self) -> None:
        """Hand the engine the dirty log while LOG_ALL is on, else none.
        Called whenever the log, the features or guest memory change: a log
        that no longer covers guest memory (hot-added RAM) is refused."""
        if self.mem is None:
            return
        if self.logging and self.log is not None:
            self._check_log_covers(len(self._log_view))
            self.mem.set_log(ffi.cast("void *", ffi.from_buffer(self._log_view)),
                             len(self._log_view))
        else:
            self.mem.set_log(None, 0)

    def _release_old_logs(self) -> None:
        """Unmap replaced logs once no queue runs (none can hold them)."""
        if any(v.started for v in self.vrings):
            return
        for m in self._old_logs:
            m.close()
        self._old_logs.clear()

    def _check_log_covers(self, size: int) -> None:
        if self.mem_end and size < p.log_bytes_for(self.mem_end):
            raise ProtocolError(f"dirty log of {size} bytes is too small for guest memory "
                                f"up to {self.mem_end:#x} (needs "
                                f"{p.log_bytes_for(self.mem_end)})")

    async def set_log_base(self, payload: bytes, fds: list[int]) -> bytes:
        """VHOST_USER_SET_LOG_BASE: map the frontend's dirty-log bitmap (an fd
        with LOG_SHMFD), check it covers guest memory; acked with 0."""
        if not self.protocol_features & p.bits(p.ProtocolFeature.LOG_SHMFD):
            raise ProtocolError("SET_LOG_BASE without VHOST_USER_PROTOCOL_F_LOG_SHMFD")
        size, offset = p.decode_log(payload)
        fd = fds.pop()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolError("the dirty log fd is not a shared-memory file")
            if st.st_size < offset + size:
                raise ProtocolError(f"dirty log fd of {st.st_size} bytes is smaller than the "
                                    f"log it announces ({size} bytes at {offset:#x})")
            self._check_log_covers(size)
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                m = mmap.mmap(fd, size + offset - base, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
            except (OSError, ValueError) as e:
                raise ProtocolError(f"cannot map the dirty log: {e}") from None
        finally:
            os.close(fd)
        if self.log is not None:
            self._old_logs.append(self.log)
        self.log = m
        self._log_view = memoryview(m)[offset - base:offset - base + size]
        self._apply_log()
        self._release_old_logs()
        log.info("dirty log: %d bytes (guest pages up to %#x)", size,
                 size * 8 * p.LOG_PAGE)
        return p.pack_u64(0)

    async def set_log_fd(self, payload: bytes, fds: list[int]) -> None:
        """VHOST_USER_SET_LOG_FD: an eventfd to signal log updates on; this
        backend marks the shared log only and never needs it."""
        if len(payload) not in (0, 8):
            raise ProtocolError(f"SET_LOG_FD: payload is {len(payload)} bytes")
        os.close(fds.pop())

    def _lock_backing(self) -> None:
        """The first ring to start takes an OFD lock on the backing (a read
        lock for a read-only export), the last to stop drops it: two
        frontends never run rings on one backing at once.  A second export
        of a volume may start (a migration's destination is prepared that
        way) but its rings wait until the source's have stopped."""
        cfg = self.target.config
        if self._backing_locked or cfg.null_io:   # a null backing holds nothing
            return
        if cfg.rbd is not None:
            self._lock_rbd(cfg)
            return
        try:
            _ofd_lock(cfg.fd_buffered, fcntl.F_RDLCK if cfg.read_only else fcntl.F_WRLCK)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise ProtocolError(f"cannot lock the backing: {e.strerror}") from None
            raise ProtocolError(
                "the backing is in use: another export runs rings on it (a second VM "
                "on this volume, or a migration source that has not stopped its "
                "rings yet); this connection's rings are refused") from None
        self._backing_locked = True

    def _lock_rbd(self, cfg) -> None:
        """An RBD image's exclusive lock, taken for good (not handed over on
        request as librbd does by default): the same guard across hosts,
        and a stale holder's writes fail (-EROFS) once another took it."""
        if cfg.read_only:
            self._backing_locked = True
            return
        try:
            cfg.rbd.lock(True)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EBUSY, errno.EAGAIN):
                raise ProtocolError(
                    "the RBD image is in use: another client holds its exclusive lock "
                    "(a second VM on this volume, or a migration source that has not "
                    "stopped its rings yet); this connection's rings are refused") from None
            raise ProtocolError(f"cannot lock the RBD image: {e.strerror}") from None
        self._backing_locked = True

    async def _release_backing(self) -> None:
        """The last ring stopped: the backing's writes are made durable
        (fdatasync: the page cache of --cache writeback, the disk's volatile
        cache), then its lock is let go.  The next frontend on the backing
        may run on another host (a migration's destination), so this comes
        before the final GET_VRING_BASE is answered.  Bounded by the drain
        timeout: a backing that does not sync in time is logged, not waited
        for (the sync goes on in its own thread)."""
        if not self._backing_locked or any(v.started for v in self.vrings):
            return
        cfg = self.target.config
        timeout = (cfg.drain_timeout_ms or 30000) / 1000
        if not cfg.read_only:
            sync = cfg.rbd.flush if cfg.rbd is not None else \
                functools.partial(os.fdatasync, cfg.fd_buffered)
            await self._sync_backing(sync, timeout)
            if cfg.rbd is not None:
                # the lock goes back to the cluster (one round trip, bounded
                # like the sync: a cluster that does not answer keeps it
                # until this client's session times out there)
                err = await self._in_thread(functools.partial(cfg.rbd.lock, False), timeout)
                if err is not None:
                    log.error("releasing the RBD image's exclusive lock at the last ring's "
                              "stop: %s", f"no answer within {timeout:.1f} s"
                              if isinstance(err, TimeoutError) else err.strerror)
                if not any(v.started for v in self.vrings):
                    self._backing_locked = False
                return
        self._unlock_backing()

    @classmethod
    async def _sync_backing(cls, sync, timeout: float) -> None:
        t0 = time.monotonic()
        err = await cls._in_thread(sync, timeout)
        if isinstance(err, TimeoutError):
            log.error("the backing did not sync within %.1f s of the last ring's stop: "
                      "writes may not be durable yet", timeout)
        elif err is not None:
            log.error("syncing the backing at the last ring's stop failed: %s", err.strerror)
        else:
            log.debug("backing synced in %.1f ms", (time.monotonic() - t0) * 1000)

    @staticmethod
    async def _in_thread(fn, timeout: float) -> OSError | TimeoutError | None:
        """Run FN (a blocking call into the backing) in a thread of its own,
        waiting at most TIMEOUT; its OSError, a TimeoutError, or None."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(err: OSError | None) -> None:
            if not done.done():
                done.set_result(err)

        def run() -> None:
            err = None
            try:
                fn()
            except OSError as e:
                err = e
            try:
                loop.call_soon_threadsafe(settle, err)
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        # a thread of its own, not the default executor: a sync that never
        # returns (a dead NFS server) must not hold up the loop's shutdown
        threading.Thread(target=run, name="bs-sync", daemon=True).start()
        try:
            return await asyncio.wait_for(done, timeout)  # settle() sees it cancelled
        except TimeoutError as e:
            return e

    def _unlock_backing(self) -> None:
        if self._backing_locked and not any(v.started for v in self.vrings):
            cfg = self.target.config
            if cfg.rbd is None:
                _ofd_lock(cfg.fd_buffered, fcntl.F_UNLCK)
            elif not cfg.read_only:
                try:   # a ring's start failed just after the lock was taken
                    cfg.rbd.lock(False)
                except OSError as e:
                    log.warning("%s", e)
            self._backing_locked = False

    def _drop_inflight(self) -> None:
        if self.inflight is None:
            return
        for q in self.queues:
            q.set_inflight(None, 0)
        self._inflight_buf = None
        self.inflight.close()
        self.inflight = None

    def notify_config_change(self) -> bool:
        """Tell the frontend to re-read the config space (a resize): True if
        it could be told."""
        if self.backend_fd is None:
            return False
        msg = p.pack_backend_request(p.BACKEND_CONFIG_CHANGE_MSG)
        try:
            # a 12-byte datagram-sized write on a socket the frontend drains:
            # it does not block in practice; a full buffer is reported, not waited on
            os.set_blocking(self.backend_fd, False)
            sent = os.write(self.backend_fd, msg)
        except OSError as e:
            log.warning("cannot send CONFIG_CHANGE_MSG to the frontend: %s", e.strerror)
            return False
        return sent == len(msg)

    # ---- handlers: each gets (payload, fds) and pops the fds it keeps ----

    async def get_features(self, payload: bytes, fds: list[int]) -> bytes:
        return p.pack_u64(self.model.features)

    async def set_features(self, payload: bytes, fds: list[int]) -> None:
        value = p.decode_u64(payload)
        extra = value & ~self.model.features
        if extra:
            raise ProtocolError(f"frontend acked features never offered: {extra:#x}")
        was = self.logging
        self.features = value
        if self.logging != was:
            # live migration starts or ends: no ring restarts for it
            self._apply_log()
            log.info("dirty logging %s", "on" if self.logging else "off")

    async def set_owner(self, payload: bytes, fds: list[int]) -> None:
        return None

    async def reset_owner(self, payload: bytes, fds: list[int]) -> None:
        await self._stop_every()
        for i in range(len(self.vrings)):
            self.vrings[i].close_fds()
            self.vrings[i] = VringState()
        self.features = 0

    async def reset_device(self, payload: bytes, fds: list[int]) -> None:
        """VHOST_USER_RESET_DEVICE: every ring stops (in-flight I/O completes
        first) and forgets its state, the device features and the write cache
        mode return to their initial values; ownership, protocol features,
        guest memory and the backend channel stay."""
        if not self.protocol_features & p.bits(p.ProtocolFeature.RESET_DEVICE):
            raise ProtocolError("RESET_DEVICE without VHOST_USER_PROTOCOL_F_RESET_DEVICE")
        await self.reset_owner(payload, fds)
        self.writeback = self.model.default_writeback
        self.target.set_writethrough(not self.writeback)
        log.info("device reset by the frontend")

    async def get_protocol_features(self, payload: bytes, fds: list[int]) -> bytes:
        return p.pack_u64(self.model.protocol_features)

    async def set_protocol_features(self, payload: bytes, fds: list[int]) -> None:
        value = p.decode_u64(payload)
        extra = value & ~self.model.protocol_features
        if extra:
            raise ProtocolError(f"frontend acked protocol features never offered: {extra:#x}")
        self.protocol_features = value

    async def get_queue_num(self, payload: bytes, fds: list[int]) -> bytes:
        return p.pack_u64(self.model.num_queues)

    async def _stop_all(self) -> None:
        await self._stop_every()
        self._release_old_logs()

    def _start_all(self) -> None:
        for i in range(len(self.vrings)):
            self._maybe_start(i)

    async def set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        regions = p.decode_mem_table(payload)
        mem = GuestMemory()
        try:
            for r in regions:
                mem.add(fds[0], r.gpa, r.size, r.uva, r.mmap_offset)
                os.close(fds.pop(0))
        except OSError as e:
            mem.close()
            raise ProtocolError(f"memory table rejected: {e.strerror}") from None
        # Queues hold pointers into the old table: stop them, swap, restart.
        await self._stop_all()
        if self.mem is not None:
            self.mem.close()
        self.mem = mem
        self.mem_end = max((r.gpa + r.size for r in regions), default=0)
        self._apply_log()
        log.info("memory table: %d region(s), %d MiB", len(regions),
                 sum(r.size for r in regions) >> 20)
        self._start_all()

    async def get_max_mem_slots(self, payload: bytes, fds: list[int]) -> bytes:
        return p.pack_u64(p.MAX_MEM_SLOTS)

    async def add_mem_reg(self, payload: bytes, fds: list[int]) -> None:
        r = p.decode_single_region(payload)
        # Memory hotplug is rare: quiesce the queues rather than make the
        # hot path's region lookup safe against concurrent updates.
        await self._stop_all()
        if self.mem is None:
            self.mem = GuestMemory()
        try:
            self.mem.add(fds[0], r.gpa, r.size, r.uva, r.mmap_offset)
        except OSError as e:
            raise ProtocolError(f"memory region rejected: {e.strerror}") from None
        self.mem_end = max(self.mem_end, r.gpa + r.size)
        self._apply_log()
        log.info("memory region added: gpa %#x, %d MiB (%d slot(s) in use)", r.gpa,
                 r.size >> 20, len(self.mem))
        self._start_all()

    async def rem_mem_reg(self, payload: bytes, fds: list[int]) -> None:
        r = p.decode_single_region(payload)
        if self.mem is None:
            raise ProtocolError("REM_MEM_REG before any memory was added")
        await self._stop_all()
        try:
            self.mem.remove(r.gpa, r.size, r.uva)
        except OSError as e:
            raise ProtocolError(f"cannot remove memory region gpa {r.gpa:#x}: "
                                f"{e.strerror}") from None
        log.info("memory region removed: gpa %#x (%d slot(s) in use)", r.gpa, len(self.mem))
        self._start_all()

    async def set_vring_num(self, payload: bytes, fds: list[int]) -> None:
        index, num = p.decode_vring_state(payload)
        v = self._vring(index)
        # Split rings need a power of two; packed rings take any size.
        if num == 0 or num > p.MAX_QUEUE_SIZE or (num & (num - 1) and not self.packed):
            raise ProtocolError(f"queue {index}: size {num} is not "
                                f"{'' if self.packed else 'a power of two '}"
                                f"in 1..{p.MAX_QUEUE_SIZE}")
        await self._stop(index)
        v.num = num

    async def set_vring_addr(self, payload: bytes, fds: list[int]) -> None:
        addr = p.decode_vring_addr(payload)
        v = self._vring(addr.index)
        if addr.flags & ~p.VRING_F_LOG:
            raise ProtocolError(f"queue {addr.index}: unknown vring address flags "
                                f"{addr.flags:#x}")
        if v.started and v.addr is not None and (addr.desc, addr.used, addr.avail) == \
                (v.addr.desc, v.addr.used, v.addr.avail):
            # only the log flag / log_guest_addr changed (a migration starts
            # or ends): the engine marks used-ring pages through its memory
            # table, so the running ring needs no restart
            v.addr = addr
            return
        await self._stop(addr.index)
        v.addr = addr
        self._maybe_start(addr.index)

    async def set_vring_base(self, payload: bytes, fds: list[int]) -> None:
        index, num = p.decode_vring_state(payload)
        v = self._vring(index)
        # A split ring's base is a 16-bit index; a packed ring's carries the
        # avail position and wrap counter, and the used ones in bits 16-31.
        if num > 0xFFFF and not self.packed:
            raise ProtocolError(f"queue {index}: base {num} exceeds 16 bits")
        await self._stop(index)
        v.base = num

    async def get_vring_base(self, payload: bytes, fds: list[int]) -> bytes:
        index, _ = p.decode_vring_state(payload)
        v = self._vring(index)
        await self._stop(index)
        # The ring is stopped until the frontend sends a new kick fd.
        v.kick = _replace_fd(v.kick, None)
        log.debug("queue %d stopped at %d", index, v.base)
        return struct.pack("<II", index, v.base)

    async def _set_vring_fd(self, payload: bytes, fds: list[int], name: str) -> None:
        index, has_fd = p.decode_vring_fd(payload)
        v = self._vring(index)
        await self._stop(index)
        setattr(v, name, _replace_fd(getattr(v, name), fds.pop() if has_fd else None))
        self._maybe_start(index)

    async def set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        index, has_fd = p.decode_vring_fd(payload)
        if not has_fd:
            raise ProtocolError(f"queue {index}: polling mode (no kick fd) is not supported")
        await self._set_vring_fd(payload, fds, "kick")

    async def set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        await self._set_vring_fd(payload, fds, "call")

    async def set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        index, has_fd = p.decode_vring_fd(payload)
        v = self._vring(index)
        v.err = _replace_fd(v.err, fds.pop() if has_fd else None)

    async def set_vring_enable(self, payload: bytes, fds: list[int]) -> None:
        index, num = p.decode_vring_state(payload)
        v = self._vring(index)
        if num not in (0, 1):
            raise ProtocolError(f"queue {index}: enable value {num} is not 0 or 1")
        v.enable_msg = bool(num)
        if num:
            self._maybe_start(index)
        else:
            await self._stop(index)

    async def set_backend_req_fd(self, payload: bytes, fds: list[int]) -> None:
        if not self.protocol_features & p.bits(p.ProtocolFeature.BACKEND_REQ):
            raise ProtocolError("SET_BACKEND_REQ_FD without VHOST_USER_PROTOCOL_F_BACKEND_REQ")
        self.backend_fd = _replace_fd(self.backend_fd, fds.pop())

    def _inflight_request(self, payload: bytes) -> tuple[int, int, int, int, int]:
        if not self.protocol_features & p.bits(p.ProtocolFeature.INFLIGHT_SHMFD):
            raise ProtocolError("inflight message without VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD")
        size, offset, nq, qsize = p.decode_inflight(payload)
        if not 1 <= nq <= len(self.vrings) or not 1 <= qsize <= 32768:
            raise ProtocolError(f"inflight region for {nq} queue(s) of {qsize}: the device "
                                f"has {len(self.vrings)} queue(s) of at most 32768")
        return size, offset, nq, qsize, inflight_queue_bytes(qsize)

    async def get_inflight_fd(self, payload: bytes, fds: list[int]) -> bytes:
        """Allocate the shared memory the frontend keeps for us across backend
        restarts (zeroed: no request in flight)."""
        _, _, nq, qsize, per_queue = self._inflight_request(payload)
        total = nq * per_queue
        fd = os.memfd_create("blkserve-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, total)
        except OSError:
            os.close(fd)
            raise
        self.reply_fds.append(fd)
        return p.pack_inflight(total, 0, nq, qsize)

    async def set_inflight_fd(self, payload: bytes, fds: list[int]) -> None:
        """Map the frontend's inflight memory; each queue's start then redoes
        what a previous backend left in flight there."""
        size, offset, nq, qsize, per_queue = self._inflight_request(payload)
        if size < nq * per_queue or offset % mmap.PAGESIZE:
            raise ProtocolError(f"inflight region of {size} bytes at {offset} is too small or "
                                f"misaligned for {nq} queue(s) of {qsize}")
        if any(v.started for v in self.vrings):
            raise ProtocolError("SET_INFLIGHT_FD while rings run")
        fd = fds.pop()
        try:
            if os.fstat(fd).st_size < offset + size:
                raise ProtocolError("inflight fd is smaller than the region it announces")
            region = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                               offset=offset)
        finally:
            os.close(fd)
        self._drop_inflight()
        self.inflight = region
        self._inflight_buf = ffi.from_buffer(region)
        for i, q in enumerate(self.queues[:nq]):
            q.set_inflight(self._inflight_buf + i * per_queue, per_queue)
        log.info("inflight region: %d queue(s) of %d entries (%d bytes)", nq, qsize, size)

    async def get_config(self, payload: bytes, fds: list[int]) -> bytes:
        offset, size, flags, _ = p.decode_config(payload)
        cfg = self.model.config(self.writeback)
        if size == 0 or offset + size > len(cfg):
            # An empty reply tells the frontend the read failed; the
            # connection stays up.
            log.warning("GET_CONFIG outside the config space (offset %d, size %d) refused",
                        offset, size)
            return b""
        return p.CONFIG_HDR.pack(offset, size, flags) + cfg[offset:offset + size]

    async def set_config(self, payload: bytes, fds: list[int]) -> bool:
        offset, size, _, data = p.decode_config(payload)
        # The only writable field is the write cache enable byte, and only
        # once VIRTIO_BLK_F_CONFIG_WCE was negotiated.
        if (offset, size) != (OFF_WCE, 1) or data[0] > 1 or \
                not self.features & p.bits(Feature.BLK_CONFIG_WCE):
            log.warning("SET_CONFIG (offset %d, size %d) refused: only the write cache "
                        "byte (offset %d) is writable", offset, size, OFF_WCE)
            return False
        self.writeback = bool(data[0])
        self.target.set_writethrough(not self.writeback)
        log.info("guest switched the write cache to %s",
                 "writeback" if self.writeback else "writethrough")
        return True
