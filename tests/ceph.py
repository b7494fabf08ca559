"""A throwaway real Ceph cluster for tests: one monitor, one BlueStore OSD.

Ceph 16.2 (Debian 12's ``ceph-mon ceph-osd ceph-common``), started as plain
child processes (no systemd, no mgr) in a short directory under ``/tmp``
(unix socket paths must fit in 107 bytes).  Facts this relies on:
/work/shared/CEPH-TESTBED.md.

* one monitor on a free 127.0.0.1 port, messenger v2 only, cephx on,
  ``paxos_propose_interval = 0.01`` (every map change is quick);
* one OSD, BlueStore on a 10 GiB sparse file that the OSD creates itself
  (``bluestore_block_create``; ``bluestore_block_path`` left empty: pointing
  it at the OSD's own ``block`` fails with ELOOP), ``osd_memory_target``
  1 GiB, so data survives an OSD restart (memstore would not);
* one replicated pool of size 1, ``rbd pool init`` done.

Public API:

* ``ceph_available() -> str | None`` -- None when the binaries are there,
  else the reason (for ``pytest.skip``).
* ``CephCluster(keep_dir=False, pool="rbd", pg_num=8)`` -- ``start()`` /
  ``stop()`` or a context manager.  ``conf`` (client ceph.conf: mon address,
  keyring, empty ``admin socket``), ``keyring`` (client.admin),
  ``client_id`` ("admin"), ``pool``, ``run(tool, *args)`` (``ceph``, ``rbd``,
  ``rados`` with ``--conf``; stdout), ``create_image`` / ``remove_image`` /
  ``image_size`` / ``image_info`` / ``list_images`` / ``export_image`` /
  ``write_image``, ``stop_osd()`` / ``start_osd()`` / ``osd_pid`` /
  ``mon_pid``, ``start_seconds`` / ``stop_seconds``.
* ``session_cluster()`` -- a generator for a session-scoped pytest fixture:
  skips where Ceph is missing, starts, yields the cluster, stops.
* ``CephError`` -- startup, daemon or command failure (with log tails).

Example::

    with CephCluster() as c:
        c.create_image("disk", 64 << 20)
        c.write_image("disk", 4096, b"x" * 4096)
        assert c.export_image("disk")[4096:8192] == b"x" * 4096

Costs on 2 cores: ``start()`` 1.5-2 s (nothing to a pool that takes I/O),
``stop()`` 0.15-0.25 s, ``stop_osd()`` 0.3 s, ``start_osd()`` 0.9 s; a CLI
call 0.05 s (``rbd``, ``rados``) to 0.2 s (``ceph``, Python); mon ~40 MiB,
OSD 60 MiB idle.  Two clusters side by side work.

There is no mgr: what the mgr serves (``ceph pg ...``, ``rbd perf``, ``ceph
osd pool stats``) hangs until the command's timeout; RBD itself (create,
resize, snapshots, clones, ``rbd du``) needs none.  A command fails at once
(with the log tails) when a daemon of the cluster dies while it runs.

The daemons run in the foreground (``-f``) as children of this process
(their pid is known, no pid-file races) in a session of their own, and die
with the thread that started them if it dies without ``stop()``
(PR_SET_PDEATHSIG, set only when started from the main thread).  Their logs
are ``mon.a.log`` / ``osd.0.log`` / ``cluster.log`` (and ``*.out`` for
stdout/stderr) in the cluster directory.  Standard library only.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

BINARIES = {
    "ceph-mon": "ceph-mon",
    "ceph-osd": "ceph-osd",
    "ceph": "ceph-common",
    "rbd": "ceph-common",
    "rados": "ceph-common",
    "ceph-authtool": "ceph-common",
    "monmaptool": "ceph-common",
}
CLASS_DIR = Path("/usr/lib/x86_64-linux-gnu/rados-classes")

OSD_BLOCK_SIZE = 10 << 30  # sparse: only what is written takes disk space
OSD_MEMORY_TARGET = 1 << 30
LOG_TAIL_LINES = 25


class CephError(RuntimeError):
    """The cluster could not start, a daemon died, or a command failed."""


def ceph_available() -> str | None:
    """None when this machine can run the testbed, else why not."""
    missing = sorted({pkg for exe, pkg in BINARIES.items() if shutil.which(exe) is None})
    if missing:
        return (f"Ceph not installed: {', '.join(missing)} missing "
                f"(apt-get install ceph-mon ceph-osd ceph-common)")
    if not any(CLASS_DIR.glob("libcls_rbd.so*")):
        return f"Ceph OSD object class cls_rbd missing ({CLASS_DIR}; package ceph-osd)"
    return None


def _secret() -> str:
    """A cephx key as ceph-authtool --gen-print-key makes it: type 1 (AES),
    creation time, 16 random bytes."""
    now = time.time()
    raw = struct.pack("<HIIH", 1, int(now), int((now % 1) * 1e9), 16) + os.urandom(16)
    return base64.b64encode(raw).decode()


def _keyring(entries: dict[str, tuple[str, dict[str, str]]]) -> str:
    out = []
    for name, (key, caps) in entries.items():
        out.append(f"[{name}]\n\tkey = {key}\n")
        out.extend(f'\tcaps {sub} = "{cap}"\n' for sub, cap in caps.items())
    return "".join(out)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"({e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


def _pdeathsig() -> None:  # runs in the child between fork and exec
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class CephCluster:
    """One mon + one OSD in a fresh directory; see the module docstring."""

    client_id = "admin"
    mon_id = "a"
    osd_id = 0

    def __init__(self, keep_dir: bool = False, pool: str = "rbd", pg_num: int = 8):
        self.keep_dir = keep_dir
        self.pool = pool
        self.pg_num = pg_num
        self.dir: Path | None = None
        self.port = 0
        self.fsid = ""
        self.start_seconds: float | None = None  # nothing to a usable pool
        self.stop_seconds: float | None = None
        self._mon: subprocess.Popen | None = None
        self._osd: subprocess.Popen | None = None
        self._procs: list[subprocess.Popen] = []  # every daemon started, for stop()
        self._osd_up_from = 0  # the osdmap epoch the running OSD came up in
        self._need_osd = False  # commands fail early when the OSD dies (starting)

    # ------------------------------------------------------------------
    # paths

    @property
    def conf(self) -> str:
        return str(self._path("ceph.conf"))

    @property
    def keyring(self) -> str:
        return str(self._path("client.admin.keyring"))

    @property
    def mon_addr(self) -> str:
        return f"v2:127.0.0.1:{self.port}"

    @property
    def osd_pid(self) -> int | None:
        """The running OSD's pid, None while it is stopped."""
        if self._osd is None or self._osd.poll() is not None:
            return None
        return self._osd.pid

    @property
    def mon_pid(self) -> int | None:
        if self._mon is None or self._mon.poll() is not None:
            return None
        return self._mon.pid

    def _path(self, name: str) -> Path:
        if self.dir is None:
            raise CephError("cluster not started")
        return self.dir / name

    # ------------------------------------------------------------------
    # lifecycle

    def __enter__(self) -> CephCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 90.0) -> CephCluster:
        """Make and start the cluster; returns once ``pool`` takes I/O.
        Raises CephError (with the daemons' log tails) after ``timeout``
        seconds or when a daemon dies; nothing is left running then."""
        reason = ceph_available()
        if reason:
            raise CephError(reason)
        if self.dir is not None:
            raise CephError("cluster already started")
        t0 = time.monotonic()
        deadline = t0 + timeout
        for attempt in range(3):
            atexit.register(self.stop)
            try:
                self._need_osd = True
                self._start(deadline)
                break
            except BaseException as e:
                # the free port was taken before the monitor bound it: again
                retry = "Address already in use" in str(e) and attempt < 2
                self.stop(keep_dir=self.keep_dir and not retry)
                if not retry:
                    if isinstance(e, CephError):
                        raise CephError(f"Ceph cluster did not start: {e}") from None
                    raise
            finally:
                self._need_osd = False
        self.start_seconds = time.monotonic() - t0
        return self

    def _start(self, deadline: float) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bsceph", dir="/tmp"))
        self.dir.chmod(0o755)  # clients running as another user (QEMU) read conf and key
        self.port = _free_port()
        self.fsid = str(uuid.uuid4())
        self._write_conf()
        self._write_keys()

        self._check_call(["monmaptool", "--create", "--fsid", self.fsid,
                          "--addv", self.mon_id, f"[{self.mon_addr}]",
                          str(self._path("monmap"))], deadline)
        self._check_call(["ceph-mon", "--conf", self.conf, "--mkfs", "-i", self.mon_id,
                          "--monmap", str(self._path("monmap")),
                          "--keyring", str(self._path("mon.keyring"))], deadline)
        self._mon = self._spawn("mon." + self.mon_id,
                                ["ceph-mon", "--conf", self.conf, "-f", "-i", self.mon_id])

        # BlueStore mkfs needs no monitor: done while the monitor comes up
        osd_uuid = str(uuid.uuid4())
        self._path(f"osd.{self.osd_id}").mkdir()
        mkfs = self._spawn(f"osd.{self.osd_id}.mkfs",
                           ["ceph-osd", "--conf", self.conf, "--no-mon-config", "--mkfs",
                            "-i", str(self.osd_id), "--osd-uuid", osd_uuid])
        self.run("ceph", "osd", "new", osd_uuid, str(self.osd_id),
                 timeout=self._left(deadline, "the monitor to answer"))
        try:
            rc = mkfs.wait(self._left(deadline, "OSD mkfs"))
        except subprocess.TimeoutExpired:
            raise self._error("timed out waiting for OSD mkfs") from None
        if rc != 0:
            raise self._error(f"ceph-osd --mkfs exited with {rc}")
        self._procs.remove(mkfs)

        self._start_osd(deadline)
        # pool only once the OSD is up: its PGs are created at once
        self.run("ceph", "osd", "pool", "create", self.pool, str(self.pg_num), str(self.pg_num),
                 "replicated", timeout=self._left(deadline, "pool create"))
        self.run("rbd", "pool", "init", self.pool, timeout=self._left(deadline, "rbd pool init"))

    def stop(self, keep_dir: bool | None = None) -> None:
        """Stop the OSD, then the monitor (the OSD would otherwise wait for
        the gone monitor), kill whatever of ours is left, remove the dir
        (unless ``keep_dir``, default: the constructor's)."""
        atexit.unregister(self.stop)
        if keep_dir is None:
            keep_dir = self.keep_dir
        if self.dir is None:
            return
        t0 = time.monotonic()
        if self._osd is not None:  # waits 5 s for a monitor that is gone: not for that
            self._terminate(self._osd, grace=15.0 if self.mon_pid is not None else 0)
        if self._mon is not None:
            self._terminate(self._mon)
        for p in self._procs:
            self._terminate(p, grace=0)
        for pidfile in self.dir.glob("*.pid"):  # none expected: belt and braces
            self._kill_stray(pidfile)
        self._procs.clear()
        self._mon = self._osd = None
        if not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        self.stop_seconds = time.monotonic() - t0

    def stop_osd(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        """Send the OSD ``sig`` (SIGKILL for a crash) and wait for it to exit
        (SIGKILL after ``timeout``); returns with the OSD marked down (it asks
        the monitor itself on SIGTERM; forced here otherwise)."""
        if self._osd is None:
            raise CephError("OSD not running")
        self._osd.send_signal(sig)  # no-op if it has exited (Popen knows)
        try:
            self._osd.wait(timeout)
        except subprocess.TimeoutExpired:
            self._osd.kill()
        self._forget_osd()
        if self._osd_info()["up"]:
            self.run("ceph", "osd", "down", str(self.osd_id))

    def start_osd(self, timeout: float = 60.0) -> None:
        """Start the OSD again on the same store; returns once the monitor
        has it up (a new boot, not the old instance)."""
        if self.osd_pid is not None:
            raise CephError("OSD already running")
        self._forget_osd()  # it may have been killed behind our back
        self._need_osd = True
        try:
            self._start_osd(time.monotonic() + timeout)
        finally:
            self._need_osd = False

    def _forget_osd(self) -> None:
        if self._osd is not None:
            self._osd.wait()
            self._procs.remove(self._osd)
            self._osd = None

    def _start_osd(self, deadline: float) -> None:
        name = f"osd.{self.osd_id}"
        self._osd = self._spawn(name, ["ceph-osd", "--conf", self.conf, "-f",
                                       "-i", str(self.osd_id)])
        while True:
            info = self._osd_info(timeout=self._left(deadline, f"{name} up"))
            if info["up"] and info["in"] and info["up_from"] > self._osd_up_from:
                self._osd_up_from = info["up_from"]
                return
            self._pause(deadline, f"{name} up and in")

    def _osd_info(self, timeout: float = 30.0) -> dict:
        dump = json.loads(self.run("ceph", "osd", "dump", "--format", "json", timeout=timeout))
        for osd in dump["osds"]:
            if osd["osd"] == self.osd_id:
                return osd
        raise CephError(f"osd.{self.osd_id} not in the osdmap: {dump['osds']}")

    # ------------------------------------------------------------------
    # commands

    def run(self, tool: str, *args: str, input: bytes | None = None,
            timeout: float = 60.0) -> str:
        """Run ``tool`` (ceph, rbd, rados, ...) with ``--conf``; its stdout."""
        return self._exec(tool, *args, input=input, timeout=timeout).decode(errors="replace")

    def _exec(self, tool: str, *args: str, input: bytes | None = None,
              timeout: float = 60.0) -> bytes:
        """Run the command; fails early (with the log tails) when a daemon of
        the cluster dies meanwhile: the CLI would wait for it forever."""
        cmd = [tool, "--conf", self.conf, *args]
        text = " ".join(cmd)
        end = time.monotonic() + timeout
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with p:
            pending = input  # handed over once: communicate() carries on with it
            while True:
                slice_ = max(0.01, min(0.2, end - time.monotonic()))
                try:
                    out, err = p.communicate(pending, timeout=slice_)
                    break
                except subprocess.TimeoutExpired:
                    pending = None
                dead = self._dead_daemon()
                if dead or time.monotonic() >= end:
                    p.kill()
                    _, err = p.communicate()
                    why = f"{dead} died" if dead else f"timed out after {timeout:.1f}s"
                    raise self._error(f"{text}: {why}\n{err.decode(errors='replace')}")
        if p.returncode != 0:
            raise CephError(f"{text}: exit {p.returncode}: {err.decode(errors='replace').strip()}")
        return out

    def _dead_daemon(self) -> str | None:
        """Which daemon that must be running has exited, with its status: the
        monitor always, the OSD while starting (tests may kill it on purpose:
        I/O then waits for it, as it would with a real cluster)."""
        daemons = [(f"mon.{self.mon_id}", self._mon)]
        if self._need_osd:
            daemons.append((f"osd.{self.osd_id}", self._osd))
        for name, proc in daemons:
            if proc is not None and proc.poll() is not None:
                return f"{name} (exit status {proc.returncode})"
        return None

    def _image(self, name: str) -> str:
        return f"{self.pool}/{name}"

    def create_image(self, name: str, size_bytes: int, *args: str) -> None:
        """A format 2 image with the default features; ``args`` go to
        ``rbd create`` (e.g. ``"--object-size", "1M"``)."""
        self.run("rbd", "create", "--size", f"{size_bytes}B", *args, self._image(name))

    def remove_image(self, name: str) -> None:
        self.run("rbd", "rm", "--no-progress", self._image(name))

    def image_info(self, name: str) -> dict:
        return json.loads(self.run("rbd", "info", "--format", "json", self._image(name)))

    def image_size(self, name: str) -> int:
        return int(self.image_info(name)["size"])

    def list_images(self) -> list[str]:
        return json.loads(self.run("rbd", "ls", "--format", "json", self.pool))

    def export_image(self, name: str, timeout: float = 120.0) -> bytes:
        """The whole image's bytes (for small images)."""
        return self._exec("rbd", "export", "--no-progress", self._image(name), "-",
                          timeout=timeout)

    def write_image(self, name: str, offset: int, data: bytes, timeout: float = 120.0) -> None:
        """Write ``data`` at ``offset`` of an existing image, zeroes included,
        through ``rbd import-diff`` of a one-extent diff (format v1) on stdin.
        It must fit in the image: librbd would silently cut a write that
        crosses the end."""
        size = self.image_size(name)
        if offset < 0 or offset + len(data) > size:
            raise ValueError(f"write of {len(data)} bytes at {offset} outside {name} "
                             f"({size} bytes)")
        diff = b"".join([
            b"rbd diff v1\n",
            b"w", struct.pack("<QQ", offset, len(data)), data,
            b"e",
        ])
        self._exec("rbd", "import-diff", "--no-progress", "-", self._image(name),
                   input=diff, timeout=timeout)

    # ------------------------------------------------------------------
    # internals

    def _write_conf(self) -> None:
        d = self.dir
        assert d is not None
        conf = f"""\
[global]
fsid = {self.fsid}
mon host = [{self.mon_addr}]
mon initial members = {self.mon_id}
ms bind msgr1 = false
ms bind msgr2 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {d}
crash dir = {d}/crash
log file = {d}/$name.log
admin socket = {d}/$name.asok
pid file = {d}/$name.pid
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
auth allow insecure global id reclaim = false

[mon]
mon data = {d}/mon.$id
# the port was free a moment ago: if it is taken now, exit at once (start()
# tries another) rather than retrying every 5 s
ms bind retry count = 1
mon cluster log file = {d}/cluster.log
paxos propose interval = 0.01
# the host disk's free space is not the cluster's business here
mon data avail warn = 1
mon data avail crit = 0

[osd]
osd data = {d}/osd.$id
keyring = {d}/$name.keyring
public addr = 127.0.0.1
cluster addr = 127.0.0.1
osd objectstore = bluestore
bluestore block create = true
bluestore block size = {OSD_BLOCK_SIZE}
osd memory target = {OSD_MEMORY_TARGET}
bluestore fsck on mkfs = false
# the aio thread waits this long for events: every close of the block file
# (8 in mkfs and boot) waited up to 250 ms for it
bdev aio poll ms = 20
# a client that stops answering (a host cut off) loses its watches, and with
# them an RBD image's exclusive lock, after this long (default 30 s)
osd client watch timeout = 5

[client]
keyring = {d}/client.admin.keyring
admin socket =
log file =
"""
        self._path("ceph.conf").write_text(conf)
        self._path("ceph.conf").chmod(0o644)

    def _write_keys(self) -> None:
        admin = _secret()
        osd = _secret()
        admin_caps = {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"}
        osd_caps = {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"}
        osd_name = f"osd.{self.osd_id}"
        self._path("mon.keyring").write_text(_keyring({
            "mon.": (_secret(), {"mon": "allow *"}),
            "client.admin": (admin, admin_caps),  # imported into the auth db by mkfs
            osd_name: (osd, osd_caps),
        }))
        self._path(f"{osd_name}.keyring").write_text(_keyring({osd_name: (osd, {})}))
        Path(self.keyring).write_text(_keyring({"client.admin": (admin, admin_caps)}))
        Path(self.keyring).chmod(0o644)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self._path(f"{name}.out"), "ab") as out:
            p = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_pdeathsig if threading.current_thread() is threading.main_thread()
                else None,
            )
        self._procs.append(p)
        return p

    def _check_call(self, cmd: list[str], deadline: float) -> None:
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                               timeout=self._left(deadline, cmd[0]))
        except subprocess.TimeoutExpired:
            raise self._error(f"{' '.join(cmd)}: timed out") from None
        if p.returncode != 0:
            raise self._error(f"{' '.join(cmd)}: exit {p.returncode}: "
                              f"{(p.stdout + p.stderr).decode(errors='replace').strip()}")

    def _left(self, deadline: float, what: str) -> float:
        """Seconds left before ``deadline``; raises when a daemon died or
        none are left."""
        for p in self._procs:
            rc = p.poll()
            if rc is not None and (rc != 0 or p in (self._mon, self._osd)):
                raise self._error(f"{' '.join(p.args)} exited with {rc} (waiting for {what})")
        left = deadline - time.monotonic()
        if left <= 0:
            raise self._error(f"timed out waiting for {what}")
        return left

    def _pause(self, deadline: float, what: str) -> None:
        """Between two polls of a condition."""
        time.sleep(min(0.05, self._left(deadline, what)))

    def _error(self, msg: str) -> CephError:
        if self.dir is None:
            return CephError(msg)
        parts = [f"{msg}\n(cluster dir {self.dir})"]
        for log in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")):
            if log.stat().st_size:
                parts.append(f"--- {log.name} (last lines) ---\n{_tail(log)}")
        return CephError("\n".join(parts))

    @staticmethod
    def _terminate(p: subprocess.Popen, grace: float = 15.0) -> None:
        if p.poll() is not None:
            return
        if grace > 0:
            p.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(grace)
                return
        p.kill()
        p.wait()

    def _kill_stray(self, pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if self.conf.encode() in cmdline.split(b"\0"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def session_cluster(timeout: float = 90.0,
                    report: Callable[[str], object] = print) -> Iterator[CephCluster]:
    """Body of a session-scoped fixture::

        @pytest.fixture(scope="session")
        def ceph_cluster():
            yield from session_cluster()

    Skips the test when Ceph is not installed; ``report`` gets one line at
    start and one at stop (e.g. the terminal reporter's ``write_line``, which
    pytest does not capture)."""
    import pytest

    reason = ceph_available()
    if reason:
        pytest.skip(reason)
    cluster = CephCluster()
    cluster.start(timeout)
    report(f"Ceph cluster up in {cluster.start_seconds:.1f}s in {cluster.dir} "
           f"(mon {cluster.mon_addr})")
    try:
        yield cluster
    finally:
        cluster.stop()
        report(f"Ceph cluster stopped in {cluster.stop_seconds:.2f}s")
