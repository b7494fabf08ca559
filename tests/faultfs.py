"""faultfs: a FUSE file system for tests whose files fail or stall on cue.

It runs as a process of its own (so a test may kill -9 whatever uses its
files without hurting it) and serves one or more files, each passed through
to a real backing file.  A test decides at run time, per file, byte range and
operation (``read``, ``write``, ``fsync``), what a request that touches that
range meets:

- ``delay``: it is answered after that many seconds;
- ``stall``: it blocks until the test calls ``release()``;
- ``fail``: it is answered with an errno (EIO, ENOSPC, ...), nothing is done;
- ``short``: a read is answered with at most that many bytes (a short
  transfer: the caller must ask again for the rest).

Every file is opened with FUSE ``direct_io``: no page cache, so every read and
write of the user, O_DIRECT or not, reaches the file system as a request.

The control channel is a unix socket outside the mount (one JSON line per
request and per answer).  `FaultFS` is the client and owns the process::

    with FaultFS({"disk.img": 64 << 20}) as fs:
        fs.stall("write", 0, 4096)
        ... use fs.path("disk.img") ...
        fs.wait_stalled(1)
        fs.release()

Leaving the ``with`` releases every stall, stops the server and unmounts
(``fusermount3 -u -z`` / ``umount -l`` when the server did not), whatever
happened in between.  Needs Debian's ``fuse3`` and pyfuse3 (the ``test``
extra; it builds against ``libfuse3-dev``), and root or /dev/fuse access.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OPS = ("read", "write", "fsync")
# O_DIRECT requests from io_uring are FUSE "background" requests: the kernel
# sends at most max_background (default 12) of them to the file system at
# once, the rest wait in the kernel.  So at most 12 can be seen held.
MAX_HELD_ASYNC = 12
ACTIONS = ("delay", "stall", "fail", "short")


# ---------------------------------------------------------------------------
# the client: what tests use
# ---------------------------------------------------------------------------
class FaultFSError(RuntimeError):
    pass


def _mounted(path: str) -> bool:
    """Whether PATH is a mount point (from mountinfo: a FUSE mount whose
    server died cannot even be stat'ed)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].encode().decode("unicode_escape")
                if mp == target:
                    return True
    except OSError:
        pass
    return False


class FaultFS:
    """Start a faultfs process serving FILES: name -> size in bytes (a new
    sparse backing file) or the path of an existing file to pass through.

    Everything (mount point, backing files, control socket, server log) lives
    in a new directory under *dir* (default /tmp: a short path, since the
    control socket's path must fit in sun_path)."""

    def __init__(self, files: dict[str, int | str | os.PathLike], dir: str | None = None,
                 start_timeout: float = 15.0):
        self.root = Path(tempfile.mkdtemp(prefix="faultfs-", dir=dir))
        self.mountpoint = self.root / "mnt"
        self.control = str(self.root / "ctl.sock")
        self.log_path = self.root / "faultfs.log"
        self.backings: dict[str, Path] = {}
        self.proc: subprocess.Popen | None = None
        self._start_timeout = start_timeout
        (self.root / "backing").mkdir()
        self.mountpoint.mkdir()
        for name, spec in files.items():
            if "/" in name or name in (".", ".."):
                raise ValueError(f"file name {name!r} must be a plain name")
            if isinstance(spec, int):
                p = self.root / "backing" / name
                with open(p, "wb") as f:
                    f.truncate(spec)
            else:
                p = Path(spec).resolve()
            self.backings[name] = p

    # -- life cycle -----------------------------------------------------------
    def start(self) -> FaultFS:
        argv = [sys.executable, str(Path(__file__).resolve()), "--mount", str(self.mountpoint),
                "--control", self.control]
        for name, p in self.backings.items():
            argv += ["--file", f"{name}={p}"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self._start_timeout
        while True:
            if self.proc.poll() is not None:
                self.close()
                raise FaultFSError(f"faultfs exited at start: {self.log()}")
            if os.path.exists(self.control) and _mounted(str(self.mountpoint)):
                try:
                    self._call("ping")
                    return self
                except OSError:
                    pass
            if time.monotonic() > deadline:
                self.close()
                raise FaultFSError(f"faultfs did not come up in {self._start_timeout} s: "
                                   f"{self.log()}")
            time.sleep(0.05)

    def close(self) -> None:
        """Release every stall, stop the server, unmount; never raises."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self._call("quit", timeout=5)
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        mnt = str(self.mountpoint)
        for cmd in (["fusermount3", "-u", "-z", mnt], ["umount", "-l", mnt]):
            if not _mounted(mnt):
                break
            subprocess.run(cmd, capture_output=True, check=False)
        if self.proc is not None:
            self._log.close()
            self.proc = None
        if not _mounted(mnt):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FaultFS:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    # -- paths ----------------------------------------------------------------
    def path(self, name: str) -> str:
        """The file as the code under test should open it (on the mount)."""
        if name not in self.backings:
            raise KeyError(name)
        return str(self.mountpoint / name)

    def backing(self, name: str) -> Path:
        """The real file behind NAME, to check or prepare data without faults."""
        return self.backings[name]

    # -- control --------------------------------------------------------------
    def _call(self, cmd: str, timeout: float = 10.0, **args) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.control)
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError(f"faultfs closed the control connection ({cmd})")
                buf += chunk
        reply = json.loads(buf)
        if "error" in reply:
            raise FaultFSError(reply["error"])
        return reply

    def _rule(self, action: str, op: str, start: int, end: int | None, file: str | None,
              **extra) -> None:
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, not {op!r}")
        if file is not None and file not in self.backings:
            raise KeyError(file)
        self._call("rule", action=action, op=op, start=start, end=end, file=file, **extra)

    def delay(self, op: str, seconds: float, start: int = 0, end: int | None = None,
              file: str | None = None) -> None:
        """Answer OP requests overlapping [start, end) after SECONDS."""
        self._rule("delay", op, start, end, file, seconds=seconds)

    def stall(self, op: str, start: int = 0, end: int | None = None,
              file: str | None = None) -> None:
        """Hold OP requests overlapping [start, end) until release()."""
        self._rule("stall", op, start, end, file)

    def fail(self, op: str, err: int = errno.EIO, start: int = 0, end: int | None = None,
             file: str | None = None) -> None:
        """Answer OP requests overlapping [start, end) with errno ERR."""
        self._rule("fail", op, start, end, file, errno=err)

    def short(self, limit: int, start: int = 0, end: int | None = None,
              file: str | None = None) -> None:
        """Answer reads overlapping [start, end) with at most LIMIT bytes."""
        if limit <= 0:
            raise ValueError("limit must be positive")
        self._rule("short", "read", start, end, file, limit=limit)

    def release(self, err: int | None = None) -> None:
        """Drop every stall rule and let every held request go on, or, with
        ERR, answer every held request with that errno instead (nothing it
        would have read or written is done: a backing that lost them)."""
        self._call("release", errno=err)

    def clear(self) -> None:
        """Drop every rule (held requests go on) and zero the counters."""
        self._call("clear")

    def stats(self) -> dict:
        return self._call("stats")

    def stalled(self) -> int:
        """Requests blocked in the file system right now."""
        return self.stats()["stalled"]

    def calls(self, op: str) -> int:
        """OP requests received since the start (or the last clear())."""
        return self.stats()["calls"][op]

    def failed(self, op: str) -> int:
        """OP requests answered with an error by a fail rule."""
        return self.stats()["failed"][op]

    def wait_stalled(self, n: int, timeout: float = 10.0) -> int:
        """Wait until at least N requests are held; returns how many are."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.stalled()
            if got >= n:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"{got} request(s) stalled after {timeout} s, "
                                   f"{n} awaited; stats {self.stats()}")
            time.sleep(0.02)


# ---------------------------------------------------------------------------
# the server: `python faultfs.py --mount DIR --control SOCK --file NAME=PATH...`
# ---------------------------------------------------------------------------
def serve(mountpoint: str, control: str, files: dict[str, str]) -> None:
    import pyfuse3
    import trio

    class Rule:
        def __init__(self, action: str, op: str, start: int, end: int | None,
                     file: str | None, seconds: float = 0.0, err: int = errno.EIO,
                     limit: int = 0):
            self.action, self.op, self.file = action, op, file
            self.limit = limit
            self.start, self.end = start, end
            self.seconds, self.err = seconds, err
            self.released = trio.Event() if action == "stall" else None
            self.release_err: int | None = None  # answer held requests with this

        def matches(self, op: str, file: str, off: int, length: int) -> bool:
            if op != self.op or (self.file is not None and self.file != file):
                return False
            if op == "fsync":  # no range: any rule on the file
                return True
            end = off + max(length, 1)
            return end > self.start and (self.end is None or off < self.end)

    class State:
        def __init__(self) -> None:
            self.rules: list[Rule] = []
            self.stalled = 0
            self.stalled_total = 0
            self.zero()

        def zero(self) -> None:
            self.calls = dict.fromkeys(OPS, 0)
            self.failed = dict.fromkeys(OPS, 0)

        def release(self, keep_others: bool = True, err: int | None = None) -> None:
            for r in self.rules:
                if r.released is not None:
                    r.release_err = err
                    r.released.set()
            self.rules = [r for r in self.rules if r.released is None] if keep_others else []

    state = State()

    class Ops(pyfuse3.Operations):
        def __init__(self) -> None:
            super().__init__()
            self.by_inode: dict[int, tuple[str, int]] = {}  # inode -> (name, fd)
            self.by_name: dict[bytes, int] = {}
            for i, (name, path) in enumerate(sorted(files.items())):
                ino = pyfuse3.ROOT_INODE + 1 + i
                self.by_inode[ino] = (name, os.open(path, os.O_RDWR | os.O_CLOEXEC))
                self.by_name[name.encode()] = ino

        def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            if ino == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFDIR | 0o755, 2, 0
                st = None
            else:
                st = os.fstat(self.by_inode[ino][1])
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o644, 1, st.st_size
                a.st_blocks = st.st_blocks
            now = time.time_ns()
            a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = now if st is None else st.st_mtime_ns
            a.st_uid, a.st_gid = os.getuid(), os.getgid()
            a.st_blksize = 4096
            a.st_ino = ino
            a.attr_timeout = a.entry_timeout = 0  # a resize is seen at once
            return a

        def _file(self, ino: int) -> tuple[str, int]:
            try:
                return self.by_inode[ino]
            except KeyError:
                raise pyfuse3.FUSEError(errno.ENOENT) from None

        async def _fault(self, op: str, name: str, off: int, length: int) -> int:
            """Apply the rule that decides; returns how many bytes to transfer."""
            state.calls[op] += 1
            for r in reversed(state.rules):  # the newest rule that matches decides
                if not r.matches(op, name, off, length):
                    continue
                if r.action == "fail":
                    state.failed[op] += 1
                    raise pyfuse3.FUSEError(r.err)
                if r.action == "short":
                    return min(length, r.limit)
                if r.action == "delay":
                    await trio.sleep(r.seconds)
                elif r.action == "stall":
                    state.stalled += 1
                    state.stalled_total += 1
                    try:
                        await r.released.wait()
                    finally:
                        state.stalled -= 1
                    if r.release_err is not None:
                        state.failed[op] += 1
                        raise pyfuse3.FUSEError(r.release_err)
                return length
            return length

        async def lookup(self, parent_inode, name, ctx=None):
            if parent_inode != pyfuse3.ROOT_INODE or name not in self.by_name:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(self.by_name[name])

        async def getattr(self, inode, ctx=None):
            if inode != pyfuse3.ROOT_INODE:
                self._file(inode)
            return self._attr(inode)

        async def setattr(self, inode, attr, fields, fh, ctx):
            _, fd = self._file(inode)
            if fields.update_size:
                os.ftruncate(fd, attr.st_size)
            return self._attr(inode)

        async def opendir(self, inode, ctx):
            if inode != pyfuse3.ROOT_INODE:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode

        async def readdir(self, fh, start_id, token):
            entries = sorted(self.by_name.items())
            for i, (name, ino) in enumerate(entries[start_id:], start_id):
                if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                    break

        async def releasedir(self, fh):
            pass

        async def open(self, inode, flags, ctx):
            self._file(inode)
            return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

        async def read(self, fh, off, size):
            name, fd = self._file(fh)
            size = await self._fault("read", name, off, size)
            return os.pread(fd, size, off)

        async def write(self, fh, off, buf):
            name, fd = self._file(fh)
            await self._fault("write", name, off, len(buf))
            return os.pwrite(fd, buf, off)

        async def fsync(self, fh, datasync):
            name, fd = self._file(fh)
            await self._fault("fsync", name, 0, 0)
            (os.fdatasync if datasync else os.fsync)(fd)

        async def flush(self, fh):
            pass

        async def release(self, fh):
            pass

        async def statfs(self, ctx):
            sv = os.statvfs(os.path.dirname(next(iter(files.values()))))
            d = pyfuse3.StatvfsData()
            for k in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail"):
                setattr(d, k, getattr(sv, k))
            d.f_namemax = 255
            return d

    def handle(req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True}
        if cmd == "rule":
            if req.get("action") not in ACTIONS or req.get("op") not in OPS:
                return {"error": f"bad rule {req}"}
            state.rules.append(Rule(req["action"], req["op"], int(req.get("start") or 0),
                                    req.get("end"), req.get("file"),
                                    float(req.get("seconds") or 0),
                                    int(req.get("errno") or errno.EIO),
                                    int(req.get("limit") or 0)))
            return {"ok": True}
        if cmd == "release":
            err = req.get("errno")
            state.release(err=None if err is None else int(err))
            return {"ok": True}
        if cmd == "clear":
            state.release(keep_others=False)
            state.zero()
            return {"ok": True}
        if cmd == "stats":
            return {"stalled": state.stalled, "stalled_total": state.stalled_total,
                    "calls": state.calls, "failed": state.failed, "rules": len(state.rules)}
        return {"error": f"unknown command {cmd!r}"}

    async def control_conn(stream, nursery) -> None:
        async with stream:
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
            try:
                req = json.loads(buf)
                reply = {"ok": True} if req.get("cmd") == "quit" else handle(req)
            except (ValueError, TypeError, KeyError) as e:
                req, reply = {}, {"error": str(e)}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
            if req.get("cmd") == "quit":
                nursery.cancel_scope.cancel()

    async def control_server(nursery) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(control)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        await trio.serve_listeners(lambda s: control_conn(s, nursery), [listener])

    async def on_signals(nursery) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
            async for _ in sigs:
                nursery.cancel_scope.cancel()
                return

    async def orphaned(nursery) -> None:
        # the test process that started us died without close(): unmount
        # rather than leave a mount behind
        parent = os.getppid()
        while os.getppid() == parent:
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(on_signals, nursery)
            nursery.start_soon(orphaned, nursery)
            nursery.start_soon(control_server, nursery)
            # many tasks: every stalled request holds one, the others go on
            await pyfuse3.main(min_tasks=4, max_tasks=4096)
            nursery.cancel_scope.cancel()

    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=faultfs", "subtype=faultfs"}
    pyfuse3.init(Ops(), mountpoint, options)
    try:
        trio.run(main)
    finally:
        state.release(keep_others=False)
        pyfuse3.close(unmount=True)
        try:
            os.unlink(control)
        except OSError:
            pass


def _main(argv: list[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="faultfs: FUSE files that fail or stall on cue")
    ap.add_argument("--mount", required=True)
    ap.add_argument("--control", required=True, help="unix socket for the control channel")
    ap.add_argument("--file", action="append", default=[], metavar="NAME=PATH")
    a = ap.parse_args(argv)
    files = dict(f.split("=", 1) for f in a.file)
    if not files:
        ap.error("at least one --file NAME=PATH")
    serve(a.mount, a.control, files)


if __name__ == "__main__":
    _main(sys.argv[1:])
