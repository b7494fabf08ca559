"""Hot-attach through the REST API to a running libvirt domain, on a real
libvirtd (Debian's libvirt-daemon-system; started here when none runs, and
stopped again at the end of the session).

One TCG domain (q35, three pcie-root-ports, memfd shared memory, the test
guest's kernel and initramfs, its control shell on a serial port connected to
a socket of this test) and one `blkserve serve` serve every check, in file
order: a volume in the domain's config from its start (the XML of GET
.../libvirt-xml), which the guest finds and verifies with fio (libvirt runs
QEMU as libvirt-qemu, so the export socket and the state dir must let that
user in); its worker killed and restarted, whose new socket QEMU reaches
again; hot-attach and fio verify; a read-only volume; no free slot; refusals
(no shared memory, domain not running or unknown, libvirt unreachable,
already attached); the XML taken by libvirt into a config; detach (the guest
loses the disk, the live XML too); a detach timeout; and the domain destroyed
under an attachment, which goes stale.

libvirt 9.0 hot-plugs a vhostuser disk's chardev without reconnect (its
`<reconnect>` only reaches QEMU's command line): a hot-attached disk does not
survive a restart of its export worker, so the restart is checked on the
disk from the domain's config.

The rest needs no libvirt: the 501 without the bindings, and a database of
an older daemon migrated on start."""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

try:
    from . import guest as g
    from .apiserver import ApiServer, worker_pids
except ImportError:
    import guest as g
    from apiserver import ApiServer, worker_pids

URI = "qemu:///system"
ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
SHARED = "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"


# -- libvirtd ------------------------------------------------------------------


def _kvm_shut_to_qemu() -> tuple[int, int, int] | None:
    """(uid, gid, mode) of /dev/kvm if it exists but libvirt's QEMU user
    cannot open it, as on a machine without udev (whose Debian rule makes it
    root:kvm 0660).  libvirt 9.0 then probes QEMU again at every capabilities
    lookup (it finds KVM when probing and not when checking): ~4 s each, ~10
    per domain definition."""
    try:
        st = os.stat("/dev/kvm")
        pw = pwd.getpwnam("libvirt-qemu")
    except (OSError, KeyError):
        return None
    groups = set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    need = stat.S_IRUSR | stat.S_IWUSR
    if st.st_uid == pw.pw_uid:
        ok = st.st_mode & need == need
    elif st.st_gid in groups:
        ok = st.st_mode & (need >> 3) == need >> 3
    else:
        ok = st.st_mode & (need >> 6) == need >> 6
    return None if ok else (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))


def _open(libvirt):
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError:
        return None


@pytest.fixture(scope="session")
def libvirt_conn():
    """A connection to qemu:///system; libvirtd and virtlogd are started
    (no systemd here) unless they run, and stopped at the end if so."""
    try:
        import libvirt
    except ImportError as e:
        pytest.skip(f"the libvirt Python bindings are not installed ({e}): make setup")
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = _open(libvirt)
    started: list[subprocess.Popen] = []
    logs = Path(tempfile.mkdtemp(prefix="bs-libvirtd-"))
    kvm = None
    if conn is None:
        if os.geteuid() != 0:
            pytest.skip("libvirtd (qemu:///system) does not run and starting it needs root")
        for binary in ("/usr/sbin/virtlogd", "/usr/sbin/libvirtd"):
            if not os.path.exists(binary):
                pytest.skip(f"{binary} is not installed (libvirt-daemon-system)")
        os.makedirs("/run/libvirt", exist_ok=True)
        kvm = _kvm_shut_to_qemu()
        if kvm is not None:  # as udev would have it, for this session
            os.chown("/dev/kvm", 0, grp.getgrnam("kvm").gr_gid)
            os.chmod("/dev/kvm", 0o660)
        daemons = ["/usr/sbin/libvirtd"]
        if not g.socket_accepts("/run/libvirt/virtlogd-sock"):
            daemons.insert(0, "/usr/sbin/virtlogd")
        for binary in daemons:
            with open(logs / f"{Path(binary).name}.log", "wb") as f:
                started.append(subprocess.Popen([binary], stdout=f, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL,
                                                start_new_session=True))
        deadline = time.monotonic() + 30
        while conn is None and time.monotonic() < deadline:
            if any(p.poll() is not None for p in started):
                break
            time.sleep(0.2)
            conn = _open(libvirt)
        if conn is None:
            _stop(started)
            _restore_kvm(kvm)
            tails = "; ".join(f"{p.name}: {p.read_text(errors='replace')[-500:]}"
                              for p in logs.glob("*.log"))
            pytest.skip(f"libvirtd cannot start: {tails}")
    try:
        yield conn
    finally:
        conn.close()
        _stop(started)
        _restore_kvm(kvm)
        shutil.rmtree(logs, ignore_errors=True)


