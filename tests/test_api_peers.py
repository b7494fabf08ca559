"""Whom `blkserve serve` (root) talks to and whom its exports serve.

- A QMP socket must lie under the config's qmp_socket_dirs (its real path: a
  symlink does not lead out), a libvirt ?socket= must be one of
  libvirt_sockets: else 403 naming the key.
- What listens there must be QEMU (SO_PEERCRED: /proc/PID/exe), or a libvirt
  daemon running as root: else 403, and nothing is exported.
- A QEMU that accepts and never answers (SIGSTOPped: the hung-QEMU case)
  costs each attach at most qmp_timeout_s, and after eight of them the
  daemon still attaches and detaches a live QEMU and stops on SIGTERM at once.
  A libvirt daemon that never answers holds at most four threads (then 503),
  which do not keep the daemon from stopping.
- An export made for an attachment serves only that VM's QEMU: another
  process is refused (logged) while the attached QEMU is served; a PUT export
  with no attachment serves anyone the socket's permissions let in.
- An attach that fails unexpectedly is a 502 and leaves no export behind;
  /metrics and the docs are open or need the token, as configured."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apiserver import ApiServer, worker_pids  # noqa: E402
from test_export_peers import foreign  # noqa: E402

from blkserve import peers  # noqa: E402

MiB = 1 << 20
QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def detail(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, f"{r.request.method} {r.request.url.path}: " \
                                    f"{r.status_code} {r.text}"
    return r.json()["detail"]


def wait_socket(path: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.05)


def start_qemu(qmp: str, target: bool = False, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """A QEMU that never runs a guest (-S), with its QMP monitor on QMP; a
    TARGET one can take a vhost-user-blk disk (shared memory, a free root port).
    EXTRA: more arguments."""
    argv = [QEMU, "-nodefaults", "-display", "none", "-S",
            "-qmp", f"unix:{qmp},server=on,wait=off", *extra]
    if target:
        # native PCIe hotplug: with no guest to power the slot, device_del
        # unplugs at once (ACPI hotplug would wait for a guest to eject it)
        argv += ["-machine", "q35,accel=tcg", "-m", "64",
                 "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                 "-object", "memory-backend-memfd,id=mem,size=64M,share=on",
                 "-numa", "node,memdev=mem",
                 "-device", "pcie-root-port,id=hp0,chassis=1,slot=1"]
    else:
        argv += ["-machine", "none"]
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    wait_socket(qmp, p)
    return p


def kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
        os.kill(p.pid, signal.SIGCONT)
        p.wait(10)


@pytest.fixture
def qemus():
    """start_qemu, every QEMU killed at the end whatever happens."""
    started: list[subprocess.Popen] = []

    def start(qmp: str, target: bool = False, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        started.append(start_qemu(qmp, target, extra))
        return started[-1]
    yield start
    for p in started:
        kill(p)


def silent_server(path: str) -> socket.socket:
    """A listener that never accepts (the kernel queues the connections)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(64)
    return s


def server(tmp: Path, **keys) -> ApiServer:
    lines = [f"{k} = {v!r}".replace("'", '"') for k, v in keys.items()]
    cfg = tmp / "blkserve.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return ApiServer(config=cfg).start()


# -- where: allow-lists --------------------------------------------------------------


def test_qmp_socket_outside_qmp_socket_dirs_is_refused(tmp):
    (tmp / "vms").mkdir()
    outside = silent_server(str(tmp / "outside.sock"))
    (tmp / "vms" / "link.sock").symlink_to(tmp / "outside.sock")
    s = server(tmp, qmp_socket_dirs=[str(tmp / "vms")], qmp_timeout_s=2)
    try:
        with s.client() as c:
            assert c.post("/v1/volumes", json={"name": "p1", "size_bytes": MiB}).status_code \
                == 201
            for path in (tmp / "outside.sock", tmp / "vms" / "link.sock", Path("/etc/passwd")):
                d = detail(c.post("/v1/volumes/p1/attachments",
                                  json={"hypervisor": "qemu", "qmp_socket": str(path)}), 403)
                assert "qmp_socket_dirs" in d, d
                if path.name == "link.sock":  # a symlink does not lead out
                    assert f"resolving to {tmp}/outside.sock" in d, d
            assert c.get("/v1/volumes/p1").json()["export"] is None
    finally:
        s.cleanup()
        outside.close()


