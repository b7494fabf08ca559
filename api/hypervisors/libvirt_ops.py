"""The libvirt adapter's operations: hot-attach and detach vhost-user-blk
disks to running libvirt domains (the `libvirt-python` bindings, imported
on first use: without them a libvirt attachment is refused with a clear
error, nothing else changes).

attach: `attachDeviceFlags(VIR_DOMAIN_AFFECT_LIVE)` of a
`<disk type='vhostuser' device='disk'>` whose source is the export's socket
(libvirt's chardev re-dials a restarted export: `<reconnect enabled='yes'>`),
with a free `vdX` target and a user alias `ua-blkserve-ID` that finds it again.
libvirt (9.0) refuses `<serial>` and `<readonly/>` on vhostuser disks: the
export itself gives the guest the volume name as serial (GET_ID) and, for a
read-only volume, VIRTIO_BLK_F_RO.  detach: `detachDeviceAlias` (which only
asks the guest), then the disk is watched until it leaves the live XML.

libvirt calls block: these functions are meant to run in a thread
(asyncio.to_thread), each on a connection of its own.

libvirt runs QEMU as an unprivileged user (libvirt-qemu on Debian) and does not
chown vhost-user sockets: `qemu_owner` finds that user (the running domain's
DAC label, else the host's libvirt QEMU user); api/sockets.py finds the
directories on the way to a socket it could not search."""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import socket
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from xml.sax.saxutils import escape

from blkserve import peers

log = logging.getLogger("blkserve.libvirt")

ALIAS_PREFIX = "ua-blkserve-"  # libvirt user aliases must start with "ua-"
SHARED_MEMORY_XML = ("<memoryBacking><source type='memfd'/><access mode='shared'/>"
                     "</memoryBacking>")
# The users the stock libvirt packages run QEMU as (Debian/Ubuntu, Fedora/RHEL).
QEMU_USERS = ("libvirt-qemu", "qemu")
INSTALL_HINT = ("libvirt attachments need the libvirt Python bindings in blkserve's "
                "environment: pip install libvirt-python (it builds against the host's "
                "libvirt; Debian: apt install libvirt-dev pkg-config first)")


class Unavailable(Exception):
    """The libvirt bindings are not installed."""


class ConnectFailed(Exception):
    """No libvirt connection (the message is libvirt's)."""


class DomainNotFound(Exception):
    pass


class NotRunning(Exception):
    pass


class NoSharedMemory(Exception):
    pass


class NoFreeSlot(Exception):
    pass


class LibvirtFailed(Exception):
    """libvirt (or QEMU under it) refused (the message is libvirt's)."""


class DomainGone(Exception):
    """The domain is no longer there or no longer running."""


class PeerRefused(Exception):
    """What listens on the libvirt socket is not a root libvirt daemon."""


_module = None


def bindings():
    """The `libvirt` module, imported on first use."""
    global _module
    if _module is None:
        try:
            import libvirt
        except ImportError as e:
            raise Unavailable(f"{INSTALL_HINT} ({e})") from None
        # the default handler prints every error on stderr; they are raised anyway
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _module = libvirt
    return _module


def available() -> bool:
    try:
        bindings()
    except Unavailable:
        return False
    return True


@contextlib.contextmanager
def connect(uri: str) -> Iterator:
    lv = bindings()
    # a session URI must not spawn a libvirt session daemon as a side effect
    os.environ.setdefault("LIBVIRT_AUTOSTART", "0")
    try:
        conn = lv.open(uri)
    except lv.libvirtError as e:
        raise ConnectFailed(f"cannot connect to libvirt at {uri}: {e}") from None
    try:
        yield conn
    finally:
        with contextlib.suppress(lv.libvirtError):
            conn.close()


def _lookup(conn, name: str, uri: str):
    lv = bindings()
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as e:
        if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
            raise DomainNotFound(f"libvirt at {uri} has no domain '{name}'") from None
        raise LibvirtFailed(f"libvirt: looking up domain '{name}': {e}") from None
    except ValueError as e:  # e.g. an embedded NUL byte
        raise DomainNotFound(f"no domain '{name}': {e}") from None


