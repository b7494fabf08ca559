"""vhost-user backend server: one frontend connection at a time over a unix
socket, each message validated (protocol.check_message) before a handler of
the dispatch table acts on it.  The data path is the C engine; this module
only configures, starts and stops its queues (the connection's state and
its message handlers: session.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket

from blkserve.logs import log_event
from blkserve.native import Queue, Target
from blkserve.peers import exe_name, peer_cred
from blkserve.vhost import protocol as p
from blkserve.vhost.blk import BlkDeviceModel
from blkserve.vhost.protocol import ProtocolError
from blkserve.vhost.session import Session

log = logging.getLogger("blkserve.vhost")


async def _send_with_fds(loop, conn: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send a reply carrying file descriptors (they ride on its first byte)."""
    while True:
        try:
            sent = socket.send_fds(conn, [data], fds)
            break
        except BlockingIOError:
            fut = loop.create_future()
            loop.add_writer(conn.fileno(), _wake, fut)
            try:
                await fut
            finally:
                loop.remove_writer(conn.fileno())
    if sent < len(data):
        await loop.sock_sendall(conn, data[sent:])


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class VhostUserServer:
    """Listens on a unix socket and serves one frontend at a time."""

    def __init__(self, path: str, model: BlkDeviceModel, target: Target) -> None:
        self.path = path
        self.model = model
        self.target = target
        self.queues = [Queue(target, i) for i in range(model.num_queues)]
        self._listener: socket.socket | None = None
        self._conn_task: asyncio.Task | None = None
        self._closing = False  # the served connection is being torn down
        self._reported: dict[int, dict[str, int]] = {}
        self.stats = None  # the shared stats block (blkserve.stats.StatsWriter), if any
        self._session: Session | None = None
        self.size_probe = lambda: 0  # the backing's current size (set by export)
        self.peer_policy = None  # blkserve.peers.PeerPolicy; None: any peer the socket lets in

    def bind(self) -> None:
        """Create the listening socket; raises OSError(EADDRINUSE) if a live
        process already listens there."""
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except ConnectionRefusedError:
                os.unlink(self.path)  # stale socket from a dead process
            except OSError as e:
                raise OSError(e.errno, f"cannot use socket path {self.path}: {e.strerror}") \
                    from None
            else:
                raise OSError(98, f"socket path {self.path} is in use by another process")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(self.path)
            s.listen(4)
        except OSError as e:
            s.close()
            raise OSError(e.errno, f"cannot listen on {self.path}: {e.strerror}") from None
        s.setblocking(False)
        self._listener = s

    async def serve(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        accept = asyncio.create_task(self._accept_loop())
        monitor = asyncio.create_task(self._monitor())
        await stop.wait()
        accept.cancel()
        monitor.cancel()
        if self._conn_task is not None:
            # One cancel: the connection's cleanup then runs to its end
            # (stopping queues waits for their in-flight requests).
            self._conn_task.cancel()
            await asyncio.wait([self._conn_task])
        for q in self.queues:
            await loop.run_in_executor(None, q.stop)
        self.close()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for q in self.queues:
            q.close()
        self.queues = []

    def grow(self) -> str:
        """The backing grew (SIGHUP from `blkserve serve` after a resize): serve
        the new capacity and tell the connected frontend, which re-reads the
        config space and tells the guest.  Returns what happened, for the log."""
        try:
            size = self.size_probe()
        except OSError as e:
            return f"cannot read the backing's size: {e.strerror}"
        new = size - size % self.model.blk_size
        old = self.model.capacity
        if new == old:
            return f"capacity unchanged ({old} bytes)"
        if new < old:
            return (f"the backing shrank to {new} bytes under a running export; still "
                    f"serving {old} bytes (requests past the new end fail)")
        try:
            self.target.set_capacity(new)
        except OSError as e:
            return f"cannot serve the new capacity {new}: {e}"
        self.model.capacity = new
        session = self._session
        told = session is not None and session.notify_config_change()
        return (f"capacity grown from {old} to {new} bytes; "
                + ("frontend notified (CONFIG_CHANGE_MSG)" if told else
                   "no frontend channel to notify: the guest sees it after a reconnect"))

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            if self.peer_policy is not None and not self._peer_allowed(conn):
                conn.close()
                continue
            if self._conn_task is not None and not self._conn_task.done():
                if not self._closing:
                    log.warning("refusing a second frontend connection: one is already served")
                    conn.close()
                    continue
                # The previous frontend is gone and its queues are draining
                # (e.g. QEMU reconnecting after a restart): serve the new
                # one as soon as they have stopped.
                await asyncio.wait([self._conn_task])
            self._conn_task = asyncio.create_task(self._serve_conn(conn))

    def _peer_allowed(self, conn: socket.socket) -> bool:
        """Is the process that connected CONN one this export serves?"""
        try:
            cred = peer_cred(conn)
        except OSError as e:
            why, cred = f"no peer credentials: {e.strerror}", None
        else:
            why = self.peer_policy.why_refused(cred)
        if why is None:
            return True
        self.peer_policy.refused += 1
        log_event(log, "frontend.refused", level=logging.WARNING,
                  pid=cred.pid if cred else None, uid=cred.uid if cred else None,
                  exe=exe_name(cred.pid) if cred else None, reason=why,
                  refused_total=self.peer_policy.refused,
                  msg=f"refusing a frontend connection from pid "
                      f"{cred.pid if cred else '?'} uid {cred.uid if cred else '?'}: {why}")
        return False

    async def _monitor(self) -> None:
        """Log guest faults and backing errors once per burst."""
        while True:
            await asyncio.sleep(1.0)
            for q in self.queues:
                s = q.stats()
                prev = self._reported.setdefault(q.index, dict.fromkeys(s, 0))
                for key, what in (("bad_chains", "malformed descriptor chain(s) from the guest"),
                                  ("io_errors", "backing-store I/O error(s)"),
                                  ("resubmitted", "request(s) a previous backend left in "
                                                  "flight, resubmitted")):
                    if s[key] > prev[key]:
                        log.warning("queue %d: %d %s (last error: %s)", q.index,
                                    s[key] - prev[key], what,
                                    os.strerror(-s["last_error"]) if s["last_error"] else "-")
                if s["broken"] and not prev["broken"] and s["last_error"] == -errno.ENXIO:
                    log.error("queue %d: the frontend shrank the guest memory, inflight or "
                              "dirty-log file under the backend (SIGBUS absorbed); queue "
                              "stopped until the frontend resets it", q.index)
                elif s["broken"] and not prev["broken"]:
                    log.error("queue %d: the guest corrupted the ring (%s); queue stopped "
                              "until the frontend resets it", q.index,
                              os.strerror(-s["last_error"]) if s["last_error"] else "?")
                self._reported[q.index] = s

    async def _recv(self, conn: socket.socket, n: int, fds: list[int]) -> bytes:
        loop = asyncio.get_running_loop()
        buf = b""
        while len(buf) < n:
            try:
                data, newfds, flags, _ = socket.recv_fds(conn, n - len(buf), p.MAX_FDS)
            except BlockingIOError:
                fut = loop.create_future()
                loop.add_reader(conn.fileno(), _wake, fut)
                try:
                    await fut
                finally:
                    loop.remove_reader(conn.fileno())
                continue
            fds.extend(newfds)
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(f"more than {p.MAX_FDS} file descriptors attached")
            if not data:
                raise EOFError
            buf += data
        return buf

    async def _serve_conn(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        session = Session(self.model, self.queues, self.target)
        self._session = session
        self._closing = False
        log.info("frontend connected")
        try:
            while True:
                fds: list[int] = []
                try:
                    hdr = p.parse_header(await self._recv(conn, p.HEADER.size, fds))
                    payload = await self._recv(conn, hdr.size, fds) if hdr.size else b""
                    spec = p.check_message(hdr, payload, len(fds))
                    result = await session.handlers[hdr.request](payload, fds)
                finally:
                    for fd in fds:  # whatever a handler did not keep
                        os.close(fd)
                if spec.reply:
                    reply = p.pack_reply(hdr.request, result)
                    if session.reply_fds:
                        try:
                            await _send_with_fds(loop, conn, reply, session.reply_fds)
                        finally:
                            for fd in session.reply_fds:
                                os.close(fd)
                            session.reply_fds = []
                    else:
                        await loop.sock_sendall(conn, reply)
                elif hdr.need_reply and session.reply_ack:
                    status = 1 if result is False else 0
                    await loop.sock_sendall(conn, p.pack_reply(hdr.request, p.pack_u64(status)))
        except EOFError:
            log.info("frontend disconnected")
        except ProtocolError as e:
            log.error("dropping frontend connection: %s", e)
        except OSError as e:
            log.error("frontend connection failed: %s", e)
        finally:
            self._closing = True
            try:
                await session.close()
            finally:
                conn.close()
                self._closing = False
                if self._session is session:
                    self._session = None
            for q in self.queues:
                st = q.stats()
                log.info("queue %d: %d requests served so far (%d read, %d write, %d flush, "
                         "%d discard, %d write-zeroes)", q.index,
                         sum(v for k, v in st.items() if k.startswith("reqs_")),
                         st["reqs_read"], st["reqs_write"], st["reqs_flush"],
                         st["reqs_discard"], st["reqs_write_zeroes"])
