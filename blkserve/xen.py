"""Serve a backing store to a Xen domain through the blkif protocol.

The backend runs in dom0 (or a driver domain).  It does the xenstore
hot-plug handshake itself (no libxl disk entry, no hotplug script): it
creates the backend and frontend directories of a vbd, offers its features
and waits in InitWait; when blkfront has published its ring(s) and event
channel(s) it maps them through libxengnttab, binds the channels through
libxenevtchn, and hands each ring to the C engine (native/blkif.c, one
thread and io_uring per ring, on the same request core as the virtio
queues).  The Xen libraries are Debian's, opened with cffi at run time:
without them a Xen export is a clear error (XenUnavailable), not a crash.
"""

from __future__ import annotations

import logging
import os
import re
import select
import time
from dataclasses import dataclass, field

import cffi

from blkserve.native import STAT_FIELDS, Target

log = logging.getLogger("blkserve.xen")

# xenbus states (xen/io/xenbus.h)
INITIALISING, INITWAIT, INITIALISED, CONNECTED, CLOSING, CLOSED = 1, 2, 3, 4, 5, 6
STATE_NAMES = {0: "Unknown", 1: "Initialising", 2: "InitWait", 3: "Initialised",
               4: "Connected", 5: "Closing", 6: "Closed", 7: "Reconfiguring",
               8: "Reconfigured"}
VDISK_READONLY = 4
PROT_READ, PROT_WRITE = 1, 2
XS_PERM_NONE, XS_PERM_READ = 0, 1
MAX_RING_PAGE_ORDER = 2          # up to 4 pages per ring
MAX_QUEUES = 4
NATIVE_PROTOCOL = "x86_64-abi"   # the only ABI whose layout we serve

_CDEF = """
struct xs_handle;
typedef uint32_t xs_transaction_t;
struct xs_permissions { unsigned int id; unsigned int perms; };
struct xs_handle *xs_open(unsigned long flags);
void xs_close(struct xs_handle *xsh);
void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len);
bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path, const void *data,
              unsigned int len);
bool xs_mkdir(struct xs_handle *h, xs_transaction_t t, const char *path);
bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path);
char **xs_directory(struct xs_handle *h, xs_transaction_t t, const char *path,
                    unsigned int *num);
bool xs_set_permissions(struct xs_handle *h, xs_transaction_t t, const char *path,
                        struct xs_permissions *perms, unsigned int num_perms);
bool xs_watch(struct xs_handle *h, const char *path, const char *token);
bool xs_unwatch(struct xs_handle *h, const char *path, const char *token);
int xs_fileno(struct xs_handle *h);
char **xs_check_watch(struct xs_handle *h);
xs_transaction_t xs_transaction_start(struct xs_handle *h);
bool xs_transaction_end(struct xs_handle *h, xs_transaction_t t, bool abort);

typedef struct xengnttab_handle xengnttab_handle;
xengnttab_handle *xengnttab_open(void *logger, unsigned int open_flags);
int xengnttab_close(xengnttab_handle *xgt);
void *xengnttab_map_domain_grant_refs(xengnttab_handle *xgt, uint32_t count, uint32_t domid,
                                      uint32_t *refs, int prot);
int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count);

typedef struct xenevtchn_handle xenevtchn_handle;
xenevtchn_handle *xenevtchn_open(void *logger, unsigned int open_flags);
int xenevtchn_close(xenevtchn_handle *xce);
int xenevtchn_fd(xenevtchn_handle *xce);
int xenevtchn_notify(xenevtchn_handle *xce, uint32_t port);
int xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid, uint32_t remote_port);
int xenevtchn_unbind(xenevtchn_handle *xce, uint32_t port);
int xenevtchn_pending(xenevtchn_handle *xce);
int xenevtchn_unmask(xenevtchn_handle *xce, uint32_t port);

void free(void *ptr);
"""

