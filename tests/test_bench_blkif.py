"""`blkserve bench-blkif` (issue 21, item 5): the blkif transport driven
without Xen by an in-process blkfront, on a file and on a null backing.
Functional checks only: no figure is asserted (make bench measures)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MiB = 1 << 20


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blkserve", "bench-blkif", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_random_writes_reach_the_file_through_blkif(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(16 * MiB))
    r = bench(str(img), "--rw", "randwrite", "--runtime", "0.5", "--iodepth", "8",
              "--cache", "writeback", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["transport"] == "blkif" and res["errors"] == 0
    assert res["write_ios"] > 0 and res["read_ios"] == 0
    assert res["backend_cpu_s"] > 0 and res["cpu_s_per_mreq"] > 0
    # the frontend's pages hold 0x5a: written blocks of the file do too
    data = img.read_bytes()
    assert data.count(b"\x5a" * 4096) > 0 and len(data) == 16 * MiB


@pytest.mark.parametrize("rw", ["randread", "randrw"])
def test_null_backing_over_blkif(rw):
    r = bench("null:64M", "--rw", rw, "--runtime", "0.3", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["ios"] > 0 and res["errors"] == 0 and res["sync_io"] is True
    if rw == "randrw":
        assert res["read_ios"] > 0 and res["write_ios"] > 0


@pytest.mark.parametrize("args, message", [
    (["null:64M", "--iodepth", "33"], "--iodepth"),
    (["null:64M", "--bs", "1000"], "multiple of 512"),
    (["null:64M", "--bs", "64k"], "at most"),
    (["null:64M", "--backend-cpu", "4096"], "--backend-cpu"),
    (["/nonexistent/disk.img"], "nonexistent"),
])
def test_bad_arguments_are_one_line_and_status_2(args, message):
    r = bench(*args, "--runtime", "0.1")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
