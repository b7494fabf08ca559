"""Daemon settings: embedded defaults, overridden by a TOML config file, then
by command-line flags."""

from __future__ import annotations

import fnmatch
import glob
import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field

from blkserve.export import parse_poll

DEFAULT_LISTEN = "127.0.0.1:8470"
DEFAULT_STATE_DIR = "./var"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes including the NUL
# Where QMP sockets live: QEMU's and libvirt's run dirs and the usual
# -qmp unix:/tmp/... (any local user can create a socket in /tmp or under
# /run/user: what answers there is trusted only if it is QEMU, see qemu.py).
DEFAULT_QMP_SOCKET_DIRS = ("/run", "/var/run", "/var/lib/libvirt/qemu", "/tmp")
# libvirt 9.0's system sockets: the monolithic libvirtd (Debian 12) and the
# modular virtqemud, read-write and read-only.
DEFAULT_LIBVIRT_SOCKETS = ("/run/libvirt/libvirt-sock", "/run/libvirt/libvirt-sock-ro",
                           "/run/libvirt/virtqemud-sock", "/run/libvirt/virtqemud-sock-ro")
AUTH_CHOICES = ("open", "token")


class ConfigError(Exception):
    pass


@dataclass
class Settings:
    listen: str = DEFAULT_LISTEN
    state_dir: str = DEFAULT_STATE_DIR
    socket_dir: str | None = None
    # Paths (exact, or fnmatch patterns such as /dev/disk/by-id/nvme-*) of
    # existing block devices or files outside the state dir that volumes may
    # use as their backing.  Matched against the resolved path only (a
    # symlink does not extend the list; root's links in root-only
    # directories, such as udev's by-id ones, stand for their target).
    # Empty: only volumes created under the state dir.
    allowed_backings: list[str] = field(default_factory=list)
    detach_timeout_s: float = 60.0
    qmp_timeout_s: float = 30.0
    worker_start_timeout_s: float = 15.0
    worker_stop_timeout_s: float = 10.0
    export_cache: str = "none"
    export_io_engine: str = "auto"
    export_poll_us: int | str = "auto"   # blkserve export --poll-us: auto, auto:N or N
    # Directories under which a QMP socket may be named (checked on its real
    # path).  The peer must also be a QEMU binary (SO_PEERCRED), which is what
    # makes world-writable /tmp acceptable here.
    qmp_socket_dirs: list[str] = field(default_factory=lambda: list(DEFAULT_QMP_SOCKET_DIRS))
    # The libvirt daemon sockets a libvirt URI may name with ?socket=.
    libvirt_sockets: list[str] = field(default_factory=lambda: list(DEFAULT_LIBVIRT_SOCKETS))
    # "open" or "token" for /metrics and /docs, /redoc, /openapi.json; None:
    # open when the API listens on loopback only, token otherwise.
    metrics_auth: str | None = None
    docs_auth: str | None = None
    # [storage]: where managed volumes live: "file" (STATE_DIR/volumes) or
    # "rbd" (images in rbd_pool); the rbd_* client settings also serve
    # external rbd:POOL/IMAGE backings
    storage_backend: str = "file"
    rbd_pool: str = "rbd"
    rbd_namespace: str = ""
    rbd_conf: str | None = None
    rbd_client_id: str | None = None
    rbd_keyring: str | None = None
    rbd_timeout_s: int = 60          # a request the cluster does not answer fails
    rbd_connect_timeout_s: int = 10  # a management call (create, resize, ...) gives up

    def __post_init__(self) -> None:
        self.state_dir = os.path.abspath(self.state_dir)

    @property
    def loopback(self) -> bool:
        """Does the API listen on a loopback address only?"""
        host = self.host_port[0]
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def route_auth(self, which: str) -> str:
        """'open' or 'token' for 'metrics' or 'docs'."""
        value = getattr(self, f"{which}_auth")
        return value or ("open" if self.loopback else "token")

    def qmp_socket_allowed(self, path: str) -> bool:
        """Is the real path of PATH under one of qmp_socket_dirs?"""
        if "\x00" in path:
            return False
        real = os.path.realpath(path)
        for d in self.qmp_socket_dirs:
            root = os.path.realpath(d)
            if real.startswith(root.rstrip(os.sep) + os.sep):
                return True
        return False

    def libvirt_socket_allowed(self, path: str) -> bool:
        if "\x00" in path:
            return False
        real = os.path.realpath(path)
        return any(real == os.path.realpath(s) for s in self.libvirt_sockets)

    @property
    def peers_dir(self) -> str:
        """Allowed-peers files of the exports (blkserve.peers)."""
        return os.path.join(self.state_dir, "peers")

    @property
    def host_port(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"listen address {self.listen!r} is not HOST:PORT")
        return host.strip("[]") or "127.0.0.1", int(port)

    @property
    def db_path(self) -> str:
        return os.path.join(self.state_dir, "blkserve.db")

    @property
    def volumes_dir(self) -> str:
        return os.path.join(self.state_dir, "volumes")

    @property
    def sockets_dir(self) -> str:
        return os.path.abspath(self.socket_dir or os.path.join(self.state_dir, "sockets"))

    @property
    def stats_dir(self) -> str:
        return os.path.join(self.state_dir, "stats")

    @property
    def qos_dir(self) -> str:
        """QoS blocks of the volumes (and groups/ of the groups): blkserve.qos."""
        return os.path.join(self.state_dir, "qos")

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    @property
    def token_path(self) -> str:
        return os.path.join(self.state_dir, "api-token")

    def rbd_allowed(self, spec: str) -> bool:
        """Is the RBD backing SPEC (rbd:POOL/[NS/]IMAGE) on the allow-list
        (rbd: patterns of allowed_backings, fnmatch)?"""
        return any(p.startswith("rbd:") and fnmatch.fnmatchcase(spec, p)
                   for p in self.allowed_backings)

    def null_allowed(self, spec: str) -> bool:
        """Is the null backing SPEC (null:SIZE) allowed (a null: pattern in
        allowed_backings, e.g. "null:*")?  None is by default: a volume that
        stores nothing is for benchmarks, not for a guest's data."""
        return any(p.startswith("null:") and fnmatch.fnmatchcase(spec, p)
                   for p in self.allowed_backings)

    def backing_allowed(self, path: str) -> bool:
        """Is the file PATH resolves to on the allow-list?  Only its real path
        counts: a symlink in an allow-listed directory does not make what it
        points to allowed.  A pattern's directories are resolved (the admin
        wrote them), and a pattern may match root's own symlinks to devices,
        as udev's /dev/disk/by-id/* are: such a link stands for its target."""
        real = os.path.realpath(path)
        for pattern in self.allowed_backings:
            if pattern.startswith(("rbd:", "null:")):
                continue
            head, tail = os.path.split(pattern)
            if not glob.has_magic(head):
                head = os.path.realpath(head)
            if fnmatch.fnmatchcase(real, os.path.join(head, tail)):
                return True
            if any(_root_link_target(m) == real for m in glob.iglob(pattern)):
                return True
        return False


