"""`blkserve bench` (the C vhost-user frontend of native/bench.c) as a real
process: against `blkserve export`, against qemu-storage-daemon (the
reference backend), against a deliberately broken fake backend, and with
bad arguments.  Functional only: no timing assertions."""

from __future__ import annotations

import json
import mmap
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import blkserve

# Run `python -m blkserve` from the same package this test process imported
# (the source tree, or e.g. a sanitizer build put first on PYTHONPATH).
ROOT = Path(blkserve.__file__).resolve().parent.parent
QSD = shutil.which("qemu-storage-daemon")
IMG_SIZE = 64 << 20
VERIFY_SIZE = "8M"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def bench(sock: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blkserve", "bench", "--socket", sock, *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env(),
    )


def bench_json(sock: str, *args: str) -> dict:
    p = bench(sock, "--json", *args)
    assert p.returncode == 0, f"rc={p.returncode}\nstdout={p.stdout}\nstderr={p.stderr}"
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout       # exactly one JSON object
    return json.loads(lines[0])


def _wait_socket(path: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 15
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"backend did not start:\n{log.read_text()}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    return proc.returncode


@pytest.fixture(scope="module")
def sockdirs():
    """Short socket directories under /tmp (sun_path is 108 bytes), removed
    at the end."""
    made: list[str] = []

    def make(prefix: str) -> str:
        made.append(tempfile.mkdtemp(prefix=prefix))
        return made[-1]
    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def _image(tmp: Path) -> Path:
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.truncate(IMG_SIZE)
    return img


@pytest.fixture(scope="module")
def blkserve_sock(tmp_path_factory, sockdirs):
    tmp = tmp_path_factory.mktemp("bench-bs")
    img = _image(tmp)
    sock = os.path.join(sockdirs("bsb-"), "blk.sock")
    log = tmp / "export.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blkserve", "export", str(img), "--socket", sock,
             "--queues", "2"],
            stdout=subprocess.DEVNULL, stderr=logf, cwd=ROOT, env=_env(),
        )
    try:
        _wait_socket(sock, proc, log)
        yield sock
        assert proc.poll() is None, f"blkserve export died:\n{log.read_text()}"
    finally:
        rc = _stop(proc)
    assert rc == 0, log.read_text()


@pytest.fixture(scope="module")
def qsd_sock(tmp_path_factory, sockdirs):
    if QSD is None:
        pytest.skip("qemu-storage-daemon not installed")
    tmp = tmp_path_factory.mktemp("bench-qsd")
    img = _image(tmp)
    sock = os.path.join(sockdirs("bsq-"), "blk.sock")
    log = tmp / "qsd.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [QSD,
             "--blockdev", f"driver=file,node-name=f0,filename={img},cache.direct=on,"
             "aio=io_uring",
             "--export", "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
             f"addr.path={sock},writable=on,num-queues=2"],
            stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    try:
        _wait_socket(sock, proc, log)
        yield sock
        assert proc.poll() is None, f"qemu-storage-daemon died:\n{log.read_text()}"
    finally:
        _stop(proc)


@pytest.fixture(params=["blkserve", "qsd"])
def backend(request):
    return request.getfixturevalue(f"{request.param}_sock")


