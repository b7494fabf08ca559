"""Daemon settings: embedded defaults, overridden by a TOML config file, then
by command-line flags."""

from __future__ import annotations

import fnmatch
import os
import tomllib
from dataclasses import dataclass, field

DEFAULT_LISTEN = "127.0.0.1:8470"
DEFAULT_STATE_DIR = "./var"
SOCKET_PATH_MAX = 107  # sun_path holds 108 bytes including the NUL


class ConfigError(Exception):
    pass


@dataclass
class Settings:
    listen: str = DEFAULT_LISTEN
    state_dir: str = DEFAULT_STATE_DIR
    socket_dir: str | None = None
    # Paths (exact, or fnmatch patterns such as /dev/disk/by-id/nvme-*) of
    # existing block devices or files outside the state dir that volumes may
    # use as their backing.  Empty: only volumes created under the state dir.
    allowed_backings: list[str] = field(default_factory=list)
    detach_timeout_s: float = 60.0
    qmp_timeout_s: float = 30.0
    worker_start_timeout_s: float = 15.0
    worker_stop_timeout_s: float = 10.0
    export_cache: str = "none"
    export_io_engine: str = "auto"
    export_poll_us: int = 0

    def __post_init__(self) -> None:
        self.state_dir = os.path.abspath(self.state_dir)

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
    def logs_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    @property
    def token_path(self) -> str:
        return os.path.join(self.state_dir, "api-token")

    def backing_allowed(self, path: str) -> bool:
        """Is PATH (or the file it resolves to) on the allow-list?"""
        real = os.path.realpath(path)
        for pattern in self.allowed_backings:
            for candidate in {path, real}:
                if fnmatch.fnmatchcase(candidate, pattern) or \
                        fnmatch.fnmatchcase(candidate, os.path.realpath(pattern)):
                    return True
        return False


_KEYS = {
    "listen": str, "state_dir": str, "socket_dir": str, "allowed_backings": list,
    "detach_timeout_s": (int, float), "qmp_timeout_s": (int, float),
    "worker_start_timeout_s": (int, float), "worker_stop_timeout_s": (int, float),
}
_EXPORT_KEYS = {"cache": ("none", "writeback"), "io_engine": ("auto", "io_uring", "sync"),
                "poll_us": int}


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
                    if allowed is int and (not isinstance(v, int) or not 0 <= v <= 1_000_000):
                        raise ConfigError(f"config {path}: export.{k} must be an integer "
                                          "from 0 to 1000000")
                    values[f"export_{k}"] = v
                continue
            want = _KEYS.get(key)
            if want is None:
                raise ConfigError(f"config {path}: unknown key {key}")
            if not isinstance(value, want) or isinstance(value, bool):
                raise ConfigError(f"config {path}: {key} has the wrong type")
            if key == "allowed_backings" and not all(isinstance(p, str) and p.startswith("/")
                                                     for p in value):
                raise ConfigError(f"config {path}: allowed_backings must be absolute paths")
            values[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    settings.host_port  # noqa: B018 - validates
    return settings