def _call(what: str, fn, *args):
    lv = bindings()
    try:
        return fn(*args)
    except lv.libvirtError as e:
        raise LibvirtFailed(f"libvirt {what}: {e}") from None


# -- domain XML ----------------------------------------------------------------


def shares_memory(root: ET.Element) -> bool:
    """Is the guest RAM shared (mappable by a vhost-user backend)?"""
    access = root.find("memoryBacking/access")
    if access is not None and access.get("mode") == "shared":
        return True
    cells = root.findall("cpu/numa/cell")
    return bool(cells) and all(c.get("memAccess") == "shared" for c in cells)


def no_shared_memory_message(domain: str) -> str:
    return (f"libvirt domain '{domain}' does not share its memory, which a vhost-user "
            f"disk needs: add {SHARED_MEMORY_XML} inside <domain> (virsh edit {domain}), "
            "then shut the domain down and start it again")


def _user_ids(spec: str) -> tuple[int, int] | None:
    """'+64055:+64055' or 'libvirt-qemu:kvm' (a DAC label) as (uid, gid)."""
    user, _, group = spec.partition(":")
    try:
        uid = int(user[1:]) if user.startswith("+") else pwd.getpwnam(user).pw_uid
        if not group:
            gid = pwd.getpwuid(uid).pw_gid
        else:
            gid = int(group[1:]) if group.startswith("+") else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        return None
    return uid, gid


def default_qemu_owner() -> tuple[int, int] | None:
    """(uid, gid) libvirt runs QEMU as on this host by default, or None when
    no such user exists (libvirt is not installed)."""
    for name in QEMU_USERS:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        try:
            gid = grp.getgrnam(name).gr_gid  # libvirt's default group has the user's name
        except KeyError:
            gid = pw.pw_gid
        return pw.pw_uid, gid
    return None


def qemu_owner(root: ET.Element) -> tuple[int, int] | None:
    """(uid, gid) the running domain's QEMU runs as: its DAC label, else the
    host's default; None if unknown (then QEMU is taken to be root)."""
    for sec in root.findall("seclabel"):
        if sec.get("model") == "dac" and sec.get("type") != "none":
            label = sec.findtext("label")
            if label:
                ids = _user_ids(label.strip())
                if ids is not None:
                    return ids
    return default_qemu_owner()


def _target_name(n: int) -> str:
    letters = ""
    n += 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return "vd" + letters


def free_target(root: ET.Element) -> str:
    used = {t.get("dev") for t in root.findall("devices/disk/target")}
    n = 0
    while _target_name(n) in used:
        n += 1
    return _target_name(n)


def _attr(value: str) -> str:
    return "'" + escape(value, {"'": "&apos;", '"': "&quot;"}) + "'"


def disk_xml(socket: str, target: str, queues: int, alias: str | None = None) -> str:
    """The <disk> element of an export.  `queues` is always given: libvirt
    would ask for one per vCPU, more than the export may offer.  No <serial>
    and no <readonly/>: libvirt refuses them on vhostuser disks, and the
    export gives the guest both itself."""
    lines = ["<disk type='vhostuser' device='disk'>",
             f"  <driver name='qemu' type='raw' queues={_attr(str(queues))}/>",
             f"  <source type='unix' path={_attr(socket)}>",
             "    <reconnect enabled='yes' timeout='1'/>",
             "  </source>",
             f"  <target dev={_attr(target)} bus='virtio'/>"]
    if alias:
        lines.append(f"  <alias name={_attr(alias)}/>")
    lines.append("</disk>")
    return "\n".join(lines) + "\n"


def find_disk(root: ET.Element, alias: str) -> ET.Element | None:
    for disk in root.findall("devices/disk"):
        a = disk.find("alias")
        if a is not None and a.get("name") == alias:
            return disk
    return None


def _bus_alias(root: ET.Element, disk: ET.Element) -> str | None:
    addr = disk.find("address")
    if addr is None or addr.get("type") != "pci" or not addr.get("bus"):
        return None
    try:
        bus = int(addr.get("bus"), 0)
    except ValueError:
        return None
    for ctl in root.findall("devices/controller"):
        if ctl.get("type") == "pci" and ctl.get("index") == str(bus):
            a = ctl.find("alias")
            return a.get("name") if a is not None else f"pci.{bus}"
    return f"pci.{bus}"


