"""`blkserve volume|export-volume|attach|detach`: the command line over the REST API.

Talks to a running `blkserve serve` over HTTP. Only httpx and the standard
library are needed, so these commands work without the server's dependencies.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from blkserve import qos as qos_mod
from blkserve.sizes import parse_size

DEFAULT_URL = "http://127.0.0.1:8470"
DEFAULT_STATE_DIR = "./var"
DEFAULT_TIMEOUT = 120.0
DEFAULT_LIBVIRT_URI = "qemu:///system"
TOKEN_FILE = "api-token"

_HUMAN_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


class CliError(Exception):
    """A failure to report as one `blkserve: error: ...` line (exit 1)."""


# --------------------------------------------------------------------------- pure helpers


def human_size(n: int | None) -> str:
    """'512 B', '1.5 KiB', '10.0 GiB' (binary units, one decimal)."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _HUMAN_UNITS:
        value /= 1024
        if round(abs(value), 1) < 1024 or unit == _HUMAN_UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return " ".join(str(value).split())  # one line per row, whatever the value holds


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 right: Sequence[int] = ()) -> str:
    """Columns separated by two spaces, padded to the widest cell; columns whose
    index is in RIGHT are right-aligned. None/'' print as '-', bools as yes/no.
    No trailing whitespace."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    ncols = len(headers)
    for row in cells:
        if len(row) != ncols:
            raise ValueError(f"row has {len(row)} cells, expected {ncols}")
    widths = [max(len(row[i]) for row in cells) for i in range(ncols)]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def format_kv(pairs: Sequence[tuple[str, Any]]) -> str:
    """'key:   value' lines with the values aligned."""
    if not pairs:
        return ""
    width = max(len(k) for k, _ in pairs) + 1
    return "\n".join(f"{k + ':':<{width}} {_cell(v)}" for k, v in pairs)


def one_line(text: str) -> str:
    """TEXT's non-blank lines joined with ' | ', runs of blanks collapsed."""
    lines = [" ".join(line.split()) for line in str(text).splitlines()]
    return " | ".join(line for line in lines if line)


def error_detail(body: bytes | str, reason: str = "") -> str:
    """The one-line detail of an error answer: the JSON body's "detail" (a list or
    object rendered compactly), else the body's text, else REASON."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
    except ValueError:
        return one_line(text)[:500] or reason or "(empty answer)"
    if isinstance(data, dict) and "detail" in data:
        data = data["detail"]
    if isinstance(data, str):
        return one_line(data) or reason or "(empty detail)"
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def export_summary(exp: dict | None) -> str:
    """'running (pid 1234)', 'backoff (3 restarts)' or '-'."""
    if not exp:
        return "-"
    facts = []
    if exp.get("pid"):
        facts.append(f"pid {exp['pid']}")
    restarts = exp.get("restarts") or 0
    if restarts:
        facts.append(f"{restarts} restart{'s' if restarts != 1 else ''}")
    state = exp.get("state", "?")
    return f"{state} ({', '.join(facts)})" if facts else state


def volume_table(volumes: Sequence[dict]) -> str:
    headers = ("NAME", "SIZE", "RO", "QUEUES", "EXPORT", "ATTACHMENTS", "BACKING")
    rows = []
    for v in volumes:
        exp = v.get("export")
        rows.append((
            v.get("name"), human_size(v.get("size_bytes")), bool(v.get("read_only")),
            v.get("queues"), exp.get("state") if exp else None,
            len(v.get("attachments") or ()), v.get("backing"),
        ))
    return format_table(headers, rows, right=(1, 3, 5))


def _vm(att: dict) -> str | None:
    """Where an attachment is: the QMP socket, or the libvirt domain (and a
    URI other than the default)."""
    if att.get("hypervisor") == "libvirt":
        uri = att.get("uri")
        return att.get("domain") if uri in (None, DEFAULT_LIBVIRT_URI) \
            else f"{att.get('domain')} ({uri})"
    return att.get("qmp_socket")


def attachment_table(attachments: Sequence[dict]) -> str:
    headers = ("ID", "STATE", "HYPERVISOR", "BUS", "DEVICE", "VM", "CREATED", "ERROR")
    rows = [(a.get("id"), a.get("state"), a.get("hypervisor"), a.get("bus"),
             a.get("device_id"), _vm(a), a.get("created_at"), a.get("error"))
            for a in attachments]
    return format_table(headers, rows)


def qos_text(flat: dict | None) -> str:
    return ",".join(f"{k}={v}" for k, v in flat.items()) if flat else "none"


def _qos_arg(text: str) -> dict:
    """A --qos value (blkserve.qos.parse_spec) as the API's flat JSON."""
    try:
        return qos_mod.to_flat(qos_mod.parse_spec(text))
    except qos_mod.QosError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def volume_details(v: dict) -> str:
    """`volume show`: key/value lines (exact size in bytes), then the attachments."""
    size = v.get("size_bytes")
    pairs: list[tuple[str, Any]] = [
        ("name", v.get("name")),
        ("size", f"{size} bytes ({human_size(size)})" if size is not None else None),
        ("read-only", bool(v.get("read_only"))),
        ("queues", v.get("queues")),
        ("backing", v.get("backing")),
        ("managed", bool(v.get("managed"))),
        ("created", v.get("created_at")),
        ("qos", qos_text(v.get("qos"))),
        ("qos group", v.get("qos_group") or "none"),
    ]
    exp = v.get("export")
    pairs.append(("export", export_summary(exp)))
    if exp:
        pairs += [
            ("socket", exp.get("socket")),
            ("explicit", bool(exp.get("explicit"))),
            ("started", exp.get("started_at")),
        ]
    attachments = v.get("attachments") or []
    pairs.append(("attachments", len(attachments) if attachments else "none"))
    out = format_kv(pairs)
    if attachments:
        out += "\n" + attachment_table(attachments)
    return out


