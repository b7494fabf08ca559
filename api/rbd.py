"""Volumes on Ceph RBD (the Controller's RBD half): managed volumes as
images in the configured pool ([storage] backend = "rbd"), and allow-listed
external rbd:POOL/[NAMESPACE/]IMAGE backings.  The images are created,
sized, resized and removed through librbd (blkserve.native.RbdCluster),
each call in a thread of its own and bounded by storage.connect_timeout_s:
a cluster that does not answer is a 502 within that time, never a hung
API.  Ceph does the rest (replication, placement): no cluster logic here."""

from __future__ import annotations

import contextlib
import errno
import logging

from blkserve.api.calls import Busy
from blkserve.api.errors import ApiError
from blkserve.api.state import VolumeRow, now
from blkserve.api.volumes import existing_size
from blkserve.export import RBD_PREFIX, ExportError, is_rbd, parse_rbd
from blkserve.logs import log_event
from blkserve.native import RbdCluster, RbdError

log = logging.getLogger("blkserve.api")


def rbd_spec(pool: str, nspace: str, image: str) -> str:
    return f"{RBD_PREFIX}{pool}/{nspace + '/' if nspace else ''}{image}"


class RbdVolumes:
    """Mixin of the Controller: settings, state, workers come from it."""

    @property
    def rbd_cluster(self) -> RbdCluster:
        s = self.settings
        return RbdCluster(conf=s.rbd_conf, client_id=s.rbd_client_id, keyring=s.rbd_keyring,
                          timeout=max(1, s.rbd_connect_timeout_s))

    def wants_rbd(self, backing: str | None) -> bool:
        """Does a new volume with this backing live on RBD?"""
        return is_rbd(backing) or (backing is None and self.settings.storage_backend == "rbd")

    async def _rbd_call(self, fn, *args, missing_ok: bool = False):
        """FN(*ARGS) against the cluster, off the event loop and bounded;
        with MISSING_OK, None when the image does not exist."""
        bound = max(1, self.settings.rbd_connect_timeout_s)
        try:
            # the library bounds itself (connect and op timeouts); the
            # thread's own bound is a backstop a little later
            return await self.rbd_calls.run(fn, *args, timeout=3 * bound + 5)
        except Busy as e:
            raise ApiError(503, f"Ceph cluster: {e}") from None
        except TimeoutError:
            raise ApiError(502, f"the Ceph cluster did not answer within {3 * bound + 5} s"
                           ) from None
        except RbdError as e:
            if missing_ok and e.stage == "image" and e.errno == errno.ENOENT:
                return None
            raise self._rbd_error(e) from None

    @staticmethod
    def _rbd_error(e: RbdError) -> ApiError:
        if e.stage in ("connect", "conf", "create") or e.errno in (errno.ETIMEDOUT,):
            return ApiError(502, f"{e.strerror} (check the [storage] settings: conf, "
                                 "client_id, keyring)")
        if e.stage == "pool":
            return ApiError(422, e.strerror)
        if e.errno == errno.ENOENT:
            return ApiError(422, e.strerror)
        if e.errno == errno.EEXIST:
            return ApiError(409, e.strerror)
        if e.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return ApiError(409, f"{e.strerror} (still open by a client, or has snapshots)")
        return ApiError(502, e.strerror)

    async def create_rbd_volume(self, name: str, size: int | None, read_only: bool,
                                queues: int, backing: str | None) -> VolumeRow:
        if self.state.volume(name):
            raise ApiError(409, f"volume '{name}' already exists")
        managed = backing is None
        if managed:
            if size is None:
                raise ApiError(422, "size_bytes is required unless backing is given")
            pool, nspace, image = self.settings.rbd_pool, self.settings.rbd_namespace, name
            backing = rbd_spec(pool, nspace, image)
        else:
            try:
                pool, nspace, image = parse_rbd(backing)
            except ExportError as e:
                raise ApiError(422, f"backing {e}") from None
            if not self.settings.rbd_allowed(backing):
                raise ApiError(403, f"backing {backing} is not in the daemon's "
                                    "allowed_backings (config file: rbd:POOL/IMAGE patterns); "
                                    "add it there to use it")
        other = self.state.volume_by_backing(backing)
        if other:
            raise ApiError(409, f"backing {backing} is already used by volume '{other.name}'")
        cluster = self.rbd_cluster
        existing = await self._rbd_call(cluster.size, pool, nspace, image, missing_ok=True)
        if existing is not None:
            if managed:
                raise ApiError(409, f"image {backing} already exists but belongs to no "
                                    "volume; remove it or choose another name")
            size = existing_size(size, existing, backing)
            created = False
        else:
            if size is None:
                raise ApiError(422, f"backing {backing} does not exist; give size_bytes "
                                    "to create it")
            await self._rbd_call(cluster.create, pool, nspace, image, size)
            created = True
        row = VolumeRow(name, size, read_only, queues, backing, managed, now(),
                        backing_kind="rbd")
        try:
            self.state.add_volume(row)
        except Exception:
            if created:
                with contextlib.suppress(ApiError):
                    await self._rbd_call(cluster.remove, pool, nspace, image)
            raise
        log_event(log, "volume.created", volume=name, size_bytes=size, backing=backing)
        return row

    async def resize_rbd(self, name: str, size: int) -> VolumeRow:
        """rbd_resize by this client: while an export holds the image's lock,
        librbd hands the resize to that client (the lock owner performs
        maintenance operations), so it works on a served image; the export
        is then told (SIGHUP) and tells the guest."""
        v = self.get_volume(name)
        if size == v.size_bytes:
            return v
        self.check_resizable(v, size)
        pool, nspace, image = parse_rbd(v.backing)
        await self._rbd_call(self.rbd_cluster.resize, pool, nspace, image, size)
        return self.resized(v, size)

    async def delete_rbd_volume(self, name: str) -> None:
        """A managed volume's image is removed with it (first: if the
        cluster refuses, the volume stays); an external one is left."""
        v = self.get_volume(name)
        self.check_deletable(name)
        if v.managed:   # an image gone already has nothing left to free
            pool, nspace, image = parse_rbd(v.backing)
            await self._rbd_call(self.rbd_cluster.remove, pool, nspace, image, missing_ok=True)
        self.state.delete_volume(name)
        self.drop_volume_qos(name)
        log_event(log, "volume.deleted", volume=name)
