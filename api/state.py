"""The daemon's memory: volumes, exports and attachments in SQLite.

Every change is one short transaction, so a `kill -9` of the daemon at any
point leaves a consistent database; the export workers' pids are stored too,
so a restarted daemon adopts the workers that kept running."""

from __future__ import annotations

import contextlib
import datetime
import os
import sqlite3
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    name        TEXT PRIMARY KEY,
    size_bytes  INTEGER NOT NULL,
    read_only   INTEGER NOT NULL DEFAULT 0,
    queues      INTEGER NOT NULL DEFAULT 1,
    backing     TEXT NOT NULL UNIQUE,
    managed     INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    backing_dev  INTEGER,
    backing_ino  INTEGER,
    backing_kind TEXT,
    backing_rdev INTEGER,
    qos         TEXT,
    qos_group   TEXT REFERENCES qos_groups(name)
);
CREATE TABLE IF NOT EXISTS qos_groups (
    name        TEXT PRIMARY KEY,
    qos         TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS exports (
    volume      TEXT PRIMARY KEY REFERENCES volumes(name),
    socket      TEXT NOT NULL,
    explicit    INTEGER NOT NULL DEFAULT 0,
    pid         INTEGER,
    pid_start   INTEGER,
    restarts    INTEGER NOT NULL DEFAULT 0,
    started_at  TEXT,
    socket_owner TEXT
);
CREATE TABLE IF NOT EXISTS attachments (
    id          TEXT PRIMARY KEY,
    volume      TEXT NOT NULL REFERENCES volumes(name),
    hypervisor  TEXT NOT NULL,
    qmp_socket  TEXT,
    bus         TEXT,
    device_id   TEXT NOT NULL,
    chardev_id  TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    error       TEXT,
    uri         TEXT,
    domain      TEXT,
    target      TEXT,
    migrate_from TEXT,
    worker_socket TEXT,
    worker_pid  INTEGER,
    worker_pid_start INTEGER
);
"""

# Upgrades of a database written by an older daemon: MIGRATIONS[i] takes
# PRAGMA user_version i to i + 1.  A new database gets SCHEMA, which is the
# latest version already.
MIGRATIONS = [
    # 1: libvirt attachments (uri, domain, target; no QMP socket) and the
    # owner given to an export's socket
    """
    CREATE TABLE attachments_v1 (
        id          TEXT PRIMARY KEY,
        volume      TEXT NOT NULL REFERENCES volumes(name),
        hypervisor  TEXT NOT NULL,
        qmp_socket  TEXT,
        bus         TEXT,
        device_id   TEXT NOT NULL,
        chardev_id  TEXT NOT NULL,
        state       TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        error       TEXT,
        uri         TEXT,
        domain      TEXT,
        target      TEXT
    );
    INSERT INTO attachments_v1 (id, volume, hypervisor, qmp_socket, bus, device_id,
                                chardev_id, state, created_at, error)
        SELECT id, volume, hypervisor, qmp_socket, bus, device_id, chardev_id, state,
               created_at, error FROM attachments;
    DROP TABLE attachments;
    ALTER TABLE attachments_v1 RENAME TO attachments;
    ALTER TABLE exports ADD COLUMN socket_owner TEXT;
    """,
    # 2: the backing's identity (st_dev, st_ino, file or block device, and a
    # block device's st_rdev), checked at every open; NULL until the next
    # successful open of a volume created before
    """
    ALTER TABLE volumes ADD COLUMN backing_dev INTEGER;
    ALTER TABLE volumes ADD COLUMN backing_ino INTEGER;
    ALTER TABLE volumes ADD COLUMN backing_kind TEXT;
    ALTER TABLE volumes ADD COLUMN backing_rdev INTEGER;
    """,
    # 3: live migration: an `incoming` attachment (the destination QEMU) names
    # the attachment it takes over and has an export worker of its own
    """
    ALTER TABLE attachments ADD COLUMN migrate_from TEXT;
    ALTER TABLE attachments ADD COLUMN worker_socket TEXT;
    ALTER TABLE attachments ADD COLUMN worker_pid INTEGER;
    ALTER TABLE attachments ADD COLUMN worker_pid_start INTEGER;
    """,
    # 4: QoS: a volume's limits (JSON, the flat form of blkserve.qos) and
    # group, and the groups
    """
    CREATE TABLE qos_groups (
        name        TEXT PRIMARY KEY,
        qos         TEXT NOT NULL,
        created_at  TEXT NOT NULL
    );
    ALTER TABLE volumes ADD COLUMN qos TEXT;
    ALTER TABLE volumes ADD COLUMN qos_group TEXT REFERENCES qos_groups(name);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class VolumeRow:
    name: str
    size_bytes: int
    read_only: bool
    queues: int
    backing: str
    managed: bool
    created_at: str
    # the inode the backing was created on (see blkserve.backing.Identity)
    backing_dev: int | None = None
    backing_ino: int | None = None
    backing_kind: str | None = None  # file | block
    backing_rdev: int | None = None
    qos: str | None = None  # JSON of the flat limits (blkserve.qos.to_flat), or NULL
    qos_group: str | None = None

    @property
    def identity(self) -> tuple[int, int] | None:
        if self.backing_dev is None or self.backing_ino is None:
            return None
        return self.backing_dev, self.backing_ino


@dataclass
class ExportRow:
    volume: str
    socket: str
    explicit: bool
    pid: int | None
    pid_start: int | None
    restarts: int
    started_at: str | None
    socket_owner: str | None = None  # "UID:GID" the socket is chowned to (see workers)


@dataclass
class AttachmentRow:
    id: str
    volume: str
    hypervisor: str  # qemu | libvirt
    qmp_socket: str | None  # qemu
    bus: str | None
    device_id: str  # qemu: device_add id; libvirt: the disk's alias (ua-...)
    chardev_id: str
    state: str
    created_at: str
    error: str | None
    uri: str | None = None  # libvirt: connection URI
    domain: str | None = None  # libvirt: domain name
    target: str | None = None  # libvirt: <target dev=...> of the disk
    # incoming (a live migration's destination): the attachment it takes over,
    # and the socket and process of the export worker it has until then
    migrate_from: str | None = None
    worker_socket: str | None = None
    worker_pid: int | None = None
    worker_pid_start: int | None = None


class State:
    def __init__(self, path: str):
        # private: the state dir may be searchable by others (export sockets
        # are reached through it); SQLite gives -wal and -shm the db's mode
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        for f in (path, path + "-wal", path + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f, 0o600)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        new = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                              "name = 'volumes'").fetchone() is None
        if new:
            self.db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; "
                                  "COMMIT;")
            return
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        for i in range(version, SCHEMA_VERSION):
            # one transaction per step: a daemon killed mid-upgrade redoes the step
            self.db.executescript(f"BEGIN; {MIGRATIONS[i]} PRAGMA user_version = {i + 1}; "
                                  "COMMIT;")

    def close(self) -> None:
        self.db.close()

    def _exec(self, sql: str, args=()) -> sqlite3.Cursor:
        return self.db.execute(sql, args)

    # -- volumes -----------------------------------------------------------

    def volumes(self) -> list[VolumeRow]:
        rows = self._exec("SELECT * FROM volumes ORDER BY name").fetchall()
        return [_volume(r) for r in rows]

    def volume(self, name: str) -> VolumeRow | None:
        r = self._exec("SELECT * FROM volumes WHERE name = ?", (name,)).fetchone()
        return _volume(r) if r else None

    def volume_by_backing(self, backing: str) -> VolumeRow | None:
        r = self._exec("SELECT * FROM volumes WHERE backing = ?", (backing,)).fetchone()
        return _volume(r) if r else None

    def add_volume(self, v: VolumeRow) -> None:
        self._exec("INSERT INTO volumes (name, size_bytes, read_only, queues, backing, "
                   "managed, created_at, backing_dev, backing_ino, backing_kind, "
                   "backing_rdev) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (v.name, v.size_bytes, int(v.read_only), v.queues, v.backing,
                    int(v.managed), v.created_at, v.backing_dev, v.backing_ino,
                    v.backing_kind, v.backing_rdev))

    def set_volume_identity(self, name: str, dev: int, ino: int, kind: str,
                            rdev: int | None) -> None:
        self._exec("UPDATE volumes SET backing_dev = ?, backing_ino = ?, backing_kind = ?, "
                   "backing_rdev = ? WHERE name = ?", (dev, ino, kind, rdev, name))

    def set_volume_size(self, name: str, size: int) -> None:
        self._exec("UPDATE volumes SET size_bytes = ? WHERE name = ?", (size, name))

    def delete_volume(self, name: str) -> None:
        self._exec("DELETE FROM volumes WHERE name = ?", (name,))

    def set_volume_qos(self, name: str, qos: str | None, group: str | None) -> None:
        self._exec("UPDATE volumes SET qos = ?, qos_group = ? WHERE name = ?",
                   (qos, group, name))

    # -- QoS groups --------------------------------------------------------

    def qos_groups(self) -> list[sqlite3.Row]:
        return self._exec("SELECT * FROM qos_groups ORDER BY name").fetchall()

    def qos_group(self, name: str) -> sqlite3.Row | None:
        return self._exec("SELECT * FROM qos_groups WHERE name = ?", (name,)).fetchone()

    def add_qos_group(self, name: str, qos: str) -> None:
        self._exec("INSERT INTO qos_groups (name, qos, created_at) VALUES (?, ?, ?)",
                   (name, qos, now()))

    def set_qos_group(self, name: str, qos: str) -> None:
        self._exec("UPDATE qos_groups SET qos = ? WHERE name = ?", (qos, name))

    def delete_qos_group(self, name: str) -> None:
        self._exec("DELETE FROM qos_groups WHERE name = ?", (name,))

    def qos_group_members(self, name: str) -> list[str]:
        return [r[0] for r in self._exec("SELECT name FROM volumes WHERE qos_group = ? "
                                         "ORDER BY name", (name,)).fetchall()]

    # -- exports -----------------------------------------------------------

    def exports(self) -> list[ExportRow]:
        return [_export(r) for r in self._exec("SELECT * FROM exports ORDER BY volume")]

    def export(self, volume: str) -> ExportRow | None:
        r = self._exec("SELECT * FROM exports WHERE volume = ?", (volume,)).fetchone()
        return _export(r) if r else None

    def add_export(self, volume: str, socket: str, explicit: bool) -> None:
        self._exec("INSERT INTO exports (volume, socket, explicit) VALUES (?, ?, ?)",
                   (volume, socket, int(explicit)))

    def set_export_explicit(self, volume: str, explicit: bool) -> None:
        self._exec("UPDATE exports SET explicit = ? WHERE volume = ?", (int(explicit), volume))

    def set_export_pid(self, volume: str, pid: int | None, pid_start: int | None) -> None:
        self._exec("UPDATE exports SET pid = ?, pid_start = ?, started_at = ? WHERE volume = ?",
                   (pid, pid_start, now() if pid else None, volume))

    def set_export_socket_owner(self, volume: str, owner: str | None) -> None:
        self._exec("UPDATE exports SET socket_owner = ? WHERE volume = ?", (owner, volume))

    def count_restart(self, volume: str) -> None:
        self._exec("UPDATE exports SET restarts = restarts + 1 WHERE volume = ?", (volume,))

    def delete_export(self, volume: str) -> None:
        self._exec("DELETE FROM exports WHERE volume = ?", (volume,))

    # -- attachments -------------------------------------------------------

    def attachments(self, volume: str | None = None) -> list[AttachmentRow]:
        if volume is None:
            rows = self._exec("SELECT * FROM attachments ORDER BY created_at, id")
        else:
            rows = self._exec("SELECT * FROM attachments WHERE volume = ? "
                              "ORDER BY created_at, id", (volume,))
        return [AttachmentRow(**dict(r)) for r in rows]

    def attachment(self, volume: str, att_id: str) -> AttachmentRow | None:
        r = self._exec("SELECT * FROM attachments WHERE volume = ? AND id = ?",
                       (volume, att_id)).fetchone()
        return AttachmentRow(**dict(r)) if r else None

    def add_attachment(self, a: AttachmentRow) -> None:
        self._exec("INSERT INTO attachments (id, volume, hypervisor, qmp_socket, bus, "
                   "device_id, chardev_id, state, created_at, error, uri, domain, target, "
                   "migrate_from, worker_socket) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (a.id, a.volume, a.hypervisor, a.qmp_socket, a.bus, a.device_id,
                    a.chardev_id, a.state, a.created_at, a.error, a.uri, a.domain, a.target,
                    a.migrate_from, a.worker_socket))

    def set_attachment_worker(self, att_id: str, pid: int | None,
                              pid_start: int | None) -> None:
        self._exec("UPDATE attachments SET worker_pid = ?, worker_pid_start = ? WHERE id = ?",
                   (pid, pid_start, att_id))

    def complete_migration(self, incoming: AttachmentRow, pid: int | None,
                           pid_start: int | None) -> None:
        """One transaction: INCOMING takes over from the attachment it migrated
        from (forgotten), and its worker becomes the volume's export."""
        with self.db:
            self.db.execute("BEGIN")
            self._exec("DELETE FROM attachments WHERE id = ?", (incoming.migrate_from,))
            self._exec("UPDATE attachments SET state = 'attached', error = NULL, "
                       "migrate_from = NULL, worker_socket = NULL, worker_pid = NULL, "
                       "worker_pid_start = NULL WHERE id = ?", (incoming.id,))
            self._exec("UPDATE exports SET socket = ?, pid = ?, pid_start = ?, started_at = ? "
                       "WHERE volume = ?", (incoming.worker_socket, pid, pid_start,
                                            now() if pid else None, incoming.volume))

    def set_attachment_state(self, att_id: str, state: str, error: str | None = None,
                             bus: str | None = None, target: str | None = None) -> None:
        self._exec("UPDATE attachments SET state = ?, error = ?, bus = COALESCE(?, bus), "
                   "target = COALESCE(?, target) WHERE id = ?",
                   (state, error, bus, target, att_id))

    def delete_attachment(self, att_id: str) -> None:
        self._exec("DELETE FROM attachments WHERE id = ?", (att_id,))


def _volume(r: sqlite3.Row) -> VolumeRow:
    d = dict(r)
    d["read_only"] = bool(d["read_only"])
    d["managed"] = bool(d["managed"])
    return VolumeRow(**d)


def _export(r: sqlite3.Row) -> ExportRow:
    d = dict(r)
    d["explicit"] = bool(d["explicit"])
    return ExportRow(**d)