# --------------------------------------------------------------------------- HTTP


def _base_url(args: argparse.Namespace) -> str:
    url = (args.url or os.environ.get("BLKSERVE_URL") or DEFAULT_URL).strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _state_dir(args: argparse.Namespace) -> str:
    return args.state_dir or os.environ.get("BLKSERVE_STATE_DIR") or DEFAULT_STATE_DIR


def load_token(state_dir: str) -> str | None:
    """env BLKSERVE_API_TOKEN, else STATE_DIR/api-token, else None."""
    env = os.environ.get("BLKSERVE_API_TOKEN", "").strip()
    if env:
        return env
    path = os.path.join(state_dir, TOKEN_FILE)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise CliError(f"cannot read the API token from {path}: {e.strerror or e}") from None


def _seg(name: str) -> str:
    """NAME as one URL path segment ('.' and '..' escaped too, so they stay names)."""
    s = quote(name, safe="")
    return s.replace(".", "%2E") if s in (".", "..") else s


class Api:
    def __init__(self, args: argparse.Namespace):
        import httpx  # here, not at import: every `blkserve` command loads this module

        self.url = _base_url(args)
        token = load_token(_state_dir(args))
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.timeout = args.timeout
        try:
            self.client = httpx.Client(base_url=self.url, headers=headers,
                                       timeout=args.timeout)
        except (httpx.InvalidURL, ValueError) as e:
            raise CliError(f"invalid --url {self.url}: {e}") from None

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        """(status, decoded JSON or None for an empty body); CliError for a
        transport failure or an HTTP error status."""
        import httpx

        try:
            resp = self.client.request(method, path, json=body)
        except httpx.TimeoutException as e:
            if isinstance(e, httpx.ConnectTimeout):
                raise CliError(f"cannot reach the blkserve API at {self.url}: "
                               f"connection timed out") from None
            raise CliError(f"no answer from the blkserve API at {self.url} within "
                           f"{self.timeout:g} s (--timeout)") from None
        except httpx.HTTPError as e:
            reason = one_line(str(e)) or type(e).__name__
            raise CliError(f"cannot reach the blkserve API at {self.url}: {reason}") from None
        except httpx.InvalidURL as e:
            raise CliError(f"invalid --url {self.url}: {e}") from None
        if resp.status_code >= 400:
            raise CliError(f"HTTP {resp.status_code}: "
                           f"{error_detail(resp.content, resp.reason_phrase)}")
        if not resp.content:
            return resp.status_code, None
        try:
            return resp.status_code, resp.json()
        except ValueError:
            raise CliError(f"HTTP {resp.status_code}: not a JSON answer: "
                           f"{one_line(resp.text)[:200]}") from None