# libxenctrl, for one question only: did a domain that vanished shut down to
# be saved or migrated (SHUTDOWN_suspend) or for good?  Its ABI changes with
# every Xen release, but the domain info starts the same way in all of them:
# domid_t domain, uint16_t pad, uint32_t flags (xen/domctl.h).
_XC_CDEF = """
struct dominfo_head { uint16_t domain; uint16_t pad; uint32_t flags; };
typedef struct xc_interface_core xc_interface;
xc_interface *xc_interface_open(void *logger, void *dombuild_logger, unsigned open_flags);
int xc_interface_close(xc_interface *xch);
int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain, unsigned int max_domains,
                          void *info);
"""
XEN_DOMINF_SHUTDOWN = 1 << 2
XEN_DOMINF_SHUTDOWNSHIFT = 16
SHUTDOWN_SUSPEND = 2
_XC_SONAMES = ("libxenctrl.so.4.17", "libxenctrl.so.4.18", "libxenctrl.so.4.19",
               "libxenctrl.so.4.16", "libxenctrl.so")


class XenUnavailable(Exception):
    """The Xen libraries or devices are missing (not a Xen dom0)."""


class XenError(Exception):
    """A Xen operation failed (message says which)."""


class _Libs:
    def __init__(self) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef(_CDEF)
        try:
            self.xs = self.ffi.dlopen("libxenstore.so.4")
            self.gnt = self.ffi.dlopen("libxengnttab.so.1")
            self.evt = self.ffi.dlopen("libxenevtchn.so.1")
        except OSError as e:
            raise XenUnavailable(
                f"the Xen libraries are not installed ({e}); install Debian's libxenstore4, "
                "libxengnttab1 and libxenevtchn1 (blkserve must run in dom0 or a driver "
                "domain)") from None
        self.libc = self.ffi.dlopen(None)
        self._xc_ffi = None
        self._xc = None

    def xc(self):
        """(ffi, lib) of libxenctrl, or None where it is not installed."""
        if self._xc_ffi is None:
            ffi = cffi.FFI()
            ffi.cdef(_XC_CDEF)
            for name in _XC_SONAMES:
                try:
                    self._xc = ffi.dlopen(name)
                    break
                except OSError:
                    continue
            self._xc_ffi = ffi
        return (self._xc_ffi, self._xc) if self._xc is not None else None

    def addr(self, cdata) -> int:
        return int(self.ffi.cast("uintptr_t", cdata))


_libs: _Libs | None = None


def libs() -> _Libs:
    global _libs
    if _libs is None:
        _libs = _Libs()
    return _libs


class XenStore:
    """A connection to xenstored (the small part of libxenstore we need)."""

    def __init__(self) -> None:
        self.L = libs()
        ffi = self.L.ffi
        self.h = self.L.xs.xs_open(0)
        if self.h == ffi.NULL:
            err = ffi.errno
            raise XenUnavailable(f"cannot connect to xenstored: {os.strerror(err)} "
                                 "(is this a Xen dom0 with xenstored running?)")

    def read(self, path: str) -> str | None:
        ffi = self.L.ffi
        n = ffi.new("unsigned int *")
        p = self.L.xs.xs_read(self.h, 0, path.encode(), n)
        if p == ffi.NULL:
            return None
        try:
            return ffi.string(ffi.cast("char *", p), n[0]).decode(errors="replace")
        finally:
            self.L.libc.free(p)

    def read_int(self, path: str, default: int | None = None) -> int | None:
        v = self.read(path)
        if v is None:
            return default
        try:
            return int(v.strip())
        except ValueError:
            return default

    def write(self, path: str, value: str | int) -> None:
        data = str(value).encode()
        if not self.L.xs.xs_write(self.h, 0, path.encode(), data, len(data)):
            raise XenError(f"xenstore write {path}: {os.strerror(self.L.ffi.errno)}")

    def rm(self, path: str) -> None:
        self.L.xs.xs_rm(self.h, 0, path.encode())

    def mkdir(self, path: str, perms: list[tuple[int, int]]) -> None:
        ffi = self.L.ffi
        if not self.L.xs.xs_mkdir(self.h, 0, path.encode()):
            raise XenError(f"xenstore mkdir {path}: {os.strerror(ffi.errno)}")
        p = ffi.new("struct xs_permissions[]", len(perms))
        for i, (dom, perm) in enumerate(perms):
            p[i].id = dom
            p[i].perms = perm
        if not self.L.xs.xs_set_permissions(self.h, 0, path.encode(), p, len(perms)):
            raise XenError(f"xenstore set permissions {path}: {os.strerror(ffi.errno)}")

    def directory(self, path: str) -> list[str]:
        ffi = self.L.ffi
        n = ffi.new("unsigned int *")
        p = self.L.xs.xs_directory(self.h, 0, path.encode(), n)
        if p == ffi.NULL:
            return []
        try:
            return [ffi.string(p[i]).decode() for i in range(n[0])]
        finally:
            self.L.libc.free(p)

    def watch(self, path: str, token: str) -> None:
        if not self.L.xs.xs_watch(self.h, path.encode(), token.encode()):
            raise XenError(f"xenstore watch {path}: {os.strerror(self.L.ffi.errno)}")

    def unwatch(self, path: str, token: str) -> None:
        self.L.xs.xs_unwatch(self.h, path.encode(), token.encode())

    def fileno(self) -> int:
        return self.L.xs.xs_fileno(self.h)

    def drain_watches(self) -> list[str]:
        """Consume the watch events that arrived; returns their paths."""
        paths = []
        while True:
            p = self.L.xs.xs_check_watch(self.h)
            if p == self.L.ffi.NULL:
                return paths
            paths.append(self.L.ffi.string(p[0]).decode(errors="replace"))
            self.L.libc.free(p)

    def close(self) -> None:
        if self.h is not None:
            self.L.xs.xs_close(self.h)
            self.h = None


