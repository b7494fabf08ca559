"""A volume's backing cannot be redirected: only the resolved path is
allow-listed and stored, backings are opened without following symlinks,
as the inode recorded at creation (worker start, restart, adoption, resize,
size probe), special files are refused without blocking, and two volumes
cannot share one disk.  Also: request bodies are strictly typed, sizes are
integers in the OpenAPI, and the per-name locks do not pile up.

Against a real `blkserve serve` (tests/apiserver.py) unless the promise is
about one function."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from blkserve import backing as backing_io
from blkserve.api import models
from blkserve.api.config import Settings
from blkserve.api.controller import Controller

try:
    from .apiserver import REPO, ApiServer, serving, worker_pids
    from .test_api import assert_error, create, listening, ok, pid_alive, wait_for
except ImportError:
    from apiserver import REPO, ApiServer, serving, worker_pids
    from test_api import assert_error, create, listening, ok, pid_alive, wait_for

MiB = 1 << 20
NOBODY = 65534  # owner of the links "an unprivileged user" plants


# -- fixtures ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ext():
    """allowed/ is on the allow-list, outside/ is not (root's files a link
    must never reach)."""
    d = Path(tempfile.mkdtemp(prefix="bsbk-"))
    (d / "allowed").mkdir()
    (d / "outside").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def api(ext):
    cfg = ext / "blkserve.toml"
    cfg.write_text(f'allowed_backings = ["{ext}/allowed/*", "/dev/loop*"]\n'
                   "worker_start_timeout_s = 10\n")
    with serving(config=cfg) as server:
        yield server


@pytest.fixture(scope="module")
def http(api):
    with api.client() as c:
        yield c


def _raw(path: Path, size: int, fill: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(fill)
        f.truncate(size)
    return path


def _secret(ext: Path, name: str, size: int = 4 * MiB) -> Path:
    return _raw(ext / "outside" / name, size, b"root's secret")


def _swap_for_link(path: Path, target: Path) -> Path:
    """Replace the file PATH by a symlink to TARGET (atomically, as an
    attacker with write access to the directory would); returns where the
    original went."""
    kept = path.with_name(path.name + ".orig")
    os.rename(path, kept)
    os.symlink(target, path)
    return kept


def _restore(path: Path, kept: Path) -> None:
    path.unlink()
    os.rename(kept, path)


def _ext_volume(http, ext: Path, name: str, size: int = 4 * MiB) -> tuple[dict, Path]:
    disk = _raw(ext / "allowed" / f"{name}.raw", size, b"the volume's data")
    v = ok(http.post("/v1/volumes", json={"name": name, "backing": str(disk)}), 201)
    return v, disk


# -- the allow-list sees only the resolved path -------------------------------

def test_a_planted_symlink_in_an_allowed_dir_does_not_allow_its_target(http, ext):
    secret = _secret(ext, "s1.raw")
    link = ext / "allowed" / "evil.raw"
    os.symlink(secret, link)
    os.lchown(link, NOBODY, NOBODY)
    detail = assert_error(http.post("/v1/volumes", json={"name": "evil1",
                                                         "backing": str(link)}), 403)
    assert str(secret) in detail and "allowed_backings" in detail
    # a symlinked directory on the way is resolved the same
    os.symlink(ext / "outside", ext / "allowed" / "dirlink")
    assert_error(http.post("/v1/volumes", json={
        "name": "evil2", "backing": str(ext / "allowed" / "dirlink" / "s1.raw")}), 403)
    assert_error(http.get("/v1/volumes/evil1"), 404)
    assert secret.read_bytes()[:13] == b"root's secret" and secret.stat().st_size == 4 * MiB


def test_the_volume_stores_the_resolved_path(http, ext):
    disk = _raw(ext / "allowed" / "real1.raw", MiB)
    link = ext / "allowed" / "real1.link"
    os.symlink(disk, link)
    v = ok(http.post("/v1/volumes", json={"name": "real1", "backing": str(link)}), 201)
    assert v["backing"] == str(disk)
    ok(http.delete("/v1/volumes/real1"), 204)


# -- a backing swapped after creation ------------------------------------------

def test_resize_does_not_truncate_through_a_swapped_in_symlink(http, ext):
    v, disk = _ext_volume(http, ext, "rsz1")
    secret = _secret(ext, "s2.raw")
    kept = _swap_for_link(disk, secret)
    try:
        detail = assert_error(http.patch("/v1/volumes/rsz1", json={"size_bytes": 8 * MiB}),
                              409)
        assert "symbolic link" in detail and "rsz1" in detail, detail
        assert secret.stat().st_size == 4 * MiB
        assert ok(http.get("/v1/volumes/rsz1"))["size_bytes"] == 4 * MiB
        # the same with another file renamed over it: not the recorded inode
        disk.unlink()
        _raw(disk, 4 * MiB)
        detail = assert_error(http.patch("/v1/volumes/rsz1", json={"size_bytes": 8 * MiB}),
                              409)
        assert "no longer the file the volume was created on" in detail, detail
        assert disk.stat().st_size == 4 * MiB
    finally:
        disk.unlink()
        os.rename(kept, disk)
    grown = ok(http.patch("/v1/volumes/rsz1", json={"size_bytes": 8 * MiB}))
    assert grown["size_bytes"] == 8 * MiB and disk.stat().st_size == 8 * MiB
    ok(http.delete("/v1/volumes/rsz1"), 204)


def test_export_refuses_a_swapped_in_symlink(api, http, ext):
    v, disk = _ext_volume(http, ext, "exs1")
    kept = _swap_for_link(disk, _secret(ext, "s3.raw"))
    try:
        detail = assert_error(http.put("/v1/volumes/exs1/export"), 409)
        assert "symbolic link" in detail, detail
        assert ok(http.get("/v1/volumes/exs1"))["export"] is None
        assert not (api.state_dir / "sockets" / "exs1.sock").exists()
    finally:
        _restore(disk, kept)
    ok(http.put("/v1/volumes/exs1/export"), 201)
    ok(http.delete("/v1/volumes/exs1/export"), 204)
    ok(http.delete("/v1/volumes/exs1"), 204)


@pytest.mark.parametrize("swap", ["symlink", "other-file"])
def test_restarted_worker_refuses_a_swapped_backing(api, http, ext, swap):
    name = f"rst-{swap}"
    v, disk = _ext_volume(http, ext, name)
    exp = ok(http.put(f"/v1/volumes/{name}/export"), 201)
    secret = _secret(ext, f"s-{swap}.raw")
    if swap == "symlink":
        kept = _swap_for_link(disk, secret)
        needle = "symbolic link"
    else:
        kept = disk.with_name(disk.name + ".orig")
        os.rename(disk, kept)
        shutil.copy(secret, disk)  # same size, another inode
        needle = "no longer the file the volume was created on"
    log = api.state_dir / "logs" / f"{name}.log"
    try:
        os.kill(exp["pid"], signal.SIGKILL)
        wait_for(lambda: needle in log.read_text(errors="replace"), 10,
                 what=f"the restarted worker to refuse the backing ({needle})")
        # and it never serves: nothing listens on the socket for a while
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert not listening(exp["socket"]), "a restarted worker serves the swapped file"
            time.sleep(0.05)
        e = ok(http.get(f"/v1/volumes/{name}/export"))
        assert e["restarts"] >= 1 and e["state"] in ("backoff", "starting")
    finally:
        ok(http.delete(f"/v1/volumes/{name}/export"), 204)
        disk.unlink()
        os.rename(kept, disk)
    ok(http.delete(f"/v1/volumes/{name}"), 204)


# -- special files ---------------------------------------------------------------

def test_a_fifo_is_refused_at_once_and_named(api, http, ext):
    fifo = ext / "allowed" / "pipe.raw"
    os.mkfifo(fifo)
    t = time.monotonic()
    detail = assert_error(http.post("/v1/volumes", json={"name": "fifo1",
                                                         "backing": str(fifo)}), 422)
    assert "is a FIFO" in detail and time.monotonic() - t < 5, detail
    # swapped in after creation: resize and export refuse it, nothing blocks
    v, disk = _ext_volume(http, ext, "fifo2")
    kept = disk.with_name("fifo2.orig")
    os.rename(disk, kept)
    os.mkfifo(disk)
    try:
        detail = assert_error(http.patch("/v1/volumes/fifo2", json={"size_bytes": 8 * MiB}),
                              409)
        assert "is a FIFO" in detail, detail
        detail = assert_error(http.put("/v1/volumes/fifo2/export"), 409)
        assert "is a FIFO" in detail, detail
        assert ok(http.get("/healthz"))["status"] == "ok"
    finally:
        _restore(disk, kept)
    ok(http.delete("/v1/volumes/fifo2"), 204)


def _export_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blkserve", "export", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_the_worker_refuses_special_files_symlinks_and_other_inodes(ext):
    fifo = ext / "outside" / "w.fifo"
    os.mkfifo(fifo)
    sock = str(ext / "w.sock")
    p = _export_cli(str(fifo), "--socket", sock, timeout=10)
    assert p.returncode == 2 and "is a FIFO" in p.stderr, p.stderr
    p = _export_cli("/dev/null", "--socket", sock)
    assert p.returncode == 2 and "is a character device" in p.stderr, p.stderr
    disk = _raw(ext / "outside" / "w.raw", MiB)
    st = disk.stat()
    p = _export_cli(str(disk), "--socket", sock, "--backing-identity",
                    f"{st.st_dev}:{st.st_ino + 1}")
    assert p.returncode == 2 and "no longer the file" in p.stderr, p.stderr
    link = ext / "outside" / "w.link"
    os.symlink(disk, link)
    p = _export_cli(str(link), "--socket", sock, "--backing-identity",
                    f"{st.st_dev}:{st.st_ino}")
    assert p.returncode == 2 and "symbolic link" in p.stderr, p.stderr
    p = _export_cli("--help")
    assert "--backing-identity" in p.stdout


def test_no_symlink_is_followed_anywhere_in_the_path(tmp_path):
    (tmp_path / "d").mkdir()
    disk = _raw(tmp_path / "d" / "f.raw", MiB)
    os.symlink(tmp_path / "d", tmp_path / "dl")
    os.symlink(disk, tmp_path / "d" / "fl")
    for walk in (False, True):  # openat2, and the O_NOFOLLOW walk of older kernels
        old = backing_io._have_openat2
        backing_io._have_openat2 = not walk
        try:
            assert backing_io.check(str(disk)).ino == disk.stat().st_ino
            for p in (tmp_path / "dl" / "f.raw", tmp_path / "d" / "fl"):
                with pytest.raises(backing_io.BackingError, match="symbolic link"):
                    backing_io.check(str(p))
        finally:
            backing_io._have_openat2 = old


# -- two volumes, one disk -----------------------------------------------------------

def test_a_hard_link_cannot_make_a_second_volume(http, ext):
    v, disk = _ext_volume(http, ext, "hl1")
    twin = ext / "allowed" / "hl1-twin.raw"
    os.link(disk, twin)
    detail = assert_error(http.post("/v1/volumes", json={"name": "hl2",
                                                         "backing": str(twin)}), 409)
    assert "'hl1'" in detail and "hard link" in detail, detail
    ok(http.delete("/v1/volumes/hl1"), 204)
    ok(http.post("/v1/volumes", json={"name": "hl2", "backing": str(twin)}), 201)
    ok(http.delete("/v1/volumes/hl2"), 204)


@pytest.fixture
def loop_device(ext):
    if not shutil.which("losetup"):
        pytest.skip("losetup is not installed")
    img = _raw(ext / "loop.img", 8 * MiB)
    p = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {p.stderr.strip()}")
    dev = p.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def test_a_second_node_of_a_block_device_cannot_make_a_second_volume(http, ext, loop_device):
    ok(http.post("/v1/volumes", json={"name": "blk1", "backing": loop_device}), 201)
    node = ext / "allowed" / "loop-alias"
    os.mknod(node, 0o600 | 0o060000, os.stat(loop_device).st_rdev)  # S_IFBLK
    try:
        detail = assert_error(http.post("/v1/volumes", json={"name": "blk2",
                                                             "backing": str(node)}), 409)
        assert "'blk1'" in detail and loop_device in detail, detail
    finally:
        node.unlink()
        ok(http.delete("/v1/volumes/blk1"), 204)


def test_a_partition_overlaps_its_whole_disk(tmp_path):
    """sysfs: /sys/dev/block/MAJ:MIN of a partition has a `partition` file
    and its parent directory is the disk (with `dev`)."""
    disk_dir = tmp_path / "devices" / "vdz"
    (disk_dir / "vdz1").mkdir(parents=True)
    (disk_dir / "dev").write_text("253:16\n")
    (disk_dir / "vdz1" / "partition").write_text("1\n")
    (disk_dir / "vdz1" / "dev").write_text("253:17\n")
    sysfs = tmp_path / "dev-block"
    sysfs.mkdir()
    os.symlink(disk_dir, sysfs / "253:16")
    os.symlink(disk_dir / "vdz1", sysfs / "253:17")
    disk = backing_io.Identity(5, 100, "block", os.makedev(253, 16))
    part = backing_io.Identity(5, 101, "block", os.makedev(253, 17))
    other = backing_io.Identity(5, 102, "block", os.makedev(253, 32))
    assert backing_io.overlap(part, disk, str(sysfs)) == "a-in-b"
    assert backing_io.overlap(disk, part, str(sysfs)) == "b-in-a"
    assert backing_io.overlap(part, other, str(sysfs)) is None
    assert backing_io.overlap(disk, backing_io.Identity(6, 1, "block", disk.rdev)) == "same"
    assert backing_io.overlap(backing_io.Identity(5, 100, "file"), disk) == "same"


# -- identity in the state, and adoption ------------------------------------------------

def test_identity_is_recorded_and_checked_when_adopting(ext):
    d = Path(tempfile.mkdtemp(prefix="bsbka-"))
    servers = []
    try:
        s1 = ApiServer(state_dir=d)
        servers.append(s1)
        with s1.start().client() as c:
            v = create(c, "adopt1", MiB)
            exp = ok(c.put("/v1/volumes/adopt1/export"), 201)
        st = os.stat(v["backing"])
        db = sqlite3.connect(d / "blkserve.db")
        row = db.execute("SELECT backing_dev, backing_ino, backing_kind FROM volumes "
                         "WHERE name = 'adopt1'").fetchone()
        assert row == (st.st_dev, st.st_ino, "file")
        assert f"{st.st_dev}:{st.st_ino}".encode() in \
            Path(f"/proc/{exp['pid']}/cmdline").read_bytes()
        s1.stop(signal.SIGKILL)
        # the worker left running must serve the recorded inode to be adopted:
        # record one it certainly has no descriptor on (inode + 1 was, in one
        # CI run, a file the worker had open: adopted, the test timed out)
        decoy = d / "decoy"
        decoy.touch()
        with db:
            db.execute("UPDATE volumes SET backing_ino = ? WHERE name = 'adopt1'",
                       (decoy.stat().st_ino,))
        db.close()
        s2 = ApiServer(state_dir=d)
        servers.append(s2)
        with s2.start().client() as c:
            wait_for(lambda: not pid_alive(exp["pid"]), 10,
                     what="the worker serving another inode to be stopped")
            assert "worker.refused" in s2.log()
            e = ok(c.get("/v1/volumes/adopt1/export"))
            assert e["pid"] != exp["pid"] and e["state"] in ("backoff", "starting")
    finally:
        for s in servers:
            s.cleanup()
        for pid in worker_pids(d):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)


def test_a_database_from_before_gets_identity_columns_and_fills_them(tmp_path):
    """A version-1 database (no identity columns): upgraded on start; the
    volume's identity is recorded at its next successful open."""
    d = tmp_path / "st"
    (d / "volumes").mkdir(parents=True)
    disk = _raw(d / "volumes" / "old1.img", MiB)
    db = sqlite3.connect(d / "blkserve.db")
    db.executescript("""
        CREATE TABLE volumes (name TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL,
            read_only INTEGER NOT NULL DEFAULT 0, queues INTEGER NOT NULL DEFAULT 1,
            backing TEXT NOT NULL UNIQUE, managed INTEGER NOT NULL, created_at TEXT NOT NULL);
        CREATE TABLE exports (volume TEXT PRIMARY KEY REFERENCES volumes(name),
            socket TEXT NOT NULL, explicit INTEGER NOT NULL DEFAULT 0, pid INTEGER,
            pid_start INTEGER, restarts INTEGER NOT NULL DEFAULT 0, started_at TEXT,
            socket_owner TEXT);
        CREATE TABLE attachments (id TEXT PRIMARY KEY, volume TEXT NOT NULL, hypervisor
            TEXT NOT NULL, qmp_socket TEXT, bus TEXT, device_id TEXT NOT NULL, chardev_id
            TEXT NOT NULL, state TEXT NOT NULL, created_at TEXT NOT NULL, error TEXT,
            uri TEXT, domain TEXT, target TEXT);
        PRAGMA user_version = 1;
    """)
    db.execute("INSERT INTO volumes VALUES ('old1', ?, 0, 1, ?, 1, '2025-01-01T00:00:00')",
               (MiB, str(disk)))
    db.commit()
    db.close()
    c = Controller(Settings(state_dir=str(d)))
    try:
        v = c.get_volume("old1")
        assert v.identity is None
        c.resize_volume("old1", 2 * MiB)  # an open of the backing
        v = c.get_volume("old1")
        st = disk.stat()
        assert v.identity == (st.st_dev, st.st_ino) and v.backing_kind == "file"
        assert st.st_size == 2 * MiB
    finally:
        c.state.close()


