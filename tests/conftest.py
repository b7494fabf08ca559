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

# Every temporary directory the tests make goes under one root of this
# session's, removed when the session ends: a run leaves nothing in /tmp.
# Short (unix socket paths live there: sun_path is 108 bytes) and
# traversable (QEMU under libvirt runs as another user).
# (pytest's own tmp_path dirs stay where they were, kept for a look after a
# failure.)
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
SESSION_TMP = tempfile.mkdtemp(prefix="bst-", dir="/tmp")
os.chmod(SESSION_TMP, 0o755)
tempfile.tempdir = SESSION_TMP


def pytest_sessionfinish(session, exitstatus):
    with open("/proc/self/mounts") as f:
        mounted = [line.split()[1] for line in f
                   if line.split()[1].startswith(SESSION_TMP + "/")]
    if mounted:  # never recurse into a file system a test left mounted
        print(f"\nleft {SESSION_TMP} in place: still mounted there: {mounted}")
        return
    shutil.rmtree(SESSION_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def ceph(request):
    """One real Ceph cluster (a monitor and a BlueStore OSD, cephx, on
    127.0.0.1) for the whole session: tests/ceph.py."""
    from ceph import session_cluster

    plugins = request.config.pluginmanager
    terminal = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")

    def report(line: str) -> None:  # on the terminal, also without -s
        with capture.global_and_fixture_disabled():
            terminal.write_line("\n" + line)

    yield from session_cluster(report=report)


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
    d = Path(tempfile.mkdtemp(prefix="bsapi-"))
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


@pytest.fixture
def tmp():
    """A short directory (sockets fit in sun_path) that QEMU, whoever it runs
    as, can search; removed afterwards."""
    d = Path(tempfile.mkdtemp(prefix="bsq-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)