# --------------------------------------------------------------------------- commands


def _print_json(data: Any) -> None:
    if data is not None:
        print(json.dumps(data, indent=2, sort_keys=False))


def _volume_path(name: str) -> str:
    return f"/v1/volumes/{_seg(name)}"


def _cmd_create(api: Api, args: argparse.Namespace) -> int:
    if args.size is None and args.backing is None:
        args._parser.error("--size is required unless --backing is given")
    body: dict[str, Any] = {"name": args.name, "read_only": args.read_only,
                            "queues": args.queues}
    if args.size is not None:
        body["size_bytes"] = args.size
    if args.backing is not None:
        body["backing"] = os.path.abspath(args.backing)
    if args.qos is not None:
        body["qos"] = args.qos
    if args.qos_group is not None:
        body["qos_group"] = args.qos_group
    _, v = api.call("POST", "/v1/volumes", body)
    if args.json:
        _print_json(v)
        return 0
    q = v.get("queues")
    print(f"created volume {v.get('name')}: {human_size(v.get('size_bytes'))} "
          f"({v.get('size_bytes')} bytes), {q} queue{'s' if q != 1 else ''}, "
          f"{'read-only' if v.get('read_only') else 'read-write'}, backing {v.get('backing')}")
    return 0


def _cmd_list(api: Api, args: argparse.Namespace) -> int:
    _, volumes = api.call("GET", "/v1/volumes")
    if args.json:
        _print_json(volumes)
    else:
        print(volume_table(volumes or []))
    return 0


def _cmd_show(api: Api, args: argparse.Namespace) -> int:
    _, v = api.call("GET", _volume_path(args.name))
    if args.json:
        _print_json(v)
    else:
        print(volume_details(v))
    return 0


def _cmd_resize(api: Api, args: argparse.Namespace) -> int:
    _, v = api.call("PATCH", _volume_path(args.name), {"size_bytes": args.size})
    if args.json:
        _print_json(v)
        return 0
    line = (f"resized volume {v.get('name')} to {human_size(v.get('size_bytes'))} "
            f"({v.get('size_bytes')} bytes)")
    exp = v.get("export")
    if exp and exp.get("state") not in (None, "stopped"):
        line += "; the running export serves the new size (attached guests see it online)"
    print(line)
    return 0