# -- strict request types ---------------------------------------------------------

@pytest.mark.parametrize("path,body", [
    ("/v1/volumes", {"name": "lax1", "size_bytes": MiB, "read_only": 0}),
    ("/v1/volumes", {"name": "lax1", "size_bytes": MiB, "read_only": "true"}),
    ("/v1/volumes", {"name": "lax1", "size_bytes": "1048576"}),
    ("/v1/volumes", {"name": "lax1", "size_bytes": 1048576.0}),
    ("/v1/volumes", {"name": "lax1", "size_bytes": MiB, "queues": True}),
    ("/v1/volumes", {"name": "lax1", "size_bytes": MiB, "queues": "2"}),
    ("/v1/tracing", {"duration_s": "5"}),
    ("/v1/tracing", {"duration_s": 1, "breakdown": 1}),
])
def test_wrong_json_types_are_422(http, path, body):
    r = http.post(path, json=body)
    if r.status_code == 201:  # accepted after all: do not spoil the next cases
        http.delete("/v1/volumes/lax1")
    detail = assert_error(r, 422)
    assert "\n" not in detail
    assert_error(http.get("/v1/volumes/lax1"), 404)


def test_wrong_json_types_are_422_on_resize_and_attach(http):
    create(http, "lax2", MiB)
    assert_error(http.patch("/v1/volumes/lax2", json={"size_bytes": str(2 * MiB)}), 422)
    assert_error(http.patch("/v1/volumes/lax2", json={"size_bytes": float(2 * MiB)}), 422)
    assert_error(http.post("/v1/volumes/lax2/attachments",
                           json={"hypervisor": "qemu", "qmp_socket": 5}), 422)
    assert ok(http.get("/v1/volumes/lax2"))["size_bytes"] == MiB
    ok(http.delete("/v1/volumes/lax2"), 204)


