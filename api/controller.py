"""What the REST API does, apart from HTTP: the volume/export/attachment
state machine, its locks and the supervision of export workers and VMs.

Operations on one volume are serialised by a per-volume lock; every state
change is written to SQLite before the call returns. What differs between
hypervisors (how to plug a disk in, is the VM alive, who may connect) is
asked of the attachment's adapter (hypervisors/); the volume operations are
volumes.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from blkserve import peers
from blkserve.api import sockets
from blkserve.api.calls import BoundedCalls
from blkserve.api.config import SOCKET_PATH_MAX, Settings
from blkserve.api.errors import ApiError
from blkserve.api.hypervisors import ADAPTERS, DetachTimeout, Hypervisor, Target
from blkserve.api.qos import QosControl
from blkserve.api.rbd import RbdVolumes, is_rbd
from blkserve.api.state import AttachmentRow, State, VolumeRow
from blkserve.api.volumes import Volumes
from blkserve.api.workers import Worker, WorkerSpec, WorkerStartError, own_socket
from blkserve.logs import log_event
from blkserve.qos import QosBlock

log = logging.getLogger("blkserve.api")

STALE_CHECK_S = 5.0

__all__ = ["ApiError", "Controller", "NamedLocks"]


def _owner(text: str | None) -> tuple[int, int] | None:
    """'UID:GID' (exports.socket_owner) as a tuple."""
    if not text:
        return None
    uid, _, gid = text.partition(":")
    return int(uid), int(gid)


def _owner_text(owner: tuple[int, int] | None) -> str | None:
    return f"{owner[0]}:{owner[1]}" if owner else None


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


class Controller(Volumes, RbdVolumes, QosControl):
    def __init__(self, settings: Settings):
        self.settings = settings
        os.makedirs(settings.state_dir, exist_ok=True)
        # private: the state dir may be made searchable for the QEMU user, who
        # must reach the sockets through it, and nothing else
        for d in (settings.volumes_dir, settings.logs_dir, settings.stats_dir,
                  settings.qos_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        os.makedirs(settings.sockets_dir, exist_ok=True)
        self.state = State(settings.db_path)
        self.workers: dict[str, Worker] = {}
        self.incoming: dict[str, Worker] = {}  # incoming attachment id -> its worker
        self.qos_blocks: dict[str, QosBlock] = {}  # QoS blocks mapped (api/qos.py), by path
        self.rbd_calls = BoundedCalls(name="rbd-call")  # calls to a Ceph cluster (api/rbd.py)
        self._named_locks = NamedLocks()
        self._locks = self._named_locks.entries  # what is held or waited on, by name
        self._stale_task: asyncio.Task | None = None
        self._trace_lock = asyncio.Lock()
        # one adapter per hypervisor (hypervisors/__init__.py registers them)
        self.hypervisors: dict[str, Hypervisor] = {n: a(self) for n, a in ADAPTERS.items()}

    def hypervisor(self, name: str) -> Hypervisor:
        """The adapter of the hypervisor NAME (an attachment's `hypervisor`)."""
        return self.hypervisors[name]

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
            elif att.state == "incoming" and att.migrate_from is not None:
                await self._adopt_incoming(att)
        self._stale_task = asyncio.get_running_loop().create_task(self._watch_vms())

    async def _settle_attaching(self, att: AttachmentRow) -> None:
        """A previous daemon died during this attach: keep the attachment if
        the device made it into the VM, else forget it."""
        try:
            present = await self.hypervisor(att.hypervisor).present(att)
        except ApiError as e:
            self.state.set_attachment_state(att.id, "attached", e.detail)
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
        for w in [*self.workers.values(), *self.incoming.values()]:
            w.detach()
        self.state.close()

    def lock(self, name: str) -> contextlib.AbstractAsyncContextManager:
        """`async with controller.lock(name)`: one operation on a volume at a time."""
        return self._named_locks.hold(name)

    def vm_lock(self, vm: str) -> contextlib.AbstractAsyncContextManager:
        """One conversation per VM (an adapter's vm_key) at a time: two volumes
        attached at once must not pick the same free port."""
        return self._named_locks.hold("vm:" + vm)

    async def _watch_vms(self) -> None:
        while True:
            await asyncio.sleep(STALE_CHECK_S)
            try:
                await self._settle_migrations()
            except Exception:
                log.exception("checking live migrations failed")
            for hv in self.hypervisors.values():
                try:
                    await self._retire_migrated(hv)
                except Exception:
                    log.exception("checking %s attachments migrated away failed", hv.label)
            for hv in self.hypervisors.values():
                try:
                    await self._mark_stale(hv)
                except Exception:
                    log.exception("checking %s attachments failed", hv.label)

    async def _mark_stale(self, hv: Hypervisor) -> None:
        """Mark stale the attachments of HV whose VM is gone; an attachment
        served by a worker of its own has it stopped (nothing is left to
        serve)."""
        atts = [a for a in self.state.attachments() if a.hypervisor == hv.name]
        if not atts:
            return
        gone = await hv.stale_reasons(atts)
        for att in atts:
            why = gone.get(att.id)
            current = self.state.attachment(att.volume, att.id)
            if not why or current is None or current.state != att.state:
                continue
            self.state.set_attachment_state(att.id, "stale", why)
            log_event(log, "attachment.stale", level=logging.WARNING, volume=att.volume,
                      attachment=att.id, **hv.log_fields(att), reason=why)
            if att.state == "incoming":  # a migration's destination that died
                await self._stop_incoming_worker(att.id)
            elif hv.own_worker:
                await self.stop_worker(att.volume, self.settings.worker_stop_timeout_s)

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
                "queues": v.queues, "backing": v.backing,
                "backing_kind": "rbd" if is_rbd(v.backing) else v.backing_kind or "file",
                "managed": v.managed,
                "created_at": v.created_at, **self.qos_view(v),
                "export": self.export_view(v.name),
                "attachments": [vars(a) for a in self.state.attachments(v.name)]}

    # -- exports -----------------------------------------------------------

    def stats_path(self, name: str) -> str:
        return os.path.join(self.settings.stats_dir, f"{name}.stats")

    def _rbd_worker_args(self) -> dict:
        s = self.settings
        return {"ceph_conf": s.rbd_conf, "ceph_id": s.rbd_client_id,
                "ceph_keyring": s.rbd_keyring, "rbd_timeout": s.rbd_timeout_s}

    def _new_worker(self, v: VolumeRow, socket_path: str,
                    socket_owner: tuple[int, int] | None = None, *,
                    stats_file: str | None = None, log_path: str | None = None,
                    on_pid=None, on_restart=None) -> Worker:
        # a volume whose attachment has a worker of its own (Xen: a blkif
        # worker) is served by that worker alone
        own = next((a for a in self.state.attachments(v.name)
                    if self.hypervisor(a.hypervisor).own_worker), None)
        peers_file = self._peers_path(v.name)
        spec = WorkerSpec(volume=v.name, backing=self._backing_path(v), socket=socket_path,
                          queues=v.queues, read_only=v.read_only,
                          cache=self.settings.export_cache,
                          io_engine=self.settings.export_io_engine,
                          poll_us=self.settings.export_poll_us,
                          stats_file=stats_file or self.stats_path(v.name),
                          socket_owner=socket_owner,
                          backing_identity=v.identity,
                          qos_file=self.sync_qos_block(v),
                          **(self._rbd_worker_args() if is_rbd(v.backing) else {}),
                          # an export from before allowed-peers files serves any peer
                          allow_peers_file=None if own or not os.path.exists(peers_file)
                          else peers_file,
                          **(self.hypervisor(own.hypervisor).worker_spec(own) if own else {}))
        return Worker(spec, log_path or os.path.join(self.settings.logs_dir, f"{v.name}.log"),
                      on_pid=on_pid or self.state.set_export_pid,
                      on_restart=on_restart or self.state.count_restart,
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
        # the socket goes to the user a hypervisor runs QEMU as on this host
        # (libvirt's), so that a domain given the disk in its config reaches it too
        owner = next((o for hv in self.hypervisors.values()
                      if (o := hv.default_socket_owner()) is not None), None)
        if owner is not None:
            for d in self._reach_socket_dir(sock, owner):
                log.warning("export %s: %s cannot search %s, so QEMU running as it cannot "
                            "reach %s", name, sockets.owner_name(owner), d, sock)
        # who may connect, from the worker's start: an attach wrote its QEMU
        # there already; a PUT export serves any peer
        if explicit or not os.path.exists(self._peers_path(name)):
            self._set_peers(name, explicit)
        worker = await self.start_worker(v, sock, explicit, owner)
        log_event(log, "export.started", volume=name, socket=sock, pid=worker.pid)
        return self.export_view(name), True

    async def start_worker(self, v: VolumeRow, sock: str, explicit: bool,
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

    async def stop_worker(self, name: str, timeout: float) -> None:
        """Stop the volume's worker (waiting up to TIMEOUT s) and forget its export."""
        worker = self.workers.pop(name, None)
        if worker is not None:
            await worker.stop(timeout)
        self.state.delete_export(name)

    def _reach_socket_dir(self, sock: str, owner: tuple[int, int]) -> list[str]:
        """Let OWNER search the directories blkserve manages on the way to
        SOCK (the socket dir, and the state dir with what lies between);
        returns the other directories it cannot search (not ours to change)."""
        roots = (self.settings.sockets_dir, self.settings.state_dir)
        still = []
        for d in sockets.unreachable_dirs(sock, owner):
            if any(d == r or d.startswith(r + os.sep) for r in roots):
                sockets.grant_search(d, owner)
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
            raise ApiError(409, f"QEMU runs as {sockets.owner_name(owner)}, which cannot search "
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
        await self.stop_worker(name, self.settings.worker_stop_timeout_s)
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

    async def attach(self, name: str, request) -> AttachmentRow:
        """Plug the volume into the VM REQUEST names (a request_model of one
        of the adapters: its `hypervisor` picks it)."""
        v = self.get_volume(name)
        hv = self.hypervisor(request.hypervisor)
        incoming = getattr(request, "incoming", False)
        if getattr(request, "migrate_from", None) is not None:
            if incoming:
                raise ApiError(422, "incoming is for a migration from another host; "
                                    "migrate_from names a source attachment on this one: "
                                    "give one of them")
            return await self._attach_incoming(v, hv, request)
        if incoming:
            return await self._attach_incoming_remote(v, hv, request)
        if getattr(request, "device_id", None) is not None or \
                getattr(request, "addr", None) is not None:
            raise ApiError(422, "device_id and addr are for an incoming attachment "
                                "(\"incoming\": true)")
        target = await hv.prepare(v, request)
        row = target.row
        if hv.own_worker:
            # recorded first: the worker's spec comes from it, and a daemon
            # killed mid-attach settles it on restart (see _settle_attaching)
            self.state.add_attachment(row)
            try:
                await hv.plug(target, v, target.socket)
            except BaseException:
                self.state.delete_attachment(row.id)
                raise
        else:
            await self._attach_through_export(hv, v, target)
        row.state = "attached"
        self.state.set_attachment_state(row.id, "attached", bus=row.bus, target=row.target)
        log_event(log, "attachment.created", volume=name, attachment=row.id,
                  **(target.fields if target.fields is not None else {"bus": row.bus}))
        return row

    async def _attach_through_export(self, hv: Hypervisor, v: VolumeRow,
                                     target: Target) -> None:
        """Allow the VM's QEMU on the volume's export (started if need be),
        then have the adapter plug it in; on failure undo all of it."""
        name, row = v.name, target.row
        att_id = row.id
        peer = peers.peer_of(target.peer_pid, att_id) if target.peer_pid else None
        if peer is None:
            raise target.peer_gone
        had_export = self.state.export(name) is not None
        explicit = self._export_explicit(name)
        # only this QEMU may connect to the export, from before it is told to
        self._set_peers(name, explicit, add=peer)
        try:
            exp, _ = await self.ensure_export(name, explicit=False)
        except BaseException:
            await self._undo_attach(name, att_id, had_export, explicit)
            raise
        try:
            if target.socket_owner is not None:
                self.set_socket_owner(name, target.socket_owner)
            # recorded before the hypervisor is touched: a daemon killed
            # mid-attach finds the row on restart and settles it
            self.state.add_attachment(row)
            async with self.vm_lock(hv.vm_key(row)):
                await hv.plug(target, v, exp["socket"])
        except ApiError as e:
            if e.status == 504:
                # the hypervisor may still plug the disk: keep the attachment
                # (DELETE it to unplug whatever made it; a daemon restart settles it)
                self.state.set_attachment_state(att_id, "attaching", e.detail)
                raise ApiError(504, f"{e.detail}; the attachment {att_id} stays 'attaching': "
                                    f"DELETE it to undo whatever {hv.label} did") from None
            await self._undo_attach(name, att_id, had_export, explicit)
            raise
        except Exception as e:
            log.exception("attaching %s to %s failed", name, target.where)
            await self._undo_attach(name, att_id, had_export, explicit)
            raise ApiError(502, f"attaching volume '{name}' to {target.where} failed: "
                                f"{type(e).__name__}: {e}") from None
        except BaseException:
            self.state.delete_attachment(att_id)
            raise

    async def detach(self, name: str, att_id: str, timeout: float | None = None) -> None:
        a = self.get_attachment(name, att_id)
        hv = self.hypervisor(a.hypervisor)
        if a.migrate_from is not None:
            # a migration's destination (cancelled, failed or gone): its export
            # stops; the QEMU it was plugged into is the caller's to quit
            await self._end_incoming(a)
            log_event(log, "attachment.detached", volume=name, attachment=att_id, was=a.state)
            return
        dst = next((x for x in self.state.attachments(name)
                    if x.migrate_from == att_id and x.state == "incoming"), None)
        if dst is not None:
            raise ApiError(409, f"attachment {att_id} is migrating to the VM at "
                                f"{dst.qmp_socket} (attachment {dst.id}): DELETE that one to "
                                "cancel, or let the migration complete")
        # a stale attachment (VM gone) is just forgotten, but a worker of its
        # own is stopped all the same
        if hv.own_worker or a.state != "stale":
            try:
                async with self.vm_lock(hv.vm_key(a)):
                    await hv.unplug(a, timeout or self.settings.detach_timeout_s)
            except DetachTimeout as e:
                self.state.set_attachment_state(att_id, "detaching", str(e))
                log_event(log, "attachment.detach_timeout", volume=name, attachment=att_id)
                raise ApiError(504, f"{e}; retry DELETE to wait again") from None
            except ApiError as e:
                if e.status != 504:  # (no answer in time: the unplug may go on)
                    self.state.set_attachment_state(att_id, a.state, e.detail)
                raise
        self.state.delete_attachment(att_id)
        log_event(log, "attachment.detached", volume=name, attachment=att_id, was=a.state)
        exp = self.state.export(name)
        if exp is not None and not exp.explicit and not self.state.attachments(name):
            await self.stop_export(name)
        elif exp is not None and os.path.exists(self._peers_path(name)):
            self._set_peers(name, bool(exp.explicit))  # its QEMU may no longer connect

    # -- live migration ------------------------------------------------------

    def _incoming_paths(self, name: str, att_id: str) -> tuple[str, str, str]:
        """Socket, stats file and log of the export worker of the incoming
        attachment ATT_ID of volume NAME."""
        base = f"{name}.in-{att_id}"
        return (os.path.join(self.settings.sockets_dir, f"{base}.sock"),
                os.path.join(self.settings.stats_dir, f"{base}.stats"),
                os.path.join(self.settings.logs_dir, f"{base}.log"))

    def _incoming_worker(self, v: VolumeRow, att: AttachmentRow) -> Worker:
        """The second export of volume V, for the incoming attachment ATT:
        its own socket, stats and log; the volume's allowed-peers file (both
        QEMUs of the migrating VM); its pid recorded on the attachment."""
        _, stats_file, log_path = self._incoming_paths(v.name, att.id)
        exp = self.state.export(v.name)
        att_id = att.id
        return self._new_worker(
            v, att.worker_socket, _owner(exp.socket_owner) if exp else None,
            stats_file=stats_file, log_path=log_path,
            on_pid=lambda _vol, pid, start: self.state.set_attachment_worker(att_id, pid, start),
            on_restart=lambda vol: log.warning("export %s: the worker of incoming attachment "
                                               "%s restarted", vol, att_id))

    async def _attach_incoming(self, v: VolumeRow, hv: Hypervisor, request) -> AttachmentRow:
        """A live migration's destination: plug the volume into the destination
        VM (REQUEST.qmp_socket) where the source VM has it, served by a second
        export of the volume; `incoming` until the watcher sees the VM arrive."""
        name = v.name
        if getattr(request, "bus", None) is not None:
            raise ApiError(422, "bus cannot be given with migrate_from: the disk goes where "
                                "the source VM has it")
        src = self.get_attachment(name, request.migrate_from)
        if src.hypervisor != hv.name or src.state != "attached":
            raise ApiError(409, f"attachment {src.id} of volume '{name}' is a {src.state} "
                                f"{self.hypervisor(src.hypervisor).label} attachment, not an "
                                f"attached {hv.label} one: there is no migration to take over")
        busy = next((a for a in self.state.attachments(name) if a.state == "incoming"), None)
        if busy is not None:
            raise ApiError(409, f"volume '{name}' is already migrating to the VM at "
                                f"{busy.qmp_socket} (attachment {busy.id})")
        if self.state.export(name) is None or name not in self.workers:
            raise ApiError(409, f"volume '{name}' has no running export to migrate from")
        target = await hv.prepare(v, request)
        target.placement = await hv.placement(src)
        row = target.row
        row.state, row.migrate_from = "incoming", src.id
        row.device_id, row.chardev_id, row.bus = src.device_id, src.chardev_id, src.bus
        row.worker_socket = self._incoming_paths(name, row.id)[0]
        if len(row.worker_socket.encode()) > SOCKET_PATH_MAX:
            raise ApiError(422, f"socket path {row.worker_socket} is longer than "
                                f"{SOCKET_PATH_MAX} bytes; use a shorter volume name or "
                                "socket_dir")
        peer = peers.peer_of(target.peer_pid, row.id) if target.peer_pid else None
        if peer is None:
            raise target.peer_gone
        self.state.add_attachment(row)
        worker = self._incoming_worker(v, row)
        try:
            # the volume's peers file: both QEMUs of the VM, on either export
            self._set_peers(name, self._export_explicit(name), add=peer)
            await worker.start(self.settings.worker_start_timeout_s)
            self.incoming[row.id] = worker
            async with self.vm_lock(hv.vm_key(row)):
                await hv.plug(target, v, row.worker_socket)
        except WorkerStartError as e:
            await self._end_incoming(row, worker)
            raise ApiError(502, str(e)) from None
        except ApiError:
            await self._end_incoming(row, worker)
            raise
        except Exception as e:
            log.exception("preparing the migration of %s to %s failed", name, target.where)
            await self._end_incoming(row, worker)
            raise ApiError(502, f"preparing the migration of volume '{name}' to "
                                f"{target.where} failed: {type(e).__name__}: {e}") from None
        except BaseException:  # cancelled: the clean-up goes on regardless
            await asyncio.shield(self._end_incoming(row, worker))
            raise
        log_event(log, "attachment.incoming", volume=name, attachment=row.id,
                  migrate_from=src.id, socket=row.worker_socket, pid=worker.pid,
                  **hv.log_fields(row))
        return row

    async def _attach_incoming_remote(self, v: VolumeRow, hv: Hypervisor,
                                      request) -> AttachmentRow:
        """A live migration's destination when the source is on another host:
        plug the volume into the destination VM (REQUEST.qmp_socket) where the
        source VM has it (REQUEST.device_id, bus, addr), served by this
        daemon's export of the volume; `incoming` until the watcher sees the
        VM arrive, then `attached`.  The backing's lock (OFD on a shared file,
        the RBD image's exclusive lock) keeps this export's rings waiting
        until the source host's have stopped."""
        name = v.name
        if request.device_id is None:
            raise ApiError(422, "an incoming attachment needs device_id: the source "
                                "attachment's, as its host's daemon reports it")
        busy = next((a for a in self.state.attachments(name) if a.state == "incoming"), None)
        if busy is not None:
            raise ApiError(409, f"volume '{name}' is already migrating to the VM at "
                                f"{busy.qmp_socket} (attachment {busy.id})")
        live = next((a for a in self.state.attachments(name)
                     if a.state in ("attached", "attaching", "detaching")), None)
        if live is not None:
            raise ApiError(409, f"volume '{name}' is attached to a VM on this host "
                                f"(attachment {live.id}): for a migration from it give "
                                f"migrate_from {live.id}")
        target = await hv.prepare(v, request)
        target.placement = {"bus": request.bus, "addr": request.addr}
        row = target.row
        row.state, row.device_id = "incoming", request.device_id
        row.chardev_id = f"{request.device_id}-chr"
        await self._attach_through_export(hv, v, target)
        self.state.set_attachment_state(row.id, "incoming", bus=row.bus)
        log_event(log, "attachment.incoming", volume=name, attachment=row.id,
                  migrate_from="another host", device_id=row.device_id, **hv.log_fields(row))
        return row

    async def _retire_migrated(self, hv: Hypervisor) -> None:
        """Attachments whose VM was migrated to another host (its QEMU here
        handed the VM over): forgotten, their export stopped unless another
        attachment or an explicit export keeps it.  A migration to a QEMU on
        this host is settled by its incoming attachment instead."""
        local = {a.migrate_from for a in self.state.attachments() if a.state == "incoming"}
        for att in [a for a in self.state.attachments()
                    if a.hypervisor == hv.name and a.state == "attached" and a.id not in local]:
            if not await hv.migrated_away(att):
                continue
            async with self.lock(att.volume):
                current = self.state.attachment(att.volume, att.id)
                if current is None or current.state != "attached":
                    continue
                self.state.delete_attachment(att.id)
                log_event(log, "attachment.migrated_away", volume=att.volume,
                          attachment=att.id, **hv.log_fields(att))
                exp = self.state.export(att.volume)
                if exp is not None and not exp.explicit and \
                        not self.state.attachments(att.volume):
                    await self.stop_export(att.volume)
                elif exp is not None and os.path.exists(self._peers_path(att.volume)):
                    self._set_peers(att.volume, bool(exp.explicit))

    async def _stop_incoming_worker(self, att_id: str, worker: Worker | None = None) -> None:
        w = self.incoming.pop(att_id, None) or worker
        if w is not None:
            await w.stop(self.settings.worker_stop_timeout_s)

    async def _end_incoming(self, att: AttachmentRow, worker: Worker | None = None) -> None:
        """Forget the incoming attachment ATT (a cancelled or failed migration)
        and stop its export; the source's export serves on."""
        await self._stop_incoming_worker(att.id, worker)
        self.state.delete_attachment(att.id)
        exp = self.state.export(att.volume)
        self._set_peers(att.volume, bool(exp and exp.explicit), drop=att.id)
        for path in self._incoming_paths(att.volume, att.id)[:2]:
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _adopt_incoming(self, att: AttachmentRow) -> None:
        """Daemon start: take the worker of an incoming attachment back (or
        start it again: its destination QEMU reconnects)."""
        v = self.state.volume(att.volume)
        worker = self._incoming_worker(v, att)
        self.incoming[att.id] = worker
        if att.worker_pid and worker.adopt(att.worker_pid, att.worker_pid_start):
            return
        log.warning("incoming attachment %s of %s: worker %s is gone; starting a new one",
                    att.id, att.volume, att.worker_pid)
        try:
            await worker.start(self.settings.worker_start_timeout_s)
        except WorkerStartError as e:
            log.error("%s; retrying with back-off", e)
            worker.retry_later()

    async def _settle_migrations(self) -> None:
        """Incoming attachments whose destination VM has received the
        migration take over from their source."""
        for att in [a for a in self.state.attachments() if a.state == "incoming"]:
            if not await self.hypervisor(att.hypervisor).incoming_done(att):
                continue
            async with self.lock(att.volume):
                current = self.state.attachment(att.volume, att.id)
                if current is not None and current.state == "incoming":
                    await self._complete_migration(current)

    async def _complete_migration(self, att: AttachmentRow) -> None:
        """The VM runs at ATT's QEMU now: its export becomes the volume's, the
        source attachment and its export go."""
        name = att.volume
        if att.migrate_from is None:
            # from another host: this daemon's export served it all along
            self.state.set_attachment_state(att.id, "attached")
            log_event(log, "attachment.migrated", volume=name, attachment=att.id,
                      replaced="another host", **self.hypervisor(att.hypervisor).log_fields(att))
            return
        new = self.incoming.pop(att.id, None)
        if new is None:  # (cannot be: adopted or started at daemon start)
            log.error("incoming attachment %s of %s has no worker", att.id, name)
            return
        old = self.workers.pop(name, None)
        if old is not None:
            await old.stop(self.settings.worker_stop_timeout_s)
        new.on_pid = self.state.set_export_pid
        new.on_restart = self.state.count_restart
        # its stats block becomes the volume's (renamed: the worker's mapping
        # stays, and a restarted or adopted worker finds it where the
        # volume's always is)
        with contextlib.suppress(OSError):
            os.replace(new.spec.stats_file, self.stats_path(name))
        new.spec.stats_file = self.stats_path(name)
        self.state.complete_migration(att, new.pid, new.pid_start)
        self.workers[name] = new
        self._set_peers(name, self._export_explicit(name))
        log_event(log, "attachment.migrated", volume=name, attachment=att.id,
                  replaced=att.migrate_from, socket=att.worker_socket, pid=new.pid,
                  **self.hypervisor(att.hypervisor).log_fields(att))