def _root_link_target(link: str) -> str | None:
    """Where LINK points, if only root can have made it so: a symlink owned
    by root, in a root-owned directory nobody else may write to, pointing
    straight (no further link) at its target.  Else None."""
    try:
        st = os.lstat(link)
        if not stat.S_ISLNK(st.st_mode) or st.st_uid != 0:
            return None
        parent = os.path.realpath(os.path.dirname(link))
        pst = os.stat(parent)
        if pst.st_uid != 0 or pst.st_mode & 0o022:
            return None
        target = os.path.normpath(os.path.join(parent, os.readlink(link)))
    except OSError:
        return None
    return target if os.path.realpath(target) == target else None


_KEYS = {
    "listen": str, "state_dir": str, "socket_dir": str, "allowed_backings": list,
    "detach_timeout_s": (int, float), "qmp_timeout_s": (int, float),
    "worker_start_timeout_s": (int, float), "worker_stop_timeout_s": (int, float),
    "qmp_socket_dirs": list, "libvirt_sockets": list, "metrics_auth": str, "docs_auth": str,
}
_STORAGE_KEYS = {"backend": ("file", "rbd"), "pool": str, "namespace": str, "conf": str,
                 "client_id": str, "keyring": str, "timeout_s": int, "connect_timeout_s": int}