def test_a_socket_path_with_a_nul_byte_is_422(http):
    """A NUL in the QMP socket or in the libvirt URI's socket= path: the
    path functions raise ValueError on it (schemathesis found a 500 with
    `qemu:///system?socket=/\x00...`)."""
    create(http, "nul1", MiB)
    for body in ({"hypervisor": "qemu", "qmp_socket": "/run/vm\x00/qmp.sock"},
                 {"hypervisor": "libvirt", "domain": "vm1",
                  "uri": "qemu:///system?socket=/\x00M"}):
        detail = assert_error(http.post("/v1/volumes/nul1/attachments", json=body), 422)
        assert "\n" not in detail
    assert ok(http.get("/v1/volumes/nul1"))["attachments"] == []
    ok(http.delete("/v1/volumes/nul1"), 204)


def test_sizes_are_integers_in_the_openapi(http):
    spec = ok(http.get("/openapi.json"))
    schemas = spec["components"]["schemas"]
    patch = schemas["VolumePatch"]["properties"]["size_bytes"]
    create_ = schemas["VolumeCreate"]["properties"]["size_bytes"]
    ints = [patch, next(s for s in create_["anyOf"] if s.get("type") == "integer")]
    for s in ints:
        assert type(s["maximum"]) is int and s["maximum"] == models.MAX_SIZE, s
        assert type(s["exclusiveMinimum"]) is int, s
    assert type(patch["multipleOf"]) is int and type(create_["multipleOf"]) is int
    assert json.dumps(patch["multipleOf"]) == "512"


