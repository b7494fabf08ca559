"""The Debian package under real systemd: `make deb`'s package is installed
into a minimal Debian 12 root (built from Debian packages by mmdebstrap,
cached outside the repo) that boots systemd as PID 1 in a container
(systemd-nspawn --boot; this machine has no usable KVM, and a container
boots in seconds where a TCG VM takes minutes).  Everything runs through the
package's own units and maintainer scripts: the service starts and answers;
a volume serves verified I/O from a worker inside the unit's sandbox
(io_uring, no_new_privs, the seccomp filter, the capability bounding set);
tracing works with the unit's capabilities; `systemctl restart`, a package
upgrade and `systemctl stop` + `start` leave the workers serving (a
frontend's verified I/O runs across each of them) and the next daemon
adopts them; a standalone export unit serves too.

The container is given what a host gives a service (CAP_BPF, CAP_PERFMON,
CAP_IPC_LOCK, the bpf and perf_event_open system calls, the kernel headers
and tracefs), its own network namespace (only loopback: the daemon's port
cannot collide with the host's), and nothing of the host's blkserve."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from apiserver import REPO, wait_for
from guest import default_cache_dir

SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
# the root's own packages; the package's Depends are added to them
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "procps", "python3-bpfcc"]
STATE = "/var/lib/blkserve"
PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("systemd-nspawn", "mmdebstrap", "dpkg-deb", "nsenter")),
    reason="needs systemd-nspawn (systemd-container), mmdebstrap and dpkg-deb (make setup)")


def _build_packages(out: Path) -> tuple[Path, Path]:
    """The package as `make deb` builds it, and a newer build of it (the same
    files under a higher version: what an upgrade installs)."""
    r = subprocess.run([str(REPO / "deploy/debian/build-deb.sh"), str(out)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    deb = Path(r.stdout.strip().splitlines()[-1])
    version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True,
                             text=True, check=True).stdout.strip()
    tree = out / "newer"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN/control"
    control.write_text(control.read_text().replace(f"Version: {version}\n",
                                                   f"Version: {version}+upgrade1\n"))
    newer = out / f"blkserve_{version}+upgrade1_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "-z1", "-b", str(tree), str(newer)],
                   check=True, capture_output=True)
    return deb, newer


def _base_root(deb: Path) -> Path:
    """A minimal Debian root with systemd and the package's dependencies,
    built once per package list (under a lock; renamed into place whole)."""
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout
    names = sorted(set(BASE_PACKAGES) | {re.split(r"[ (]", d.strip())[0]
                                         for d in depends.split(",")})
    key = hashlib.sha256(f"{SUITE} {' '.join(names)}".encode()).hexdigest()[:12]
    cache = default_cache_dir()
    final = cache / f"nspawn-{SUITE}-{key}"
    if (final / "etc/os-release").exists():
        return final
    with open(cache / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "etc/os-release").exists():
            return final
        for stale in cache.glob(".nspawn-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".nspawn-", dir=cache))
        try:
            r = subprocess.run(["mmdebstrap", "--variant=minbase", f"--include={','.join(names)}",
                                SUITE, str(tmp), MIRROR], capture_output=True, text=True,
                               timeout=1200)
            assert r.returncode == 0, r.stderr[-4000:]
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


class Container:
    """systemd booted as PID 1 in ROOT by systemd-nspawn."""

    def __init__(self, root: Path, log: Path):
        self.root, self.log = root, log
        kver = os.uname().release
        binds = [f"--bind-ro=/lib/modules/{kver}", "--bind-ro=/usr/src"]
        self.started: list[subprocess.Popen] = []
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", str(root), "--boot", "--register=no",
             "--keep-unit", "--console=pipe", "--private-network",
             f"--machine=bstest{os.getpid()}",
             "--capability=CAP_BPF,CAP_PERFMON,CAP_IPC_LOCK",
             "--system-call-filter=bpf perf_event_open", *binds],
            stdin=subprocess.DEVNULL, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True)
        self.leader = wait_for(self._leader, 60, "the container's PID 1")
        state = wait_for(self._booted, 120, "systemd to finish booting", interval=0.3)
        assert state == "running", (
            state, self.run("systemctl", "--failed", "--no-pager", check=False).stdout)
        # tracefs, as `make setup` mounts it on the host (with a private
        # network nspawn mounts /sys/kernel over a bind of the host's)
        if Path("/sys/kernel/tracing/events").is_dir():
            self.run("mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing")

    def _booted(self) -> str | None:
        """systemd's state once its start-up is over (the bus answers)."""
        r = self.run("systemctl", "is-system-running", check=False, timeout=30)
        state = r.stdout.strip()
        return state if state not in ("", "initializing", "starting") else None

    def _leader(self) -> int | None:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")[-4000:]
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return None
        for pid in kids.split():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if comm == "systemd":
                return int(pid)
        return None

    def _argv(self, args) -> list[str]:
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", PATH,
                f"BLKSERVE_STATE_DIR={STATE}", *map(str, args)]

    def run(self, *args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        r = subprocess.run(self._argv(args), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check:
            assert r.returncode == 0, f"{args}: rc {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r

    def start(self, *args) -> subprocess.Popen:
        p = subprocess.Popen(self._argv(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, stdin=subprocess.DEVNULL, start_new_session=True)
        self.started.append(p)
        return p

    def api(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """A call of the REST API inside the container, with the daemon's token."""
        code = ("import httpx, json, sys; tok = open(sys.argv[1]).read().strip(); "
                "r = httpx.request(sys.argv[2], 'http://127.0.0.1:8470' + sys.argv[3], "
                "json=json.loads(sys.argv[4]), timeout=120, "
                "headers={'Authorization': 'Bearer ' + tok}); "
                "print(json.dumps([r.status_code, r.json()]))")
        r = self.run("/opt/blkserve/.venv/bin/python", "-c", code, f"{STATE}/api-token", method,
                     path, json.dumps(body))
        status, doc = json.loads(r.stdout)
        return status, doc

    def healthy(self) -> bool:
        r = self.run("/opt/blkserve/.venv/bin/python", "-c",
                     "import httpx; print(httpx.get('http://127.0.0.1:8470/healthz').status_code)",
                     check=False, timeout=30)
        return r.stdout.strip() == "200"

    def main_pid(self, unit: str = "blkserve.service") -> int:
        return int(self.run("systemctl", "show", "-P", "MainPID", unit).stdout)

    def journal(self, unit: str = "blkserve.service") -> str:
        return self.run("journalctl", "-u", unit, "--no-pager", "-o", "cat").stdout

    def status(self, pid: int) -> dict[str, str]:
        """/proc/PID/status of a process of the container (its own pid)."""
        text = self.run("cat", f"/proc/{pid}/status").stdout
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)

    def stop(self) -> None:
        for p in self.started:  # clients a failed test left running
            if p.poll() is None:
                p.kill()
                p.communicate()
        if self.proc.poll() is None:
            self.run("systemctl", "poweroff", check=False, timeout=30)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(self.leader, signal.SIGKILL)
                self.proc.wait(30)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    work = Path(tempfile.mkdtemp(prefix="bs-nspawn-", dir="/var/tmp"))
    try:
        deb, newer = _build_packages(tmp_path_factory.mktemp("deb"))
        base = _base_root(deb)
        root = work / "root"
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
        for d in (deb, newer):
            shutil.copy(d, root / "root" / d.name)
        c = Container(root, work / "nspawn.log")
        c.deb, c.newer = f"/root/{deb.name}", f"/root/{newer.name}"
        try:
            yield c
        finally:
            c.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _bench(c: Container, sock: str, runtime: float, rw: str = "randrw") -> subprocess.Popen:
    return c.start("blkserve", "bench", "--socket", sock, "--rw", rw, "--verify", "--bs", "4k",
                   "--iodepth", "8", "--runtime", runtime, "--size", 16 << 20, "--json")


def _bench_ok(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, (out, err)
    result = json.loads(out)
    assert result["errors"] == 0 and result["ios"] > 0, result
    return result


def _worker_pid(c: Container, volume: str) -> int:
    status, doc = c.api("GET", f"/v1/volumes/{volume}")
    assert status == 200, doc
    assert doc["export"]["state"] == "running", doc
    return doc["export"]["pid"]


def _connections(c: Container, pid: int) -> int:
    log = c.run("journalctl", f"_PID={pid}", "--no-pager", "-o", "cat").stdout
    return log.count("frontend connected")


def _serving_across(c: Container, volume: str, action, runtime: float = 20) -> tuple[int, int]:
    """ACTION() runs while a frontend's verified I/O is in progress on
    VOLUME's socket (for RUNTIME s: longer than ACTION takes on a busy
    machine); the I/O must finish without an error.  (worker pid before,
    after)."""
    pid = _worker_pid(c, volume)
    before = _connections(c, pid)
    bench = _bench(c, f"{STATE}/sockets/{volume}.sock", runtime)
    wait_for(lambda: _connections(c, pid) > before, 30, "the frontend to connect")
    action()
    assert bench.poll() is None, ("the frontend's I/O did not outlast the action",
                                  bench.communicate())
    _bench_ok(bench)
    return pid, _worker_pid(c, volume)


def test_the_package_installs_enables_and_starts_the_service(box):
    r = box.run("dpkg", "-i", box.deb)
    assert "blkserve.service" in r.stdout + r.stderr  # the enable symlink
    assert box.run("systemctl", "is-enabled", "blkserve.service").stdout.strip() == "enabled"
    wait_for(box.healthy, 60, "the service to answer")
    pid = box.main_pid()
    st = box.status(pid)
    # the unit's sandbox is in force on the daemon
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2", st
    caps = int(st["CapBnd"], 16)
    bits = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_IPC_LOCK": 14,
            "CAP_SYS_ADMIN": 21, "CAP_PERFMON": 38, "CAP_BPF": 39}
    assert caps == sum(1 << b for b in bits.values()), hex(caps)
    assert box.run("stat", "-c", "%a", STATE).stdout.strip() == "751"
    assert box.run("blkserve", "--version").stdout.strip().endswith(
        box.run("dpkg-query", "-W", "-f", "${Version}", "blkserve").stdout.split("+")[0])


def test_a_volume_serves_verified_io_from_inside_the_units_sandbox(box):
    box.run("blkserve", "volume", "create", "v1", "--size", "64M")
    box.run("blkserve", "export-volume", "v1")
    pid = _worker_pid(box, "v1")
    cgroup = box.run("cat", f"/proc/{pid}/cgroup").stdout
    assert "/system.slice/blkserve.service" in cgroup, cgroup
    st = box.status(pid)
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2", st
    # the worker serves through io_uring (its rings are among its fds while
    # a frontend is connected), not a fallback engine
    before = _connections(box, pid)
    bench = _bench(box, f"{STATE}/sockets/v1.sock", 3)
    wait_for(lambda: _connections(box, pid) > before, 30, "the frontend to connect")
    fds = wait_for(lambda: (lambda t: t if "io_uring" in t else None)(
        box.run("ls", "-l", f"/proc/{pid}/fd").stdout), 10, "the worker's io_uring")
    assert bench.poll() is None, fds
    _bench_ok(bench)


def test_tracing_works_with_the_units_capabilities(box):
    pid = _worker_pid(box, "v1")
    before = _connections(box, pid)
    bench = _bench(box, f"{STATE}/sockets/v1.sock", 20, rw="randread")
    wait_for(lambda: _connections(box, pid) > before, 30, "the frontend to connect")
    status, doc = box.api("POST", "/v1/tracing", {"duration_s": 2, "breakdown": True})
    assert status == 200, doc
    reads = doc["volumes"]["v1"]["latency"]["read"]
    assert reads["count"] > 0, doc
    assert doc["volumes"]["v1"]["pids"] == [pid], doc
    bench.send_signal(signal.SIGINT)
    bench.communicate(timeout=60)


def test_systemctl_restart_leaves_the_workers_serving_and_the_new_daemon_adopts_them(box):
    old = box.main_pid()
    before, after = _serving_across(box, "v1", lambda: (
        box.run("systemctl", "restart", "blkserve.service"),
        wait_for(box.healthy, 60, "the restarted service to answer")))
    assert box.main_pid() != old
    assert before == after
    adopted = [line for line in box.journal().splitlines() if "msg=worker.adopted" in line]
    assert any("volume=v1" in line and f"pid={before}" in line for line in adopted), adopted


def test_a_package_upgrade_restarts_only_the_api(box):
    old = box.main_pid()

    def upgrade():
        box.run("dpkg", "-i", box.newer)
        wait_for(box.healthy, 60, "the upgraded service to answer")

    # (dpkg byte-compiles the virtualenv before the restart: give it time)
    before, after = _serving_across(box, "v1", upgrade, runtime=45)
    assert before == after
    assert box.main_pid() != old
    version = box.run("dpkg-query", "-W", "-f", "${Version}", "blkserve").stdout
    assert version.endswith("+upgrade1"), version


def test_systemctl_stop_then_start_brings_everything_back(box):
    pid = _worker_pid(box, "v1")

    def stop_start():
        box.run("systemctl", "stop", "blkserve.service")
        assert not box.healthy()
        assert box.run("kill", "-0", pid, check=False).returncode == 0  # still serving
        box.run("systemctl", "start", "blkserve.service")
        wait_for(box.healthy, 60, "the started service to answer")

    before, after = _serving_across(box, "v1", stop_start)
    assert before == after == pid


def test_a_standalone_export_unit_serves(box):
    box.run("truncate", "-s", "32M", "/var/lib/standalone.img")
    box.run("sh", "-c", "printf 'BACKING=/var/lib/standalone.img\\nEXTRA_ARGS=\\n' "
            "> /etc/blkserve/exports/sa.env")
    box.run("systemctl", "start", "blkserve-export@sa.service")
    wait_for(lambda: box.run("test", "-S", "/run/blkserve/sa.sock", check=False).returncode == 0,
             30, "the standalone export's socket")
    pid = box.main_pid("blkserve-export@sa.service")
    st = box.status(pid)
    assert st["NoNewPrivs"].strip() == "1" and st["Seccomp"].strip() == "2", st
    _bench_ok(_bench(box, "/run/blkserve/sa.sock", 2))
    box.run("systemctl", "stop", "blkserve-export@sa.service")
    assert box.run("test", "-e", "/run/blkserve/sa.sock", check=False).returncode != 0