def _restore_kvm(kvm: tuple[int, int, int] | None) -> None:
    if kvm is not None:
        os.chown("/dev/kvm", kvm[0], kvm[1])
        os.chmod("/dev/kvm", kvm[2])


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# -- the domain ----------------------------------------------------------------


def domain_xml(name: str, workdir: Path | None, shared: bool = True, mem_mib: int = 512,
               ports: int = 2, devices: str = "") -> str:
    """A TCG q35 domain; with WORKDIR it boots the test guest (kernel and
    initramfs copied there), its console in WORKDIR/console.log and its
    control shell (ttyS1) connected to WORKDIR/ttyS1.sock."""
    boot = serials = ""
    if workdir is not None:
        boot = (f"<kernel>{workdir}/vmlinuz</kernel><initrd>{workdir}/initrd.gz</initrd>"
                f"<cmdline>{g.KERNEL_CMDLINE}</cmdline>")
        serials = (f"<serial type='file'><source path='{workdir}/console.log'/>"
                   "<target port='0'/></serial>"
                   f"<serial type='unix'><source mode='connect' path='{workdir}/ttyS1.sock'/>"
                   "<target port='1'/></serial>")
    root_ports = "<controller type='pci' model='pcie-root-port'/>" * ports
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{mem_mib}</memory>
  <vcpu>2</vcpu>
  {SHARED if shared else ""}
  <os><type arch='x86_64' machine='q35'>hvm</type>{boot}</os>
  <features><acpi/><apic/></features>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <controller type='usb' model='none'/>
    <controller type='pci' model='pcie-root'/>
    {root_ports}
    <memballoon model='none'/>
    {serials}
    {devices}
  </devices>
