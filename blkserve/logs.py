"""Structured logs: one line per event, as logfmt (default), JSON or text.

Every record, whoever logs it, is rendered by the formatter set up here
(`setup`): ``ts level logger msg`` and then its fields.  Fields come from

- ``log_event(logger, "volume.created", volume="db1", ...)``: the event
  name (``event=``) and its fields;
- the request being served (``request_id=``, set by the API's middleware
  through a context variable, see `begin_request`);
- fields fixed for the process (an export worker adds ``volume=``);
- known messages of the export's protocol server (the once-per-second guest
  and backing error summaries, frontend connects), which get an ``event=``
  and their numbers as fields without that code knowing about it;
- any other ``extra=`` of a record.

When stderr is the systemd journal (``JOURNAL_STREAM`` names it) each line
starts with a ``<N>`` syslog priority, which the journal strips and stores,
so ``journalctl -p warning`` works.  An export worker of ``blkserve serve``
can send its lines to the journal too (`worker_to_journal`), keeping only a
bounded tail in its log file for the daemon's error messages.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import re
import socket
import stat
import sys
import uuid

FORMATS = ("logfmt", "json", "text")
DEFAULT_FORMAT = "logfmt"
TEXT_FORMAT = "%(asctime)s blkserve %(levelname)s %(name)s: %(message)s"
JOURNAL_STDOUT = "/run/systemd/journal/stdout"
# A worker's log file in journal mode: trimmed to its last TAIL_KEEP bytes
# whenever it grows past TAIL_MAX (the daemon reads the last 4 KiB of it).
TAIL_MAX = 256 * 1024
TAIL_KEEP = 32 * 1024

_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message", "asctime", "taskName",
    "color_message",  # uvicorn's coloured copy of msg
    "event_fields",   # ours, rendered explicitly
}
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                    logging.ERROR: 3, logging.CRITICAL: 2}
_BARE = re.compile(r"^[A-Za-z0-9_.:/@+,%^*-]+$")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_.-]")

# -- request ids -------------------------------------------------------------

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class RequestContext:
    """The request a log line belongs to.  A mutable object in a context
    variable: callbacks and tasks created while the request runs copy the
    context, and must stop naming the request once it has been answered."""

    __slots__ = ("request_id", "active")

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.active = True


_request: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "blkserve_request", default=None)


def new_request_id(given: str | None = None) -> str:
    """GIVEN (a client's X-Request-ID) if it is a sane token, else a new id."""
    if given and REQUEST_ID_RE.match(given):
        return given
    return uuid.uuid4().hex


def begin_request(request_id: str) -> RequestContext:
    ctx = RequestContext(request_id)
    _request.set(ctx)
    return ctx


def current_request_id() -> str | None:
    ctx = _request.get()
    return ctx.request_id if ctx is not None and ctx.active else None


# -- events ------------------------------------------------------------------

def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO,
              msg: str | None = None, **fields) -> None:
    """One structured line: ``event=EVENT`` and FIELDS (None values left
    out); the message is MSG, or the event name."""
    if not logger.isEnabledFor(level):
        return
    data = {"event": event}
    data.update((k, v) for k, v in fields.items() if v is not None)
    logger.log(level, "%s", msg or event, extra={"event_fields": data})


def worker_event(worker, event: str, level: int | str = logging.INFO, **fields) -> None:
    """log_event for an export worker (blkserve.api.workers.Worker): adds
    its volume, pid (unless given) and how its last run ended."""
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
    fields.setdefault("pid", worker.pid)
    fields.setdefault("last_exit", worker.last_exit)
    log_event(logging.getLogger("blkserve.workers"), event, level=level,
              volume=worker.spec.volume, **fields)


# The export's protocol server (blkserve/vhost/server.py, session.py) logs plain
# messages; these known ones get an event name and fields.
_BURSTS = {
    "malformed descriptor chain(s) from the guest": "guest.bad_chains",
    "backing-store I/O error(s)": "backing.io_errors",
    "request(s) a previous backend left in flight, resubmitted": "inflight.resubmitted",
}


def _burst(args: tuple) -> dict | None:
    queue, count, what, last = args
    event = _BURSTS.get(what)
    if event is None:
        return None
    return {"event": event, "queue": queue, "count": count, "last_error": last}


_KNOWN_MESSAGES = {
    "queue %d: %d %s (last error: %s)": _burst,
    "queue %d: the guest corrupted the ring (%s); queue stopped until the frontend "
    "resets it": lambda a: {"event": "queue.broken", "queue": a[0], "last_error": a[1]},
    "frontend connected": lambda a: {"event": "frontend.connected"},
    "frontend disconnected": lambda a: {"event": "frontend.disconnected"},
    "refusing a second frontend connection: one is already served":
        lambda a: {"event": "frontend.refused"},
    "device reset by the frontend": lambda a: {"event": "device.reset"},
    "queue %d: %d requests served so far (%d read, %d write, %d flush, %d discard, "
    "%d write-zeroes)": lambda a: {"event": "queue.totals", "queue": a[0], "requests": a[1]},
}