_EXPORT_KEYS = {"cache": ("none", "writeback"), "io_engine": ("auto", "io_uring", "sync"),
                "poll_us": "poll"}


def _storage(path: str, table) -> dict:
    """The [storage] table as Settings fields."""
    if not isinstance(table, dict):
        raise ConfigError(f"config {path}: [storage] must be a table")
    out = {}
    for k, v in table.items():
        allowed = _STORAGE_KEYS.get(k)
        if allowed is None:
            raise ConfigError(f"config {path}: unknown key storage.{k}")
        if isinstance(allowed, tuple):
            if v not in allowed:
                raise ConfigError(f"config {path}: storage.{k} must be one of "
                                  f"{', '.join(allowed)}")
        elif not isinstance(v, allowed) or isinstance(v, bool):
            raise ConfigError(f"config {path}: storage.{k} has the wrong type")
        if k in ("timeout_s", "connect_timeout_s") and not 0 <= v <= 86400:
            raise ConfigError(f"config {path}: storage.{k} must be from 0 to 86400")
        if k in ("pool", "namespace") and v and not re.fullmatch(r"[A-Za-z0-9_.+-]+", v):
            raise ConfigError(f"config {path}: storage.{k} {v!r} is not a valid name")
        if k in ("conf", "keyring") and not v.startswith("/"):
            raise ConfigError(f"config {path}: storage.{k} must be an absolute path")
        name = "storage_backend" if k == "backend" else f"rbd_{k}"
        out[name] = v
    return out


def load(path: str | None, **overrides) -> Settings:
    """Settings from the embedded defaults, then the TOML file PATH, then the
    non-None OVERRIDES (command-line flags)."""
    values: dict = {}
    if path:
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config {path}: {e}") from None
        for key, value in doc.items():
            if key == "storage":
                values.update(_storage(path, value))
                continue
            if key == "export":
                if not isinstance(value, dict):
                    raise ConfigError(f"config {path}: [export] must be a table")
                for k, v in value.items():
                    allowed = _EXPORT_KEYS.get(k)
                    if allowed is None:
                        raise ConfigError(f"config {path}: unknown key export.{k}")
                    if isinstance(allowed, tuple) and v not in allowed:
                        raise ConfigError(f"config {path}: export.{k} must be one of "
                                          f"{', '.join(allowed)}")
                    if allowed == "poll":
                        try:
                            if isinstance(v, bool) or not isinstance(v, (int, str)):
                                raise ValueError
                            parse_poll(str(v))
                        except ValueError:
                            raise ConfigError(f"config {path}: export.{k} must be \"auto\", "
                                              "\"auto:N\" or an integer N from 0 to "
                                              "1000000") from None
                    values[f"export_{k}"] = v
                continue
            want = _KEYS.get(key)
            if want is None:
                raise ConfigError(f"config {path}: unknown key {key}")
            if not isinstance(value, want) or isinstance(value, bool):
                raise ConfigError(f"config {path}: {key} has the wrong type")
            if key == "allowed_backings" and not all(
                    isinstance(p, str) and p.startswith(("/", "rbd:", "null:")) for p in value):
                raise ConfigError(f"config {path}: allowed_backings must be absolute paths, "
                                  "rbd:POOL/IMAGE or null:SIZE patterns")
            if key in ("qmp_socket_dirs", "libvirt_sockets") and not all(
                    isinstance(p, str) and p.startswith("/") for p in value):
                raise ConfigError(f"config {path}: {key} must be absolute paths")
            if key in ("metrics_auth", "docs_auth") and value not in AUTH_CHOICES:
                raise ConfigError(f"config {path}: {key} must be one of "
                                  f"{', '.join(AUTH_CHOICES)}")
            values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    settings.host_port  # noqa: B018 - validates
    return settings