# -- the per-name locks ------------------------------------------------------------

def test_named_locks_are_dropped_when_nobody_holds_or_waits(tmp_path):
    c = Controller(Settings(state_dir=str(tmp_path / "st")))

    async def scenario():
        for i in range(200):
            async with c.lock(f"vol{i}"):
                pass
            async with c.vm_lock(f"/run/vm{i}/qmp.sock"):
                pass
        assert len(c._locks) == 0
        # still a lock: a second holder waits; the entry lives while it does
        order = []

        async def hold(tag, delay):
            async with c.lock("shared"):
                order.append(f"{tag}+")
                await asyncio.sleep(delay)
                order.append(f"{tag}-")
        first = asyncio.create_task(hold("a", 0.05))
        await asyncio.sleep(0)
        second = asyncio.create_task(hold("b", 0))
        await asyncio.sleep(0.01)
        assert "shared" in c._locks
        await asyncio.gather(first, second)
        assert order == ["a+", "a-", "b+", "b-"] and len(c._locks) == 0
        # a waiter that gives up (cancelled) leaves nothing behind either
        holder = asyncio.create_task(hold("c", 0.05))
        await asyncio.sleep(0)
        waiter = asyncio.create_task(hold("d", 0))
        await asyncio.sleep(0.01)
        waiter.cancel()
        await holder
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert len(c._locks) == 0

    try:
        asyncio.run(scenario())
    finally:
        c.state.close()