def _known_fields(record: logging.LogRecord) -> dict | None:
    fn = _KNOWN_MESSAGES.get(record.msg) if isinstance(record.msg, str) else None
    if fn is None:
        return None
    try:
        return fn(tuple(record.args or ()))
    except (TypeError, ValueError, IndexError):
        return None


# -- formatting --------------------------------------------------------------

def record_fields(record: logging.LogRecord, static: dict | None = None) -> dict:
    """The fields of RECORD after ts/level/logger/msg, in order."""
    fields: dict = {}
    known = getattr(record, "event_fields", None) or _known_fields(record)
    # the request being served, or the one a line names itself (the access
    # line, written once the request no longer counts as running)
    rid = current_request_id() or (known or {}).get("request_id")
    if rid is not None:
        fields["request_id"] = rid
    if static:
        fields.update(static)
    if known:
        fields.update(known)
    for k, v in vars(record).items():
        if k not in _STANDARD and not k.startswith("_") and k not in fields:
            fields[k] = v
    return fields


def _ts(record: logging.LogRecord) -> str:
    t = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def logfmt_value(v) -> str:
    if v is None:
        return '""'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        s = f"{v:.6g}"
    else:
        s = str(v)
    if _BARE.match(s):
        return s
    s = (s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
         .replace("\r", "\\r").replace("\t", "\\t"))
    s = "".join(c if c >= " " else f"\\u{ord(c):04x}" for c in s)
    return f'"{s}"'


def logfmt_key(k: str) -> str:
    return _KEY_BAD.sub("_", str(k)) or "_"


