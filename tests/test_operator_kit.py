"""The operator kit in deploy/: systemd units accepted by systemd-analyze and
hardened without taking away what blkserve needs, the QEMU vhost-user
backend descriptor and `--print-capabilities`, the backend program
conventions (--socket-path, --fd, --blk-file), and the CLI help.  (The
sample config is checked by test_api_config.py, the Prometheus files by
test_metrics.py.)"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_client as vc  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNITS = sorted(DEPLOY.glob("*.service"))
DESCRIPTOR = DEPLOY / "50-blkserve-vhost-user-blk.json"
VENV_BLKSERVE = REPO / ".venv" / "bin" / "blkserve"
# What the data path needs, and the daemon's tracing: never in a unit's
# system call deny-list.
NEEDED_SYSCALLS = {"io_uring_setup", "io_uring_enter", "io_uring_register", "mmap",
                   "memfd_create", "fallocate", "eventfd2", "recvmsg", "sendmsg"}
TRACING_SYSCALLS = {"bpf", "perf_event_open", "pidfd_open"}


def unit(path: Path) -> configparser.RawConfigParser:
    p = configparser.RawConfigParser(strict=False, interpolation=None)
    p.optionxform = str
    p.read_string(path.read_text())
    return p


def exec_binary(path: Path) -> str:
    return unit(path)["Service"]["ExecStart"].split()[0]


def prefix() -> str:
    """Where the units expect the install (/opt/blkserve)."""
    binary = exec_binary(DEPLOY / "blkserve.service")
    assert binary.endswith("/.venv/bin/blkserve"), binary
    return binary.removesuffix("/.venv/bin/blkserve")


def run_cli(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blkserve", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, **kw)


# -- systemd units -------------------------------------------------------------

def test_units_pass_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify` accepts both units without a single warning
    (it warns but exits 0 on unknown keys, so the output must be empty).  It
    also wants ExecStart's binary to exist: the real files are verified when
    blkserve is installed where they expect it (docs/OPERATIONS.md), else
    copies whose only change is that path, pointed at this checkout's venv."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    assert {u.name for u in UNITS} == {"blkserve.service", "blkserve-export@.service"}
    binary = exec_binary(UNITS[0])
    if os.access(binary, os.X_OK):
        paths = [str(u) for u in UNITS]
    else:
        if not os.access(VENV_BLKSERVE, os.X_OK):
            pytest.skip(f"neither {binary} nor {VENV_BLKSERVE} exists (make setup)")
        paths = []
        for u in UNITS:
            text = u.read_text()
            assert text.count(binary) == 1, f"{u.name}: one ExecStart with {binary}"
            (tmp_path / u.name).write_text(text.replace(binary, str(VENV_BLKSERVE)))
            paths.append(str(tmp_path / u.name))
    r = subprocess.run([analyze, "verify", *paths], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        f"rc={r.returncode}\n{r.stdout}\n{r.stderr}"


def _denied_syscalls(filter_value: str) -> set[str]:
    assert filter_value.startswith("~"), f"a deny-list is expected: {filter_value}"
    out = set()
    for group in filter_value[1:].split():
        if not group.startswith("@"):
            out.add(group)
            continue
        r = subprocess.run(["systemd-analyze", "syscall-filter", group],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        for line in r.stdout.splitlines()[1:]:
            line = line.strip()
            if line and not line.startswith("#"):
                assert not line.startswith("@"), f"{group} nests {line}: resolve it too"
                out.add(line)
    return out


@pytest.mark.parametrize("name", ["blkserve.service", "blkserve-export@.service"])
def test_units_keep_what_blkserve_needs(name):
    svc = unit(DEPLOY / name)["Service"]
    assert svc["LimitMEMLOCK"] == "infinity"  # io_uring
    assert svc["Restart"] == "on-failure"
    assert svc["RuntimeDirectory"] == "blkserve" and svc["RuntimeDirectoryPreserve"] == "yes"
    assert svc.get("Type") == "exec"
    # hardening that would take block devices, kernel headers (bcc) or
    # QMP sockets under /tmp away from the daemon
    forbidden = {"PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock",
                 "MemoryDenyWriteExecute"}
    if name == "blkserve.service":
        forbidden |= {"ProtectKernelModules", "ProtectKernelTunables", "PrivateTmp",
                      "PrivateNetwork"}
    assert not forbidden & set(svc), forbidden & set(svc)
    assert svc["NoNewPrivileges"] == "yes"
    assert svc["ProtectSystem"] in ("full", "yes")  # strict needs ReadWritePaths per backing
    if shutil.which("systemd-analyze"):
        needed = NEEDED_SYSCALLS | (TRACING_SYSCALLS if name == "blkserve.service" else set())
        assert not needed & _denied_syscalls(svc["SystemCallFilter"])
    caps = set(svc["CapabilityBoundingSet"].split())
    if name == "blkserve.service":
        # the daemon: tracing (bpf, uprobes, tracefs), QMP sockets of other
        # users, export sockets given to QEMU's user; workers survive its
        # restart; the state dir is systemd's and others may search it
        assert {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_CHOWN",
                "CAP_FOWNER"} <= caps
        assert svc["KillMode"] == "process"
        assert svc["StateDirectory"] == "blkserve" and svc["StateDirectoryMode"] == "0751"
        assert "AF_INET" in svc["RestrictAddressFamilies"]
        assert svc["TasksMax"] == "infinity"
    else:
        assert svc["RestrictAddressFamilies"] == "AF_UNIX"
        assert "CAP_SYS_ADMIN" not in caps


def test_units_and_sample_config_agree():
    """The serve unit's --state-dir and --config are where the sample config
    and systemd's StateDirectory= put them; both units run the same binary."""
    svc = unit(DEPLOY / "blkserve.service")["Service"]
    argv = svc["ExecStart"].split()
    assert argv[1] == "serve"
    state_dir = argv[argv.index("--state-dir") + 1]
    assert state_dir == "/var/lib/" + svc["StateDirectory"]
    assert argv[argv.index("--config") + 1] == "/etc/blkserve/blkserve.toml"
    assert f'state_dir = "{state_dir}"' in (DEPLOY / "blkserve.toml").read_text()
    assert exec_binary(DEPLOY / "blkserve-export@.service") == exec_binary(
        DEPLOY / "blkserve.service")
    ops = (REPO / "docs" / "OPERATIONS.md").read_text()
    assert f"python3 -m venv {prefix()}/.venv" in ops
    assert "/etc/blkserve/blkserve.toml" in ops and "/etc/systemd/system" in ops


