"""Structured logs: a real `blkserve serve` writes one logfmt line per event,
with the request id of the API call that caused it (X-Request-ID in and
out) and an access line per request; volume, export and worker events
(including the restart after a `kill -9` of a worker); workers log in the
daemon's format, to their file or to the journal; the formatter itself."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apiserver import ApiServer  # noqa: E402

from blkserve import logs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def lines_of(path: Path) -> list[dict[str, str]]:
    """Every line of PATH parsed as logfmt (fails on one that is not)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            fields = logs.parse_logfmt(line)
        except ValueError as e:
            pytest.fail(f"{path.name}: not a logfmt line: {line!r} ({e})")
        assert {"ts", "level", "logger", "msg"} <= set(fields), line
        assert list(fields)[:4] == ["ts", "level", "logger", "msg"], line
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", fields["ts"]), line
        assert fields["level"] in ("debug", "info", "warning", "error", "critical"), line
        out.append(fields)
    return out


def wait_for(path: Path, pred, what: str, timeout: float = 20.0) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [f for f in lines_of(path) if pred(f)] if path.exists() else []
        if found:
            return found
        if time.monotonic() > deadline:
            text = path.read_text(errors="replace")[-4000:] if path.exists() else "(none)"
            pytest.fail(f"no {what} in {path}:\n{text}")
        time.sleep(0.1)


@pytest.fixture
def server():
    with ApiServer() as s:
        yield s


def test_api_lines_are_logfmt_with_request_ids(server):
    """Every line of the daemon is logfmt; a request's X-Request-ID comes back
    in the response and is on the access line and on the events it caused; a
    request without one (or with a bad one) gets a generated id."""
    with server.client() as c:
        r = c.post("/v1/volumes", json={"name": "lg1", "size_bytes": MiB},
                   headers={"X-Request-ID": "op-create-1"})
        assert r.status_code == 201 and r.headers["x-request-id"] == "op-create-1"
        r = c.patch("/v1/volumes/lg1", json={"size_bytes": 2 * MiB},
                    headers={"X-Request-ID": "op-resize-1"})
        assert r.status_code == 200
        r = c.post("/v1/volumes", json={"name": "lg1", "size_bytes": MiB})
        assert r.status_code == 409
        generated = r.headers["x-request-id"]
        assert re.match(r"^[0-9a-f]{32}$", generated), generated
        r = c.get("/v1/volumes", headers={"X-Request-ID": "bad id\twith spaces"})
        assert r.status_code == 200 and re.match(r"^[0-9a-f]{32}$", r.headers["x-request-id"])
        r = c.delete("/v1/volumes/lg1", headers={"X-Request-ID": "op-delete-1"})
        assert r.status_code == 204 and r.headers["x-request-id"] == "op-delete-1"
    with server.client(token="wrong") as c:
        r = c.get("/v1/volumes", headers={"X-Request-ID": "op-unauth"})
        assert r.status_code == 401 and r.headers["x-request-id"] == "op-unauth"

    log = server.log_path
    access = wait_for(log, lambda f: f.get("request_id") == "op-unauth"
                      and f["logger"] == "blkserve.access", "401 access line")[0]
    assert access["status"] == "401" and access["method"] == "GET"
    lines = lines_of(log)
    by_id = {}
    for f in lines:
        by_id.setdefault(f.get("request_id"), []).append(f)

    acc = [f for f in by_id["op-create-1"] if f["logger"] == "blkserve.access"]
    assert len(acc) == 1, by_id["op-create-1"]
    assert acc[0]["event"] == "http.request" and acc[0]["method"] == "POST"
    assert acc[0]["path"] == "/v1/volumes" and acc[0]["status"] == "201"
    assert float(acc[0]["duration_ms"]) > 0 and acc[0]["level"] == "info"
    created = [f for f in by_id["op-create-1"] if f.get("event") == "volume.created"]
    assert created and created[0]["volume"] == "lg1" and created[0]["size_bytes"] == str(MiB)
    resized = [f for f in by_id["op-resize-1"] if f.get("event") == "volume.resized"]
    assert resized and resized[0]["size_bytes"] == str(2 * MiB)
    assert resized[0]["old_size_bytes"] == str(MiB)
    assert any(f.get("event") == "volume.deleted" and f["volume"] == "lg1"
               for f in by_id["op-delete-1"])
    conflict = [f for f in by_id[generated] if f["logger"] == "blkserve.access"]
    assert conflict and conflict[0]["status"] == "409"
    # the start-up line, outside any request
    assert any(f.get("event") == "api.starting" and "request_id" not in f for f in lines)
    # polled routes stay out of the log at info level
    assert not any(f.get("path") == "/healthz" for f in lines)


