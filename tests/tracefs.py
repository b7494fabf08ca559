"""A private ftrace instance (tracefs `instances/NAME`) for tests that must see
what a process really asked the kernel to do: which io_uring opcodes it
submitted, which syscalls it made and with which flags, which writes reached
the filesystem as `RWF_DSYNC`, which `fdatasync`s reached the backing file.

The instance has its own ring buffer and its own event filters, so it does
not disturb other tracers (bcc, another test's instance) and sees only the
events its filters let through."""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")

# "  python-123  [001] .....  2173.93: io_uring_submit_req: ring ..., opcode WRITE, ..."
# "  python-123  [001] .....  2174.69: sys_pwritev2(fd: 4, ..., flags: 2)"
_LINE = re.compile(r"^\s*(?P<task>.+?)-(?P<tid>\d+)\s+\[\d+\]\s+\S+\s+[\d.]+:\s+"
                   r"(?P<event>\w+)(?::\s*|\()(?P<rest>.*)$")


@dataclass
class Event:
    tid: int
    name: str   # io_uring_submit_req, iomap_dio_rw_begin, sys_pwritev2, ...
    text: str   # the event's printed fields

    def field(self, name: str) -> str | None:
        """The printed value of field NAME ("opcode WRITE," -> "WRITE")."""
        m = re.search(rf"(?:^|[\s,(]){name}:?\s+([^\s,)]*)", self.text)
        return m.group(1) if m else None


def unavailable(*events: str) -> str | None:
    """Why this machine cannot run a tracefs test, or None."""
    if os.geteuid() != 0:
        return "tracefs instances need root"
    if not (TRACEFS / "instances").is_dir():
        return f"tracefs is not mounted at {TRACEFS} (mount -t tracefs nodev {TRACEFS})"
    for ev in events:
        if not (TRACEFS / "events" / ev / "enable").exists():
            return f"the kernel has no tracepoint {ev}"
    return None


def kernel_dev(st_dev: int) -> int:
    """A userspace st_dev as the kernel's dev_t in trace events (major << 20 | minor)."""
    return os.major(st_dev) << 20 | os.minor(st_dev)


def pid_filter(pid: int) -> str:
    """A filter matching every thread PID has now (common_pid is a thread id)."""
    tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    return " || ".join(f"common_pid == {t}" for t in tids)


class Instance:
    def __init__(self, prefix: str = "blkserve-test"):
        self.dir = TRACEFS / "instances" / f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()

    def _write(self, rel: str, text: str) -> None:
        with open(self.dir / rel, "w") as f:
            f.write(text)

    def enable(self, event: str, filter: str | None = None) -> None:
        """Enable EVENT ("io_uring/io_uring_submit_req") with an optional filter."""
        if filter:
            self._write(f"events/{event}/filter", filter)
        self._write(f"events/{event}/enable", "1")

    def clear(self) -> None:
        self._write("trace", "")  # opening `trace` for writing empties the buffer

    def events(self, name: str | None = None) -> list[Event]:
        out = []
        for line in (self.dir / "trace").read_text(errors="replace").splitlines():
            if line.startswith("#"):
                continue
            m = _LINE.match(line)
            if m and (name is None or m["event"] == name):
                out.append(Event(int(m["tid"]), m["event"], m["rest"]))
        return out

    def take(self) -> list[Event]:
        """Every event recorded since the last take()/clear(), then clear."""
        ev = self.events()
        self.clear()
        return ev

    def close(self) -> None:
        try:
            self._write("tracing_on", "0")
            self._write("events/enable", "0")
        finally:
            self.dir.rmdir()

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