# -- the vhost-user backend descriptor -------------------------------------------

def test_vhost_user_descriptor_follows_qemu_schema():
    """QEMU's docs/interop/vhost-user.json, VhostUserBackend: description,
    type, binary (absolute), optional tags; nothing else."""
    d = json.loads(DESCRIPTOR.read_text())
    assert set(d) <= {"description", "type", "binary", "tags"}
    assert {"description", "type", "binary"} <= set(d)
    assert isinstance(d["description"], str) and d["description"]
    assert d["type"] == "block"
    assert os.path.isabs(d["binary"])
    assert all(isinstance(t, str) for t in d.get("tags", []))
    assert re.match(r"^\d\d-", DESCRIPTOR.name), "a double-digit priority prefix"
    # the binary is part of the installed tree
    assert d["binary"].startswith(prefix() + "/")
    rel = d["binary"].removeprefix(prefix() + "/")
    assert os.access(REPO / rel, os.X_OK), f"{rel} is not an executable in the tree"


def test_print_capabilities_matches_schema(tmp_path):
    """`--print-capabilities` (through the descriptor's binary, also via a
    symlink, and `blkserve export`): a VHostUserBackendCapabilities object for
    type block, features from VHostUserBackendBlockFeature only, each one an
    option the export really takes; exit 0, no backing needed, other
    arguments ignored."""
    if not os.access(VENV_BLKSERVE, os.X_OK):
        pytest.skip(f"{VENV_BLKSERVE} does not exist (make setup)")
    d = json.loads(DESCRIPTOR.read_text())
    binary = REPO / d["binary"].removeprefix(prefix() + "/")
    link = tmp_path / "vhost-user-blk"
    link.symlink_to(binary)
    outputs = []
    for argv in ([str(binary), "--print-capabilities"],
                 [str(link), "--print-capabilities", "--queues", "nonsense"],
                 [sys.executable, "-m", "blkserve", "export", "--print-capabilities"]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 0 and not r.stderr, (argv, r.stderr)
        outputs.append(json.loads(r.stdout))
    caps = outputs[0]
    assert outputs == [caps] * 3
    assert set(caps) == {"type", "features"} and caps["type"] == d["type"]
    assert caps["features"] and set(caps["features"]) <= {"read-only", "blk-file"}
    help_text = run_cli("export", "--help").stdout
    for feature in caps["features"]:
        assert f"--{feature}" in help_text


def _image(tmp_path: Path, fill: bytes = b"\x5a") -> Path:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
        f.write(fill * 4096)
    return img


def _wait_socket(path: str, proc: subprocess.Popen) -> None:
    """(No probing connection: the export would serve it, and refuse the
    next one while it tears the first down.)"""
    deadline = time.monotonic() + 15
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, "the export did not come up"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_backend_conventions_socket_path_blk_file_read_only(tmp_path):
    img = _image(tmp_path)
    sock = os.path.join(tempfile.mkdtemp(prefix="bs-"), "blk.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "blkserve", "export", f"--socket-path={sock}",
         f"--blk-file={img}", "--read-only"], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        _wait_socket(sock, proc)
        with vc.BlkDevice(sock, queues=1, connect_retry=2.0) as d:
            assert d.config.capacity == (4 << 20) // 512
            st, data = d.read(0, 4096)
            assert st == vc.BLK_S_OK and data == b"\x5a" * 4096
            assert d.write(0, b"\x00" * 4096) == vc.BLK_S_IOERR  # read-only
    finally:
        assert _stop(proc) == 0
    assert not os.path.exists(sock)  # ours: removed


def test_backend_conventions_fd(tmp_path):
    """--fd: a listening socket the management layer made (here: this test)
    is served; on SIGTERM it is closed, and its file left to its owner."""
    img = _image(tmp_path, b"\x33")
    sock = os.path.join(tempfile.mkdtemp(prefix="bs-"), "blk.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock)
    listener.listen(4)
    fd = listener.fileno()
    proc = subprocess.Popen(
        [sys.executable, "-m", "blkserve", "export", "--blk-file", str(img), "--fd",
         str(fd)], cwd=REPO, pass_fds=[fd], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    listener.close()  # the export holds it now
    try:
        with vc.BlkDevice(sock, queues=1, connect_retry=10.0) as d:
            st, data = d.read(0, 4096)
            assert st == vc.BLK_S_OK and data == b"\x33" * 4096
            assert d.write(8, b"\x44" * 512) == vc.BLK_S_OK
    finally:
        assert _stop(proc) == 0
    err = proc.stderr.read()
    assert "event=export.listening" in err and f"socket={sock}" in err, err
    assert os.path.exists(sock), "the socket file belongs to whoever passed the fd"
    assert img.read_bytes()[4096:4608] == b"\x44" * 512


def test_fd_that_is_not_a_listening_socket_is_refused(tmp_path):
    img = _image(tmp_path)
    a, b = socket.socketpair()
    fd = a.fileno()
    with a, b:
        r = subprocess.run([sys.executable, "-m", "blkserve", "export", str(img), "--fd",
                            str(fd)], cwd=REPO, pass_fds=[fd], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"blkserve export: error: --fd {fd} is not a "
                                "listening unix stream socket (bind and listen on it "
                                "before passing it)"), r.stderr
    for args, msg in [
        ([str(img)], "give exactly one of --socket PATH (alias --socket-path), --fd FD and "
                     "--xen-domain DOMAIN"),
        ([str(img), "--socket", "x.sock", "--fd", "3"], "give exactly one of"),
        (["--socket", "x.sock"], "the backing (BACKING or --blk-file PATH) is required"),
        ([str(img), "--blk-file", "/other", "--socket", "x.sock"], "not both"),
        ([str(img), "--fd", "99"], "--fd 99: Bad file descriptor"),
    ]:
        r = run_cli("export", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, \
            (args, r.stderr)


# -- help ------------------------------------------------------------------------

def test_help_mentions_the_options():
    ex = run_cli("export", "--help")
    assert ex.returncode == 0
    for opt in ("--socket-path", "--socket", "--fd", "--blk-file", "--read-only",
                "--print-capabilities", "--log-format", "logfmt|json|text"):
        assert opt in ex.stdout, opt
    sv = run_cli("serve", "--help")
    assert sv.returncode == 0
    for opt in ("--log-format", "logfmt|json|text", "--worker-logs", "X-Request-ID",
                "journal"):
        assert opt in sv.stdout, opt
