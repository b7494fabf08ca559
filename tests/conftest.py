"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest as g  # noqa: E402
from apiserver import ApiServer, worker_pids  # noqa: E402


@pytest.fixture(scope="session")
def guest_image():
    """The Debian guest kernel + initramfs, built once (cached on disk)."""
    try:
        return g.build_guest_image()
    except g.GuestUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture
def fresh_state():
    """A state dir of its own for tests that restart daemons; every daemon
    and worker started on it is gone afterwards."""
    d = Path(tempfile.mkdtemp(prefix="bsapi-", dir="/tmp"))
    servers: list[ApiServer] = []

    def new(**kw) -> ApiServer:
        servers.append(ApiServer(state_dir=d, **kw))
        return servers[-1].start()
    yield d, new
    for s in servers:
        s.cleanup()
    for pid in worker_pids(d):
        os.kill(pid, signal.SIGKILL)
    (d.parent / f"{d.name}.serve.log").unlink(missing_ok=True)
    shutil.rmtree(d, ignore_errors=True)