# -- operations (blocking: run them in a thread) -------------------------------


@dataclass
class DomainInfo:
    owner: tuple[int, int] | None  # (uid, gid) its QEMU runs as
    pid: int | None = None  # its QEMU process


def _run_dirs(uri: str) -> list[str]:
    """Where libvirt keeps the pid files of URI's running QEMU domains."""
    if "/session" not in uri:
        return ["/run/libvirt/qemu"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    home = os.path.expanduser("~")
    return [d for d in (runtime and os.path.join(runtime, "libvirt/qemu/run"),
                        os.path.join(home, ".cache/libvirt/qemu/run"),
                        os.path.join(home, ".config/libvirt/qemu/run")) if d]


def _runs_domain(pid: int, domain: str) -> bool:
    """Is PID a QEMU started for DOMAIN (`-name guest=DOMAIN,...`)?"""
    if not peers.is_qemu(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    want = b"guest=" + domain.replace(",", ",,").encode()
    return any(a == want or a.startswith(want + b",") for a in argv)


def qemu_pid(uri: str, domain: str) -> int:
    """The pid of the running DOMAIN's QEMU: libvirt's pid file for it,
    checked against the process (a QEMU binary whose -name is the domain);
    else the one QEMU process whose -name is the domain.  LibvirtFailed if
    there is no such process: the export could not tell it from others."""
    for d in _run_dirs(uri):
        try:
            with open(os.path.join(d, f"{domain}.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if _runs_domain(pid, domain):
            return pid
    found = [int(p) for p in os.listdir("/proc") if p.isdigit() and _runs_domain(int(p), domain)]
    if len(found) == 1:
        return found[0]
    raise LibvirtFailed(f"cannot tell which process is the QEMU of libvirt domain '{domain}' "
                        f"({len(found)} candidates, no usable pid file in "
                        f"{', '.join(_run_dirs(uri))}): the export would not know whom to "
                        "serve")


def daemon_socket(uri: str) -> str | None:
    """The unix socket the libvirt client library dials for URI: its
    ?socket=, else the system daemon's (libvirtd's if it listens, else
    virtqemud's) or the session daemon's."""
    parts = urllib.parse.urlsplit(uri)
    for kv in parts.query.split("&"):
        key, _, value = kv.partition("=")
        if key == "socket":
            return urllib.parse.unquote(value)
    if parts.path == "/system":
        cands = ["/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock"]
    else:
        runtime = os.environ.get("XDG_RUNTIME_DIR") or \
            os.path.join(os.path.expanduser("~"), ".cache")
        cands = [os.path.join(runtime, "libvirt", n) for n in ("libvirt-sock",
                                                                "virtqemud-sock")]
    return next((c for c in cands if os.path.exists(c)), None)


LIBVIRT_DAEMONS = ("libvirtd", "virtqemud", "virtproxyd")


def check_daemon(path: str, timeout: float) -> peers.PeerCred:
    """Connect to the libvirt daemon socket PATH and check who listens: a
    libvirt daemon running as root, else PeerRefused.  ConnectFailed if
    nothing answers within TIMEOUT.  (Blocking: run it in a thread.)"""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(os.path.realpath(path))
        cred = peers.peer_cred(s)
    except OSError as e:
        raise ConnectFailed(f"cannot connect to libvirt at {path}: "
                            f"{e.strerror or 'timed out'}") from None
    finally:
        s.close()
    exe = peers.exe_name(cred.pid)
    if cred.uid != 0 or exe not in LIBVIRT_DAEMONS:
        raise PeerRefused(f"the process listening on {path} (pid {cred.pid}, uid {cred.uid}, "
                          f"{exe or 'unknown program'}) is not a libvirt daemon running as "
                          f"root ({', '.join(LIBVIRT_DAEMONS)}); blkserve does not trust it")
    return cred


def inspect(uri: str, domain: str) -> DomainInfo:
    """Check that DOMAIN can take a vhost-user disk: it exists, shares its
    memory and runs (NotRunning, NoSharedMemory, DomainNotFound...)."""
    with connect(uri) as conn:
        dom = _lookup(conn, domain, uri)
        running = bool(_call("isActive", dom.isActive))
        root = ET.fromstring(_call("XMLDesc", dom.XMLDesc, 0))
    if not shares_memory(root):
        raise NoSharedMemory(no_shared_memory_message(domain))
    if not running:
        raise NotRunning(f"libvirt domain '{domain}' is not running; start it (or, for a "
                         "disk present from its next start, add the XML of GET "
                         ".../libvirt-xml to its config)")
    return DomainInfo(qemu_owner(root), qemu_pid(uri, domain))


def attach(uri: str, domain: str, socket: str, queues: int, alias: str) -> tuple[str, str | None]:
    """Hot-plug the export into DOMAIN; returns (target dev, bus)."""
    lv = bindings()
    with connect(uri) as conn:
        dom = _lookup(conn, domain, uri)
        root = ET.fromstring(_call("XMLDesc", dom.XMLDesc, 0))
        target = free_target(root)
        xml = disk_xml(socket, target, queues, alias)
        try:
            dom.attachDeviceFlags(xml, lv.VIR_DOMAIN_AFFECT_LIVE)
        except lv.libvirtError as e:
            msg = str(e)
            if "No more available PCI slots" in msg or "no free" in msg.lower():
                raise NoFreeSlot(
                    f"libvirt domain '{domain}' has no free PCI(e) slot to hot-plug into "
                    f"({msg}); give it an empty <controller type='pci' "
                    "model='pcie-root-port'/> per disk (q35; effective at its next "
                    "start)") from None
            if "Permission denied" in msg:
                msg += (" (QEMU could not open the export socket: see the socket and "
                        "directory permissions in blkserve's README)")
            raise LibvirtFailed(f"libvirt attachDeviceFlags: {msg}") from None
        live = ET.fromstring(_call("XMLDesc", dom.XMLDesc, 0))
    disk = find_disk(live, alias)
    bus = _bus_alias(live, disk) if disk is not None else None
    log.info("attached %s to libvirt domain %s as %s (%s)", socket, domain, target, alias)
    return target, bus


def disk_present(uri: str, domain: str, alias: str) -> bool:
    """Is the disk still in the running domain?  DomainGone if the domain is
    not (then the disk is gone with it)."""
    with connect(uri) as conn:
        try:
            dom = _lookup(conn, domain, uri)
        except DomainNotFound as e:
            raise DomainGone(str(e)) from None
        # the XML first: read after a stop, it would be the config, without the disk
        root = ET.fromstring(_call("XMLDesc", dom.XMLDesc, 0))
        if not _call("isActive", dom.isActive):
            raise DomainGone(f"libvirt domain '{domain}' is not running")
        return find_disk(root, alias) is not None


def request_detach(uri: str, domain: str, alias: str) -> bool:
    """Ask the guest to release the disk (returns at once); False if the disk
    is already gone."""
    lv = bindings()
    if not disk_present(uri, domain, alias):
        return False
    with connect(uri) as conn:
        dom = _lookup(conn, domain, uri)
        try:
            dom.detachDeviceAlias(alias, lv.VIR_DOMAIN_AFFECT_LIVE)
        except lv.libvirtError as e:
            if "no device found" in str(e):
                return False
            raise LibvirtFailed(f"libvirt detachDeviceAlias: {e}") from None
    return True


def stale_reasons(uri: str, disks: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """For (domain, alias) pairs on URI: why each one that is gone is gone.
    A failing connection says nothing (raises ConnectFailed)."""
    out = {}
    with connect(uri) as conn:
        for domain, alias in disks:
            try:
                dom = _lookup(conn, domain, uri)
                # the XML first: read after a stop, it would be the config
                root = ET.fromstring(_call("XMLDesc", dom.XMLDesc, 0))
                if not _call("isActive", dom.isActive):
                    out[domain, alias] = f"libvirt domain '{domain}' is not running"
                elif find_disk(root, alias) is None:
                    out[domain, alias] = f"the disk is no longer in libvirt domain '{domain}'"
            except DomainNotFound:
                out[domain, alias] = f"libvirt domain '{domain}' is gone"
            except LibvirtFailed as e:
                log.debug("stale check of %s on %s: %s", alias, domain, e)
    return out