def test_worker_events_and_restart_after_kill_9(server):
    with server.client() as c:
        assert c.post("/v1/volumes", json={"name": "lg2", "size_bytes": MiB}).status_code == 201
        r = c.put("/v1/volumes/lg2/export", headers={"X-Request-ID": "op-export"})
        assert r.status_code == 201, r.text
        pid = r.json()["pid"]
        os.kill(pid, signal.SIGKILL)
        log = server.log_path
        exited = wait_for(log, lambda f: f.get("event") == "worker.exited"
                          and f.get("pid") == str(pid), "worker.exited")[0]
        assert exited["level"] == "warning" and exited["volume"] == "lg2"
        assert exited["last_exit"] == "killed by SIGKILL"
        assert float(exited["backoff_s"]) > 0 and float(exited["lived_s"]) >= 0
        # a callback of a request that has ended names no request
        assert "request_id" not in exited, exited
        restarted = wait_for(log, lambda f: f.get("event") == "worker.restarted",
                             "worker.restarted")[0]
        assert restarted["volume"] == "lg2" and restarted["pid"] != str(pid)
        assert restarted["last_exit"] == "killed by SIGKILL"
        started = [f for f in lines_of(log) if f.get("event") == "export.started"]
        assert started[0]["request_id"] == "op-export" and started[0]["pid"] == str(pid)
        # the worker's own lines: its file, the daemon's format, its volume
        wlog = server.state_dir / "logs" / "lg2.log"
        listening = wait_for(wlog, lambda f: f.get("event") == "export.listening",
                             "export.listening", timeout=5)
        assert len(listening) == 2 and all(f["volume"] == "lg2" for f in listening)
        assert c.delete("/v1/volumes/lg2/export").status_code == 204
        stopped = wait_for(log, lambda f: f.get("event") == "export.stopped", "export.stopped")
        assert stopped[0]["volume"] == "lg2"
        wait_for(wlog, lambda f: f.get("event") == "export.drained", "export.drained")


class FakeJournal:
    """A stand-in for journald's stdout stream socket: records each
    connection's header and lines."""

    def __init__(self, path: str):
        self.path = path
        self.streams: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.streams.append(b"")
                i = len(self.streams) - 1
            threading.Thread(target=self._read, args=(conn, i), daemon=True).start()

    def _read(self, conn: socket.socket, i: int) -> None:
        with conn:
            while data := conn.recv(65536):
                with self.lock:
                    self.streams[i] += data

    def entries(self) -> list[tuple[list[str], list[str]]]:
        """(header fields, lines) per stream."""
        with self.lock:
            raw = list(self.streams)
        out = []
        for data in raw:
            parts = data.decode(errors="replace").split("\n")
            out.append((parts[:7], [p for p in parts[7:] if p]))
        return out

    def close(self) -> None:
        self.sock.close()


def test_workers_log_to_the_journal_in_journal_mode(monkeypatch, tmp_path):
    """--worker-logs journal (here through env BLKSERVE_WORKER_LOGS, and a
    fake journald): each worker opens its own journal stream as
    blkserve-export, its lines carry their syslog priority; its log file
    keeps the tail the daemon quotes when a worker cannot start."""
    jpath = os.path.join(tempfile.mkdtemp(prefix="bsj-"), "stdout")
    journal = FakeJournal(jpath)
    monkeypatch.setenv("BLKSERVE_WORKER_LOGS", "journal")
    monkeypatch.setenv("BLKSERVE_JOURNAL_SOCKET", jpath)
    try:
        with ApiServer() as server, server.client() as c:
            assert c.post("/v1/volumes", json={"name": "jr1", "size_bytes": MiB}).status_code \
                == 201
            r = c.put("/v1/volumes/jr1/export")
            assert r.status_code == 201, r.text
            deadline = time.monotonic() + 10
            while True:
                streams = [e for e in journal.entries() if e[1]]
                if streams or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert len(streams) == 1, journal.entries()
            header, lines = streams[0]
            assert header == ["blkserve-export", "", "6", "1", "0", "0", "0"], header
            assert lines[0].startswith("<6>ts="), lines
            fields = logs.parse_logfmt(lines[0][3:])
            assert fields["event"] == "export.listening" and fields["volume"] == "jr1"
            wlog = server.state_dir / "logs" / "jr1.log"
            assert "event=export.listening" in wlog.read_text()
            assert not wlog.read_text().startswith("<")  # no priority in the file
            starting = [f for f in lines_of(server.log_path) if f.get("event") == "api.starting"]
            assert starting[0]["worker_logs"] == "journal"
            # a worker that cannot start: the 502 quotes its error all the same
            assert c.post("/v1/volumes", json={"name": "jr2", "size_bytes": MiB}).status_code \
                == 201
            os.unlink(server.state_dir / "volumes" / "jr2.img")
            r = c.put("/v1/volumes/jr2/export")
            assert r.status_code == 502
            assert "blkserve export: error: backing" in r.json()["detail"], r.json()
            assert "No such file or directory" in r.json()["detail"]
    finally:
        journal.close()