def test_libvirt_socket_outside_libvirt_sockets_is_refused(tmp):
    pytest.importorskip("libvirt")
    fake = silent_server(str(tmp / "libvirt-sock"))
    s = server(tmp, qmp_timeout_s=2)
    try:
        with s.client() as c:
            c.post("/v1/volumes", json={"name": "p2", "size_bytes": MiB})
            d = detail(c.post("/v1/volumes/p2/attachments", json={
                "hypervisor": "libvirt", "domain": "vm1",
                "uri": f"qemu+unix:///system?socket={tmp}/libvirt-sock"}), 403)
            assert "libvirt_sockets" in d and f"{tmp}/libvirt-sock" in d, d
            assert c.get("/v1/volumes/p2").json()["export"] is None
    finally:
        s.cleanup()
        fake.close()


# -- who: peer credentials -------------------------------------------------------------


def test_a_listener_that_is_not_qemu_or_libvirtd_is_refused(tmp):
    fake_qmp = silent_server(str(tmp / "qmp.sock"))
    fake_lv = silent_server(str(tmp / "libvirt-sock"))
    s = server(tmp, qmp_socket_dirs=[str(tmp)], libvirt_sockets=[str(tmp / "libvirt-sock")],
               qmp_timeout_s=2)
    try:
        with s.client() as c:
            c.post("/v1/volumes", json={"name": "p3", "size_bytes": MiB})
            d = detail(c.post("/v1/volumes/p3/attachments",
                              json={"hypervisor": "qemu", "qmp_socket": str(tmp / "qmp.sock")}),
                       403)
            assert "is not QEMU" in d and f"pid {os.getpid()}" in d, d
            try:
                import libvirt  # noqa: F401
            except ImportError:
                pass
            else:
                d = detail(c.post("/v1/volumes/p3/attachments", json={
                    "hypervisor": "libvirt", "domain": "vm1",
                    "uri": f"qemu+unix:///system?socket={tmp}/libvirt-sock"}), 403)
                assert "not a libvirt daemon running as root" in d, d
            vol = c.get("/v1/volumes/p3").json()
            assert vol["export"] is None and vol["attachments"] == []
    finally:
        s.cleanup()
        fake_qmp.close()
        fake_lv.close()


# -- silent peers ----------------------------------------------------------------------


def attach_qemu(c: httpx.Client, name: str, qmp: str) -> httpx.Response:
    return c.post(f"/v1/volumes/{name}/attachments",
                  json={"hypervisor": "qemu", "qmp_socket": qmp})


@needs_qemu
def test_a_hung_qemu_does_not_wedge_the_daemon(tmp, qemus):
    hung = qemus(str(tmp / "hung.sock"))
    os.kill(hung.pid, signal.SIGSTOP)  # accepts (kernel backlog), never answers
    live = qemus(str(tmp / "live.sock"), target=True)
    s = server(tmp, qmp_socket_dirs=[str(tmp)], qmp_timeout_s=2, worker_start_timeout_s=10)
    try:
        with s.client(timeout=30) as c:
            c.post("/v1/volumes", json={"name": "h1", "size_bytes": 16 * MiB})
            c.post("/v1/volumes", json={"name": "h2", "size_bytes": 16 * MiB})
            for _ in range(8):
                t = time.monotonic()
                d = detail(attach_qemu(c, "h1", str(tmp / "hung.sock")), 502)
                assert time.monotonic() - t < 6, d  # qmp_timeout_s (2) and a margin
                assert "stopped or hung" in d, d
            assert c.get("/v1/volumes/h1").json()["export"] is None  # nothing left behind
            # the daemon still attaches and detaches a live QEMU
            att = attach_qemu(c, "h2", str(tmp / "live.sock"))
            assert att.status_code == 201, att.text
            att = att.json()
            r = c.delete(f"/v1/volumes/h2/attachments/{att['id']}", params={"timeout_s": 10})
            assert r.status_code == 204, r.text
            assert c.get("/v1/volumes/h2").json()["export"] is None
        t = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(10)
        assert time.monotonic() - t < 5
        log = s.log()
        assert "Traceback" not in log, log
    finally:
        s.cleanup()
        kill(hung)
        kill(live)


