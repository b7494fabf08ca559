"""Who is on the other end of a unix socket (SO_PEERCRED), and which peers an
export serves.

An export started by `blkserve serve` for an attachment serves only the QEMU
process of that attachment's VM: the daemon writes an allowed-peers file
(`--allow-peers-file`) before the worker starts or QEMU is told to connect,
and the worker reads it again at every connection it accepts, so the set can
change (attach, detach) without restarting the worker or signalling it.

The file has one line per allowed process, `PID UID START_TIME [LABEL]`
(START_TIME: field 22 of /proc/PID/stat, so a reused pid does not pass), or
the single line `any` (any peer the socket's permissions let in: an export
PUT for VMs that have it in their config).  A missing or unreadable file
allows nobody: the worker fails closed."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from dataclasses import dataclass, field

ANY = "any"
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket) -> PeerCred:
    """The credentials of the process on the other end of a connected unix
    socket (for a client: those of the listener when it called listen())."""
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(data))


def exe_name(pid: int) -> str | None:
    """Basename of the program PID runs (/proc/PID/exe), or None."""
    try:
        target = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    return os.path.basename(target.removesuffix(" (deleted)"))


def is_qemu(pid: int) -> bool:
    name = exe_name(pid) or ""
    return name.startswith("qemu-system-") or name == "qemu-kvm"


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (guards pid reuse)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()  # comm may hold spaces and ')'
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def proc_uid(pid: int) -> int | None:
    """The effective uid of PID (what SO_PEERCRED reports for it)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[2])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    start: int
    label: str = ""

    def line(self) -> str:
        return f"{self.pid} {self.uid} {self.start} {self.label}".rstrip()


def peer_of(pid: int, label: str = "") -> Peer | None:
    """PID as an allowed-peers entry, or None if it is gone."""
    uid, start = proc_uid(pid), start_time(pid)
    if uid is None or start is None:
        return None
    return Peer(pid, uid, start, label)


@dataclass
class Allowed:
    any: bool = False
    peers: list[Peer] = field(default_factory=list)


def read_file(path: str) -> Allowed:
    """The allowed-peers file; OSError if it cannot be read."""
    out = Allowed()
    with open(path) as f:
        for raw in f:
            words = raw.split()
            if not words or words[0].startswith("#"):
                continue
            if words == [ANY]:
                out.any = True
                continue
            try:
                pid, uid, start = (int(w) for w in words[:3])
            except ValueError:
                continue  # a malformed line allows nobody
            out.peers.append(Peer(pid, uid, start, " ".join(words[3:])))
    return out


def write_file(path: str, allowed: Allowed) -> None:
    """Replace the allowed-peers file atomically (a worker reading it at the
    same moment sees the old or the new set, never half of one)."""
    lines = [ANY] if allowed.any else [p.line() for p in allowed.peers]
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, "".join(line + "\n" for line in lines).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class PeerPolicy:
    """Which processes an export accepts: fixed pids (--allow-peer-pid) and
    the allowed-peers file (--allow-peers-file), re-read at every accept."""

    def __init__(self, pids: list[int] | None = None, path: str | None = None) -> None:
        self.pids = set(pids or ())
        self.path = path
        self.refused = 0  # connections refused so far

    def why_refused(self, cred: PeerCred) -> str | None:
        """None if CRED may connect, else why not (for the log)."""
        if cred.pid in self.pids:
            return None
        if self.path is None:
            return "not an allowed peer (--allow-peer-pid)"
        try:
            allowed = read_file(self.path)
        except OSError as e:
            return f"cannot read the allowed-peers file {self.path}: {e.strerror}"
        if allowed.any:
            return None
        for p in allowed.peers:
            if p.pid == cred.pid:
                if p.uid != cred.uid:
                    return f"pid {cred.pid} is allowed as uid {p.uid}, not uid {cred.uid}"
                if start_time(cred.pid) != p.start:
                    return f"pid {cred.pid} is not the allowed process (it was restarted)"
                return None
        return "not in the allowed-peers file"