def resolve_domain(xs: XenStore, domain: str) -> tuple[int, str]:
    """A domain id or name -> (domid, name), from xenstore."""
    doms = xs.directory("/local/domain")
    if domain.isdigit():
        domid = int(domain)
        if str(domid) not in doms:
            raise XenError(f"no Xen domain with id {domid}")
        return domid, xs.read(f"/local/domain/{domid}/name") or str(domid)
    for d in doms:
        if xs.read(f"/local/domain/{d}/name") == domain:
            return int(d), domain
    raise XenError(f"no running Xen domain named {domain!r}")


def domain_exists(domain: str) -> None:
    """Raises XenError if DOMAIN (name or id) is not running."""
    xs = XenStore()
    try:
        resolve_domain(xs, domain)
    finally:
        xs.close()


def domain_saved(domid: int) -> bool | None:
    """Whether DOMID, gone from xenstore, shut down to be saved or migrated
    (`xl save`, `xl migrate`: SHUTDOWN_suspend) rather than destroyed,
    crashed or shut down for good.  A dying domain is still known to the
    hypervisor while a backend holds its grants mapped, so ask before
    unmapping them.  None: libxenctrl is not installed or cannot be
    opened (not dom0)."""
    xc = libs().xc()
    if xc is None:
        return None
    ffi, lib = xc
    h = lib.xc_interface_open(ffi.NULL, ffi.NULL, 0)
    if h == ffi.NULL:
        return None
    try:
        buf = ffi.new("uint8_t[]", 4096)       # one entry, whatever its size
        n = lib.xc_domain_getinfolist(h, domid, 1, buf)
        info = ffi.cast("struct dominfo_head *", buf)
        if n != 1 or info.domain != domid:
            return False                        # released already: nothing to tell
        flags = info.flags
        return bool(flags & XEN_DOMINF_SHUTDOWN) and \
            (flags >> XEN_DOMINF_SHUTDOWNSHIFT) & 0xFF == SHUTDOWN_SUSPEND
    finally:
        lib.xc_interface_close(h)


class VbdInUse(XenError):
    """The domain already has a disk with that device number."""


def find_domain(domain: str, vdev: str | None) -> tuple[int, str, str]:
    """(domid, name, vdev) for attaching a disk to DOMAIN: VDEV, or the first
    xvdX from xvdb on that the domain does not have yet."""
    xs = XenStore()
    try:
        domid, name = resolve_domain(xs, domain)
        used = set(xs.directory(f"/local/domain/{domid}/device/vbd"))
    finally:
        xs.close()
    if vdev is not None:
        if str(vdev_to_devid(vdev)) in used:
            raise VbdInUse(f"Xen domain {name} already has a disk {vdev}")
        return domid, name, vdev
    for c in "bcdefghijklmnopqrstuvwxyz":
        if str(vdev_to_devid("xvd" + c)) not in used:
            return domid, name, "xvd" + c
    raise VbdInUse(f"Xen domain {name} has no free xvdX name left")


def vdev_to_devid(vdev: str) -> int:
    """xvdb -> 51728 (the Linux PV disk numbering); a number passes through."""
    if vdev.isdigit():
        return int(vdev)
    if vdev.startswith("xvd") and vdev[3:].isalpha() and vdev[3:].islower():
        idx = 0
        for ch in vdev[3:]:
            idx = idx * 26 + (ord(ch) - ord("a") + 1)
        idx -= 1
        return (202 << 8) | (idx << 4) if idx < 16 else (1 << 28) | (idx << 8)
    raise XenError(f"--vdev {vdev!r}: expected xvd<letters> or a device number")