def _check_result(r: dict, *, queues: int, reads: bool, writes: bool) -> None:
    for key in ("iops", "bw_bytes", "errors", "ios", "runtime_s", "per_queue"):
        assert key in r
    assert set(r["lat_ns"]) >= {"mean", "p50", "p99", "p999"}
    assert r["errors"] == 0 and r["verify_errors"] == 0 and r["io_errors"] == 0
    assert r["ios"] > 0 and r["iops"] > 0 and r["bw_bytes"] > 0
    assert (r["read_ios"] > 0) == reads and (r["write_ios"] > 0) == writes
    lat = r["lat_ns"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p999"] and lat["mean"] > 0
    assert len(r["per_queue"]) == queues
    assert all(q["ios"] > 0 for q in r["per_queue"])
    assert sum(q["ios"] for q in r["per_queue"]) == r["ios"]


@pytest.mark.parametrize("rw,queues", [("randrw", 2), ("randwrite", 1), ("read", 1)])
def test_verify(backend, rw, queues):
    """Prefill with a pattern, run the workload checking every read, read the
    range back after a workload that writes: no request fails, nothing
    mismatches, on blkserve and on qemu-storage-daemon alike."""
    r = bench_json(backend, "--rw", rw, "--queues", str(queues), "--verify",
                   "--size", VERIFY_SIZE, "--runtime", "1")
    _check_result(r, queues=queues, reads=rw != "randwrite", writes=rw != "read")
    assert r["verify"] is True and r["size"] == 8 << 20


def test_verify_detects_corruption(tmp_path, sockdirs):
    """Zeroes written into the image behind the backend's back must show up as
    verify errors at the right place, and make the exit status 1."""
    img = _image(tmp_path)
    sock = os.path.join(sockdirs("bsc-"), "blk.sock")
    log = tmp_path / "export.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blkserve", "export", str(img), "--socket", sock,
             "--cache", "writeback"],
            stdout=subprocess.DEVNULL, stderr=logf, cwd=ROOT, env=_env())
    try:
        _wait_socket(sock, proc, log)
        p = subprocess.Popen(
            [sys.executable, "-m", "blkserve", "bench", "--socket", sock, "--json",
             "--rw", "randread", "--verify", "--size", "4M", "--runtime", "1.5",
             "--iodepth", "8"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
        # The prefill pass rewrites the image first, so keep corrupting
        # [1 MiB, 2 MiB) while the run goes on.
        with open(img, "r+b") as f:
            while p.poll() is None:
                f.seek(1 << 20)
                f.write(b"\0" * (1 << 20))
                f.flush()
                time.sleep(0.05)
        out, err = p.communicate()
    finally:
        _stop(proc)
    assert p.returncode == 1, err
    r = json.loads(out)
    assert r["verify_errors"] > 0 and r["io_errors"] == 0
    assert r["errors"] == r["verify_errors"]
    assert (1 << 20) <= r["first_bad_offset"] < (2 << 20)


def test_randread_two_queues_indirect(backend):
    r = bench_json(backend, "--rw", "randread", "--queues", "2", "--iodepth", "16",
                   "--indirect", "--runtime", "1", "--ramp", "0.2")
    _check_result(r, queues=2, reads=True, writes=False)
    assert r["frontend"]["indirect"] is True
    assert r["backend"]["capacity"] == IMG_SIZE


def test_dirty_log(backend):
    """--dirty-log runs as during a live migration (SET_LOG_BASE, LOG_ALL,
    the log flag on the rings): the requests complete as usual and the
    backend has marked the pages it wrote in the log, each data buffer (a
    page of its own per request slot) among them; on blkserve and on
    qemu-storage-daemon alike."""
    r = bench_json(backend, "--rw", "randread", "--queues", "2", "--iodepth", "16",
                   "--dirty-log", "--runtime", "1")
    _check_result(r, queues=2, reads=True, writes=False)
    assert r["frontend"]["dirty_log"] is True
    assert r["frontend"]["dirty_pages"] >= 2 * 16, r["frontend"]


def test_qd1_no_polling(blkserve_sock):
    r = bench_json(blkserve_sock, "--iodepth", "1", "--poll-us", "0", "--runtime", "1",
                   "--bs", "8k")
    _check_result(r, queues=1, reads=True, writes=False)
    assert r["bs"] == 8192 and r["frontend"]["event_idx"] is True
    assert r["sleeps"] > 0        # without polling every wait blocks on the call fd


def test_text_output(blkserve_sock):
    p = bench(blkserve_sock, "--runtime", "0.5", "--iodepth", "4")
    assert p.returncode == 0, p.stderr
    assert "iops" in p.stdout and "p99.9" in p.stdout and "errors  : 0" in p.stdout


def test_too_many_queues(blkserve_sock):
    p = bench(blkserve_sock, "--queues", "3", "--runtime", "1")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "queue" in p.stderr, p.stderr


# ---- bad arguments and bad sockets: one line on stderr, status 2 ----

@pytest.mark.parametrize("args", [
    ["--bs", "1000"],
    ["--bs", "4x"],
    ["--iodepth", "0"],
    ["--queues", "65"],
    ["--runtime", "-1"],
    ["--rw", "trim"],
    ["--size", "100"],
])
def test_bad_arguments(tmp_path, args):
    p = bench(str(tmp_path / "nothing.sock"), *args)
    assert p.returncode == 2, p
    assert p.stderr.startswith("blkserve bench: error: ") and p.stderr.count("\n") == 1
    assert p.stdout == ""


def test_bad_socket_path(tmp_path):
    p = bench(str(tmp_path / "missing.sock"), "--runtime", "1")
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1
    assert "cannot connect" in p.stderr and "No such file" in p.stderr


def test_socket_path_is_not_a_socket(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"")
    p = bench(str(f), "--runtime", "1")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "not a unix socket" in p.stderr


def test_nobody_listening(sockdirs):
    path = sockdirs("bsn-") + "/dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)             # bound but not listening: connection refused
    try:
        p = bench(path, "--runtime", "1")
    finally:
        s.close()
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert "Connection refused" in p.stderr


# ---- a broken backend must end the run with an error, never a crash ----

HDR = struct.Struct("<III")
F_VERSION_1, F_PROTOCOL_FEATURES, F_EVENT_IDX = 1 << 32, 1 << 30, 1 << 29
PF_REPLY_ACK, PF_CONFIG = 1 << 3, 1 << 9


class FakeBackend(threading.Thread):
    """A minimal vhost-user-blk backend that misbehaves in one chosen way."""

    def __init__(self, mode: str):
        super().__init__(daemon=True)
        self.mode = mode
        self.dir = tempfile.mkdtemp(prefix="bsf-")
        self.path = self.dir + "/fake.sock"
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(self.path)
        self.srv.listen(1)
        self.mem = None
        self.used_uva = self.region_uva = 0
        self.fds: list[int] = []

    def reply(self, c, req: int, payload: bytes, flags: int = 0x5) -> None:
        c.sendall(HDR.pack(req, flags, len(payload)) + payload)

    def run(self) -> None:
        c, _ = self.srv.accept()
        with c:
            if self.mode == "hangup":
                return
            while True:
                try:
                    hdr, fds, _, _ = socket.recv_fds(c, HDR.size, 8)
                except OSError:
                    return
                if len(hdr) < HDR.size:
                    return
                req, flags, size = HDR.unpack(hdr)
                payload = b""
                while len(payload) < size:
                    chunk = c.recv(size - len(payload))
                    if not chunk:
                        return
                    payload += chunk
                self.fds += fds
                if not self.handle(c, req, flags, payload, fds):
                    return

    def handle(self, c, req, flags, payload, fds) -> bool:
        m = self.mode
        if req == 1:    # GET_FEATURES
            if m == "bad_version":
                self.reply(c, req, struct.pack("<Q", F_VERSION_1), flags=0x6)
            elif m == "huge_reply":
                c.sendall(HDR.pack(req, 0x5, 1 << 20) + b"\0" * 4096)
            elif m == "wrong_request":
                self.reply(c, 2, struct.pack("<Q", F_VERSION_1))
            elif m == "short_reply":
                self.reply(c, req, b"\0\0\0\0")
            elif m == "no_version_1":
                self.reply(c, req, struct.pack("<Q", F_PROTOCOL_FEATURES))
            else:
                self.reply(c, req, struct.pack("<Q", F_VERSION_1 | F_PROTOCOL_FEATURES
                                               | F_EVENT_IDX))
        elif req == 15:  # GET_PROTOCOL_FEATURES
            self.reply(c, req, struct.pack("<Q", PF_REPLY_ACK | PF_CONFIG))
        elif req == 24:  # GET_CONFIG: 1 MiB device
            off, size, fl = struct.unpack_from("<III", payload)
            if m == "bad_config":
                self.reply(c, req, struct.pack("<III", off, size + 4, fl) + bytes(size + 4))
            else:
                cfg = struct.pack("<Q", 2048).ljust(size, b"\0")
                self.reply(c, req, struct.pack("<III", off, size, fl) + cfg)
        elif req == 11:  # GET_VRING_BASE
            self.reply(c, req, payload)
        else:
            if req == 5:     # SET_MEM_TABLE
                _, _, gpa, size, uva, off = struct.unpack_from("<IIQQQQ", payload)
                self.mem = mmap.mmap(fds[0], size + off)
                self.region_uva = uva
            elif req == 9:   # SET_VRING_ADDR
                _, _, _desc, used, _avail, _ = struct.unpack("<IIQQQQ", payload)
                self.used_uva = used
            elif req == 12:  # SET_VRING_KICK
                self.kick_fd = fds[0]
            elif req == 13:  # SET_VRING_CALL
                self.call_fd = fds[0]
            if flags & 0x8:  # NEED_REPLY
                code = 1 if (m == "nack_mem_table" and req == 5) else 0
                self.reply(c, req, struct.pack("<Q", code))
            if req == 18 and m == "bad_used":   # SET_VRING_ENABLE: serve junk
                threading.Thread(target=self.bad_used, daemon=True).start()
            if req == 18 and m == "stall":      # never complete, but keep waking
                threading.Thread(target=self.stall, daemon=True).start()
        return True

    def bad_used(self) -> None:
        select.select([self.kick_fd], [], [], 10)   # the kick fd is non-blocking
        off = self.used_uva - self.region_uva
        struct.pack_into("<II", self.mem, off + 4, 999, 0)   # id 999: never submitted
        struct.pack_into("<H", self.mem, off + 2, 1)
        os.write(self.call_fd, struct.pack("<Q", 1))

    def stall(self) -> None:
        while not self.closed:
            try:
                os.write(self.call_fd, struct.pack("<Q", 1))   # spurious notifications
            except OSError:
                return
            time.sleep(0.01)

    closed = False

    def close(self) -> None:
        self.closed = True
        time.sleep(0.02)
        self.srv.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.mark.parametrize("mode,message", [
    ("hangup", "closed the connection"),
    ("bad_version", "protocol version"),
    ("huge_reply", "at most 8 expected"),
    ("wrong_request", "message type 2"),
    ("short_reply", "expected 8"),
    ("no_version_1", "VERSION_1"),
    ("bad_config", "GET_CONFIG"),
    ("nack_mem_table", "rejected SET_MEM_TABLE"),
    ("bad_used", "not the head of a request in flight"),
    ("stall", "no request completed for"),
])
def test_broken_backend(mode, message):
    fake = FakeBackend(mode)
    fake.start()
    try:
        p = bench(fake.path, "--runtime", "1", "--iodepth", "4", "--timeout", "0.5",
                  timeout=30)
    finally:
        fake.close()
    assert p.returncode == 1, (p.returncode, p.stderr)    # an error, not a signal
    assert p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
