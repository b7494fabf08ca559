"""What the REST API does, apart from HTTP: volumes, exports, attachments.

Operations on one volume are serialised by a per-volume lock; every state
change is written to SQLite before the call returns."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import uuid

from blkserve import backing as backing_io
from blkserve import peers, xen
from blkserve.api import libvirt as virt
from blkserve.api import qemu
from blkserve.api.calls import BoundedCalls, Busy
from blkserve.api.config import SOCKET_PATH_MAX, Settings
from blkserve.api.state import AttachmentRow, State, VolumeRow, now
from blkserve.api.workers import Worker, WorkerSpec, WorkerStartError, own_socket
from blkserve.backing import BackingError, Identity
from blkserve.logs import log_event

log = logging.getLogger("blkserve.api")

STALE_CHECK_S = 5.0


class ApiError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _not_found(name: str) -> ApiError:
    return ApiError(404, f"volume '{name}' does not exist")


def _owner(text: str | None) -> tuple[int, int] | None:
    """'UID:GID' (exports.socket_owner) as a tuple."""
    if not text:
        return None
    uid, _, gid = text.partition(":")
    return int(uid), int(gid)


def _owner_text(owner: tuple[int, int] | None) -> str | None:
    return f"{owner[0]}:{owner[1]}" if owner else None


def _backing_size(path: str,
                  expect: tuple[int, int] | None = None) -> tuple[int, Identity]:
    """Size and identity of the backing PATH, opened without following a
    symlink, only if it is a regular file or block device (and EXPECT)."""
    fd, ident = backing_io.open_checked(path, os.O_RDONLY, expect)
    try:
        return backing_io.size_of(fd), ident
    finally:
        os.close(fd)


class NamedLocks:
    """asyncio locks by name, kept only while someone holds or waits on one
    (volume and VM names come and go: the dict must not grow with them)."""

    def __init__(self) -> None:
        self.entries: dict[str, list] = {}  # name -> [lock, holders and waiters]

    @contextlib.asynccontextmanager
    async def hold(self, key: str):
        entry = self.entries.setdefault(key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self.entries[key]


class Controller:
    def __init__(self, settings: Settings):
        self.settings = settings
        os.makedirs(settings.state_dir, exist_ok=True)
        # private: the state dir may be made searchable for the QEMU user, who
        # must reach the sockets through it, and nothing else
        for d in (settings.volumes_dir, settings.logs_dir, settings.stats_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        os.makedirs(settings.sockets_dir, exist_ok=True)
        self.state = State(settings.db_path)
        self.workers: dict[str, Worker] = {}
        self._named_locks = NamedLocks()
        self._locks = self._named_locks.entries  # what is held or waited on, by name
        self._stale_task: asyncio.Task | None = None
        self._trace_lock = asyncio.Lock()
        # libvirt calls: a few daemon threads, never joined at exit (calls.py)
        self.calls = BoundedCalls()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Adopt the export workers a previous daemon left running, start the
        ones that died meanwhile."""
        for exp in self.state.exports():
            vol = self.state.volume(exp.volume)
            try:
                self._check_backing(vol, "served")  # records a missing identity
            except ApiError as e:
                log.error("export %s: %s", vol.name, e.detail)
            worker = self._new_worker(vol, exp.socket, _owner(exp.socket_owner))
            if exp.pid and worker.adopt(exp.pid, exp.pid_start):
                self.workers[vol.name] = worker
                continue
            log.warning("export %s: worker %s is gone; starting a new one", vol.name, exp.pid)
            self.workers[vol.name] = worker
            try:
                await worker.start(self.settings.worker_start_timeout_s)
            except WorkerStartError as e:
                log.error("%s; retrying with back-off", e)
                worker.retry_later()
        for att in self.state.attachments():
            if att.state == "attaching":
                await self._settle_attaching(att)
        self._stale_task = asyncio.get_running_loop().create_task(self._watch_vms())

    async def _settle_attaching(self, att: AttachmentRow) -> None:
        """A previous daemon died during this attach: keep the attachment if
        the device made it into the VM, else forget it."""
        try:
            if att.hypervisor == "xen":
                # the attach is the blkif worker's start
                w = self.workers.get(att.volume)
                present = w is not None and w.pid is not None
            elif att.hypervisor == "libvirt":
                present = await self._virt(virt.disk_present, att.uri, att.domain,
                                           att.device_id)
            else:
                present = await qemu.device_present(att.qmp_socket, att.device_id,
                                                    self.settings.qmp_timeout_s)
        except (virt.DomainGone, qemu.VMGone, qemu.PeerRefused):
            present = False
        except ApiError as e:
            self.state.set_attachment_state(att.id, "attached", e.detail)
            return
        except qemu.QMPFailed as e:
            self.state.set_attachment_state(att.id, "attached", str(e))
            return
        if present:
            self.state.set_attachment_state(att.id, "attached")
        else:
            self.state.delete_attachment(att.id)
        log.info("attachment %s of %s interrupted by a daemon restart: %s", att.id,
                 att.volume, "kept" if present else "dropped")

    async def close(self) -> None:
        """Daemon shutdown: workers keep serving guests; the next daemon adopts them."""
        if self._stale_task:
            self._stale_task.cancel()
        for w in self.workers.values():
            w.detach()
        self.state.close()

    def lock(self, name: str) -> contextlib.AbstractAsyncContextManager:
        """`async with controller.lock(name)`: one operation on a volume at a time."""
        return self._named_locks.hold(name)

    def vm_lock(self, qmp_socket: str) -> contextlib.AbstractAsyncContextManager:
        """One QMP conversation per VM at a time: two volumes attached at once
        must not pick the same free port."""
        return self._named_locks.hold("vm:" + qmp_socket)

    async def _watch_vms(self) -> None:
        while True:
            await asyncio.sleep(STALE_CHECK_S)
            try:
                await self._watch_libvirt()
            except Exception:
                log.exception("checking libvirt attachments failed")
            try:
                await self._watch_xen()
            except Exception:
                log.exception("checking Xen attachments failed")
            for att in self.state.attachments():
                if att.hypervisor != "qemu":
                    continue
                if att.state != "stale" and not qemu.vm_alive(att.qmp_socket):
                    self.state.set_attachment_state(att.id, "stale", "the VM is gone")
                    log_event(log, "attachment.stale", level=logging.WARNING, volume=att.volume,
                              attachment=att.id, qmp_socket=att.qmp_socket,
                              reason="the VM is gone")

    async def _watch_xen(self) -> None:
        """Mark stale the Xen attachments whose domain is gone; stop their
        workers (nothing is left to serve)."""
        atts = [a for a in self.state.attachments()
                if a.hypervisor == "xen" and a.state == "attached"]
        if not atts:
            return
        for a in atts:
            try:
                await asyncio.to_thread(xen.domain_exists, a.domain)
            except xen.XenError:
                self.state.set_attachment_state(a.id, "stale", "the Xen domain is gone")
                log_event(log, "attachment.stale", level=logging.WARNING, volume=a.volume,
                          attachment=a.id, domain=a.domain, reason="the Xen domain is gone")
                w = self.workers.pop(a.volume, None)
                if w is not None:
                    await w.stop(self.settings.worker_stop_timeout_s)
                self.state.delete_export(a.volume)
            except xen.XenUnavailable:
                return

    async def _watch_libvirt(self) -> None:
        """Mark stale the libvirt attachments whose domain is gone, no longer
        runs, or no longer has the disk (libvirt calls in a thread, one
        connection per URI; a URI that does not answer says nothing)."""
        by_uri: dict[str, list[AttachmentRow]] = {}
        for att in self.state.attachments():
            if att.hypervisor == "libvirt" and att.state not in ("stale", "attaching"):
                by_uri.setdefault(att.uri, []).append(att)
        for uri, atts in by_uri.items():
            try:
                await self._check_libvirt(uri)
                gone = await self._virt(virt.stale_reasons, uri,
                                        [(a.domain, a.device_id) for a in atts])
            except ApiError as e:
                log.debug("stale check on %s: %s", uri, e.detail)
                continue
            for att in atts:
                why = gone.get((att.domain, att.device_id))
                current = self.state.attachment(att.volume, att.id)
                if why and current is not None and current.state == att.state:
                    self.state.set_attachment_state(att.id, "stale", why)
                    log_event(log, "attachment.stale", level=logging.WARNING,
                              volume=att.volume, attachment=att.id, reason=why)

    async def _virt(self, fn, *args, bounded: bool = True):
        """A blocking libvirt call in one of self.calls' threads, bounded by
        qmp_timeout_s, or when it changes the domain by qmp_timeout_s +
        detach_timeout_s (libvirt's own job timeouts normally end it first;
        504 then: it may still finish, see attach_libvirt); errors as
        ApiError (except DomainGone, for the caller)."""
        timeout = self.settings.qmp_timeout_s
        if not bounded:
            timeout += self.settings.detach_timeout_s
        try:
            return await self.calls.run(fn, *args, timeout=timeout)
        except TimeoutError:
            raise ApiError(502 if bounded else 504,
                           f"libvirt did not answer in {timeout:.0f} s") from None
        except Busy as e:
            raise ApiError(503, str(e)) from None
        except virt.PeerRefused as e:
            raise ApiError(403, str(e)) from None
        except virt.Unavailable as e:
            raise ApiError(501, str(e)) from None
        except virt.DomainNotFound as e:
            raise ApiError(422, str(e)) from None
        except (virt.NotRunning, virt.NoSharedMemory, virt.NoFreeSlot) as e:
            raise ApiError(409, str(e)) from None
        except (virt.ConnectFailed, virt.LibvirtFailed) as e:
            raise ApiError(502, str(e)) from None

    async def _check_libvirt(self, uri: str) -> None:
        """Before talking to libvirt at URI: its socket must be one of the
        config's libvirt_sockets (403) and what listens there a libvirt
        daemon running as root (403; SO_PEERCRED)."""
        path = virt.daemon_socket(uri)
        if path is None:
            return  # no daemon socket: libvirt's own connect fails and says so
        if "?" in uri and not self.settings.libvirt_socket_allowed(path):
            raise ApiError(403, f"libvirt socket {path} is not in the daemon's "
                                "libvirt_sockets (config file); add it there to use it")
        await self._virt(virt.check_daemon, path, self.settings.qmp_timeout_s)

    # -- allowed peers of the exports ------------------------------------------

    def _peers_path(self, name: str) -> str:
        return os.path.join(self.settings.peers_dir, f"{name}.peers")

    def _set_peers(self, name: str, explicit: bool, add: peers.Peer | None = None,
                   drop: str | None = None) -> None:
        """Rewrite the export's allowed-peers file (its worker re-reads it at
        every connection): the QEMU processes of the volume's attachments
        (labelled with their ids), plus ADD, minus DROP; with none, any peer
        if the export was PUT (EXPLICIT: VMs with the disk in their config),
        else nobody."""
        path = self._peers_path(name)
        live = {a.id for a in self.state.attachments(name) if a.state != "stale"}
        try:
            current = peers.read_file(path).peers
        except OSError:
            current = []
        keep = [p for p in current if p.label in live and p.label != drop]
        if add is not None:
            keep.append(add)
        os.makedirs(self.settings.peers_dir, mode=0o700, exist_ok=True)
        peers.write_file(path, peers.Allowed(any=explicit and not keep, peers=keep))

    def _export_explicit(self, name: str) -> bool:
        exp = self.state.export(name)
        return exp is not None and bool(exp.explicit)

    # -- views -------------------------------------------------------------

    def export_view(self, name: str) -> dict | None:
        exp = self.state.export(name)
        if exp is None:
            return None
        w = self.workers.get(name)
        return {"volume": name, "socket": exp.socket,
                "state": w.state if w else "stopped", "pid": w.pid if w else None,
                "restarts": exp.restarts, "explicit": exp.explicit,
                "started_at": exp.started_at if w and w.pid else None}

    def volume_view(self, v: VolumeRow) -> dict:
        return {"name": v.name, "size_bytes": v.size_bytes, "read_only": v.read_only,
                "queues": v.queues, "backing": v.backing, "managed": v.managed,
                "created_at": v.created_at, "export": self.export_view(v.name),
                "attachments": [vars(a) for a in self.state.attachments(v.name)]}

    def get_volume(self, name: str) -> VolumeRow:
        v = self.state.volume(name)
        if v is None:
            raise _not_found(name)
        return v

    # -- volumes -----------------------------------------------------------

    def _check_space(self, need: int) -> None:
        st = os.statvfs(self.settings.volumes_dir)
        free = st.f_bavail * st.f_frsize
        if need > free:
            raise ApiError(507, f"not enough free space in {self.settings.volumes_dir}: "
                                f"{need} bytes needed, {free} available")

    def create_volume(self, name: str, size: int | None, read_only: bool, queues: int,
                      backing: str | None) -> VolumeRow:
        if self.state.volume(name):
            raise ApiError(409, f"volume '{name}' already exists")
        if backing is None:
            if size is None:
                raise ApiError(422, "size_bytes is required unless backing is given")
            return self._create_managed(name, size, read_only, queues)
        return self._create_external(name, size, read_only, queues, backing)

    def _create_managed(self, name: str, size: int, read_only: bool,
                        queues: int) -> VolumeRow:
        # the real path: the worker opens it without following symlinks
        path = os.path.join(os.path.realpath(self.settings.volumes_dir), f"{name}.img")
        self._check_space(size)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise ApiError(409, f"{path} already exists but belongs to no volume; "
                                "remove it or choose another name") from None
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            os.close(fd)
            os.unlink(path)
            raise ApiError(507, f"cannot size {path} to {size} bytes: {e.strerror}") from None
        ident = Identity.of(os.fstat(fd))
        os.close(fd)
        row = VolumeRow(name, size, read_only, queues, path, True, now(), ident.dev,
                        ident.ino, ident.kind, None)
        try:
            self.state.add_volume(row)
        except Exception:
            os.unlink(path)
            raise
        log_event(log, "volume.created", volume=name, size_bytes=size, backing=path)
        return row

    def _create_external(self, name: str, size: int | None, read_only: bool, queues: int,
                         backing: str) -> VolumeRow:
        if not os.path.isabs(backing) or "\0" in backing:
            raise ApiError(422, "backing must be an absolute path")
        backing = os.path.normpath(backing)
        # from here on only the real path counts: it is what the allow-list
        # is checked against, what is stored, and what is opened (never
        # following a symlink, so a link planted later is refused)
        real = os.path.realpath(backing)
        shown = backing if real == backing else f"{backing} (resolving to {real})"
        if real.startswith(os.path.realpath(self.settings.state_dir) + os.sep):
            raise ApiError(422, f"backing {shown} is inside the state dir; leave out "
                                "backing to create a volume there")
        if not self.settings.backing_allowed(real):
            raise ApiError(403, f"backing {shown} is not in the daemon's allowed_backings "
                                "(config file; only the resolved path counts); add it there "
                                "to use it")
        other = self.state.volume_by_backing(real)
        if other:
            raise ApiError(409, f"backing {shown} is already used by volume '{other.name}'")
        try:
            ident = backing_io.check(real)  # O_PATH: nothing is opened for I/O yet
        except BackingError as e:
            if e.errno != errno.ENOENT:
                raise ApiError(422, str(e)) from None
            ident = None
        if ident is not None:
            self._check_not_shared(ident, shown)
            try:
                actual, _ = _backing_size(real, (ident.dev, ident.ino))
            except BackingError as e:
                raise ApiError(422, str(e)) from None
            except OSError as e:
                raise ApiError(422, f"cannot read the size of backing {shown}: "
                                    f"{e.strerror}") from None
            actual -= actual % 512
            if actual == 0:
                raise ApiError(422, f"backing {shown} is smaller than one 512-byte sector")
            if size is not None and size != actual:
                raise ApiError(422, f"size_bytes {size} does not match the size of the "
                                    f"existing backing {shown} ({actual} bytes)")
            size = actual
        else:
            if size is None:
                raise ApiError(422, f"backing {shown} does not exist; give size_bytes "
                                    "to create it")
            st = os.statvfs(os.path.dirname(real) or "/")
            if size > st.f_bavail * st.f_frsize:
                raise ApiError(507, f"not enough free space for {shown}")
            try:
                fd = backing_io.open_nofollow(real, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    ident = Identity.of(os.fstat(fd))
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
            except OSError as e:
                raise ApiError(422, f"cannot create backing {shown}: {e.strerror}") from None
        row = VolumeRow(name, size, read_only, queues, real, False, now(), ident.dev,
                        ident.ino, ident.kind, ident.rdev if ident.kind == "block" else None)
        self.state.add_volume(row)
        log_event(log, "volume.created", volume=name, size_bytes=size, backing=real)
        return row

    def _check_not_shared(self, ident: Identity, shown: str) -> None:
        """ApiError 409 if IDENT is, or overlaps, another volume's backing: a
        hard link to it, another node of the same block device, a partition
        of its disk or the disk of its partition."""
        for v in self.state.volumes():
            other = self._identity(v)
            how = other and backing_io.overlap(ident, other)
            if not how:
                continue
            what = {"same": f"is the same {'device' if ident.kind == 'block' else 'file'} "
                            f"as {v.backing} (another name or a hard link of it)",
                    "a-in-b": f"is a partition of the disk {v.backing}",
                    "b-in-a": f"is the disk that holds the partition {v.backing}"}[how]
            raise ApiError(409, f"backing {shown} {what}, which volume '{v.name}' uses; two "
                                "volumes cannot share one disk: delete that volume first or "
                                "choose another backing")

    def _identity(self, v: VolumeRow) -> Identity | None:
        """The backing identity recorded for V (for rows from before it was
        recorded: what the path is now, if it can be seen)."""
        if v.identity is not None:
            return Identity(v.backing_dev, v.backing_ino, v.backing_kind or "file",
                            v.backing_rdev or 0)
        try:
            return backing_io.check(self._backing_path(v))
        except BackingError:
            return None

    def _backing_path(self, v: VolumeRow) -> str:
        """The path the backing is opened by: the stored real path; for a
        volume under the state dir its directories are resolved (rows from
        before paths were stored resolved), never the file itself."""
        if not v.managed:
            return v.backing
        head, tail = os.path.split(v.backing)
        return os.path.join(os.path.realpath(head), tail)

    def _check_backing(self, v: VolumeRow, action: str) -> Identity | None:
        """Before a worker opens V's backing: ApiError 409 if it is no longer
        the inode the volume was created on, a symlink is in its path, or it
        is not a regular file or block device; the identity of a row that
        has none yet is recorded now.  Other errors (a missing file) are
        left to the worker to report."""
        try:
            ident = backing_io.check(self._backing_path(v), v.identity)
        except BackingError as e:
            if e.errno not in (None, errno.ELOOP):
                return None
            raise ApiError(409, f"volume '{v.name}' cannot be {action}: {e}") from None
        self._record_identity(v, ident)
        return ident

    def _record_identity(self, v: VolumeRow, ident: Identity) -> None:
        if v.identity is not None:
            return
        rdev = ident.rdev if ident.kind == "block" else None
        self.state.set_volume_identity(v.name, ident.dev, ident.ino, ident.kind, rdev)
        v.backing_dev, v.backing_ino, v.backing_kind, v.backing_rdev = \
            ident.dev, ident.ino, ident.kind, rdev
        log.info("volume %s: recorded the identity of backing %s (device:inode %d:%d)",
                 v.name, v.backing, ident.dev, ident.ino)

    def resize_volume(self, name: str, size: int) -> VolumeRow:
        v = self.get_volume(name)
        if size == v.size_bytes:
            return v
        busy = self.state.export(name) or self.state.attachments(name)
        if size < v.size_bytes and busy:
            raise ApiError(409, f"volume '{name}' is exported or attached; shrinking it "
                                "would take data from under the guest")
        path = self._backing_path(v)
        try:
            # O_PATH first: a block device is refused without being opened
            if backing_io.check(path, v.identity).kind == "block":
                raise ApiError(409, f"volume '{name}' is a block device; resize the device "
                                    "itself")
            # truncated through the fd that was checked, never by path
            fd, ident = backing_io.open_checked(path, os.O_RDWR, v.identity)
        except BackingError as e:
            raise ApiError(409, f"cannot resize volume '{name}': {e}") from None
        try:
            self._record_identity(v, ident)
            if size > v.size_bytes:
                self._check_space(size - v.size_bytes)
            os.ftruncate(fd, size)
        except OSError as e:
            raise ApiError(507 if e.errno == errno.ENOSPC else 409,
                           f"cannot resize {v.backing}: {e.strerror}") from None
        finally:
            os.close(fd)
        self.state.set_volume_size(name, size)
        log_event(log, "volume.resized", volume=name, size_bytes=size, old_size_bytes=v.size_bytes)
        w = self.workers.get(name)
        if w is not None and w.pid is not None and size > v.size_bytes:
            # the worker re-reads the size and tells the guest (online resize)
            with contextlib.suppress(ProcessLookupError):
                os.kill(w.pid, signal.SIGHUP)
        return self.get_volume(name)

    def delete_volume(self, name: str) -> None:
        v = self.get_volume(name)
        if self.state.attachments(name):
            raise ApiError(409, f"volume '{name}' is attached to a VM; detach it first")
        if self.state.export(name):
            raise ApiError(409, f"volume '{name}' is exported; stop the export first "
                                f"(DELETE /v1/volumes/{name}/export)")
        self.state.delete_volume(name)
        if v.managed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(v.backing)
        log_event(log, "volume.deleted", volume=name)

    # -- exports -----------------------------------------------------------

    def stats_path(self, name: str) -> str:
        return os.path.join(self.settings.stats_dir, f"{name}.stats")

    def _new_worker(self, v: VolumeRow, socket_path: str,
                    socket_owner: tuple[int, int] | None = None) -> Worker:
        # a volume attached to a Xen domain is served by a blkif worker
        xen_att = next((a for a in self.state.attachments(v.name) if a.hypervisor == "xen"),
                       None)
        peers_file = self._peers_path(v.name)
        spec = WorkerSpec(volume=v.name, backing=self._backing_path(v), socket=socket_path,
                          queues=v.queues, read_only=v.read_only,
                          cache=self.settings.export_cache,
                          io_engine=self.settings.export_io_engine,
                          poll_us=self.settings.export_poll_us,
                          stats_file=self.stats_path(v.name), socket_owner=socket_owner,
                          xen_domain=xen_att.domain if xen_att else None,
                          xen_vdev=xen_att.target if xen_att else None,
                          backing_identity=v.identity,
                          # an export from before allowed-peers files serves any peer
                          allow_peers_file=None if xen_att or not os.path.exists(peers_file)
                          else peers_file)
        return Worker(spec, os.path.join(self.settings.logs_dir, f"{v.name}.log"),
                      on_pid=self.state.set_export_pid, on_restart=self.state.count_restart,
                      start_timeout_s=self.settings.worker_start_timeout_s)

    async def ensure_export(self, name: str, explicit: bool) -> tuple[dict, bool]:
        """Start the volume's export unless it runs; (export, created)."""
        v = self.get_volume(name)
        exp = self.state.export(name)
        if exp is not None:
            if explicit and not exp.explicit:
                self.state.set_export_explicit(name, True)
                if os.path.exists(self._peers_path(name)):
                    self._set_peers(name, explicit=True)
            return self.export_view(name), False
        sock = os.path.join(self.settings.sockets_dir, f"{name}.sock")
        if len(sock.encode()) > SOCKET_PATH_MAX:
            raise ApiError(422, f"socket path {sock} is longer than {SOCKET_PATH_MAX} bytes; "
                                "use a shorter volume name or socket_dir")
        # the socket goes to the host's libvirt QEMU user (if any), so that
        # a domain given the disk in its config reaches it too
        owner = virt.default_qemu_owner()
        if owner is not None:
            for d in self._reach_socket_dir(sock, owner):
                log.warning("export %s: %s cannot search %s, so QEMU running as it cannot "
                            "reach %s", name, virt.owner_name(owner), d, sock)
        # who may connect, from the worker's start: an attach wrote its QEMU
        # there already; a PUT export serves any peer
        if explicit or not os.path.exists(self._peers_path(name)):
            self._set_peers(name, explicit)
        worker = await self._start_worker(v, sock, explicit, owner)
        log_event(log, "export.started", volume=name, socket=sock, pid=worker.pid)
        return self.export_view(name), True

    async def _start_worker(self, v: VolumeRow, sock: str, explicit: bool,
                            owner: tuple[int, int] | None = None) -> Worker:
        """Record the volume's export and start its worker; if it does not
        come up, nothing is left behind (ApiError 502 with its log tail; 409
        when the backing is not the one the volume was created on)."""
        self._check_backing(v, "served")
        worker = self._new_worker(v, sock, owner)
        self.state.add_export(v.name, sock, explicit)
        self.state.set_export_socket_owner(v.name, _owner_text(owner))
        self.workers[v.name] = worker
        try:
            await worker.start(self.settings.worker_start_timeout_s)
        except BaseException as e:
            self.workers.pop(v.name, None)
            self.state.delete_export(v.name)
            if isinstance(e, WorkerStartError):
                log_event(log, "export.failed", level=logging.ERROR, volume=v.name,
                          error=str(e))
                raise ApiError(502, str(e)) from None
            raise
        return worker

    def _reach_socket_dir(self, sock: str, owner: tuple[int, int]) -> list[str]:
        """Let OWNER search the directories blkserve manages on the way to
        SOCK (the socket dir, and the state dir with what lies between);
        returns the other directories it cannot search (not ours to change)."""
        roots = (self.settings.sockets_dir, self.settings.state_dir)
        still = []
        for d in virt.unreachable_dirs(sock, owner):
            if any(d == r or d.startswith(r + os.sep) for r in roots):
                virt.grant_search(d, owner)
            else:
                still.append(d)
        return still

    def set_socket_owner(self, name: str, owner: tuple[int, int]) -> None:
        """Give the export's socket (now and after every worker restart) to
        OWNER; ApiError 409 when OWNER could not reach it anyway."""
        exp = self.state.export(name)
        if exp is None:
            return
        blocked = self._reach_socket_dir(exp.socket, owner)
        if blocked:
            raise ApiError(409, f"QEMU runs as {virt.owner_name(owner)}, which cannot search "
                                f"{', '.join(blocked)} on the way to the export socket "
                                f"{exp.socket}: grant it search permission (chmod o+x, or an "
                                "ACL), or set socket_dir to a directory it can reach")
        self.state.set_export_socket_owner(name, _owner_text(owner))
        w = self.workers.get(name)
        if w is not None:
            w.spec.socket_owner = owner
        own_socket(exp.socket, owner)

    async def stop_export(self, name: str, force_check: bool = True) -> None:
        self.get_volume(name)
        if self.state.export(name) is None:
            raise ApiError(404, f"volume '{name}' is not exported")
        if force_check and self.state.attachments(name):
            raise ApiError(409, f"volume '{name}' is attached to a VM; detach it first")
        worker = self.workers.pop(name, None)
        if worker is not None:
            await worker.stop(self.settings.worker_stop_timeout_s)
        self.state.delete_export(name)
        peers.remove_file(self._peers_path(name))
        log_event(log, "export.stopped", volume=name)

    # -- tracing -----------------------------------------------------------

    async def trace(self, volume: str | None, duration: float, breakdown: bool) -> dict:
        from blkserve import trace

        if volume is not None:
            self.get_volume(volume)
        names = [volume] if volume else [e.volume for e in self.state.exports()]
        workers = []
        for name in names:
            w = self.workers.get(name)
            desc = trace.describe_worker(w.pid, name) if w and w.pid else None
            if desc is None:
                raise ApiError(409, f"volume '{name}' has no running export to trace")
            workers.append(desc)
        if not workers:
            raise ApiError(409, "no volume is exported: nothing to trace")
        if self._trace_lock.locked():
            raise ApiError(409, "a trace is already running; try again when it ends")
        async with self._trace_lock:
            try:
                return await asyncio.to_thread(trace.run_trace, workers, duration, breakdown)
            except trace.TraceError as e:
                raise ApiError(501, f"tracing is not available: {e}") from None

    # -- attachments -------------------------------------------------------

    def get_attachment(self, name: str, att_id: str) -> AttachmentRow:
        self.get_volume(name)
        a = self.state.attachment(name, att_id)
        if a is None:
            raise ApiError(404, f"volume '{name}' has no attachment '{att_id}'")
        return a

    async def _probe_qemu(self, qmp_socket: str) -> peers.PeerCred:
        """Who listens on QMP_SOCKET: it must lie under qmp_socket_dirs (its
        real path) and be a QEMU process (SO_PEERCRED), else 403."""
        if "\0" not in qmp_socket and os.path.isabs(qmp_socket) \
                and not self.settings.qmp_socket_allowed(qmp_socket):
            real = os.path.realpath(qmp_socket)
            shown = qmp_socket if real == qmp_socket else f"{qmp_socket} (resolving to {real})"
            raise ApiError(403, f"qmp_socket {shown} is not under the daemon's "
                                "qmp_socket_dirs (config file); add its directory there to "
                                "use it")
        why = qemu.check_qmp_path(qmp_socket)
        if why:
            raise ApiError(422, why)
        try:
            return await qemu.probe(qmp_socket, self.settings.qmp_timeout_s)
        except qemu.PeerRefused as e:
            raise ApiError(403, str(e)) from None
        except qemu.VMGone as e:
            raise ApiError(422, str(e)) from None
        except qemu.QMPFailed as e:
            raise ApiError(502, str(e)) from None

    async def _undo_attach(self, name: str, att_id: str, had_export: bool,
                           explicit: bool) -> None:
        """After a failed attach: forget it; stop the export it started, or
        take its QEMU off the export's allowed peers."""
        self.state.delete_attachment(att_id)
        if not had_export:
            if self.state.export(name) is not None:
                await self.stop_export(name, force_check=False)
            peers.remove_file(self._peers_path(name))
        else:
            self._set_peers(name, explicit, drop=att_id)

    async def attach(self, name: str, qmp_socket: str, bus: str | None) -> AttachmentRow:
        v = self.get_volume(name)
        cred = await self._probe_qemu(qmp_socket)
        for a in self.state.attachments(name):
            if a.qmp_socket == qmp_socket and a.state != "stale":
                raise ApiError(409, f"volume '{name}' is already attached to the VM at "
                                    f"{qmp_socket} (attachment {a.id})")
        att_id = uuid.uuid4().hex[:8]
        peer = peers.peer_of(cred.pid, att_id)
        if peer is None:
            raise ApiError(422, f"the QEMU on {qmp_socket} (pid {cred.pid}) is gone")
        had_export = self.state.export(name) is not None
        explicit = self._export_explicit(name)
        # only this QEMU may connect to the export, from before it is told to
        self._set_peers(name, explicit, add=peer)
        try:
            exp, _ = await self.ensure_export(name, explicit=False)
        except BaseException:
            await self._undo_attach(name, att_id, had_export, explicit)
            raise
        dev = f"blkserve-{att_id}"
        # recorded before QEMU is touched: a daemon killed mid-attach finds the
        # row on restart and settles it (see _settle_attaching)
        row = AttachmentRow(att_id, name, "qemu", qmp_socket, bus, dev, f"{dev}-chr",
                            "attaching", now(), None)
        self.state.add_attachment(row)
        try:
            async with self.vm_lock(qmp_socket):
                row.bus = await qemu.attach(qmp_socket, exp["socket"], row.chardev_id, dev,
                                            v.queues, bus, self.settings.qmp_timeout_s,
                                            expect_pid=cred.pid)
        except (qemu.QMPFailed, qemu.VMGone, qemu.NoFreeSlot, qemu.PeerRefused) as e:
            await self._undo_attach(name, att_id, had_export, explicit)
            status = 409 if isinstance(e, qemu.NoFreeSlot) else \
                422 if isinstance(e, qemu.VMGone) else \
                403 if isinstance(e, qemu.PeerRefused) else 502
            raise ApiError(status, str(e)) from None
        except Exception as e:
            log.exception("attaching %s to the VM at %s failed", name, qmp_socket)
            await self._undo_attach(name, att_id, had_export, explicit)
            raise ApiError(502, f"attaching volume '{name}' to the VM at {qmp_socket} failed: "
                                f"{type(e).__name__}: {e}") from None
        except BaseException:
            self.state.delete_attachment(att_id)
            raise
        row.state = "attached"
        self.state.set_attachment_state(att_id, "attached", bus=row.bus)
        log_event(log, "attachment.created", volume=name, attachment=att_id, bus=row.bus)
        return row

    async def attach_libvirt(self, name: str, domain: str, uri: str) -> AttachmentRow:
        """Hot-plug the volume into the running libvirt DOMAIN as a vhostuser disk."""
        v = self.get_volume(name)
        await self._virt(virt.bindings)  # 501 without the bindings
        for a in self.state.attachments(name):
            if a.hypervisor == "libvirt" and (a.uri, a.domain) == (uri, domain) \
                    and a.state != "stale":
                raise ApiError(409, f"volume '{name}' is already attached to libvirt domain "
                                    f"'{domain}' (attachment {a.id})")
        await self._check_libvirt(uri)
        info = await self._virt(virt.inspect, uri, domain)
        att_id = uuid.uuid4().hex[:8]
        peer = peers.peer_of(info.pid, att_id) if info.pid else None
        if peer is None:
            raise ApiError(409, f"the QEMU process of libvirt domain '{domain}' is gone")
        had_export = self.state.export(name) is not None
        explicit = self._export_explicit(name)
        # only the domain's QEMU may connect to the export, from before it is told to
        self._set_peers(name, explicit, add=peer)
        try:
            exp, _ = await self.ensure_export(name, explicit=False)
        except BaseException:
            await self._undo_attach(name, att_id, had_export, explicit)
            raise
        alias = virt.ALIAS_PREFIX + att_id
        # recorded before libvirt is touched (see _settle_attaching);
        # chardev: the id libvirt gives the disk's vhost-user chardev
        row = AttachmentRow(att_id, name, "libvirt", None, None, alias, f"chr-vu-{alias}",
                            "attaching", now(), None, uri=uri, domain=domain)
        try:
            if info.owner is not None:
                self.set_socket_owner(name, info.owner)
            self.state.add_attachment(row)
            async with self.vm_lock(f"libvirt:{uri}:{domain}"):
                row.target, row.bus = await self._virt(virt.attach, uri, domain,
                                                       exp["socket"], v.queues, alias,
                                                       bounded=False)
        except ApiError as e:
            if e.status == 504:
                # libvirt may still plug the disk: keep the attachment (DELETE
                # it to unplug whatever made it; a daemon restart settles it)
                self.state.set_attachment_state(att_id, "attaching", e.detail)
                raise ApiError(504, f"{e.detail}; the attachment {att_id} stays 'attaching': "
                                    "DELETE it to undo whatever libvirt did") from None
            await self._undo_attach(name, att_id, had_export, explicit)
            raise
        except Exception as e:
            log.exception("attaching %s to libvirt domain %s failed", name, domain)
            await self._undo_attach(name, att_id, had_export, explicit)
            raise ApiError(502, f"attaching volume '{name}' to libvirt domain '{domain}' "
                                f"failed: {type(e).__name__}: {e}") from None
        except BaseException:
            self.state.delete_attachment(att_id)
            raise
        row.state = "attached"
        self.state.set_attachment_state(att_id, "attached", bus=row.bus, target=row.target)
        log_event(log, "attachment.created", volume=name, attachment=att_id, bus=row.bus)
        return row

    async def attach_xen(self, name: str, domain: str, vdev: str | None) -> AttachmentRow:
        """Hot-plug the volume into the running Xen DOMAIN: a blkif worker
        creates the vbd in xenstore and serves it."""
        v = self.get_volume(name)
        for a in self.state.attachments(name):
            if a.state != "stale":
                raise ApiError(409, f"volume '{name}' is attached already (attachment {a.id}, "
                                    f"{a.hypervisor}); a Xen attachment serves the volume "
                                    "alone")
        if self.state.export(name) is not None:
            raise ApiError(409, f"volume '{name}' is exported over vhost-user; a Xen "
                                "attachment serves the volume from its own blkif worker: "
                                "DELETE the export first")
        try:
            domid, dname, vdev = await asyncio.to_thread(xen.find_domain, domain, vdev)
        except xen.XenUnavailable as e:
            raise ApiError(501, f"Xen attach: {e}") from None
        except xen.VbdInUse as e:
            raise ApiError(409, str(e)) from None
        except xen.XenError as e:
            raise ApiError(422, str(e)) from None
        sock = os.path.join(self.settings.sockets_dir, f"{name}.xen.sock")
        if len(sock.encode()) > SOCKET_PATH_MAX:
            raise ApiError(422, f"socket path {sock} is longer than {SOCKET_PATH_MAX} bytes; "
                                "use a shorter volume name or socket_dir")
        att_id = uuid.uuid4().hex[:8]
        row = AttachmentRow(att_id, name, "xen", None, None,
                            f"vbd-{xen.vdev_to_devid(vdev)}", "", "attaching", now(), None,
                            domain=dname, target=vdev)
        # recorded first: the worker's spec comes from it, and a daemon killed
        # mid-attach settles it on restart (see _settle_attaching)
        self.state.add_attachment(row)
        try:
            await self._start_worker(v, sock, False)
        except BaseException:
            self.state.delete_attachment(att_id)
            raise
        row.state = "attached"
        self.state.set_attachment_state(att_id, "attached")
        log_event(log, "attachment.created", volume=name, attachment=att_id, domain=dname,
                  domid=domid, vdev=vdev)
        return row

    async def _detach_libvirt(self, a: AttachmentRow, timeout: float) -> None:
        """Ask the guest to release the disk, then wait (up to TIMEOUT s) until
        it has left the domain's live XML."""
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            await self._check_libvirt(a.uri)
            async with self.vm_lock(f"libvirt:{a.uri}:{a.domain}"):
                asked = await self._virt(virt.request_detach, a.uri, a.domain, a.device_id,
                                         bounded=False)
                while asked and await self._virt(virt.disk_present, a.uri, a.domain,
                                                 a.device_id):
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        msg = (f"the guest did not release disk {a.target} ({a.device_id}) "
                               f"of libvirt domain '{a.domain}' within {timeout:g} s; the "
                               "unplug request stays pending")
                        self.state.set_attachment_state(a.id, "detaching", msg)
                        log_event(log, "attachment.detach_timeout", volume=a.volume,
                                  attachment=a.id)
                        raise ApiError(504, f"{msg}; retry DELETE to wait again")
                    await asyncio.sleep(min(0.2, left))
        except virt.DomainGone as e:
            log.warning("attachment %s of %s: %s; dropping it", a.id, a.volume, e)
        except ApiError as e:
            if e.status != 504:
                self.state.set_attachment_state(a.id, a.state, e.detail)
            raise
        log.info("detached %s from libvirt domain %s", a.device_id, a.domain)

    def libvirt_xml(self, name: str, target: str) -> dict:
        """The <disk> element for a domain's persistent config (cold attach)."""
        v = self.get_volume(name)
        exp = self.state.export(name)
        sock = exp.socket if exp else os.path.join(self.settings.sockets_dir, f"{name}.sock")
        return {"volume": name, "socket": sock, "exported": exp is not None,
                "target": target, "xml": virt.disk_xml(sock, target, v.queues)}

    async def detach(self, name: str, att_id: str, timeout: float | None = None) -> None:
        a = self.get_attachment(name, att_id)
        if a.hypervisor == "xen":
            # the worker closes the vbd (the guest sees the disk go) and exits
            worker = self.workers.pop(name, None)
            if worker is not None:
                await worker.stop(timeout or self.settings.detach_timeout_s)
            self.state.delete_export(name)
        elif a.state != "stale" and a.hypervisor == "libvirt":
            await self._detach_libvirt(a, timeout or self.settings.detach_timeout_s)
        elif a.state != "stale":
            try:
                async with self.vm_lock(a.qmp_socket):
                    await qemu.detach(a.qmp_socket, a.chardev_id, a.device_id,
                                      timeout or self.settings.detach_timeout_s,
                                      self.settings.qmp_timeout_s)
            except (qemu.VMGone, qemu.PeerRefused) as e:
                # (not QEMU on the socket any more: the VM is gone, nothing is trusted)
                log.warning("attachment %s of %s: %s; dropping it", att_id, name, e)
            except qemu.DetachTimeout as e:
                self.state.set_attachment_state(att_id, "detaching", str(e))
                log_event(log, "attachment.detach_timeout", volume=name, attachment=att_id)
                raise ApiError(504, f"{e}; retry DELETE to wait again") from None
            except qemu.QMPFailed as e:
                self.state.set_attachment_state(att_id, a.state, str(e))
                raise ApiError(502, str(e)) from None
        self.state.delete_attachment(att_id)
        log_event(log, "attachment.detached", volume=name, attachment=att_id, was=a.state)
        exp = self.state.export(name)
        if exp is not None and not exp.explicit and not self.state.attachments(name):
            await self.stop_export(name)
        elif exp is not None and a.hypervisor != "xen" \
                and os.path.exists(self._peers_path(name)):
            self._set_peers(name, bool(exp.explicit))  # its QEMU may no longer connect