</domain>"""


class LibvirtGuest(g.Guest):
    """The test guest run by libvirt: its QEMU (user libvirt-qemu) connects
    the guest's ttyS1 to a socket this object listens on; run()/check() work
    as for a Guest."""

    def __init__(self, conn, name: str, image: g.GuestImage, workdir: Path, log_dir: Path,
                 ports: int = 2, devices: str = ""):
        super().__init__([], image=image, log_dir=log_dir)
        self.conn, self.name, self.workdir = conn, name, workdir
        self.ports, self.devices = ports, devices
        self.console_log = workdir / "console.log"
        self.qemu_log = Path(f"/var/log/libvirt/qemu/{name}.log")
        self.serial_path = workdir / "ttyS1.sock"
        self.dom = None

    def start(self) -> LibvirtGuest:
        shutil.copy(self.image.kernel, self.workdir / "vmlinuz")
        shutil.copy(self.image.initrd, self.workdir / "initrd.gz")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.serial_path))
        os.chmod(self.serial_path, 0o666)
        listener.listen(1)
        listener.settimeout(60)
        try:
            self.dom = self.conn.defineXML(domain_xml(self.name, self.workdir, ports=self.ports,
                                                      devices=self.devices))
            # QEMU waits at start for each vhost-user disk's backend: a socket
            # it cannot reach would hang create() for good
            failed: list[BaseException] = []
            starter = threading.Thread(target=self._create, args=(failed,), daemon=True)
            starter.start()
            starter.join(90)
            if starter.is_alive():
                self.dom.destroy()
                starter.join(30)
                raise g.GuestError("the domain did not start within 90 s (QEMU waiting for "
                                   "a vhost-user backend it cannot reach?)")
            if failed:
                raise failed[0]
            self._sock, _ = listener.accept()
            self._sock.settimeout(None)
            self._shell_log_f = open(self.shell_log, "wb")
            self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                            name="libvirt-guest-serial")
            self._reader.start()
            t0 = time.monotonic()
            self._wait_for(g.READY_MARKER, 0, self.boot_timeout)
            self.boot_time = time.monotonic() - t0
            self.run("true", timeout=60)
        except BaseException as e:
            diag = self.diagnostics()
            self.kill()
            raise g.GuestError(f"libvirt guest failed to boot: {e}\n{diag}") from e
        finally:
            listener.close()
        return self

    def _create(self, failed: list) -> None:
        try:
            self.dom.create()
        except BaseException as e:
            failed.append(e)

    def alive(self) -> bool:
        return self.dom is not None and bool(self.dom.isActive())

    def live_xml(self) -> ET.Element:
        return ET.fromstring(self.dom.XMLDesc(0))

    def kill(self, timeout: float = 10.0) -> None:
        if self.dom is not None:
            undefine(self.dom)
            self.dom = None
        super().kill(timeout)


def undefine(dom) -> None:
    import libvirt

    try:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
    except libvirt.libvirtError:
        pass


class Ctx:
    def __init__(self, vm: LibvirtGuest, api: ApiServer, boot_xml: dict):
        self.vm, self.api, self.boot_xml = vm, api, boot_xml
        self.http = api.client()
        self.att: dict[str, dict] = {}
        self.engine = None
        self.extra_domains: list = []

    def fio_verify(self, dev: str, size: str, offset: str = "0", timeout: float = 300) -> str:
        if self.engine is None:
            engines = self.vm.check("/usr/bin/fio --enghelp", timeout=60)
            self.engine = "libaio" if re.search(r"\blibaio\b", engines) else "psync"
        code, out = self.vm.run(
            f"/usr/bin/fio --name=v --filename=/dev/{dev} --direct=1 "
            f"--ioengine={self.engine} --iodepth=8 --rw=randwrite --bs=4k --size={size} "
            f"--offset={offset} --verify=crc32c --do_verify=1 --verify_fatal=1 "
            f"--verify_state_save=0 --randrepeat=0", timeout=timeout)
        assert code == 0, f"fio failed (exit {code}):\n{out}\n{self.api.log()}"
        assert re.search(r"err=\s*0\b", out), out
        return out

    def disks(self) -> dict[str, str]:
        """serial -> guest disk name."""
        out = self.vm.check("for d in /sys/block/vd*; do [ -e $d ] && "
                            "echo $(basename $d) $(cat $d/serial); done; true", timeout=60)
        return {p[1]: p[0] for p in (line.split() for line in out.splitlines())
                if len(p) == 2}

    def wait_disk(self, serial: str, present: bool, timeout: float = 60) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dev = self.disks().get(serial)
            if (dev is not None) == present:
                return dev
            time.sleep(0.3)
        raise AssertionError(f"disk {serial} {'never appeared' if present else 'never left'}"
                             f":\n{self.vm.check('ls /sys/block; dmesg | tail -20')}")

    def live_disk(self, alias: str) -> ET.Element | None:
        for disk in self.vm.live_xml().findall("devices/disk"):
            a = disk.find("alias")
            if a is not None and a.get("name") == alias:
                return disk
        return None

    def cli(self, *argv: str) -> subprocess.CompletedProcess:
        """`python -m blkserve ARGV --url ...` with the token in the environment."""
        env = {**os.environ, "BLKSERVE_API_TOKEN": self.api.token}
        return subprocess.run([sys.executable, "-m", "blkserve", *argv, "--url", self.api.url],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    def attach(self, volume: str, status: int = 201, **body) -> dict:
        r = self.http.post(f"/v1/volumes/{volume}/attachments",
                           json={"hypervisor": "libvirt", "domain": self.vm.name, **body})
        return _ok(r, status)


def _as_user(code: str, uid: int, gid: int) -> subprocess.CompletedProcess:
    # the system Python: the test's own may live under a private /root
    return subprocess.run(["/usr/bin/python3", "-c", code], user=uid, group=gid,
                          capture_output=True, text=True, timeout=30)


def connect_as(path: str, uid: int, gid: int) -> str | None:
    """Why a process of UID:GID cannot connect to the unix socket PATH, or None."""
    out = _as_user(f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({path!r})",
                   uid, gid)
    return None if out.returncode == 0 else out.stderr.strip().splitlines()[-1]


def _ok(r, status: int) -> dict:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} " \
                                    f"{r.text}"
    return r.json() if r.content else {}


@pytest.fixture(scope="module")
def ctx(libvirt_conn, guest_image, tmp_path_factory):
    # QEMU runs as libvirt-qemu: the kernel, initramfs and serial socket live
    # in a directory it may enter (pytest's tmp dirs are private to root)
    workdir = Path(tempfile.mkdtemp(prefix="bs-lv-"))
    workdir.chmod(0o755)
    name = f"bs-test-{uuid.uuid4().hex[:6]}"
    # its state dir is a private (0700) mkdtemp; no token in the environment,
    # so the daemon writes STATE_DIR/api-token, whose mode the tests check
    api = ApiServer(token=None)
    vm = c = None
    try:
        api.start()
        # a volume in the domain's config from its start (cold attach): it
        # takes one of the three root ports, two stay free for hot-plug
        with api.client() as http:
            _ok(http.post("/v1/volumes", json={"name": "lvboot", "size_bytes": 64 * MiB}), 201)
            _ok(http.put("/v1/volumes/lvboot/export", json={}), 201)
            boot_xml = _ok(http.get("/v1/volumes/lvboot/libvirt-xml",
                                    params={"target": "vda"}), 200)
        qemu_user = pwd.getpwnam("libvirt-qemu")
        why = connect_as(boot_xml["socket"], qemu_user.pw_uid, qemu_user.pw_gid)
        assert why is None, f"QEMU's user cannot reach the exported socket: {why}"
        vm = LibvirtGuest(libvirt_conn, name, guest_image, workdir,
                          tmp_path_factory.mktemp("libvirt-guest"), ports=3,
                          devices=boot_xml["xml"])
        vm.start()
        c = Ctx(vm, api, boot_xml)
        yield c
    finally:
        if c is not None:
            for dom in c.extra_domains:
                undefine(dom)
        if vm is not None:
            vm.kill()
        api.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


# -- the checks, in order --------------------------------------------------------


def _qemu_ids(ctx) -> tuple[int, int]:
    """uid, gid the domain's QEMU runs as (its DAC label, e.g. +64055:+64055)."""
    for sec in ctx.vm.live_xml().findall("seclabel"):
        if sec.get("model") == "dac":
            uid, gid = sec.findtext("label").split(":")
            return int(uid.lstrip("+")), int(gid.lstrip("+"))
    raise AssertionError("the domain has no DAC label")


