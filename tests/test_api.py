"""The REST control plane (`blkserve serve`) as a real process with real SQLite
state and real `blkserve export` workers: auth, volumes, the backing
allow-list, exports (with I/O through them by `blkserve bench --verify`),
worker supervision, daemon restarts that adopt running workers, attachment
requests that cannot reach a VM, and workers that cannot start.

Every error answer must be JSON `{"detail": "<string>"}` with the exact
status code the API documents."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

try:
    from .apiserver import REPO, serving, wait_for, worker_pids
except ImportError:
    from apiserver import REPO, serving, wait_for, worker_pids

MiB = 1 << 20
VOL_SIZE = 16 * MiB
BENCH_SIZE = "4M"


# -- helpers -----------------------------------------------------------------

def assert_error(r: httpx.Response, status: int) -> str:
    """R is a STATUS answer whose body is exactly {"detail": "<non-empty string>"}."""
    where = f"{r.request.method} {r.request.url.path} -> {r.status_code}: {r.text}"
    assert r.status_code == status, where
    assert r.headers.get("content-type", "").startswith("application/json"), where
    body = r.json()
    assert isinstance(body, dict) and set(body) == {"detail"}, where
    assert isinstance(body["detail"], str) and body["detail"], where
    return body["detail"]


def ok(r: httpx.Response, status: int = 200):
    assert r.status_code == status, f"{r.request.method} {r.request.url.path} -> " \
                                    f"{r.status_code}: {r.text}"
    return r.json() if r.content else None


def pid_alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def listening(path: str) -> bool:
    """Does a process listen on the unix socket PATH?  (Without connecting:
    /proc/net/unix lists bound sockets, flag 0x10000 is __SO_ACCEPTCON.)"""
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split(None, 7)
            if len(fields) == 8 and fields[7].rstrip("\n") == path and \
                    int(fields[3], 16) & 0x10000:
                return True
    return False


def wait_restarted(http: httpx.Client, name: str, old_pid: int) -> dict:
    """The export's worker, restarted after OLD_PID died, listening."""
    def restarted():
        e = ok(http.get(f"/v1/volumes/{name}/export"))
        return e if e["pid"] not in (None, old_pid) and listening(e["socket"]) else None
    return wait_for(restarted, 10, what=f"export {name}'s worker to be restarted")


def expect_running(http: httpx.Client, name: str) -> None:
    """Last check of a test: the supervisor reports the listening worker as running."""
    wait_for(lambda: ok(http.get(f"/v1/volumes/{name}/export"))["state"] == "running",
             3, what=f"export {name} to be reported running")