def _cmd_qos(api: Api, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {}
    if args.clear:
        body["qos"] = None
    elif args.limits is not None:
        body["qos"] = args.limits
    if args.no_group:
        body["qos_group"] = None
    elif args.group is not None:
        body["qos_group"] = args.group
    if not body:
        args._parser.error("give limits, --clear, --group or --no-group")
    _, v = api.call("PATCH", _volume_path(args.name), body)
    if args.json:
        _print_json(v)
    else:
        print(f"volume {v.get('name')}: qos {qos_text(v.get('qos'))}, group "
              f"{v.get('qos_group') or 'none'} (in force on a running export within 20 ms)")
    return 0


def _group_line(g: dict) -> str:
    return (f"{g.get('name')}: {qos_text(g.get('qos'))}; members: "
            f"{', '.join(g.get('members') or []) or 'none'}")


def _cmd_group(api: Api, args: argparse.Namespace) -> int:
    path = "/v1/qos-groups"
    if args.group_command == "list":
        _, data = api.call("GET", path)
        out = data if args.json else "\n".join(_group_line(g) for g in data) or "no groups"
    elif args.group_command == "show":
        _, data = api.call("GET", f"{path}/{_seg(args.name)}")
        out = data if args.json else _group_line(data)
    elif args.group_command == "create":
        _, data = api.call("POST", path, {"name": args.name, "qos": args.limits})
        out = data if args.json else "created QoS group " + _group_line(data)
    elif args.group_command == "set":
        _, data = api.call("PATCH", f"{path}/{_seg(args.name)}", {"qos": args.limits})
        out = data if args.json else "QoS group " + _group_line(data)
    else:
        _, data = api.call("DELETE", f"{path}/{_seg(args.name)}")
        out = data if args.json else f"deleted QoS group {args.name}"
    if args.json:
        _print_json(out)
    else:
        print(out)
    return 0


def _cmd_delete(api: Api, args: argparse.Namespace) -> int:
    _, data = api.call("DELETE", _volume_path(args.name))
    if args.json:
        _print_json(data)
    else:
        print(f"deleted volume {args.name}")
    return 0


def _cmd_export(api: Api, args: argparse.Namespace) -> int:
    path = _volume_path(args.name) + "/export"
    if args.stop:
        _, data = api.call("DELETE", path)
        if args.json:
            _print_json(data)
        else:
            print(f"stopped the export of volume {args.name}")
        return 0
    status, exp = api.call("PUT", path, {})
    if args.json:
        _print_json(exp)
        return 0
    verb = "exported" if status == 201 else "already exported"
    print(f"{verb} volume {exp.get('volume', args.name)} on {exp.get('socket')} "
          f"[{export_summary(exp)}]")
    return 0


def _cmd_attach(api: Api, args: argparse.Namespace) -> int:
    body: dict[str, Any]
    if args.libvirt_domain is not None:
        if args.bus is not None:
            raise CliError("--bus is for --qmp; libvirt picks the slot itself")
        if args.migrate_from is not None or args.incoming or args.device_id or args.addr:
            raise CliError("--migrate-from, --incoming, --device-id and --addr are for --qmp "
                           "(a QEMU VM's live migration)")
        body = {"hypervisor": "libvirt", "domain": args.libvirt_domain}
        if args.libvirt_uri is not None:
            body["uri"] = args.libvirt_uri
    else:
        if args.libvirt_uri is not None:
            raise CliError("--libvirt-uri goes with --libvirt-domain")
        body = {"hypervisor": "qemu", "qmp_socket": os.path.abspath(args.qmp)}
        if args.bus is not None:
            body["bus"] = args.bus
        if args.migrate_from is not None:
            body["migrate_from"] = args.migrate_from
        if args.incoming:
            body["incoming"] = True
        for key in ("device_id", "addr"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
    _, att = api.call("POST", _volume_path(args.name) + "/attachments", body)
    if args.json:
        _print_json(att)
        return 0
    where = (f"libvirt domain {_vm(att)}, target {_cell(att.get('target'))}"
             if att.get("hypervisor") == "libvirt" else f"QMP {att.get('qmp_socket')}")
    src = att.get("migrate_from") or "another host"
    what = "attached" if att.get("state") != "incoming" else \
        f"prepared the migration from {'attachment ' if att.get('migrate_from') else ''}" \
        f"{src}: attached"
    print(f"{what} volume {att.get('volume', args.name)} as attachment {att.get('id')} "
          f"(device {att.get('device_id')}, bus {_cell(att.get('bus'))}, {where})")
    return 0


def _cmd_detach(api: Api, args: argparse.Namespace) -> int:
    _, data = api.call("DELETE", f"{_volume_path(args.name)}/attachments/{_seg(args.id)}")
    if args.json:
        _print_json(data)
    else:
        print(f"detached attachment {args.id} from volume {args.name}")
    return 0


def _run(cmd: Callable[[Api, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        if not getattr(args, "verbose", False):
            # httpx logs every request at INFO; keep stderr for errors only
            for name in ("httpx", "httpcore"):
                logging.getLogger(name).setLevel(logging.WARNING)
        api = None
        try:
            api = Api(args)
            rc = cmd(api, args)
            sys.stdout.flush()
            return rc
        except CliError as e:
            print(f"blkserve: error: {e}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            # stdout closed early (`| head`): stop quietly, and keep the interpreter's
            # final flush from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except KeyboardInterrupt:
            print("blkserve: error: interrupted", file=sys.stderr)
            return 130
        finally:
            if api is not None:
                api.close()
    return run


# --------------------------------------------------------------------------- argparse


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def _timeout_arg(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not t > 0:
        raise argparse.ArgumentTypeError(f"must be greater than zero, not {text}")
    return t


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("API connection")
    g.add_argument("--url", metavar="URL",
                   help=f"base URL of `blkserve serve` (default: env BLKSERVE_URL, else "
                        f"{DEFAULT_URL})")
    g.add_argument("--state-dir", metavar="DIR",
                   help="state dir holding the api-token file, used when env "
                        "BLKSERVE_API_TOKEN is unset (default: env BLKSERVE_STATE_DIR, else "
                        f"{DEFAULT_STATE_DIR})")
    g.add_argument("--json", action="store_true",
                   help="print the API's JSON answer (pretty) instead of a table")
    g.add_argument("--timeout", type=_timeout_arg, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"HTTP timeout in seconds (default: {DEFAULT_TIMEOUT:g}; detach waits "
                        "for the guest to release the disk)")
    return common


def add_parsers(sub) -> None:
    """Register `volume`, `export-volume`, `attach` and `detach` on SUB."""
    common = _common_parser()
    epilog = ("Errors print one 'blkserve: error: ...' line and exit 1; bad arguments "
              "exit 2.")

    vol = sub.add_parser(
        "volume", help="create, list, show, resize and delete volumes (REST API client)",
        description="Manage the volumes of a running `blkserve serve`.")
    vsub = vol.add_subparsers(dest="volume_command", required=True, metavar="ACTION")

    p = vsub.add_parser(
        "create", parents=[common], help="create a volume", epilog=epilog,
        description="Create a volume: a sparse file under the daemon's state dir, or an "
                    "allow-listed external file or block device (--backing).")
    p.add_argument("name", metavar="NAME", help="lowercase letters, digits, '.', '_', '-'")
    p.add_argument("--size", type=_size_arg, metavar="SIZE",
                   help="capacity: bytes, or with a binary suffix K, M, G, T (10G = 10 GiB; "
                        "'GiB' and 'GB' mean the same); a multiple of 512. Required unless "
                        "--backing names an existing file or device")
    p.add_argument("--read-only", action="store_true", help="export the volume read-only")
    p.add_argument("--queues", type=_positive_int, default=1, metavar="N",
                   help="virtqueues offered to the guest (default: 1)")
    p.add_argument("--backing", metavar="PATH",
                   help="existing file or block device to serve (must be allowed by the "
                        "daemon's config)")
    p.add_argument("--qos", type=_qos_arg, metavar="KEY=VALUE[,...]",
                   help="QoS limits, as `blkserve export --qos` (e.g. "
                        "iops_total=5000,bps_write=20M)")
    p.add_argument("--qos-group", metavar="GROUP", help="join this QoS group")
    p.set_defaults(func=_run(_cmd_create), _parser=p)

    p = vsub.add_parser(
        "qos", parents=[common], help="set or clear a volume's QoS limits or group",
        epilog=epilog,
        description="Change a volume's QoS limits (all of them: keys left out have no "
                    "limit) or its group; a running export uses them within 20 ms, "
                    "without a restart.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("limits", nargs="?", type=_qos_arg, metavar="KEY=VALUE[,...]",
                   help="iops_total, iops_read, iops_write, bps_total, bps_read, bps_write, "
                        "each with _max and _max_length for a burst; K, M, G suffixes")
    p.add_argument("--clear", action="store_true", help="remove the volume's own limits")
    p.add_argument("--group", metavar="GROUP", help="join this QoS group")
    p.add_argument("--no-group", action="store_true", help="leave its QoS group")
    p.set_defaults(func=_run(_cmd_qos), _parser=p)

    p = vsub.add_parser("list", parents=[common], help="list volumes", epilog=epilog,
                        description="List volumes with their export state.")
    p.set_defaults(func=_run(_cmd_list))

    p = vsub.add_parser("show", parents=[common], help="show a volume", epilog=epilog,
                        description="Show a volume, its export and its attachments.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_run(_cmd_show))

    p = vsub.add_parser(
        "resize", parents=[common], help="grow (or shrink) a volume", epilog=epilog,
        description="Resize a volume. Shrinking is refused while it is exported; growing "
                    "an exported volume is seen by an attached guest at once (online).")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--size", type=_size_arg, required=True, metavar="SIZE",
                   help="new capacity (bytes or K, M, G, T suffix)")
    p.set_defaults(func=_run(_cmd_resize))

    p = vsub.add_parser(
        "delete", parents=[common], help="delete a volume", epilog=epilog,
        description="Delete a volume (refused while exported or attached); a file under "
                    "the state dir goes with it, an external backing stays.")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_run(_cmd_delete))

    grp = sub.add_parser(
        "qos-group", help="create, list, show, change and delete QoS groups (REST API client)",
        description="A QoS group's limits hold for all its volumes together.")
    gsub = grp.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    for action, text in (("list", "list groups"), ("show", "show a group and its members"),
                         ("create", "create a group"), ("set", "change a group's limits"),
                         ("delete", "delete a group (refused while it has volumes)")):
        p = gsub.add_parser(action, parents=[common], help=text, description=text + ".",
                            epilog=epilog)
        if action != "list":
            p.add_argument("name", metavar="GROUP")
        if action in ("create", "set"):
            p.add_argument("limits", type=_qos_arg, metavar="KEY=VALUE[,...]",
                           help="the group's limits, as for `volume qos`")
        p.set_defaults(func=_run(_cmd_group))

    p = sub.add_parser(
        "export-volume", parents=[common], epilog=epilog,
        help="start (or --stop) a volume's vhost-user export via the REST API",
        description="Have the daemon serve a volume on a vhost-user socket (idempotent) "
                    "and print the socket path, or stop it with --stop.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--stop", action="store_true", help="stop the export instead")
    p.set_defaults(func=_run(_cmd_export))

    p = sub.add_parser(
        "attach", parents=[common], epilog=epilog,
        help="hot-attach a volume to a running QEMU VM or libvirt domain via the REST API",
        description="Hot-plug a volume into a running QEMU VM over its QMP socket, or into "
                    "a running libvirt domain (exporting it first if needed) and print the "
                    "attachment id.")
    p.add_argument("name", metavar="NAME")
    vm = p.add_mutually_exclusive_group(required=True)
    vm.add_argument("--qmp", metavar="PATH",
                    help="the VM's QMP unix socket (its guest RAM must be shared)")
    vm.add_argument("--libvirt-domain", metavar="NAME",
                    help="a running libvirt domain (its memory must be shared: "
                         "<memoryBacking><source type='memfd'/><access mode='shared'/>"
                         "</memoryBacking>)")
    p.add_argument("--libvirt-uri", metavar="URI",
                   help=f"libvirt connection URI (default: {DEFAULT_LIBVIRT_URI})")
    p.add_argument("--bus", metavar="BUS",
                   help="QEMU bus id to plug into (--qmp; default: a free pcie-root-port, "
                        "or pci.0)")
    p.add_argument("--migrate-from", metavar="ID",
                   help="live migration (--qmp): the attachment of the VM that migrates; "
                        "--qmp is its destination QEMU (-incoming), which gets the disk "
                        "where the source has it, from a second export; the new attachment "
                        "replaces ID once the VM has arrived")
    p.add_argument("--incoming", action="store_true",
                   help="live migration from another host (--qmp): --qmp is the destination "
                        "QEMU here (-incoming); the disk goes in as --device-id (the source "
                        "attachment's) on --bus [at --addr], served by this host's export "
                        "of the volume (on shared storage); attached once the VM has arrived")
    p.add_argument("--device-id", metavar="ID",
                   help="--incoming: the source attachment's device id")
    p.add_argument("--addr", metavar="SLOT",
                   help="--incoming: the PCI address the source VM has the disk at on --bus, "
                        "when that bus has several slots")
    p.set_defaults(func=_run(_cmd_attach))

    p = sub.add_parser(
        "detach", parents=[common], epilog=epilog,
        help="hot-unplug an attachment via the REST API",
        description="Unplug an attachment from its VM, waiting for the guest to release "
                    "the disk.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("id", metavar="ID", help="attachment id (see `volume show`)")
    p.set_defaults(func=_run(_cmd_detach))