def parse_logfmt(line: str) -> dict[str, str]:
    """Parse one logfmt line (as written here) into a dict; ValueError if it
    is not one.  For tests and tools."""
    out: dict[str, str] = {}
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        if i >= n:
            break
        j = line.find("=", i)
        if j <= i or " " in line[i:j] or '"' in line[i:j]:
            raise ValueError(f"not logfmt at {i}: {line!r}")
        key = line[i:j]
        i = j + 1
        if i < n and line[i] == '"':
            i += 1
            buf = []
            while True:
                if i >= n:
                    raise ValueError(f"unterminated quote: {line!r}")
                c = line[i]
                if c == "\\" and i + 1 < n:
                    nxt = line[i + 1]
                    if nxt == "u" and i + 5 < n:
                        buf.append(chr(int(line[i + 2:i + 6], 16)))
                        i += 6
                        continue
                    buf.append({"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt))
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                buf.append(c)
                i += 1
            value = "".join(buf)
            if i < n and line[i] != " ":
                raise ValueError(f"garbage after a quoted value at {i}: {line!r}")
        else:
            j = line.find(" ", i)
            j = n if j < 0 else j
            value = line[i:j]
            if '"' in value or "=" in value:
                raise ValueError(f"bad bare value at {i}: {line!r}")
            i = j
        out[key] = value
    if not out:
        raise ValueError("empty line")
    return out


class _Base(logging.Formatter):
    def __init__(self, static: dict | None = None, journal: bool = False):
        super().__init__()
        self.static = dict(static or {})
        self.journal = journal

    def _prefix(self, record: logging.LogRecord) -> str:
        if not self.journal:
            return ""
        return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>"

    def _exc(self, record: logging.LogRecord) -> str | None:
        text = None
        if record.exc_info:
            text = self.formatException(record.exc_info)
        elif record.exc_text:
            text = record.exc_text
        if record.stack_info:
            text = (text + "\n" if text else "") + self.formatStack(record.stack_info)
        return text


class LogfmtFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        parts = [f"ts={_ts(record)}", f"level={record.levelname.lower()}",
                 f"logger={logfmt_value(record.name)}",
                 f"msg={logfmt_value(record.getMessage())}"]
        for k, v in record_fields(record, self.static).items():
            parts.append(f"{logfmt_key(k)}={logfmt_value(v)}")
        exc = self._exc(record)
        if exc:
            parts.append(f"exc={logfmt_value(exc)}")
        return self._prefix(record) + " ".join(parts)


class JsonFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        obj = {"ts": _ts(record), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        for k, v in record_fields(record, self.static).items():
            obj.setdefault(k, v)
        exc = self._exc(record)
        if exc:
            obj["exc"] = exc
        return self._prefix(record) + json.dumps(obj, default=str, ensure_ascii=False)


class TextFormatter(_Base):
    """The historical human format, with the fields appended as k=v."""

    def __init__(self, static: dict | None = None, journal: bool = False):
        super().__init__(static, journal)
        self._text = logging.Formatter(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = self._text.format(record)
        fields = record_fields(record, self.static)
        if fields.get("event") == record.getMessage():
            fields.pop("event")
        if fields:
            head, sep, rest = line.partition("\n")  # a traceback stays below
            line = head + " " + " ".join(
                f"{logfmt_key(k)}={logfmt_value(v)}" for k, v in fields.items()) + sep + rest
        return self._prefix(record) + line


def make_formatter(fmt: str, static: dict | None = None,
                   journal: bool = False) -> logging.Formatter:
    cls = {"logfmt": LogfmtFormatter, "json": JsonFormatter, "text": TextFormatter}[fmt]
    return cls(static, journal)


# -- the journal -------------------------------------------------------------

def stderr_is_journal(fd: int = 2) -> bool:
    """Is FD the journal stream systemd gave this service (JOURNAL_STREAM)?"""
    want = os.environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = want.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def journal_stream_fd(identifier: str, path: str | None = None) -> int:
    """A new stream to journald (what sd_journal_stream_fd does): lines
    written to it become journal entries of this process's unit, with a
    ``<N>`` prefix read as their priority.  Raises OSError."""
    path = path or os.environ.get("BLKSERVE_JOURNAL_SOCKET") or JOURNAL_STDOUT
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        s.shutdown(socket.SHUT_RD)
        # identifier, unit id, priority, level prefix, forward to syslog,
        # kmsg, console
        s.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    except OSError:
        s.close()
        raise
    return s.detach()


class _BoundedTail:
    """A log file (opened O_APPEND, write-only, by the daemon) cut back to
    the last TAIL_KEEP bytes this process wrote whenever it grows past
    TAIL_MAX: no logrotate needed."""

    def __init__(self, fd: int):
        self.fd = fd
        self.recent = bytearray()

    def write(self, data: bytes) -> None:
        self.recent += data
        del self.recent[:-TAIL_KEEP]
        try:
            os.write(self.fd, data)
            if os.fstat(self.fd).st_size > TAIL_MAX:
                keep = bytes(self.recent)
                if len(keep) == TAIL_KEEP:  # starts mid-line
                    keep = keep[keep.find(b"\n") + 1:]
                os.ftruncate(self.fd, 0)
                os.write(self.fd, keep)
        except OSError:
            pass


class _JournalTeeHandler(logging.Handler):
    """Each record to the journal stream (with its priority) and, without
    the prefix, to the bounded tail file."""

    def __init__(self, journal: logging.Formatter, plain: logging.Formatter,
                 stream, tail: _BoundedTail):
        super().__init__()
        self.journal, self.plain, self.stream, self.tail = journal, plain, stream, tail

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.journal.format(record) + "\n")
            self.stream.flush()
            self.tail.write((self.plain.format(record) + "\n").encode(errors="replace"))
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


class _TeeStream:
    """sys.stderr for prints and tracebacks: the journal and the tail file."""

    def __init__(self, stream, tail: _BoundedTail):
        self.stream, self.tail = stream, tail

    def write(self, s: str) -> int:
        n = self.stream.write(s)
        self.tail.write(s.encode(errors="replace"))
        return n

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


# -- set-up ------------------------------------------------------------------

def add_format_option(p) -> None:
    """--log-format on an argparse (sub)parser (serve and export)."""
    p.add_argument("--log-format", choices=FORMATS, metavar="logfmt|json|text",
                   default=os.environ.get("BLKSERVE_LOG_FORMAT") or DEFAULT_FORMAT,
                   help="log lines on stderr: logfmt (default; env BLKSERVE_LOG_FORMAT): "
                        "'ts=... level=... logger=... msg=\"...\"' then the event's "
                        "fields (event=, volume=, request_id=...); json: one object per "
                        "line with the same keys; text: the human format with the fields "
                        "appended. When stderr is the journal, each line carries its "
                        "syslog priority")


def setup(fmt: str = DEFAULT_FORMAT, level: int = logging.INFO,
          static: dict | None = None, journal: bool | None = None) -> None:
    """Configure the root logger: one handler on stderr with FMT.  JOURNAL
    (default: stderr is the journal) adds the priority prefix."""
    if journal is None:
        journal = stderr_is_journal()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(fmt, static, journal))
    _install(handler, level)


def _install(handler: logging.Handler, level: int) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.addHandler(handler)
    root.setLevel(level)


def worker_to_journal(fmt: str, level: int, static: dict | None,
                      identifier: str = "blkserve-export") -> str | None:
    """An export worker of `blkserve serve` in journal mode: send stdout,
    stderr and every log line to a new journal stream, and keep only a
    bounded tail of them in the log file the daemon gave as stderr (it
    quotes that tail when the worker fails).  Returns None when done, else
    why not (the worker then keeps logging to its file)."""
    try:
        st = os.fstat(2)
    except OSError as e:
        return f"no stderr: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return "stderr is not a log file"
    try:
        jfd = journal_stream_fd(identifier)
    except OSError as e:
        path = os.environ.get("BLKSERVE_JOURNAL_SOCKET") or JOURNAL_STDOUT
        return f"cannot connect to the journal at {path}: {e.strerror}"
    sys.stdout.flush()
    sys.stderr.flush()
    tail = _BoundedTail(os.dup(2))
    os.set_inheritable(tail.fd, False)
    os.dup2(jfd, 1)
    os.dup2(jfd, 2)
    os.close(jfd)
    sys.stderr = _TeeStream(sys.stderr, tail)
    handler = _JournalTeeHandler(make_formatter(fmt, static, journal=True),
                                 make_formatter(fmt, static, journal=False),
                                 sys.stderr.stream, tail)
    _install(handler, level)
    return None