@pytest.fixture
def fake_libvirtd(tmp):
    """A process whose program is named libvirtd, running as root, listening
    on TMP/libvirt-sock and never answering (a hung libvirt daemon)."""
    exe = tmp / "libvirtd"
    shutil.copy(os.path.realpath(sys.executable), exe)
    sock = str(tmp / "libvirt-sock")
    code = ("import socket, time\n"
            f"s = socket.socket(socket.AF_UNIX); s.bind({sock!r}); s.listen(64)\n"
            "conns = []\n"
            "while True:\n    conns.append(s.accept())\n")
    p = subprocess.Popen([str(exe), "-c", code], stdin=subprocess.DEVNULL,
                         start_new_session=True)
    wait_socket(sock, p)
    yield sock
    p.kill()
    p.wait()


@needs_qemu
def test_a_hung_libvirt_daemon_holds_at_most_four_threads(tmp, qemus, fake_libvirtd):
    pytest.importorskip("libvirt")
    live = qemus(str(tmp / "live.sock"), target=True)
    s = server(tmp, qmp_socket_dirs=[str(tmp)], libvirt_sockets=[fake_libvirtd],
               qmp_timeout_s=2, worker_start_timeout_s=10)
    try:
        with s.client(timeout=30) as c:
            c.post("/v1/volumes", json={"name": "l1", "size_bytes": 16 * MiB})
            c.post("/v1/volumes", json={"name": "l2", "size_bytes": 16 * MiB})
            codes = []
            for _ in range(8):
                t = time.monotonic()
                r = c.post("/v1/volumes/l1/attachments", json={
                    "hypervisor": "libvirt", "domain": "vm1",
                    "uri": f"qemu+unix:///system?socket={fake_libvirtd}"})
                assert time.monotonic() - t < 6, r.text
                codes.append(r.status_code)
            assert codes[:4] == [502] * 4 and codes[4:] == [503] * 4, codes
            assert "still running" in r.json()["detail"], r.text
            # QMP attaches do not need those threads
            att = attach_qemu(c, "l2", str(tmp / "live.sock"))
            assert att.status_code == 201, att.text
            r = c.delete(f"/v1/volumes/l2/attachments/{att.json()['id']}",
                         params={"timeout_s": 10})
            assert r.status_code == 204, r.text
        t = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(10)
        assert time.monotonic() - t < 5
    finally:
        s.cleanup()
        kill(live)


# -- exports serve their VM's QEMU only ------------------------------------------------


@needs_qemu
def test_an_attached_export_serves_only_its_qemu(tmp, qemus):
    vm = qemus(str(tmp / "vm.sock"), target=True)
    s = server(tmp, qmp_socket_dirs=[str(tmp)], qmp_timeout_s=5, worker_start_timeout_s=10)
    try:
        with s.client(timeout=30) as c:
            c.post("/v1/volumes", json={"name": "e1", "size_bytes": 16 * MiB})
            # PUT: any peer the socket's permissions let in
            exp = c.put("/v1/volumes/e1/export").json()
            assert foreign(exp["socket"]) == "served"
            att = attach_qemu(c, "e1", str(tmp / "vm.sock"))
            assert att.status_code == 201, att.text  # its QEMU was served (device_add)
            allowed = peers.read_file(str(s.state_dir / "peers" / "e1.peers"))
            assert not allowed.any and [p.pid for p in allowed.peers] == [vm.pid]
            assert foreign(exp["socket"]) == "refused"
            log = (s.state_dir / "logs" / "e1.log").read_text()
            assert "refusing a frontend connection from pid" in log, log
            assert f"uid {os.getuid()}" in log and "not in the allowed-peers file" in log, log
            r = c.delete(f"/v1/volumes/e1/attachments/{att.json()['id']}",
                         params={"timeout_s": 10})
            assert r.status_code == 204, r.text
            # the PUT export serves anyone again
            assert foreign(exp["socket"]) == "served"
            # an export started by the attach: its QEMU only, from the start
            c.delete("/v1/volumes/e1/export")
            att = attach_qemu(c, "e1", str(tmp / "vm.sock"))
            assert att.status_code == 201, att.text
            sock = c.get("/v1/volumes/e1/export").json()["socket"]
            assert foreign(sock) == "refused"
            argv = Path(f"/proc/{worker_pids(s.state_dir)[0]}/cmdline").read_bytes()
            assert b"--allow-peers-file" in argv
    finally:
        s.cleanup()
        kill(vm)