def test_disk_from_libvirt_xml_is_there_at_boot(ctx):
    """The XML of GET .../libvirt-xml in the domain's config: the guest boots
    with the disk (serial: the volume name) and fio verifies on it."""
    r = ctx.boot_xml
    assert r["exported"] is True and r["target"] == "vda"
    disk = ET.fromstring(r["xml"])
    assert disk.get("type") == "vhostuser" and disk.get("device") == "disk"
    assert disk.find("source").get("path") == r["socket"]
    assert r["socket"] == str(ctx.api.state_dir / "sockets" / "lvboot.sock")
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("driver").attrib == {"name": "qemu", "type": "raw", "queues": "1"}
    assert disk.find("source/reconnect").attrib == {"enabled": "yes", "timeout": "1"}
    dev = ctx.wait_disk("lvboot", present=True, timeout=10)
    assert int(ctx.vm.check(f"cat /sys/block/{dev}/size")) * 512 == 64 * MiB
    ctx.fio_verify(dev, "16M")


def test_socket_is_reachable_by_qemu_user_only(ctx):
    """libvirt runs QEMU unprivileged and does not chown vhost-user sockets:
    blkserve gave the socket to QEMU's user (the host's libvirt QEMU user: no
    attach told it the domain's) and let it search the private state dir, and
    nothing else there became readable."""
    uid, gid = _qemu_ids(ctx)
    assert uid != 0
    sock = Path(ctx.boot_xml["socket"])
    st = sock.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o660)
    state = ctx.api.state_dir
    assert stat.S_IMODE(state.stat().st_mode) & 0o007 == 0o001  # search only, for others
    for d in ("volumes", "logs", "stats"):
        assert stat.S_IMODE((state / d).stat().st_mode) == 0o700, d
    for f in ("blkserve.db", "api-token"):
        assert stat.S_IMODE((state / f).stat().st_mode) == 0o600, f
    # as QEMU's user: the socket connects (the export, busy with QEMU, then
    # refuses this second frontend), the rest stays shut
    assert connect_as(str(sock), uid, gid) is None
    for path, mode in ((state / "volumes", "os.X_OK"), (state / "blkserve.db", "os.R_OK"),
                       (state / "logs", "os.X_OK")):
        out = _as_user(f"import os; print(os.access({str(path)!r}, {mode}))", uid, gid)
        assert out.stdout.strip() == "False", (path, out.stdout, out.stderr)


