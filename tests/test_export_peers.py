"""`blkserve export --allow-peer-pid / --allow-peers-file`: an export serves
only the frontend processes it is told to (SO_PEERCRED of each accepted
connection); any other process is refused with a log line, even while the
allowed one waits to connect.  The allowed-peers file is re-read at every
connection, so the set changes without a restart."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_client as vc  # noqa: E402
from test_export import start_export, stop_export  # noqa: E402

from blkserve import peers  # noqa: E402

# A foreign frontend: another process that connects and asks GET_FEATURES.
FOREIGN = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    s.sendall(struct.pack("<III", 1, 1, 0))  # VHOST_USER_GET_FEATURES, version 1, no payload
    data = s.recv(20)
except OSError:  # closed on us (EPIPE, ECONNRESET)
    data = b""
print("served" if len(data) >= 12 else "refused", flush=True)
"""


def foreign(sock: str) -> str:
    p = subprocess.run([sys.executable, "-c", FOREIGN, sock], capture_output=True, text=True,
                       timeout=20)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def served(sock: str) -> bool:
    """Does this (the test's own) process get an answer to GET_FEATURES?"""
    c = vc.VhostUserClient(sock, timeout=3.0)
    try:
        return c.get_features() != 0
    except (vc.VhostError, OSError):
        return False
    finally:
        c.close()


def wait_log(export, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in export.logtext():
        assert time.monotonic() < deadline, export.logtext()
        time.sleep(0.05)
    return export.logtext()


def test_only_the_listed_process_is_served_and_the_list_changes_live(tmp_path):
    allow = tmp_path / "peers"
    peers.write_file(str(allow), peers.Allowed(peers=[peers.peer_of(os.getpid(), "me")]))
    e = start_export(tmp_path, "--allow-peers-file", str(allow))
    try:
        assert foreign(e.sock) == "refused"  # nobody else is served, even with no frontend
        log = wait_log(e, "refusing a frontend connection from pid")
        assert "not in the allowed-peers file" in log and "refused_total=1" in log, log
        assert served(e.sock)  # the listed process is
        # the file is re-read at each connection: "any" lets every process in
        peers.write_file(str(allow), peers.Allowed(any=True))
        assert foreign(e.sock) == "served"
        # no file: nobody (fail closed)
        allow.unlink()
        assert not served(e.sock)
        assert "cannot read the allowed-peers file" in wait_log(e, "No such file")
    finally:
        assert stop_export(e) == 0, e.logtext()


def test_allow_peer_pid(tmp_path):
    e = start_export(tmp_path, "--allow-peer-pid", str(os.getpid()))
    try:
        assert foreign(e.sock) == "refused"
        wait_log(e, "not an allowed peer")
        assert served(e.sock)
    finally:
        assert stop_export(e) == 0, e.logtext()


def test_without_a_peer_option_any_process_is_served(tmp_path):
    e = start_export(tmp_path)
    try:
        assert foreign(e.sock) == "served"
    finally:
        assert stop_export(e) == 0, e.logtext()