@dataclass
class _Ring:
    blkif: object                    # the engine's bs_blkif *
    sring: object                    # mapped ring pages
    pages: int
    evtchn: object                   # xenevtchn_handle *
    port: int
    ops: object = None
    cfg: object = None
    stats_keep: list = field(default_factory=list)


class BlkifBackend:
    """One virtual block device of one Xen domain, served from TARGET."""

    def __init__(self, target: Target, domid: int, devid: int, *, read_only: bool,
                 physical_sector_size: int = 512, discard_granularity: int = 4096,
                 stats_areas=None, name: str | None = None, on_change=None) -> None:
        from blkserve._native import ffi as nffi
        from blkserve._native import lib as nlib
        self.nffi, self.nlib = nffi, nlib
        self.L = libs()
        self.target = target
        self.domid = domid
        self.devid = devid
        self.read_only = read_only
        self.physical_sector_size = physical_sector_size
        self.discard_granularity = discard_granularity
        self.stats_areas = stats_areas
        self.xs = XenStore()
        self._paths()
        # the domain's name, followed across `xl save`/`xl restore`, where it
        # comes back with another domid
        self.name = name
        self.on_change = on_change or (lambda event, old, new: None)
        self.waiting_for: str | None = None   # saved: the name to come back
        self.gone = False                      # destroyed or shut down for good
        self.gnttab = self.L.gnt.xengnttab_open(self.L.ffi.NULL, 0)
        if self.gnttab == self.L.ffi.NULL:
            raise XenUnavailable(f"cannot open /dev/xen/gntdev: "
                                 f"{os.strerror(self.L.ffi.errno)}")
        self.rings: list[_Ring] = []
        self.max_indirect = min(64, int(nlib.bs_blkif_max_indirect()))
        self.connections = 0

    def _paths(self) -> None:
        self.be = f"/local/domain/0/backend/vbd/{self.domid}/{self.devid}"
        self.fe = f"/local/domain/{self.domid}/device/vbd/{self.devid}"

    # ---- xenstore layout ----
    def create(self, reclaim: bool = False) -> None:
        """Create both directories and wait in InitWait with our features.
        RECLAIM: the vbd may be left over by a backend that died (the caller
        holds its lock): close it in the guest and offer it afresh."""
        xs = self.xs
        if xs.read(f"{self.fe}/state") is not None or xs.read(f"{self.be}/state") is not None:
            owner = xs.read(f"{self.be}/blkserve-pid")
            if not reclaim or owner is None:
                raise XenError(f"domain {self.domid} already has a vbd {self.devid} "
                               f"({self.fe}); pick another --vdev/--xen-devid")
            # blkfront cannot resume a ring whose backend died: requests that
            # were in flight failed in the guest; close the device there and
            # offer it again
            log.warning("vbd %d of domain %d was left by a backend that died (pid %s): "
                        "closing it in the guest and offering it again", self.devid,
                        self.domid, owner)
            self.destroy(timeout=10.0, watching=False)
        xs.mkdir(self.be, [(0, XS_PERM_NONE), (self.domid, XS_PERM_READ)])
        for k, v in (("frontend", self.fe), ("frontend-id", self.domid), ("online", 1),
                     ("device-type", "disk"), ("mode", "r" if self.read_only else "w"),
                     ("blkserve-pid", os.getpid()), ("state", INITIALISING)):
            xs.write(f"{self.be}/{k}", v)
        xs.mkdir(self.fe, [(self.domid, XS_PERM_NONE), (0, XS_PERM_READ)])
        for k, v in (("backend", self.be), ("backend-id", 0), ("virtual-device", self.devid),
                     ("device-type", "disk"), ("state", INITIALISING)):
            xs.write(f"{self.fe}/{k}", v)
        self._offer_features()
        xs.write(f"{self.be}/state", INITWAIT)
        xs.watch(f"{self.fe}/state", "fe")
        xs.watch(f"{self.be}/state", "be")

    def _offer_features(self) -> None:
        xs = self.xs
        feats = {
            "feature-flush-cache": 1,
            "feature-barrier": 1,
            "feature-persistent": 1,
            "feature-max-indirect-segments": self.max_indirect,
            "max-ring-page-order": MAX_RING_PAGE_ORDER,
            "multi-queue-max-queues": MAX_QUEUES,
            "feature-discard": 0 if self.read_only else 1,
            "discard-granularity": self.discard_granularity,
            "discard-alignment": 0,
            "discard-secure": 0,
        }
        for k, v in feats.items():
            xs.write(f"{self.be}/{k}", v)

    def frontend_state(self) -> int:
        return self.xs.read_int(f"{self.fe}/state", 0) or 0

    def backend_state(self) -> int:
        return self.xs.read_int(f"{self.be}/state", 0) or 0

    # ---- connect / disconnect ----
    def connect(self) -> None:
        xs, fe = self.xs, self.fe
        proto = xs.read(f"{fe}/protocol")
        if proto not in (None, "", NATIVE_PROTOCOL):
            raise XenError(f"frontend protocol {proto!r} is not served (only "
                           f"{NATIVE_PROTOCOL}: 64-bit x86 guests)")
        nq = xs.read_int(f"{fe}/multi-queue-num-queues", 1) or 1
        if not 1 <= nq <= MAX_QUEUES:
            raise XenError(f"frontend asks for {nq} queues (we offer 1..{MAX_QUEUES})")
        order = xs.read_int(f"{fe}/ring-page-order", 0) or 0
        if not 0 <= order <= MAX_RING_PAGE_ORDER:
            raise XenError(f"frontend ring-page-order {order} is above the "
                           f"max-ring-page-order {MAX_RING_PAGE_ORDER} we offer")
        persistent = xs.read_int(f"{fe}/feature-persistent", 0) == 1
        try:
            for q in range(nq):
                base = fe if nq == 1 else f"{fe}/queue-{q}"
                self.rings.append(self._map_ring(q, base, order, persistent))
        except BaseException:
            self.disconnect()
            raise
        cap = self.target.config.capacity
        xs.write(f"{self.be}/sectors", cap // 512)
        xs.write(f"{self.be}/info", VDISK_READONLY if self.read_only else 0)
        xs.write(f"{self.be}/sector-size", self.target.config.block_size)
        xs.write(f"{self.be}/physical-sector-size", self.physical_sector_size)
        xs.write(f"{self.be}/state", CONNECTED)
        self.connections += 1
        log.info("vbd %d of domain %d connected: %d ring(s) of %d page(s), %s grants, "
                 "%d sectors%s", self.devid, self.domid, nq, 1 << order,
                 "persistent" if persistent else "per-request", cap // 512,
                 ", read-only" if self.read_only else "")

    def _map_ring(self, q: int, base: str, order: int, persistent: bool) -> _Ring:
        L, ffi = self.L, self.L.ffi
        pages = 1 << order
        if order == 0:
            keys = ["ring-ref"]
        else:
            keys = [f"ring-ref{i}" for i in range(pages)]
        refs = ffi.new("uint32_t[]", pages)
        for i, k in enumerate(keys):
            v = self.xs.read_int(f"{base}/{k}")
            if v is None or not 0 <= v < 2**32:
                raise XenError(f"frontend has no valid {base}/{k}")
            refs[i] = v
        remote = self.xs.read_int(f"{base}/event-channel")
        if remote is None or not 0 <= remote < 2**32:
            raise XenError(f"frontend has no valid {base}/event-channel")
        sring = L.gnt.xengnttab_map_domain_grant_refs(self.gnttab, pages, self.domid, refs,
                                                      PROT_READ | PROT_WRITE)
        if sring == ffi.NULL:
            raise XenError(f"cannot map the ring of queue {q} (grant refs "
                           f"{list(refs)}): {os.strerror(ffi.errno)}")
        evh = L.evt.xenevtchn_open(ffi.NULL, 0)
        if evh == ffi.NULL:
            L.gnt.xengnttab_unmap(self.gnttab, sring, pages)
            raise XenUnavailable(f"cannot open /dev/xen/evtchn: {os.strerror(ffi.errno)}")
        port = L.evt.xenevtchn_bind_interdomain(evh, self.domid, remote)
        if port < 0:
            err = ffi.errno
            L.evt.xenevtchn_close(evh)
            L.gnt.xengnttab_unmap(self.gnttab, sring, pages)
            raise XenError(f"cannot bind event channel {remote} of domain {self.domid}: "
                           f"{os.strerror(err)}")
        nffi, nlib = self.nffi, self.nlib
        out = nffi.new("bs_blkif **")
        ring = _Ring(blkif=None, sring=sring, pages=pages, evtchn=evh, port=port)
        if nlib.bs_blkif_new(self.target.handle, q, out) < 0:
            self._unmap_ring(ring)
            raise XenError("cannot allocate an engine ring")
        ring.blkif = out[0]
        if self.stats_areas is not None:
            nlib.bs_blkif_set_stats(ring.blkif, self.stats_areas(q))
        ops = nffi.new("struct bs_xen_ops *")
        ops.gnttab = nffi.cast("void *", L.addr(self.gnttab))
        ops.evtchn = nffi.cast("void *", L.addr(evh))
        ops.map_domain_grant_refs = nffi.cast(
            "void *(*)(void *, uint32_t, uint32_t, uint32_t *, int)",
            L.addr(L.gnt.xengnttab_map_domain_grant_refs))
        ops.unmap = nffi.cast("int (*)(void *, void *, uint32_t)", L.addr(L.gnt.xengnttab_unmap))
        ops.notify = nffi.cast("int (*)(void *, uint32_t)", L.addr(L.evt.xenevtchn_notify))
        ops.pending = nffi.cast("int (*)(void *)", L.addr(L.evt.xenevtchn_pending))
        ops.unmask = nffi.cast("int (*)(void *, uint32_t)", L.addr(L.evt.xenevtchn_unmask))
        cfg = nffi.new("struct bs_blkif_cfg *")
        cfg.sring = nffi.cast("void *", L.addr(sring))
        cfg.ring_pages = pages
        cfg.domid = self.domid
        cfg.port = port
        cfg.evtchn_fd = L.evt.xenevtchn_fd(evh)
        cfg.persistent = int(persistent)
        cfg.max_indirect = self.max_indirect
        cfg.discard = int(not self.read_only)
        ring.ops, ring.cfg = ops, cfg
        ret = nlib.bs_blkif_start(ring.blkif, ops, cfg)
        if ret < 0:
            self._unmap_ring(ring)
            raise XenError(f"cannot start the engine on queue {q}: {os.strerror(-ret)}")
        return ring

    def _unmap_ring(self, ring: _Ring) -> None:
        L = self.L
        if ring.blkif is not None:
            ret = self.nlib.bs_blkif_stop(ring.blkif)
            if ret < 0:
                log.error("vbd %d: a ring stopped with requests still in flight after the "
                          "drain timeout: %s", self.devid, os.strerror(-ret))
            self.nlib.bs_blkif_free(ring.blkif)
            ring.blkif = None
        L.evt.xenevtchn_unbind(ring.evtchn, ring.port)
        L.evt.xenevtchn_close(ring.evtchn)
        L.gnt.xengnttab_unmap(self.gnttab, ring.sring, ring.pages)

    def disconnect(self) -> None:
        while self.rings:
            self._unmap_ring(self.rings.pop())

    def stats(self) -> dict[str, int]:
        total = dict.fromkeys(STAT_FIELDS, 0)
        s = self.nffi.new("struct bs_queue_stats *")
        for r in self.rings:
            self.nlib.bs_blkif_get_stats(r.blkif, s)
            for f in STAT_FIELDS:
                total[f] += int(getattr(s, f))
        return total

    # ---- the state machine ----
    def step(self) -> None:
        """React to the frontend's state (called on every watch event)."""
        fs, bs = self.frontend_state(), self.backend_state()
        if fs == 0 and not self.gone and \
                self.xs.read(f"/local/domain/{self.domid}/name") is None:
            self._domain_gone()
        elif fs in (INITIALISED, CONNECTED) and bs == INITWAIT:
            try:
                self.connect()
            except (XenError, XenUnavailable) as e:
                log.error("vbd %d of domain %d: %s; closing the device", self.devid,
                          self.domid, e)
                self.xs.write(f"{self.be}/state", CLOSING)
        elif fs == CLOSING and bs != CLOSING and bs != CLOSED:
            self.disconnect()
            self.xs.write(f"{self.be}/state", CLOSING)
        elif fs == CLOSED and bs in (CONNECTED, CLOSING, INITWAIT):
            self.disconnect()
            self.xs.write(f"{self.be}/state", CLOSED)
        elif fs == INITIALISING and bs == CLOSED:
            # the frontend starts over (module reloaded, guest kexec):
            # offer the device again
            self._offer_features()
            self.xs.write(f"{self.be}/state", INITWAIT)

    def serve(self, stop_fd: int) -> None:
        """Follow the frontend until stop_fd is readable."""
        self.step()
        xfd = self.xs.fileno()
        while True:
            r, _, _ = select.select([xfd, stop_fd], [], [], 5.0)
            if stop_fd in r:
                return
            paths = self.xs.drain_watches()
            if self.waiting_for is not None:
                self._look_for_domain(paths)     # none: a timeout, look at all
            else:
                self.step()

    # ---- the domain goes away, and may come back ----
    def _domain_gone(self) -> None:
        """The domain's xenstore directory is gone: the toolstack destroyed
        it.  Ask the hypervisor why while it still knows the domain (our
        grant mappings keep it dying, not dead), then let go of it: finish
        what is in flight, unmap the rings and grants, remove our
        directories.  A domain saved (SHUTDOWN_suspend) comes back under
        its name with another domid (`xl restore`): wait for it and offer
        the disk there; blkfront resumes on the new vbd and redoes what it
        had in flight.  (`xl migrate` suspends too, but runs the
        destination before it destroys the source: too late for this, see
        deploy/xen/README.md.)  Any other end (destroy, shutdown, crash) is
        final."""
        old = self.domid
        saved = domain_saved(old)
        st = self.stats()
        log.info("vbd %d of domain %d: the domain is gone (%s) after %d reads and %d writes "
                 "on these rings, %d in flight", self.devid, old,
                 "saved or migrating" if saved else "for good", st["reqs_read"],
                 st["reqs_write"], st["inflight"])
        self.disconnect()
        self.xs.unwatch(f"{self.fe}/state", "fe")
        self.xs.unwatch(f"{self.be}/state", "be")
        self.xs.rm(self.be)
        self.xs.rm(self.fe)
        if saved and self.name:
            self.waiting_for = self.name
            self.xs.watch("/local/domain", "domains")
            self.on_change("saved", old, None)
            self._look_for_domain([])
        else:
            self.gone = True
            self.on_change("gone", old, None)

    def _look_for_domain(self, paths: list[str]) -> None:
        """A domain named as the one we wait for: offer the disk to it.
        Every change under /local/domain is an event; only a domain's own
        directory or name can make one ours (a rename: `xl migrate`)."""
        if paths:
            ids = {m.group(1) for p in paths
                   if (m := re.fullmatch(r"/local/domain/(\d+)(?:/name)?", p))}
        else:
            ids = set(self.xs.directory("/local/domain"))
        for d in sorted(ids, key=int):
            if d != "0" and self.xs.read(f"/local/domain/{d}/name") == self.waiting_for:
                self._offer_again(int(d))
                return

    def _offer_again(self, domid: int) -> None:
        old = self.domid
        self.xs.unwatch("/local/domain", "domains")
        self.waiting_for = None
        if self.on_change("back", old, domid) is False:
            self.gone = True          # another backend serves that vbd now
            return
        self.domid = domid
        self._paths()
        self.create(reclaim=True)

    def destroy(self, timeout: float = 10.0, watching: bool = True) -> None:
        """Detach: Closing, wait for the frontend to close, Closed, remove
        both directories (the guest sees the disk go)."""
        xs = self.xs
        if self.backend_state() not in (CLOSED, 0):
            xs.write(f"{self.be}/state", CLOSING)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.frontend_state() in (CLOSED, 0):
                    break
                select.select([xs.fileno()], [], [], 0.2)
                xs.drain_watches()
            else:
                log.warning("vbd %d of domain %d: the frontend did not close within %.0f s "
                            "(device still in use in the guest?); removing it anyway",
                            self.devid, self.domid, timeout)
        self.disconnect()
        if self.backend_state():
            xs.write(f"{self.be}/state", CLOSED)
        if watching:
            xs.unwatch(f"{self.fe}/state", "fe")
            xs.unwatch(f"{self.be}/state", "be")
        xs.rm(self.be)
        xs.rm(self.fe)

    def close(self) -> None:
        self.disconnect()
        if self.gnttab is not None:
            self.L.gnt.xengnttab_close(self.gnttab)
            self.gnttab = None
        self.xs.close()
