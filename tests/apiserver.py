"""A real `blkserve serve` process for tests, and a small client for it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def wait_for(pred, timeout: float = 10.0, what: str = "condition", interval: float = 0.05):
    """PRED's first true value, polled every INTERVAL s; AssertionError naming
    WHAT after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_inflight(stats_file: str | os.PathLike, timeout: float) -> int:
    """Requests in flight in an export worker, from its stats block, polled
    until nonzero or TIMEOUT s; 0 if none was seen."""
    from blkserve import stats as bstats

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            n = sum(q.inflight for q in bstats.read(str(stats_file)).queues)
        except bstats.StatsError:
            n = 0
        if n:
            return n
        time.sleep(0.001)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(state_dir: str | os.PathLike) -> list[int]:
    """Pids of `blkserve export` workers serving sockets under STATE_DIR."""
    marker = str(Path(state_dir) / "sockets").encode()
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"export" in argv and any(a.startswith(marker) for a in argv):
            pids.append(int(d))
    return pids


class ApiServer:
    """`python -m blkserve serve` on a free loopback port with its own state dir.

    ``stop()`` leaves the export workers running (as the daemon does);
    ``cleanup()`` also kills them, and removes the state dir if it made it."""

    def __init__(self, state_dir: str | os.PathLike | None = None, token: str | None = "t0k",
                 config: str | os.PathLike | None = None, port: int | None = None):
        # short path: export sockets live under it and sun_path is 108 bytes
        self._own_state = state_dir is None  # a temporary dir: removed by cleanup()
        self.state_dir = Path(state_dir or tempfile.mkdtemp(prefix="bsapi-"))
        self.token = token
        self.config = config
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.state_dir.parent / f"{self.state_dir.name}.serve.log"

    def start(self, timeout: float = 30.0) -> ApiServer:
        env = {k: v for k, v in os.environ.items()
               if k not in ("BLKSERVE_API_TOKEN", "BLKSERVE_URL", "BLKSERVE_STATE_DIR")}
        if self.token is not None:
            env["BLKSERVE_API_TOKEN"] = self.token
        argv = [sys.executable, "-m", "blkserve", "serve", "--listen",
                f"127.0.0.1:{self.port}", "--state-dir", str(self.state_dir)]
        if self.config:
            argv += ["--config", str(self.config)]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"blkserve serve exited: {self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    if self.token is None:
                        self.token = (self.state_dir / "api-token").read_text().strip()
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"blkserve serve did not answer in {timeout} s: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self._log.close()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        for pid in worker_pids(self.state_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.log_path.unlink(missing_ok=True)

    def client(self, token: str | None = None, timeout: float = 120.0) -> httpx.Client:
        tok = self.token if token is None else token
        headers = {"Authorization": f"Bearer {tok}"} if tok else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()


@contextlib.contextmanager
def serving(**kw):
    """A started ApiServer(**kw) for a module's tests: when they are done,
    its log must show no traceback and no internal error; then it goes."""
    server = ApiServer(**kw)
    try:
        server.start()
        yield server
        log = server.log()
        assert "Traceback" not in log and "internal error" not in log, log
    finally:
        server.cleanup()
