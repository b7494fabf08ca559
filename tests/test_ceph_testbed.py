"""The Ceph testbed (tests/ceph.py) itself works: a real one-mon, one-OSD
Ceph 16.2 cluster with BlueStore, started once for the session (about 2 s),
whose images take writes that read back, survive an OSD restart, and whose
teardown leaves no daemon behind.

Skipped, with the reason, where Ceph is not installed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from ceph import CephCluster, CephError, ceph_available

MiB = 1 << 20


def cluster_processes(conf: str) -> list[int]:
    """Pids of live processes started with this cluster's ceph.conf."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if conf.encode() in argv and state != "Z":
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def ceph_cluster(ceph):
    """The session's cluster (conftest.py)."""
    return ceph


def test_ceph_available():
    reason = ceph_available()
    if reason is not None:  # the other tests skip with it
        assert "missing" in reason
        pytest.skip(reason)
    for tool in ("ceph-mon", "ceph-osd", "ceph", "rbd", "rados", "ceph-authtool", "monmaptool"):
        assert shutil.which(tool), tool


def test_cluster_is_up_with_bluestore_and_a_size_1_pool(ceph_cluster):
    c = ceph_cluster
    assert c.start_seconds is not None and c.start_seconds < 90
    stat = json.loads(c.run("ceph", "osd", "stat", "--format", "json"))
    assert (stat["num_osds"], stat["num_up_osds"], stat["num_in_osds"]) == (1, 1, 1), stat
    meta = json.loads(c.run("ceph", "osd", "metadata", "0", "--format", "json"))
    assert meta["osd_objectstore"] == "bluestore", meta
    block = Path(c.dir) / "osd.0" / "block"  # a sparse file, not a device, not memstore
    assert block.is_file() and block.stat().st_size == 10 << 30
    assert block.stat().st_blocks * 512 < 1 << 30
    pools = json.loads(c.run("ceph", "osd", "pool", "ls", "detail", "--format", "json"))
    [pool] = [p for p in pools if p["pool_name"] == c.pool]
    assert pool["size"] == 1 and "rbd" in pool["application_metadata"], pool
    # the client side: messenger v2 address, cephx keyring, no admin socket
    conf = Path(c.conf).read_text()
    assert f"mon host = [v2:127.0.0.1:{c.port}]" in conf
    assert f"keyring = {c.keyring}" in conf
    assert "admin socket =\n" in conf
    assert "[client.admin]" in Path(c.keyring).read_text()
    assert c.client_id == "admin"
    assert len(str(Path(c.conf).parent / "osd.0.asok")) < 107


def test_image_size(ceph_cluster):
    c = ceph_cluster
    size = 10 * MiB + 4096
    c.create_image("size", size)
    try:
        assert c.image_size("size") == size
        assert "size" in c.list_images()
    finally:
        c.remove_image("size")
    assert "size" not in c.list_images()
    with pytest.raises(CephError, match="No such file"):
        c.image_size("size")


def test_written_data_reads_back(ceph_cluster):
    c = ceph_cluster
    size = 8 * MiB
    c.create_image("rw", size)
    try:
        model = bytearray(size)
        rng = random.Random(1)
        for offset, length in [(0, 4096), (4096 * 3 + 512, 1000), (3 * MiB - 100, MiB + 200),
                               (size - 4096, 4096)]:
            data = rng.randbytes(length)
            c.write_image("rw", offset, data)
            model[offset:offset + length] = data
        # zeroes are written too, across whole 64 KiB runs (not skipped as sparse)
        c.write_image("rw", 3 * MiB, bytes(256 * 1024))
        model[3 * MiB:3 * MiB + 256 * 1024] = bytes(256 * 1024)
        assert c.export_image("rw") == model
        with pytest.raises(ValueError, match="outside"):
            c.write_image("rw", size - 2, b"xyz")
    finally:
        c.remove_image("rw")


def test_osd_restart_keeps_data(ceph_cluster):
    c = ceph_cluster
    c.create_image("restart", 4 * MiB)
    try:
        data = random.Random(2).randbytes(4 * MiB)
        c.write_image("restart", 0, data)
        old_pid = c.osd_pid
        assert old_pid is not None

        t0 = time.monotonic()
        c.stop_osd()
        stopped = time.monotonic() - t0
        assert c.osd_pid is None
        assert not Path(f"/proc/{old_pid}").exists()
        stat = json.loads(c.run("ceph", "osd", "stat", "--format", "json"))
        assert stat["num_up_osds"] == 0, stat

        t0 = time.monotonic()
        c.start_osd()
        started = time.monotonic() - t0
        assert c.osd_pid not in (None, old_pid)
        stat = json.loads(c.run("ceph", "osd", "stat", "--format", "json"))
        assert stat["num_up_osds"] == 1, stat
        assert c.export_image("restart") == data
        print(f"stop_osd {stopped:.2f}s, start_osd {started:.2f}s")  # shown with -rP or -s

        # a crash: what was acknowledged before it is still there
        more = random.Random(3).randbytes(MiB)
        c.write_image("restart", MiB, more)
        data = data[:MiB] + more + data[2 * MiB:]
        c.stop_osd(signal.SIGKILL)
        assert c.osd_pid is None
        c.start_osd()
        assert c.export_image("restart") == data
    finally:
        c.remove_image("restart")


def test_second_cluster_side_by_side_and_teardown_leaves_nothing(ceph_cluster):
    with CephCluster() as other:
        assert other.port != ceph_cluster.port
        pids = [other.mon_pid, other.osd_pid]
        assert None not in pids and sorted(cluster_processes(other.conf)) == sorted(pids)
        other.create_image("x", MiB)
        other.write_image("x", 0, b"other")
        assert other.export_image("x")[:5] == b"other"
        directory = other.dir
        conf = other.conf
    assert other.stop_seconds is not None
    print(f"second cluster: start {other.start_seconds:.1f}s, stop {other.stop_seconds:.2f}s")
    assert cluster_processes(conf) == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert directory is not None and not directory.exists()
    # the session's cluster did not notice
    stat = json.loads(ceph_cluster.run("ceph", "osd", "stat", "--format", "json"))
    assert stat["num_up_osds"] == 1, stat