def test_restarted_worker_socket_is_reached_again(ctx):
    """kill -9 of the export worker: its successor's new socket is given to
    QEMU's user again, QEMU's chardev (reconnect) gets in, guest I/O goes on."""
    uid, gid = _qemu_ids(ctx)
    old = _ok(ctx.http.get("/v1/volumes/lvboot/export"), 200)
    os.kill(old["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    e = old
    while time.monotonic() < deadline:
        e = _ok(ctx.http.get("/v1/volumes/lvboot/export"), 200)
        if e["pid"] not in (None, old["pid"]) and e["state"] == "running":
            break
        time.sleep(0.1)
    assert e["pid"] != old["pid"] and e["state"] == "running", e
    st = os.stat(e["socket"])
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o660)
    dev = ctx.disks()["lvboot"]
    ctx.fio_verify(dev, "16M", offset="32M", timeout=120)
    log = (ctx.api.state_dir / "logs" / "lvboot.log").read_text(errors="replace")
    assert log.count("frontend connected") >= 2, log[-2000:]  # QEMU came back


def test_hot_attach_and_fio_verify(ctx):
    _ok(ctx.http.post("/v1/volumes", json={"name": "lvdisk", "size_bytes": 128 * MiB,
                                           "queues": 2}), 201)
    att = ctx.attach("lvdisk")
    ctx.att["lvdisk"] = att
    assert att == {**att, "hypervisor": "libvirt", "uri": URI, "domain": ctx.vm.name,
                   "qmp_socket": None, "state": "attached", "target": "vdb",
                   "device_id": f"ua-blkserve-{att['id']}"}, att
    assert att["bus"] and att["bus"].startswith("pci."), att
    dev = ctx.wait_disk("lvdisk", present=True)  # the serial is the volume name
    assert int(ctx.vm.check(f"cat /sys/block/{dev}/size")) * 512 == 128 * MiB
    assert ctx.vm.check(f"ls /sys/block/{dev}/mq").split() == ["0", "1"]  # queues=2
    assert ctx.vm.check(f"cat /sys/block/{dev}/ro").strip() == "0"
    # what libvirt holds: a vhostuser disk on the export's socket, reconnecting
    vol = _ok(ctx.http.get("/v1/volumes/lvdisk"), 200)
    sock = vol["export"]["socket"]
    disk = ctx.live_disk(att["device_id"])
    assert disk is not None and disk.get("type") == "vhostuser"
    assert disk.find("source").get("path") == sock
    assert disk.find("source/reconnect").get("enabled") == "yes"
    assert disk.find("target").get("dev") == "vdb"
    assert disk.find("driver").get("queues") == "2"
    uid, gid = _qemu_ids(ctx)  # the socket went to the domain's QEMU user
    st = os.stat(sock)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, 0o660)
    ctx.fio_verify(dev, "24M")


def test_read_only_volume_is_read_only_in_guest(ctx):
    _ok(ctx.http.post("/v1/volumes", json={"name": "lvro", "size_bytes": 16 * MiB,
                                           "read_only": True}), 201)
    # through the CLI this time
    r = ctx.cli("attach", "lvro", "--libvirt-domain", ctx.vm.name, "--libvirt-uri", URI,
                "--json")
    assert r.returncode == 0, r.stderr
    att = json.loads(r.stdout)
    assert att["hypervisor"] == "libvirt" and att["domain"] == ctx.vm.name, att
    ctx.att["lvro"] = att
    r = ctx.cli("volume", "show", "lvro")
    assert r.returncode == 0 and ctx.vm.name in r.stdout and att["id"] in r.stdout, r
    r = ctx.cli("attach", "lvro", "--libvirt-domain", ctx.vm.name, "--bus", "hp0")
    assert r.returncode == 1 and "--bus" in r.stderr, r
    assert att["target"] == "vdc", att  # vda and vdb are taken in the live XML
    dev = ctx.wait_disk("lvro", present=True)
    assert ctx.vm.check(f"cat /sys/block/{dev}/ro").strip() == "1"
    code, out = ctx.vm.run(f"/bin/dd if=/dev/zero of=/dev/{dev} bs=4k count=1 oflag=direct")
    assert code != 0, out
    ctx.vm.check(f"/bin/dd if=/dev/{dev} of=/dev/null bs=1M count=4 iflag=direct")