# -- an unexpected failure -------------------------------------------------------------


def test_an_unexpected_attach_failure_is_502_and_stops_the_export(tmp, monkeypatch):
    from blkserve.api.config import Settings
    from blkserve.api.controller import ApiError, Controller
    from blkserve.api.hypervisors import qemu

    async def probe(qmp_socket, timeout):
        return peers.PeerCred(os.getpid(), os.getuid(), os.getgid())

    async def attach(*args, **kw):
        raise RuntimeError("QEMU said something nobody expected")

    monkeypatch.setattr(qemu, "probe", probe)
    monkeypatch.setattr(qemu, "attach", attach)
    qmp = silent_server(str(tmp / "qmp.sock"))

    async def run():
        c = Controller(Settings(state_dir=str(tmp / "state"), worker_start_timeout_s=10))
        try:
            c.create_volume("u1", MiB, False, 1, None)
            with pytest.raises(ApiError) as e:
                await c.attach("u1", qemu.QemuAttachmentCreate(
                    hypervisor="qemu", qmp_socket=str(tmp / "qmp.sock")))
            return e.value, c.state.export("u1"), c.state.attachments("u1"), dict(c.workers)
        finally:
            for w in c.workers.values():
                await w.stop(5)
            c.state.close()

    try:
        err, exp, atts, workers = asyncio.run(run())
    finally:
        qmp.close()
    assert err.status == 502 and "nobody expected" in err.detail, err.detail
    assert exp is None and atts == [] and workers == {}
    assert not worker_pids(tmp / "state")
    assert not (tmp / "state" / "peers" / "u1.peers").exists()


# -- /metrics and the docs ---------------------------------------------------------------


def test_metrics_and_docs_need_the_token_when_configured(tmp):
    s = server(tmp, metrics_auth="token", docs_auth="token")
    try:
        with httpx.Client(base_url=s.url, timeout=30) as anon, s.client() as c:
            for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
                assert anon.get(path).status_code == 401, path
                assert c.get(path).status_code == 200, path
            assert anon.get("/healthz").status_code == 200
    finally:
        s.cleanup()


def test_metrics_and_docs_are_open_by_default_on_loopback_only(tmp):
    from blkserve.api import config

    assert config.Settings(listen="127.0.0.1:1").route_auth("metrics") == "open"
    assert config.Settings(listen="[::1]:1").route_auth("docs") == "open"
    for listen in ("0.0.0.0:1", "192.0.2.1:1", "[::]:1", "myhost:1"):
        st = config.Settings(listen=listen)
        assert (st.route_auth("metrics"), st.route_auth("docs")) == ("token", "token")
    assert config.Settings(listen="0.0.0.0:1", metrics_auth="open").route_auth("metrics") \
        == "open"
    cfg = tmp / "bad.toml"
    cfg.write_text('docs_auth = "maybe"\n')
    with pytest.raises(config.ConfigError, match="docs_auth must be one of open, token"):
        config.load(str(cfg))
    s = server(tmp)
    try:
        with httpx.Client(base_url=s.url, timeout=30) as anon:
            for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
                assert anon.get(path).status_code == 200, path
    finally:
        s.cleanup()