def bench_verify(sock: str, rw: str = "randrw") -> dict:
    """Write a pattern through the export, read it back checked: no errors."""
    p = subprocess.run(
        [sys.executable, "-m", "blkserve", "bench", "--socket", sock, "--json", "--rw", rw,
         "--verify", "--size", BENCH_SIZE, "--runtime", "0.5", "--iodepth", "8",
         "--timeout", "20"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, f"bench rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["verify"] is True
    assert r["errors"] == 0 and r["verify_errors"] == 0 and r["io_errors"] == 0, r
    assert r["ios"] > 0, r
    return r


def create(http: httpx.Client, name: str, size: int = VOL_SIZE, **extra) -> dict:
    return ok(http.post("/v1/volumes", json={"name": name, "size_bytes": size, **extra}), 201)


def export(http: httpx.Client, name: str) -> dict:
    return ok(http.put(f"/v1/volumes/{name}/export"), 201)


def unexport(http: httpx.Client, name: str) -> None:
    ok(http.delete(f"/v1/volumes/{name}/export"), 204)


def stale_socket(path: str) -> str:
    """A unix socket file nobody listens on (bound, then closed)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    return path


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ext_dir():
    """A directory outside any state dir for external backings: allowed/* is
    on the allow-list, other.raw is not."""
    d = Path(tempfile.mkdtemp(prefix="bsext-"))
    (d / "allowed").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def api(ext_dir):
    cfg = ext_dir / "blkserve.toml"
    cfg.write_text(f'allowed_backings = ["{ext_dir}/allowed/*", "/dev/loop*"]\n'
                   "worker_start_timeout_s = 10\n")
    with serving(config=cfg) as server:
        yield server


@pytest.fixture(scope="module")
def http(api):
    with api.client() as c:
        yield c


# -- auth --------------------------------------------------------------------

def _v1_routes(http: httpx.Client) -> list[tuple[str, str]]:
    spec = ok(http.get("/openapi.json"))
    routes = []
    for path, ops in spec["paths"].items():
        if not path.startswith("/v1/"):
            continue
        concrete = path.replace("{name}", "vol").replace("{att_id}", "abc")
        routes += [(m.upper(), concrete) for m in ops]
    return routes


def test_openapi_lists_the_routes(http):
    """(The auth test below covers every /v1 route the schema lists.)"""
    routes = set(_v1_routes(http))
    assert routes >= {
        ("POST", "/v1/volumes"), ("GET", "/v1/volumes"),
        ("GET", "/v1/volumes/vol"), ("PATCH", "/v1/volumes/vol"),
        ("DELETE", "/v1/volumes/vol"),
        ("PUT", "/v1/volumes/vol/export"), ("GET", "/v1/volumes/vol/export"),
        ("DELETE", "/v1/volumes/vol/export"),
        ("POST", "/v1/volumes/vol/attachments"), ("GET", "/v1/volumes/vol/attachments"),
        ("GET", "/v1/volumes/vol/attachments/abc"),
        ("DELETE", "/v1/volumes/vol/attachments/abc"),
    }


@pytest.mark.parametrize("auth", [
    None, "Bearer wrong", "Bearer", "t0k", "Basic dDBrOg==", "Bearer t0k0",
    "Bearer t0", "Bearer t0k extra", "Bearer\tt0k",
])
def test_every_v1_route_needs_the_token(api, http, auth):
    headers = {} if auth is None else {"Authorization": auth}
    with httpx.Client(base_url=api.url, headers=headers, timeout=30) as anon:
        # a route that does not exist is refused the same way: no probing
        for method, path in _v1_routes(http) + [("GET", "/v1/nope"), ("GET", "/v1")]:
            body = {"name": "vol", "size_bytes": 512} if method in ("POST", "PATCH") else None
            r = anon.request(method, path, json=body)
            assert_error(r, 401)
            assert r.headers.get("www-authenticate") == "Bearer", (method, path)
    # nothing was created by the refused requests
    assert_error(http.get("/v1/volumes/vol"), 404)


def test_open_routes(api):
    with httpx.Client(base_url=api.url, timeout=30) as anon:
        h = ok(anon.get("/healthz"))
        assert h["status"] == "ok" and isinstance(h["version"], str)
        m = anon.get("/metrics")
        assert m.status_code == 200 and "blkserve_" in m.text
        assert ok(anon.get("/openapi.json"))["openapi"].startswith("3.")
        assert_error(anon.get("/nope"), 404)


def test_env_token_takes_precedence_over_the_token_file(fresh_state):
    d, new = fresh_state
    (d / "api-token").write_text("from-file\n")
    s = new(token="from-env")
    with s.client() as c:
        ok(c.get("/v1/volumes"))
    with s.client(token="from-file") as c:
        assert_error(c.get("/v1/volumes"), 401)


def test_generated_token_file_is_private_and_reused(fresh_state):
    d, new = fresh_state
    s = new(token=None)
    path = d / "api-token"
    st = path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()
    token = path.read_text().strip()
    assert s.token == token and len(token) >= 32
    with s.client() as c:
        ok(c.get("/v1/volumes"))
    with s.client(token="not-" + token) as c:
        assert_error(c.get("/v1/volumes"), 401)
    s.stop()
    s2 = new(token=None)
    assert s2.token == token and path.read_text().strip() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with s2.client(token=token) as c:
        ok(c.get("/v1/volumes"))


# -- volumes -----------------------------------------------------------------

def test_create_volume_makes_a_sparse_file(api, http):
    v = create(http, "sparse1", 1 << 30)
    assert v == {**v, "name": "sparse1", "size_bytes": 1 << 30, "read_only": False,
                 "queues": 1, "managed": True, "export": None, "attachments": []}
    path = Path(v["backing"])
    assert path.parent == api.state_dir / "volumes" and path.is_absolute()
    st = path.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_size == 1 << 30
    assert st.st_blocks * 512 < 1 * MiB  # sparse: nothing allocated
    assert ok(http.get("/v1/volumes/sparse1")) == v
    listed = ok(http.get("/v1/volumes"))
    assert [x for x in listed if x["name"] == "sparse1"] == [v]
    ok(http.delete("/v1/volumes/sparse1"), 204)


def test_create_volume_options(http):
    v = create(http, "opts1", queues=4, read_only=True)
    assert v["queues"] == 4 and v["read_only"] is True
    assert ok(http.get("/v1/volumes/opts1")) == v
    ok(http.delete("/v1/volumes/opts1"), 204)


@pytest.mark.parametrize("name", [
    "Upper", "-lead", ".lead", "_lead", "a" * 64, "", "a/b", "..", "a b", "vol\u00e9", "a\0b",
])
def test_bad_volume_names(http, name):
    assert_error(http.post("/v1/volumes", json={"name": name, "size_bytes": MiB}), 422)


def test_longest_name_and_odd_characters(http):
    for name in ("a" * 63, "0.x_y-z"):
        v = create(http, name, MiB)
        assert v["name"] == name
        ok(http.delete(f"/v1/volumes/{name}"), 204)


@pytest.mark.parametrize("body", [
    {"name": "sz"},
    {"name": "sz", "size_bytes": 0},
    {"name": "sz", "size_bytes": -512},
    {"name": "sz", "size_bytes": 1000},
    {"name": "sz", "size_bytes": MiB + 1},
    {"name": "sz", "size_bytes": (1 << 60) + 512},
    {"name": "sz", "size_bytes": None},
    {"name": "sz", "size_bytes": "a lot"},
    {"name": "sz", "size_bytes": MiB, "queues": 0},
    {"name": "sz", "size_bytes": MiB, "queues": 65},
    {"name": "sz", "size_bytes": MiB, "colour": "blue"},
    {"size_bytes": MiB},
    [],
    "sz",
    None,
])
def test_bad_create_bodies(http, body):
    assert_error(http.post("/v1/volumes", json=body), 422)
    assert_error(http.get("/v1/volumes/sz"), 404)


@pytest.mark.parametrize("content", [b"{bad json", b"", b'{"name": "sz", "size_bytes": 512'])
def test_malformed_json(http, content):
    r = http.post("/v1/volumes", content=content, headers={"Content-Type": "application/json"})
    assert_error(r, 422)


def test_duplicate_volume(http):
    v = create(http, "dup1")
    assert_error(http.post("/v1/volumes", json={"name": "dup1", "size_bytes": 2 * VOL_SIZE}),
                 409)
    assert ok(http.get("/v1/volumes/dup1")) == v  # untouched
    assert os.stat(v["backing"]).st_size == VOL_SIZE
    ok(http.delete("/v1/volumes/dup1"), 204)


def test_volume_too_big_for_the_filesystem(api, http):
    st = os.statvfs(api.state_dir / "volumes")
    size = 1 << 59
    assert size > st.f_bavail * st.f_frsize
    detail = assert_error(http.post("/v1/volumes", json={"name": "huge", "size_bytes": size}),
                          507)
    assert "space" in detail
    assert_error(http.get("/v1/volumes/huge"), 404)
    assert not (api.state_dir / "volumes" / "huge.img").exists()


def test_resize(http):
    v = create(http, "rs1", VOL_SIZE)
    path = v["backing"]
    grown = ok(http.patch("/v1/volumes/rs1", json={"size_bytes": 2 * VOL_SIZE}))
    assert grown["size_bytes"] == 2 * VOL_SIZE and os.stat(path).st_size == 2 * VOL_SIZE
    assert ok(http.get("/v1/volumes/rs1"))["size_bytes"] == 2 * VOL_SIZE
    same = ok(http.patch("/v1/volumes/rs1", json={"size_bytes": 2 * VOL_SIZE}))
    assert same == grown and os.stat(path).st_size == 2 * VOL_SIZE
    for bad in (1000, 0, -512, None, (1 << 60) + 512):
        assert_error(http.patch("/v1/volumes/rs1", json={"size_bytes": bad}), 422)
    assert_error(http.patch("/v1/volumes/rs1", json={}), 422)
    assert_error(http.patch("/v1/volumes/rs1", json={"size_bytes": VOL_SIZE, "x": 1}), 422)
    assert_error(http.patch("/v1/volumes/rs1", json={"size_bytes": 1 << 59}), 507)
    # shrinking a volume that is not exported is allowed
    shrunk = ok(http.patch("/v1/volumes/rs1", json={"size_bytes": VOL_SIZE // 2}))
    assert shrunk["size_bytes"] == VOL_SIZE // 2 and os.stat(path).st_size == VOL_SIZE // 2
    assert os.stat(path).st_size == VOL_SIZE // 2
    ok(http.delete("/v1/volumes/rs1"), 204)


def test_missing_volume(http):
    assert_error(http.get("/v1/volumes/ghost"), 404)
    assert_error(http.patch("/v1/volumes/ghost", json={"size_bytes": MiB}), 404)
    assert_error(http.delete("/v1/volumes/ghost"), 404)
    assert_error(http.put("/v1/volumes/ghost/export"), 404)
    assert_error(http.get("/v1/volumes/ghost/export"), 404)
    assert_error(http.delete("/v1/volumes/ghost/export"), 404)
    assert_error(http.get("/v1/volumes/ghost/attachments"), 404)
    assert_error(http.get("/v1/volumes/ghost/attachments/abc"), 404)
    assert_error(http.delete("/v1/volumes/ghost/attachments/abc"), 404)


def test_delete_volume(http):
    v = create(http, "del1")
    r = http.delete("/v1/volumes/del1")
    assert r.status_code == 204 and r.content == b""
    assert not os.path.exists(v["backing"])
    assert_error(http.get("/v1/volumes/del1"), 404)
    assert_error(http.delete("/v1/volumes/del1"), 404)
    assert "del1" not in [x["name"] for x in ok(http.get("/v1/volumes"))]
    # the name is free again
    create(http, "del1")
    ok(http.delete("/v1/volumes/del1"), 204)


# -- external backings and the allow-list --------------------------------------

def _raw(path: Path, size: int, fill: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(fill)
        f.truncate(size)
    return path


def test_allowed_backing_file(http, ext_dir):
    disk = _raw(ext_dir / "allowed" / "d1.raw", 4 * MiB, b"keep me")
    v = ok(http.post("/v1/volumes", json={"name": "ext1", "backing": str(disk)}), 201)
    assert v["size_bytes"] == 4 * MiB and v["managed"] is False
    assert v["backing"] == os.path.realpath(disk)
    # the same file again, directly or through a symlink on the list
    assert_error(http.post("/v1/volumes", json={"name": "ext1b", "backing": str(disk)}), 409)
    link = ext_dir / "allowed" / "d1.link"
    os.symlink(disk, link)
    assert_error(http.post("/v1/volumes", json={"name": "ext1c", "backing": str(link)}), 409)
    # exported, it serves I/O like a managed volume
    exp = export(http, "ext1")
    bench_verify(exp["socket"])
    unexport(http, "ext1")
    ok(http.delete("/v1/volumes/ext1"), 204)
    assert disk.exists() and disk.stat().st_size == 4 * MiB  # external: left alone
    # and registered again once free
    ok(http.post("/v1/volumes", json={"name": "ext1", "backing": str(link)}), 201)
    ok(http.delete("/v1/volumes/ext1"), 204)
    assert disk.exists()


def test_allowed_backing_size_must_match(http, ext_dir):
    disk = _raw(ext_dir / "allowed" / "d2.raw", 4 * MiB)
    body = {"name": "ext2", "backing": str(disk)}
    assert_error(http.post("/v1/volumes", json={**body, "size_bytes": 8 * MiB}), 422)
    assert_error(http.post("/v1/volumes", json={**body, "size_bytes": 1000}), 422)
    v = ok(http.post("/v1/volumes", json={**body, "size_bytes": 4 * MiB}), 201)
    assert v["size_bytes"] == 4 * MiB
    ok(http.delete("/v1/volumes/ext2"), 204)
    assert disk.stat().st_size == 4 * MiB


def test_allowed_backing_created_when_missing(http, ext_dir):
    disk = ext_dir / "allowed" / "new.raw"
    assert_error(http.post("/v1/volumes", json={"name": "ext3", "backing": str(disk)}), 422)
    assert not disk.exists()
    v = ok(http.post("/v1/volumes", json={"name": "ext3", "backing": str(disk),
                                           "size_bytes": 2 * MiB}), 201)
    assert v["managed"] is False and disk.stat().st_size == 2 * MiB
    ok(http.delete("/v1/volumes/ext3"), 204)
    assert disk.exists()


def test_refused_backings(api, http, ext_dir):
    other = _raw(ext_dir / "other.raw", 4 * MiB)
    managed = create(http, "inside1")
    cases = [
        (str(other), 403),                                       # not on the list
        ("/etc/passwd", 403),
        ("allowed/d1.raw", 422),                                 # relative
        ("", 422),
        (managed["backing"], 422),                               # inside the state dir
        (str(api.state_dir / "volumes" / "other.img"), 422),
        (str(api.state_dir / "blkserve.db"), 422),
        (str(ext_dir / "allowed"), 403),                         # the directory itself
    ]
    for backing, status in cases:
        r = http.post("/v1/volumes", json={"name": "refused", "backing": backing,
                                           "size_bytes": 4 * MiB})
        assert_error(r, status)
    # an allowed path that is not a file or block device
    (ext_dir / "allowed" / "subdir").mkdir()
    assert_error(http.post("/v1/volumes", json={
        "name": "refused", "backing": str(ext_dir / "allowed" / "subdir")}), 422)
    assert_error(http.get("/v1/volumes/refused"), 404)
    assert os.stat(managed["backing"]).st_size == VOL_SIZE
    ok(http.delete("/v1/volumes/inside1"), 204)


@pytest.fixture
def loop_device(ext_dir):
    if not shutil.which("losetup"):
        pytest.skip("losetup is not installed")
    img = _raw(ext_dir / "loop.img", 8 * MiB)
    p = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot set up a loop device (needs CAP_SYS_ADMIN and /dev/loop*): "
                    f"{p.stderr.strip()}")
    dev = p.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_backing(http, loop_device):
    v = ok(http.post("/v1/volumes", json={"name": "blk1", "backing": loop_device}), 201)
    assert v["size_bytes"] == 8 * MiB and v["managed"] is False
    assert v["backing"] == loop_device
    assert_error(http.patch("/v1/volumes/blk1", json={"size_bytes": 16 * MiB}), 409)
    exp = export(http, "blk1")
    bench_verify(exp["socket"])
    unexport(http, "blk1")
    ok(http.delete("/v1/volumes/blk1"), 204)
    assert stat.S_ISBLK(os.stat(loop_device).st_mode)


# -- exports -----------------------------------------------------------------

def test_export_lifecycle(api, http):
    create(http, "ex1")
    exp = export(http, "ex1")
    sock, pid = exp["socket"], exp["pid"]
    assert exp == {**exp, "volume": "ex1", "state": "running", "restarts": 0,
                   "explicit": True}
    assert os.path.isabs(sock) and is_socket(sock)
    assert Path(sock).parent == api.state_dir / "sockets"
    assert isinstance(pid, int) and pid_alive(pid) and pid in worker_pids(api.state_dir)
    assert exp["started_at"]

    # idempotent: same worker, 200
    again = ok(http.put("/v1/volumes/ex1/export"))
    assert again == exp
    assert ok(http.put("/v1/volumes/ex1/export", json={})) == exp
    assert_error(http.put("/v1/volumes/ex1/export", json={"socket": "/tmp/x"}), 422)
    assert ok(http.get("/v1/volumes/ex1/export")) == exp
    assert ok(http.get("/v1/volumes/ex1"))["export"] == exp

    assert bench_verify(sock)["backend"]["capacity"] == VOL_SIZE

    # busy volume
    assert_error(http.delete("/v1/volumes/ex1"), 409)
    assert_error(http.patch("/v1/volumes/ex1", json={"size_bytes": VOL_SIZE // 2}), 409)
    assert ok(http.get("/v1/volumes/ex1"))["size_bytes"] == VOL_SIZE
    grown = ok(http.patch("/v1/volumes/ex1", json={"size_bytes": 2 * VOL_SIZE}))
    assert grown["size_bytes"] == 2 * VOL_SIZE and grown["export"]["pid"] == pid
    assert ok(http.get("/v1/volumes/ex1/export"))["pid"] == pid  # not restarted
    assert bench_verify(sock)["backend"]["capacity"] == 2 * VOL_SIZE  # online resize

    r = http.delete("/v1/volumes/ex1/export")
    assert r.status_code == 204 and r.content == b""
    assert not os.path.exists(sock)
    wait_for(lambda: not pid_alive(pid), 5, what=f"worker {pid} to exit")
    assert pid not in worker_pids(api.state_dir)
    assert_error(http.delete("/v1/volumes/ex1/export"), 404)
    assert_error(http.get("/v1/volumes/ex1/export"), 404)
    assert ok(http.get("/v1/volumes/ex1"))["export"] is None

    # exported again: a new worker on the same socket path
    exp2 = export(http, "ex1")
    assert exp2["socket"] == sock and exp2["pid"] != pid and exp2["restarts"] == 0
    assert bench_verify(sock)["backend"]["capacity"] == 2 * VOL_SIZE
    unexport(http, "ex1")
    ok(http.delete("/v1/volumes/ex1"), 204)


def _bench(sock: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blkserve", "bench", "--socket", sock, "--json",
         "--size", BENCH_SIZE, "--runtime", "0.3", "--iodepth", "4", "--timeout", "20", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO)


def test_volume_options_reach_the_worker(http):
    """read_only and queues are what the guest is offered."""
    create(http, "ro1", read_only=True, queues=3)
    exp = export(http, "ro1")
    p = _bench(exp["socket"], "--rw", "randread")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["errors"] == 0 and r["ios"] > 0
    assert int(r["backend"]["features"], 16) & (1 << 5)  # VIRTIO_BLK_F_RO
    assert r["backend"]["max_queues"] == 3 and r["backend"]["capacity"] == VOL_SIZE
    p = _bench(exp["socket"], "--rw", "randwrite")
    assert p.returncode == 2 and "read-only" in p.stderr, p.stderr
    unexport(http, "ro1")
    ok(http.delete("/v1/volumes/ro1"), 204)


def test_killed_worker_is_restarted(api, http):
    create(http, "sup1")
    exp = export(http, "sup1")
    old = exp["pid"]
    os.kill(old, signal.SIGKILL)
    new = wait_restarted(http, "sup1", old)
    assert new["restarts"] == 1 and new["socket"] == exp["socket"]
    assert new["explicit"] is True and new["state"] in ("starting", "running")
    assert not pid_alive(old) and pid_alive(new["pid"])
    assert worker_pids(api.state_dir).count(new["pid"]) == 1
    bench_verify(new["socket"])
    # killed again: restarted again
    os.kill(new["pid"], signal.SIGKILL)
    third = wait_restarted(http, "sup1", new["pid"])
    assert third["restarts"] == 2 and third["socket"] == exp["socket"]
    bench_verify(third["socket"])
    try:
        expect_running(http, "sup1")
    finally:
        unexport(http, "sup1")
        assert not pid_alive(third["pid"]) and not os.path.exists(exp["socket"])
        ok(http.delete("/v1/volumes/sup1"), 204)


def test_worker_that_cannot_start(api, http):
    v = create(http, "broken1")
    os.unlink(v["backing"])  # behind the daemon's back
    for _ in range(2):
        detail = assert_error(http.put("/v1/volumes/broken1/export"), 502)
        assert "broken1" in detail
        assert_error(http.get("/v1/volumes/broken1/export"), 404)
        assert ok(http.get("/v1/volumes/broken1"))["export"] is None
    sock = api.state_dir / "sockets" / "broken1.sock"
    assert not sock.exists()
    assert not [p for p in worker_pids(api.state_dir)
                if str(sock).encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
    ok(http.delete("/v1/volumes/broken1"), 204)


# -- daemon restarts -------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "term"])
def test_daemon_restart_adopts_running_workers(fresh_state, sig):
    d, new = fresh_state
    s1 = new()
    with s1.client() as c:
        create(c, "p1")
        create(c, "p2", 2 * VOL_SIZE, queues=2)
        exp = export(c, "p1")
        before = ok(c.get("/v1/volumes"))
    pid = exp["pid"]
    s1.stop(sig)
    assert pid_alive(pid), "the worker must outlive the daemon"
    assert is_socket(exp["socket"])
    bench_verify(exp["socket"])  # still serving with no daemon at all

    s2 = new()
    with s2.client() as c:
        after = ok(c.get("/v1/volumes"))
        assert after == before  # same volumes, same export, same worker
        e = ok(c.get("/v1/volumes/p1/export"))
        assert e["pid"] == pid and e["state"] == "running" and e["restarts"] == 0
        assert worker_pids(d) == [pid]
        bench_verify(e["socket"])
        # the adopted worker is supervised like one the daemon started
        os.kill(pid, signal.SIGKILL)
        x = wait_restarted(c, "p1", pid)
        assert x["restarts"] == 1 and x["socket"] == exp["socket"]
        assert worker_pids(d) == [x["pid"]]
        bench_verify(x["socket"])
        expect_running(c, "p1")
        unexport(c, "p1")
        assert worker_pids(d) == []
        ok(c.delete("/v1/volumes/p1"), 204)
        assert [v["name"] for v in ok(c.get("/v1/volumes"))] == ["p2"]


def test_restart_replaces_a_worker_that_died_meanwhile(fresh_state):
    d, new = fresh_state
    cfg = d.parent / f"{d.name}.toml"
    cfg.write_text("worker_start_timeout_s = 5\n")
    try:
        s1 = new(config=cfg)
        with s1.client() as c:
            create(c, "gone1")
            exp = export(c, "gone1")
        s1.stop(signal.SIGKILL)
        os.kill(exp["pid"], signal.SIGKILL)
        wait_for(lambda: not pid_alive(exp["pid"]), 5, what="the worker to die")
        s2 = new(config=cfg)
        with s2.client() as c:
            e = ok(c.get("/v1/volumes/gone1/export"))
            assert e["pid"] not in (None, exp["pid"]) and e["state"] == "running"
            assert e["socket"] == exp["socket"] and worker_pids(d) == [e["pid"]]
            assert e["restarts"] == 0
            bench_verify(e["socket"])
    finally:
        cfg.unlink()


def test_attach_interrupted_by_a_daemon_kill_is_settled_on_restart(fresh_state):
    """A daemon killed between writing an attachment as `attaching` and
    plugging it: the next daemon asks the VM; a VM that is not there means
    the device never made it, so the row is dropped (and the volume is
    deletable again)."""
    import sqlite3

    d, new = fresh_state
    s1 = new()
    with s1.client() as c:
        create(c, "half1")
    s1.stop(signal.SIGKILL)
    db = sqlite3.connect(d / "blkserve.db")
    with db:
        db.execute(
            "INSERT INTO attachments (id, volume, hypervisor, qmp_socket, device_id, "
            "chardev_id, state, created_at) VALUES ('a1', 'half1', 'qemu', ?, 'dev-a1', "
            "'chr-a1', 'attaching', '2026-01-01T00:00:00Z')", (str(d / "no-vm.sock"),))
    db.close()
    s2 = new()
    with s2.client() as c:
        assert ok(c.get("/v1/volumes/half1/attachments")) == []
        assert c.delete("/v1/volumes/half1").status_code == 204
    assert "interrupted by a daemon restart: dropped" in s2.log()


# -- attachments (no VM) -------------------------------------------------------

def test_attach_missing_volume(http, ext_dir):
    qmp = stale_socket(str(ext_dir / "qmp-missing.sock"))
    r = http.post("/v1/volumes/ghost/attachments",
                  json={"hypervisor": "qemu", "qmp_socket": qmp})
    assert_error(r, 404)


def test_attach_bad_requests(api, http, ext_dir):
    create(http, "att1")
    regular = _raw(ext_dir / "not-a-socket", 0)
    bodies = [
        {"hypervisor": "qemu", "qmp_socket": "relative/qmp.sock"},
        {"hypervisor": "qemu", "qmp_socket": str(ext_dir / "nonexistent.sock")},
        {"hypervisor": "qemu", "qmp_socket": str(regular)},
        {"hypervisor": "qemu", "qmp_socket": str(ext_dir)},
        {"hypervisor": "qemu", "qmp_socket": "/tmp/a\0b"},
        {"hypervisor": "qemu", "qmp_socket": ""},
        {"hypervisor": "xen", "qmp_socket": "/run/vm1/qmp.sock"},
        {"qmp_socket": "/run/vm1/qmp.sock"},
        {"hypervisor": "qemu"},
        {"hypervisor": "qemu", "qmp_socket": "/run/vm1/qmp.sock", "bus": ""},
        {"hypervisor": "qemu", "qmp_socket": "/run/vm1/qmp.sock", "extra": 1},
        {},
    ]
    for body in bodies:
        assert_error(http.post("/v1/volumes/att1/attachments", json=body), 422)
    assert_error(http.post("/v1/volumes/att1/attachments", content=b"{",
                           headers={"Content-Type": "application/json"}), 422)
    assert ok(http.get("/v1/volumes/att1/attachments")) == []
    assert_error(http.get("/v1/volumes/att1/export"), 404)
    assert_error(http.get("/v1/volumes/att1/attachments/unknown"), 404)
    assert_error(http.delete("/v1/volumes/att1/attachments/unknown"), 404)
    for t in ("0", "-1", "601", "soon"):
        assert_error(http.delete(f"/v1/volumes/att1/attachments/unknown?timeout_s={t}"), 422)
    ok(http.delete("/v1/volumes/att1"), 204)


def test_attach_to_a_dead_vm_leaves_no_export(api, http, ext_dir):
    create(http, "att2")
    qmp = stale_socket(str(ext_dir / "qmp-dead.sock"))
    r = http.post("/v1/volumes/att2/attachments", json={"hypervisor": "qemu", "qmp_socket": qmp})
    assert_error(r, 422)
    assert ok(http.get("/v1/volumes/att2/attachments")) == []
    assert_error(http.get("/v1/volumes/att2/export"), 404)  # the export it started is gone
    assert ok(http.get("/v1/volumes/att2"))["export"] is None
    assert not (api.state_dir / "sockets" / "att2.sock").exists()
    sock = str(api.state_dir / "sockets" / "att2.sock").encode()
    assert not [p for p in worker_pids(api.state_dir)
                if sock in Path(f"/proc/{p}/cmdline").read_bytes()]
    ok(http.delete("/v1/volumes/att2"), 204)


def test_attach_to_a_dead_vm_keeps_an_explicit_export(http, ext_dir):
    create(http, "att3")
    exp = export(http, "att3")
    qmp = stale_socket(str(ext_dir / "qmp-dead3.sock"))
    r = http.post("/v1/volumes/att3/attachments", json={"hypervisor": "qemu", "qmp_socket": qmp})
    assert_error(r, 422)
    assert ok(http.get("/v1/volumes/att3/export")) == exp
    assert ok(http.get("/v1/volumes/att3/attachments")) == []
    unexport(http, "att3")
    ok(http.delete("/v1/volumes/att3"), 204)