def test_no_free_slot_is_409_and_leaves_nothing(ctx):
    _ok(ctx.http.post("/v1/volumes", json={"name": "lvmore", "size_bytes": 16 * MiB}), 201)
    r = ctx.http.post("/v1/volumes/lvmore/attachments",
                      json={"hypervisor": "libvirt", "domain": ctx.vm.name})
    assert r.status_code == 409 and "pcie-root-port" in r.json()["detail"], r.text
    vol = _ok(ctx.http.get("/v1/volumes/lvmore"), 200)
    assert vol["export"] is None and vol["attachments"] == []
    # already attached to this domain
    r = ctx.http.post("/v1/volumes/lvdisk/attachments",
                      json={"hypervisor": "libvirt", "domain": ctx.vm.name})
    assert r.status_code == 409 and ctx.att["lvdisk"]["id"] in r.json()["detail"], r.text


def test_refusals(ctx, libvirt_conn):
    import libvirt

    # a running (paused: it need not boot) domain whose memory is private
    private = libvirt_conn.defineXML(domain_xml(f"{ctx.vm.name}-priv", None, shared=False,
                                                mem_mib=128, ports=1))
    ctx.extra_domains.append(private)
    private.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    r = ctx.http.post("/v1/volumes/lvmore/attachments",
                      json={"hypervisor": "libvirt", "domain": private.name()})
    assert r.status_code == 409, r.text
    detail = r.json()["detail"]
    assert SHARED in detail and "does not share its memory" in detail, detail
    # defined, shared memory, not running
    off = libvirt_conn.defineXML(domain_xml(f"{ctx.vm.name}-off", None, mem_mib=128, ports=1))
    ctx.extra_domains.append(off)
    r = ctx.http.post("/v1/volumes/lvmore/attachments",
                      json={"hypervisor": "libvirt", "domain": off.name()})
    assert r.status_code == 409 and "not running" in r.json()["detail"], r.text
    r = ctx.http.post("/v1/volumes/lvmore/attachments",
                      json={"hypervisor": "libvirt", "domain": "no-such-domain"})
    assert r.status_code == 422 and "no-such-domain" in r.json()["detail"], r.text
    r = ctx.http.post("/v1/volumes/lvmore/attachments",
                      json={"hypervisor": "libvirt", "domain": ctx.vm.name,
                            "uri": "qemu+unix:///system?socket=/nonexistent/libvirt-sock"})
    assert r.status_code == 403, r.text  # not one of the config's libvirt_sockets
    assert "/nonexistent/libvirt-sock" in r.json()["detail"], r.text
    for body in ({"hypervisor": "libvirt"}, {"hypervisor": "libvirt", "domain": ""},
                 {"hypervisor": "libvirt", "domain": "vm", "uri": "qemu+ssh://host/system"},
                 {"hypervisor": "libvirt", "domain": "vm", "qmp_socket": "/x"},
                 {"hypervisor": "libvirt", "domain": "a/b"}):
        r = ctx.http.post("/v1/volumes/lvmore/attachments", json=body)
        assert r.status_code == 422, (body, r.text)
    vol = _ok(ctx.http.get("/v1/volumes/lvmore"), 200)
    assert vol["export"] is None and vol["attachments"] == []
    ctx.vm.check("true")  # the guest is unaffected


