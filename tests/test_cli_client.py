"""The REST client commands: `blkserve volume|export-volume|attach|detach`.

Pure helpers (size parsing, tables, error lines) are tested directly; the
commands themselves run as `python -m blkserve ...` processes against a real
`blkserve serve` started once for the module."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from blkserve import client
from blkserve.cli import build_parser

try:
    from .apiserver import ApiServer, free_port
except ImportError:
    from apiserver import ApiServer, free_port

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30

# --------------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("text, expected", [
    ("1048576", 1048576),
    ("512", 512),
    ("10G", 10 * GiB),
    ("10GiB", 10 * GiB),
    ("10GB", 10 * GiB),
    ("10g", 10 * GiB),
    ("10gib", 10 * GiB),
    ("512K", 512 * 1024),
    ("64M", 64 * MiB),
    ("64MiB", 64 * MiB),
    ("1T", 1 << 40),
    ("2TiB", 2 << 40),
    ("1.5G", 3 * GiB // 2),
    ("0.5K", 512),
    ("4096B", 4096),
    (" 8 M ", 8 * MiB),
])
def test_parse_size(text, expected):
    assert client.parse_size(text) == expected


@pytest.mark.parametrize("text", [
    "", "G", "abc", "10X", "10 GG", "-1", "-1G", "0", "0G", "1.3", "0.1K", "10Gi", "1e3",
    "10 KiBB", "1,5G",
])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        client.parse_size(text)


@pytest.mark.parametrize("n, expected", [
    (0, "0 B"),
    (512, "512 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (64 * MiB, "64.0 MiB"),
    (10 * GiB, "10.0 GiB"),
    (GiB - 1, "1.0 GiB"),  # never "1024.0 MiB"
    (3 << 40, "3.0 TiB"),
    (1 << 60, "1.0 EiB"),
    (None, "-"),
])
def test_human_size(n, expected):
    assert client.human_size(n) == expected


def test_format_table_aligns_columns_without_trailing_blanks():
    out = client.format_table(
        ("NAME", "SIZE", "NOTE"),
        [("a", 5, None), ("longer-name", 12345, "x"), ("b", 7, True)],
        right=(1,))
    assert out.splitlines() == [
        "NAME          SIZE  NOTE",
        "a                5  -",
        "longer-name  12345  x",
        "b                7  yes",
    ]
    assert all(line == line.rstrip() for line in out.splitlines())


def test_format_table_header_only_and_multiline_cells():
    assert client.format_table(("A", "BB"), []) == "A  BB"
    assert client.format_table(("A",), [("x\ny  z",)]).splitlines() == ["A", "x y z"]
    with pytest.raises(ValueError):
        client.format_table(("A", "B"), [("only one",)])


def test_format_kv():
    assert client.format_kv([("name", "db1"), ("read-only", False), ("bus", None)]) == (
        "name:      db1\nread-only: no\nbus:       -")


@pytest.mark.parametrize("body, expected", [
    (b'{"detail": "volume \'x\' already exists"}', "volume 'x' already exists"),
    (b'{"detail": "worker failed:\\n  line one\\n\\n  line two"}',
     "worker failed: | line one | line two"),
    (b'{"detail": [{"loc": ["body", "name"], "msg": "bad"}]}',
     '[{"loc":["body","name"],"msg":"bad"}]'),
    (b'{"error": "weird"}', '{"error":"weird"}'),
    (b"<html>\n<body>Bad Gateway</body>\n</html>",
     "<html> | <body>Bad Gateway</body> | </html>"),
    (b"", "Bad Gateway"),
])
def test_error_detail_is_one_line(body, expected):
    got = client.error_detail(body, "Bad Gateway")
    assert got == expected
    assert "\n" not in got


VOLUME = {
    "name": "db1", "size_bytes": 10 * GiB, "read_only": False, "queues": 2,
    "backing": "/var/lib/blkserve/volumes/db1.img", "managed": True,
    "created_at": "2024-05-01T10:00:00+00:00",
    "export": {"volume": "db1", "socket": "/var/lib/blkserve/sockets/db1.sock",
               "state": "running", "pid": 4242, "restarts": 1, "explicit": False,
               "started_at": "2024-05-01T10:01:00+00:00"},
    "attachments": [{
        "id": "a1b2c3d4", "volume": "db1", "hypervisor": "qemu",
        "qmp_socket": "/run/vm1/qmp.sock", "bus": None, "device_id": "blkserve-a1b2c3d4",
        "chardev_id": "blkserve-a1b2c3d4-chr", "state": "attached",
        "created_at": "2024-05-01T10:01:00+00:00", "error": None}],
}
PLAIN = {"name": "scratch", "size_bytes": 512, "read_only": True, "queues": 1,
         "backing": "/dev/sdb", "managed": False, "created_at": "2024-05-02T00:00:00+00:00",
         "export": None, "attachments": []}


def test_volume_table():
    lines = client.volume_table([VOLUME, PLAIN]).splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "RO", "QUEUES", "EXPORT", "ATTACHMENTS",
                                "BACKING"]
    assert lines[1].split() == ["db1", "10.0", "GiB", "no", "2", "running", "1",
                                "/var/lib/blkserve/volumes/db1.img"]
    assert lines[2].split() == ["scratch", "512", "B", "yes", "1", "-", "0", "/dev/sdb"]
    # every column starts at the same offset on every line
    starts = [lines[0].index(h) for h in ("RO", "BACKING")]
    assert [lines[1].index("no"), lines[1].index("/var")] == starts
    assert [lines[2].index("yes"), lines[2].index("/dev")] == starts


def test_volume_details():
    out = client.volume_details(VOLUME)
    lines = out.splitlines()
    assert "size:        10737418240 bytes (10.0 GiB)" in lines
    assert "export:      running (pid 4242, 1 restart)" in lines
    assert "socket:      /var/lib/blkserve/sockets/db1.sock" in lines
    assert "attachments: 1" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("ID "))
    assert lines[header].split()[:3] == ["ID", "STATE", "HYPERVISOR"]
    assert lines[header + 1].split()[:5] == ["a1b2c3d4", "attached", "qemu", "-",
                                             "blkserve-a1b2c3d4"]
    plain = client.volume_details(PLAIN).splitlines()
    assert "size:        512 bytes (512 B)" in plain
    assert "export:      -" in plain
    assert "attachments: none" in plain
    assert not any(line.startswith("socket:") for line in plain)


def test_export_summary():
    assert client.export_summary(None) == "-"
    assert client.export_summary({"state": "stopped", "pid": None, "restarts": 0}) == "stopped"
    assert client.export_summary({"state": "backoff", "pid": None, "restarts": 3}) == (
        "backoff (3 restarts)")


def test_parsers():
    parser = build_parser()
    a = parser.parse_args(["volume", "create", "db1", "--size", "10G", "--queues", "2",
                           "--read-only", "--json"])
    assert (a.name, a.size, a.queues, a.read_only, a.json, a.backing) == (
        "db1", 10 * GiB, 2, True, True, None)
    assert a.timeout == 120 and a.url is None and a.state_dir is None
    a = parser.parse_args(["volume", "create", "ext", "--backing", "/dev/sdb"])
    assert a.size is None and a.backing == "/dev/sdb"
    a = parser.parse_args(["volume", "resize", "db1", "--size", "20GiB", "--url",
                           "http://h:1", "--state-dir", "/s", "--timeout", "5"])
    assert (a.size, a.url, a.state_dir, a.timeout) == (20 * GiB, "http://h:1", "/s", 5.0)
    a = parser.parse_args(["export-volume", "db1", "--stop"])
    assert a.stop and a.name == "db1"
    a = parser.parse_args(["attach", "db1", "--qmp", "/run/q.sock", "--bus", "hp0"])
    assert (a.qmp, a.bus) == ("/run/q.sock", "hp0")
    a = parser.parse_args(["detach", "db1", "a1b2c3d4"])
    assert (a.name, a.id) == ("db1", "a1b2c3d4")
    for argv in (["volume", "list"], ["volume", "show", "x"], ["volume", "delete", "x"]):
        assert callable(parser.parse_args(argv).func)


@pytest.mark.parametrize("argv", [
    ["volume"],
    ["volume", "create"],
    ["volume", "create", "x", "--size", "10X"],
    ["volume", "create", "x", "--size", "1G", "--queues", "0"],
    ["volume", "resize", "x"],
    ["volume", "list", "--timeout", "0"],
    ["attach", "x"],
    ["attach", "--qmp", "/q.sock"],
    ["detach", "x"],
])
def test_parser_rejects(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2


def test_load_token(tmp_path, monkeypatch):
    monkeypatch.delenv("BLKSERVE_API_TOKEN", raising=False)
    assert client.load_token(str(tmp_path)) is None
    assert client.load_token(str(tmp_path / "missing")) is None
    (tmp_path / "api-token").write_text("  from-file\n")
    assert client.load_token(str(tmp_path)) == "from-file"
    monkeypatch.setenv("BLKSERVE_API_TOKEN", " from-env ")
    assert client.load_token(str(tmp_path)) == "from-env"
    monkeypatch.setenv("BLKSERVE_API_TOKEN", "")
    assert client.load_token(str(tmp_path)) == "from-file"


def test_url_and_state_dir_defaults(monkeypatch):
    ns = argparse.Namespace(url=None, state_dir=None)
    monkeypatch.delenv("BLKSERVE_URL", raising=False)
    monkeypatch.delenv("BLKSERVE_STATE_DIR", raising=False)
    assert client._base_url(ns) == "http://127.0.0.1:8470"
    assert client._state_dir(ns) == "./var"
    monkeypatch.setenv("BLKSERVE_URL", "http://10.0.0.1:9000/")
    monkeypatch.setenv("BLKSERVE_STATE_DIR", "/srv/bs")
    assert client._base_url(ns) == "http://10.0.0.1:9000"
    assert client._state_dir(ns) == "/srv/bs"
    ns = argparse.Namespace(url="localhost:1234", state_dir="/x")
    assert client._base_url(ns) == "http://localhost:1234"
    assert client._state_dir(ns) == "/x"


def test_path_segments_are_escaped():
    assert client._volume_path("db1") == "/v1/volumes/db1"
    assert client._volume_path("a/b") == "/v1/volumes/a%2Fb"
    assert client._volume_path("..") == "/v1/volumes/%2E%2E"


# --------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def server():
    """One real `blkserve serve` whose token is only in STATE_DIR/api-token."""
    srv = ApiServer(token=None)
    try:
        yield srv.start()
    finally:
        try:
            with srv.client(timeout=30) as api:
                for v in api.get("/v1/volumes").json():
                    if v.get("export"):
                        api.delete(f"/v1/volumes/{v['name']}/export")
        except (httpx.HTTPError, ValueError):
            pass
        srv.cleanup()


def run_cli(*argv: str, url: str | None = None, token: str | None = None,
            state_dir: str | os.PathLike | None = None,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m blkserve ARGV` with the common options appended; TOKEN goes in env
    BLKSERVE_API_TOKEN (None: unset)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("BLKSERVE_API_TOKEN", "BLKSERVE_URL", "BLKSERVE_STATE_DIR")}
    if token is not None:
        env["BLKSERVE_API_TOKEN"] = token
    env.update(env_extra or {})
    args = [sys.executable, "-m", "blkserve", *argv]
    if url is not None:
        args += ["--url", url]
    if state_dir is not None:
        args += ["--state-dir", str(state_dir)]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture
def cli(server):
    """run_cli against the module's server, authenticated by env token."""
    def run(*argv: str, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("url", server.url)
        kw.setdefault("token", server.token)
        return run_cli(*argv, **kw)
    return run


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert r.stderr == "", r.stderr
    return r.stdout


def fails(r: subprocess.CompletedProcess, needle: str) -> str:
    """Exit 1 with exactly one 'blkserve: error:' line on stderr holding NEEDLE."""
    assert r.returncode == 1, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("blkserve: error: "), r.stderr
    assert needle in lines[0], r.stderr
    assert r.stdout == ""
    return lines[0]


def test_create_prints_a_confirmation_or_json(cli, server):
    out = ok(cli("volume", "create", "cr-a", "--size", "64M"))
    assert len(out.splitlines()) == 1
    assert "cr-a" in out and "64.0 MiB" in out and "67108864" in out
    assert str(server.state_dir) in out  # the backing path

    data = json.loads(ok(cli("volume", "create", "cr-b", "--size", "1GiB", "--queues", "2",
                             "--read-only", "--json")))
    assert data["name"] == "cr-b"
    assert data["size_bytes"] == GiB
    assert data["read_only"] is True and data["queues"] == 2 and data["managed"] is True
    assert data["export"] is None and data["attachments"] == []
    assert os.path.getsize(data["backing"]) == GiB
    for name in ("cr-a", "cr-b"):
        ok(cli("volume", "delete", name))


def test_list_table_and_json(cli):
    ok(cli("volume", "create", "ls-a", "--size", "64M"))
    ok(cli("volume", "create", "ls-b", "--size", "10G", "--read-only", "--queues", "4"))
    lines = ok(cli("volume", "list")).splitlines()
    assert lines[0].split() == ["NAME", "SIZE", "RO", "QUEUES", "EXPORT", "ATTACHMENTS",
                                "BACKING"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["ls-a"].split()[1:7] == ["64.0", "MiB", "no", "1", "-", "0"]
    assert rows["ls-b"].split()[1:7] == ["10.0", "GiB", "yes", "4", "-", "0"]
    assert rows["ls-b"].split()[7].endswith("ls-b.img")
    col = lines[0].index("BACKING")
    assert all(line[col] == "/" for line in rows.values())

    data = json.loads(ok(cli("volume", "list", "--json")))
    by_name = {v["name"]: v for v in data}
    assert by_name["ls-b"]["size_bytes"] == 10 * GiB and by_name["ls-b"]["queues"] == 4
    for name in ("ls-a", "ls-b"):
        ok(cli("volume", "delete", name))
    assert "ls-a" not in ok(cli("volume", "list"))


def test_show(cli):
    ok(cli("volume", "create", "sh-a", "--size", "1536K"))
    out = ok(cli("volume", "show", "sh-a"))
    kv = dict(line.split(":", 1) for line in out.splitlines())
    kv = {k: v.strip() for k, v in kv.items()}
    assert kv["name"] == "sh-a"
    assert kv["size"] == "1572864 bytes (1.5 MiB)"
    assert kv["read-only"] == "no" and kv["queues"] == "1" and kv["managed"] == "yes"
    assert kv["export"] == "-" and kv["attachments"] == "none"
    assert json.loads(ok(cli("volume", "show", "sh-a", "--json")))["size_bytes"] == 1572864
    ok(cli("volume", "delete", "sh-a"))
    fails(cli("volume", "show", "sh-a"), "HTTP 404")


def test_resize_grows(cli, server):
    ok(cli("volume", "create", "rs-a", "--size", "64M"))
    out = ok(cli("volume", "resize", "rs-a", "--size", "128MiB"))
    assert len(out.splitlines()) == 1
    assert "rs-a" in out and "128.0 MiB" in out and "134217728" in out
    with server.client(timeout=30) as api:
        v = api.get("/v1/volumes/rs-a").json()
    assert v["size_bytes"] == 128 * MiB
    assert os.path.getsize(v["backing"]) == 128 * MiB
    assert json.loads(ok(cli("volume", "resize", "rs-a", "--size", "192M",
                             "--json")))["size_bytes"] == 192 * MiB
    ok(cli("volume", "delete", "rs-a"))


def test_export_volume_and_stop(cli, server):
    ok(cli("volume", "create", "ex-a", "--size", "64M"))
    out = ok(cli("export-volume", "ex-a"))
    assert len(out.splitlines()) == 1
    sock = next(w for w in out.split() if w.startswith("/"))
    assert sock.startswith(str(server.state_dir))
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert "running" in out

    again = json.loads(ok(cli("export-volume", "ex-a", "--json")))  # idempotent
    assert again["socket"] == sock and again["state"] == "running" and again["explicit"]
    assert "already" in ok(cli("export-volume", "ex-a"))

    show = ok(cli("volume", "show", "ex-a"))
    assert f"socket:      {sock}" in show.splitlines()
    assert any(line.startswith("export:") and "running" in line for line in show.splitlines())
    listed = next(line for line in ok(cli("volume", "list")).splitlines()
                  if line.startswith("ex-a "))
    assert listed.split()[5] == "running"

    fails(cli("volume", "delete", "ex-a"), "HTTP 409")  # still exported

    out = ok(cli("export-volume", "ex-a", "--stop"))
    assert len(out.splitlines()) == 1 and "ex-a" in out
    assert not os.path.exists(sock)
    out = ok(cli("volume", "delete", "ex-a"))
    assert len(out.splitlines()) == 1 and "ex-a" in out
    fails(cli("volume", "show", "ex-a"), "HTTP 404")


def test_duplicate_create_is_one_error_line(cli):
    ok(cli("volume", "create", "dup", "--size", "1M"))
    line = fails(cli("volume", "create", "dup", "--size", "1M"), "HTTP 409")
    assert line.startswith("blkserve: error: HTTP 409: ")
    assert "dup" in line
    ok(cli("volume", "delete", "dup"))


def test_server_side_validation_errors(cli):
    fails(cli("volume", "create", "odd", "--size", "1000"), "HTTP 422")
    fails(cli("volume", "create", "Bad_Name", "--size", "1M"), "HTTP 422")
    fails(cli("volume", "resize", "no-such", "--size", "1M"), "HTTP 404")
    fails(cli("volume", "delete", "no-such"), "HTTP 404")
    fails(cli("export-volume", "no-such"), "HTTP 404")
    fails(cli("detach", "no-such", "deadbeef"), "HTTP 404")


def test_wrong_token_is_401(cli):
    fails(cli("volume", "list", token="not-the-token"), "HTTP 401")
    fails(cli("volume", "create", "unauth", "--size", "1M", token="nope"), "HTTP 401")


def test_token_from_state_dir(cli, server, tmp_path):
    # env BLKSERVE_API_TOKEN unset: the token is read from --state-dir/api-token
    ok(cli("volume", "list", token=None, state_dir=server.state_dir))
    # ... or from env BLKSERVE_STATE_DIR/api-token
    ok(cli("volume", "list", token=None,
           env_extra={"BLKSERVE_STATE_DIR": str(server.state_dir)}))
    # the env token wins over the file
    fails(cli("volume", "list", token="wrong", state_dir=server.state_dir), "HTTP 401")
    # no token anywhere: no header, and the server's 401 is shown
    fails(cli("volume", "list", token=None, state_dir=tmp_path), "HTTP 401")


def test_url_from_env(server):
    r = run_cli("volume", "list", token=server.token,
                env_extra={"BLKSERVE_URL": server.url})
    assert ok(r).startswith("NAME")


def test_connection_refused(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    line = fails(run_cli("volume", "list", url=url, token="x", state_dir=tmp_path),
                 "cannot reach")
    assert line.startswith(f"blkserve: error: cannot reach the blkserve API at {url}: ")
    fails(run_cli("export-volume", "a", url=url, token="x"), "cannot reach")


@pytest.mark.parametrize("argv, needle", [
    (["attach", "db1"], "--qmp"),
    (["attach", "--qmp", "/tmp/q.sock"], "NAME"),
    (["detach", "db1"], "ID"),
    (["volume", "create", "db1"], "--size is required"),
    (["volume", "create", "db1", "--size", "ten"], "invalid size"),
    (["volume", "resize", "db1", "--size", "1.1"], "whole number"),
])
def test_bad_arguments_exit_2(argv, needle, tmp_path):
    r = run_cli(*argv, url=f"http://127.0.0.1:{free_port()}", state_dir=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("usage: blkserve ")
    assert needle in r.stderr


def test_attach_missing_volume_is_404(cli, tmp_path):
    fails(cli("attach", "no-such", "--qmp", str(tmp_path / "qmp.sock")), "HTTP 404")
    fails(cli("attach", "no-such", "--qmp", "/tmp/qmp.sock", "--bus", "hp0", "--json"),
          "HTTP 404")


def test_qos_commands(cli):
    r = cli("qos-group", "create", "cli-t", "iops_total=20K,bps_total=100M")
    assert r.returncode == 0, r.stderr
    assert "cli-t: iops_total=20480,bps_total=104857600; members: none" in r.stdout
    r = cli("volume", "create", "cliq", "--size", "1M", "--qos", "iops_read=500",
            "--qos-group", "cli-t")
    assert r.returncode == 0, r.stderr
    show = cli("volume", "show", "cliq").stdout
    assert "iops_read=500" in show and "cli-t" in show, show
    r = cli("volume", "qos", "cliq", "bps_write=1M,bps_write_max=4M,bps_write_max_length=2")
    assert r.returncode == 0, r.stderr
    assert "bps_write=1048576,bps_write_max=4194304,bps_write_max_length=2.0" in r.stdout
    assert "cliq" in cli("qos-group", "show", "cli-t").stdout
    r = cli("qos-group", "delete", "cli-t")
    assert r.returncode == 1 and "has volumes (cliq)" in r.stderr, r.stderr
    r = cli("volume", "qos", "cliq", "--clear", "--no-group")
    assert r.returncode == 0 and "qos none, group none" in r.stdout, r.stdout
    assert cli("qos-group", "delete", "cli-t").returncode == 0
    r = cli("volume", "qos", "cliq", "iops_total=0")
    assert r.returncode == 2 and "must be above 0" in r.stderr, r.stderr
    assert cli("qos-group", "list").stdout.strip() == "no groups"
    assert cli("volume", "delete", "cliq").returncode == 0