def test_export_log_formats(tmp_path):
    """`blkserve export --log-format json|text` on a standalone export."""
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * MiB)
    for fmt in ("json", "text", "logfmt"):
        sock = os.path.join(tempfile.mkdtemp(prefix="bs-"), "fmt.sock")
        proc = subprocess.Popen([sys.executable, "-m", "blkserve", "export", str(img),
                                 "--socket", sock, "--log-format", fmt], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lines = []
        while not lines or "serving vhost-user-blk" not in lines[-1]:  # signals handled
            line = proc.stderr.readline()
            assert line, f"the export exited: {lines}"
            lines.append(line.rstrip("\n"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        lines = [x for x in lines if "serving vhost-user-blk" in x]
        lines += proc.stderr.read().splitlines()
        assert lines, fmt
        if fmt == "json":
            objs = [json.loads(x) for x in lines]
            first = objs[0]
            assert list(first)[:4] == ["ts", "level", "logger", "msg"]
            assert first["event"] == "export.listening" and first["volume"] == "fmt"
            assert first["queues"] == 1 and first["read_only"] is False
            assert objs[-1]["event"] == "export.drained"
        elif fmt == "text":
            assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} blkserve INFO "
                            r"blkserve\.export: serving vhost-user-blk on ", lines[0]), lines
            assert "volume=fmt event=export.listening" in lines[0], lines
        else:
            assert logs.parse_logfmt(lines[-1])["msg"] == \
                "stopped: in-flight I/O drained, socket removed"


# -- the formatter ---------------------------------------------------------------

def _record(msg, *args, level=logging.WARNING, name="blkserve.vhost", **extra):
    r = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    r.__dict__.update(extra)
    return r


def test_logfmt_quoting_round_trips():
    f = logs.make_formatter("logfmt", static={"volume": "v 1"})
    nasty = 'a "quoted" \\ back\nslash\ttab \x01 é = sign'
    line = f.format(_record("%s", nasty, extra_field="x=y", n=3, flag=True, none=None))
    assert "\n" not in line
    p = logs.parse_logfmt(line)
    assert p["msg"] == nasty and p["volume"] == "v 1" and p["extra_field"] == "x=y"
    assert p["n"] == "3" and p["flag"] == "true" and p["none"] == ""
    assert p["level"] == "warning" and p["logger"] == "blkserve.vhost"


def test_the_exports_error_summaries_become_events():
    """The export's once-per-second summaries (blkserve/vhost/server.py and
    session.py, not aware of any of this) get event names and fields from the
    formatter; the format strings it recognises are still the ones that code logs."""
    source = "".join((REPO / "blkserve" / "vhost" / f).read_text()
                     for f in ("server.py", "session.py"))
    flat = re.sub(r'"\s*\n\s*"', "", source)  # join implicitly concatenated literals
    for fmt in logs._KNOWN_MESSAGES:
        assert fmt in flat, f"server.py and session.py no longer log {fmt!r}"
    f = logs.make_formatter("logfmt")
    p = logs.parse_logfmt(f.format(_record(
        "queue %d: %d %s (last error: %s)", 1, 7, "backing-store I/O error(s)",
        "No space left on device")))
    assert p["event"] == "backing.io_errors" and p["queue"] == "1" and p["count"] == "7"
    assert p["last_error"] == "No space left on device"
    assert p["msg"] == "queue 1: 7 backing-store I/O error(s) (last error: No space left on " \
        "device)"
    p = logs.parse_logfmt(f.format(_record(
        "queue %d: %d %s (last error: %s)", 0, 2,
        "malformed descriptor chain(s) from the guest", "-")))
    assert p["event"] == "guest.bad_chains"


def test_journal_priority_prefix_and_detection(tmp_path, monkeypatch):
    f = logs.make_formatter("logfmt", journal=True)
    assert f.format(_record("x", level=logging.ERROR)).startswith("<3>ts=")
    assert f.format(_record("x", level=logging.INFO)).startswith("<6>ts=")
    path = tmp_path / "stream"
    path.write_bytes(b"")
    with open(path, "rb") as fh:
        st = os.fstat(fh.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.stderr_is_journal(fh.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        assert not logs.stderr_is_journal(fh.fileno())


def test_journal_mode_tail_file_stays_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "TAIL_MAX", 4096)
    monkeypatch.setattr(logs, "TAIL_KEEP", 1024)
    path = tmp_path / "w.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        tail = logs._BoundedTail(fd)
        for i in range(500):
            tail.write(f"line {i:04d} {'x' * 40}\n".encode())
    finally:
        os.close(fd)
    text = path.read_text()
    assert len(text) <= 4096 and text.endswith(f"line 0499 {'x' * 40}\n")
    assert text.startswith("line ")  # trimmed at a line boundary