def test_libvirt_xml_variants(ctx, libvirt_conn):
    import libvirt

    # not exported: the socket its export will have
    r = _ok(ctx.http.get("/v1/volumes/lvmore/libvirt-xml", params={"target": "vdc"}), 200)
    assert r["exported"] is False and r["target"] == "vdc"
    assert r["socket"] == str(ctx.api.state_dir / "sockets" / "lvmore.sock")
    assert ET.fromstring(r["xml"]).find("target").get("dev") == "vdc"
    # libvirt takes it into a (stopped) domain's persistent config as it is
    off = next(d for d in ctx.extra_domains if d.name().endswith("-off"))
    off.attachDeviceFlags(r["xml"], libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    cfg = ET.fromstring(off.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    assert [d.find("source").get("path") for d in cfg.findall("devices/disk")] == [r["socket"]]
    # an exported volume: the XML names the running export's socket
    exp = _ok(ctx.http.get("/v1/volumes/lvdisk/export"), 200)
    r = _ok(ctx.http.get("/v1/volumes/lvdisk/libvirt-xml"), 200)
    assert r["exported"] is True and r["target"] == "vdb"
    assert ET.fromstring(r["xml"]).find("source").get("path") == exp["socket"]
    assert ET.fromstring(r["xml"]).find("driver").get("queues") == "2"
    assert ctx.http.get("/v1/volumes/ghost/libvirt-xml").status_code == 404
    assert ctx.http.get("/v1/volumes/lvmore/libvirt-xml",
                        params={"target": "sda"}).status_code == 422


def test_detach_guest_sees_disk_go(ctx):
    att = ctx.att.pop("lvro")
    vol = _ok(ctx.http.get("/v1/volumes/lvro"), 200)
    sock, pid = vol["export"]["socket"], vol["export"]["pid"]
    _ok(ctx.http.delete(f"/v1/volumes/lvro/attachments/{att['id']}"), 204)
    # DELETE returns once the disk has left the live XML
    assert ctx.live_disk(att["device_id"]) is None
    ctx.wait_disk("lvro", present=False)
    assert "lvdisk" in ctx.disks()
    vol = _ok(ctx.http.get("/v1/volumes/lvro"), 200)
    assert vol["attachments"] == [] and vol["export"] is None
    assert not os.path.exists(sock) and pid not in worker_pids(ctx.api.state_dir)


def test_detach_timeout_then_retry(ctx):
    att = ctx.att["lvdisk"]
    r = ctx.http.delete(f"/v1/volumes/lvdisk/attachments/{att['id']}",
                        params={"timeout_s": 0.001})
    if r.status_code == 204:
        pytest.skip("the guest released the disk within 1 ms; no timeout to observe")
    assert r.status_code == 504, r.text
    a = _ok(ctx.http.get(f"/v1/volumes/lvdisk/attachments/{att['id']}"), 200)
    assert a["state"] in ("detaching", "stale") and a["error"], a
    _ok(ctx.http.delete(f"/v1/volumes/lvdisk/attachments/{att['id']}"), 204)
    ctx.att.pop("lvdisk")
    ctx.wait_disk("lvdisk", present=False)
    assert ctx.live_disk(att["device_id"]) is None
    assert sorted(ctx.disks()) == ["lvboot"]
    assert _ok(ctx.http.get("/v1/volumes/lvdisk"), 200)["export"] is None


def test_destroyed_domain_goes_stale(ctx):
    att = ctx.attach("lvdisk")
    dev = ctx.wait_disk("lvdisk", present=True)
    # what fio wrote before the detach is still there
    ctx.vm.check(f"/bin/dd if=/dev/{dev} of=/dev/null bs=1M count=4 iflag=direct")
    ctx.vm.dom.destroy()
    deadline = time.monotonic() + 30
    a = att
    while time.monotonic() < deadline:
        a = _ok(ctx.http.get(f"/v1/volumes/lvdisk/attachments/{att['id']}"), 200)
        if a["state"] == "stale":
            break
        time.sleep(0.5)
    assert a["state"] == "stale" and "not running" in a["error"], a
    assert ctx.http.delete("/v1/volumes/lvdisk").status_code == 409
    _ok(ctx.http.delete(f"/v1/volumes/lvdisk/attachments/{att['id']}"), 204)
    vol = _ok(ctx.http.get("/v1/volumes/lvdisk"), 200)
    assert vol["attachments"] == [] and vol["export"] is None
    _ok(ctx.http.delete("/v1/volumes/lvdisk"), 204)
    assert "Traceback" not in ctx.api.log(), ctx.api.log()


# -- without libvirt -------------------------------------------------------------


def test_without_bindings_libvirt_attach_is_501(tmp_path, monkeypatch):
    """No libvirt-python: a libvirt attach says what to install; the rest
    (here the cold-attach XML) works."""
    from blkserve.api.config import Settings
    from blkserve.api.controller import ApiError, Controller
    from blkserve.api.hypervisors import libvirt_ops as virt
    from blkserve.api.hypervisors.libvirt import LibvirtAttachmentCreate

    monkeypatch.setitem(sys.modules, "libvirt", None)  # import libvirt -> ImportError
    monkeypatch.setattr(virt, "_module", None)

    async def run():
        c = Controller(Settings(state_dir=str(tmp_path)))
        try:
            c.create_volume("nolv", 1 << 20, False, 1, None)
            with pytest.raises(ApiError) as e:
                await c.attach("nolv", LibvirtAttachmentCreate(
                    hypervisor="libvirt", domain="vm1", uri=URI))
            xml = c.hypervisor("libvirt").disk_xml("nolv", "vdb")["xml"]
            assert xml.startswith("<disk type='vhostuser'")
            return e.value
        finally:
            c.state.close()

    err = asyncio.run(run())
    assert err.status == 501 and "pip install libvirt-python" in err.detail, err.detail


OLD_SCHEMA = """
CREATE TABLE volumes (name TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL,
    read_only INTEGER NOT NULL DEFAULT 0, queues INTEGER NOT NULL DEFAULT 1,
    backing TEXT NOT NULL UNIQUE, managed INTEGER NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE exports (volume TEXT PRIMARY KEY REFERENCES volumes(name), socket TEXT NOT NULL,
    explicit INTEGER NOT NULL DEFAULT 0, pid INTEGER, pid_start INTEGER,
    restarts INTEGER NOT NULL DEFAULT 0, started_at TEXT);
CREATE TABLE attachments (id TEXT PRIMARY KEY, volume TEXT NOT NULL REFERENCES volumes(name),
    hypervisor TEXT NOT NULL, qmp_socket TEXT NOT NULL, bus TEXT, device_id TEXT NOT NULL,
    chardev_id TEXT NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL, error TEXT);
"""


def test_database_of_an_older_daemon_is_migrated(tmp_path):
    """A database without the libvirt columns (and a QMP socket required on
    every attachment) is upgraded on start, its rows kept."""
    state = tmp_path / "st"
    (state / "volumes").mkdir(parents=True)
    img = state / "volumes" / "old1.img"
    img.write_bytes(b"\0" * MiB)
    db = sqlite3.connect(state / "blkserve.db")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO volumes VALUES ('old1', ?, 0, 1, ?, 1, '2024-01-01T00:00:00+00:00')",
               (MiB, str(img)))
    db.execute("INSERT INTO attachments VALUES ('a1', 'old1', 'qemu', '/nonexistent/qmp.sock', "
               "'hp0', 'blkserve-a1', 'blkserve-a1-chr', 'stale', "
               "'2024-01-01T00:00:00+00:00', 'the VM is gone')")
    db.commit()
    db.close()
    with ApiServer(state_dir=state) as api, api.client() as http:
        vol = _ok(http.get("/v1/volumes/old1"), 200)
        assert vol["attachments"] == [{
            "id": "a1", "volume": "old1", "hypervisor": "qemu",
            "qmp_socket": "/nonexistent/qmp.sock", "bus": "hp0", "device_id": "blkserve-a1",
            "chardev_id": "blkserve-a1-chr", "uri": None, "domain": None, "target": None,
            "state": "stale", "created_at": "2024-01-01T00:00:00+00:00",
            "error": "the VM is gone", "migrate_from": None}]
        _ok(http.delete("/v1/volumes/old1/attachments/a1"), 204)
        _ok(http.delete("/v1/volumes/old1"), 204)
    db = sqlite3.connect(state / "blkserve.db")
    assert db.execute("PRAGMA user_version").fetchone()[0] >= 1
    cols = {r[1]: r[3] for r in db.execute("PRAGMA table_info(attachments)")}
    assert {"uri", "domain", "target"} <= set(cols) and cols["qmp_socket"] == 0  # nullable
    assert {"migrate_from", "worker_socket", "worker_pid", "worker_pid_start"} <= set(cols)
    db.close()
