"""Volumes: their backing files and devices, created, checked, resized and
deleted (the Controller's volume half; no hypervisor or export in sight
beyond "is it busy?").

A backing is opened without following a symlink anywhere in its path, only
if it is a regular file or block device, and only while it is still the
inode the volume was created on."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal

from blkserve import backing as backing_io
from blkserve.api.errors import ApiError
from blkserve.api.state import VolumeRow, now
from blkserve.backing import BackingError, Identity
from blkserve.export import ExportError, is_null, is_path, parse_null
from blkserve.logs import log_event

log = logging.getLogger("blkserve.api")


def _not_found(name: str) -> ApiError:
    return ApiError(404, f"volume '{name}' does not exist")


def existing_size(size: int | None, actual: int, shown: str) -> int:
    """The capacity of an existing backing of ACTUAL bytes (whole sectors),
    which a given SIZE must match."""
    actual -= actual % 512
    if actual == 0:
        raise ApiError(422, f"backing {shown} is smaller than one 512-byte sector")
    if size is not None and size != actual:
        raise ApiError(422, f"size_bytes {size} does not match the size of the "
                            f"existing backing {shown} ({actual} bytes)")
    return actual


def _backing_size(path: str,
                  expect: tuple[int, int] | None = None) -> tuple[int, Identity]:
    """Size and identity of the backing PATH, opened without following a
    symlink, only if it is a regular file or block device (and EXPECT)."""
    fd, ident = backing_io.open_checked(path, os.O_RDONLY, expect)
    try:
        return backing_io.size_of(fd), ident
    finally:
        os.close(fd)


class Volumes:
    """The volume operations of the Controller (which provides settings,
    state, workers and the workers of incoming attachments)."""

    def get_volume(self, name: str) -> VolumeRow:
        v = self.state.volume(name)
        if v is None:
            raise _not_found(name)
        return v

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
        if is_null(backing):
            return self._create_null(name, size, read_only, queues, backing)
        return self._create_external(name, size, read_only, queues, backing)

    def _create_null(self, name: str, size: int | None, read_only: bool, queues: int,
                     spec: str) -> VolumeRow:
        """A volume with no storage at all (null:SIZE: reads return zeroes,
        writes are dropped): the protocol's own cost, for benchmarks; only
        if a null: pattern in allowed_backings says so."""
        try:
            actual = parse_null(spec)
        except ExportError as e:
            raise ApiError(422, str(e)) from None
        if not self.settings.null_allowed(spec):
            raise ApiError(403, f"backing {spec} stores nothing (reads return zeroes, writes "
                                "are dropped): it is for benchmarks, and refused unless a "
                                "null: pattern in the daemon's allowed_backings allows it "
                                "(e.g. \"null:*\")")
        size = existing_size(size, actual, spec)
        row = VolumeRow(name, size, read_only, queues, spec, False, now(),
                        backing_kind="null")
        self.state.add_volume(row)
        log_event(log, "volume.created", volume=name, size_bytes=size, backing=spec)
        return row

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
            size = existing_size(size, actual, shown)
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
        if is_null(v.backing):
            return None
        try:
            return backing_io.check(self._backing_path(v))
        except BackingError:
            return None

    def _backing_path(self, v: VolumeRow) -> str:
        """The path the backing is opened by: the stored real path; for a
        volume under the state dir its directories are resolved (rows from
        before paths were stored resolved), never the file itself."""
        if not v.managed or not is_path(v.backing):
            return v.backing
        head, tail = os.path.split(v.backing)
        return os.path.join(os.path.realpath(head), tail)

    def _check_backing(self, v: VolumeRow, action: str) -> Identity | None:
        """Before a worker opens V's backing: ApiError 409 if it is no longer
        the inode the volume was created on, a symlink is in its path, or it
        is not a regular file or block device; the identity of a row that
        has none yet is recorded now.  Other errors (a missing file) are
        left to the worker to report."""
        if is_null(v.backing):
            return None
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

    def check_resizable(self, v: VolumeRow, size: int) -> None:
        busy = self.state.export(v.name) or self.state.attachments(v.name)
        if size < v.size_bytes and busy:
            raise ApiError(409, f"volume '{v.name}' is exported or attached; shrinking it "
                                "would take data from under the guest")

    def resized(self, v: VolumeRow, size: int) -> VolumeRow:
        """The backing of V has SIZE bytes now: record it, and when it grew
        tell the export's worker (and a live migration's destination
        export), which re-reads the size and tells the guest."""
        self.state.set_volume_size(v.name, size)
        log_event(log, "volume.resized", volume=v.name, size_bytes=size,
                  old_size_bytes=v.size_bytes)
        if size > v.size_bytes:
            incoming = [self.incoming.get(a.id) for a in self.state.attachments(v.name)
                        if a.state == "incoming"]
            for w in [self.workers.get(v.name), *incoming]:
                if w is not None and w.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGHUP)
        return self.get_volume(v.name)

    def resize_volume(self, name: str, size: int) -> VolumeRow:
        v = self.get_volume(name)
        if size == v.size_bytes:
            return v
        self.check_resizable(v, size)
        if is_null(v.backing):
            raise ApiError(409, f"volume '{name}' is a null backing ({v.backing}); its size "
                                "is part of its name: create another")
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
        return self.resized(v, size)

    def check_deletable(self, name: str) -> None:
        if self.state.attachments(name):
            raise ApiError(409, f"volume '{name}' is attached to a VM; detach it first")
        if self.state.export(name):
            raise ApiError(409, f"volume '{name}' is exported; stop the export first "
                                f"(DELETE /v1/volumes/{name}/export)")

    def delete_volume(self, name: str) -> None:
        v = self.get_volume(name)
        self.check_deletable(name)
        self.state.delete_volume(name)
        self.drop_volume_qos(name)
        if v.managed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(v.backing)
        log_event(log, "volume.deleted", volume=name)
