"""The null backing (issue 21, item 6): `blkserve export null:SIZE` serves a
disk with no storage at all (reads return zeroes, writes are dropped,
flushes and discards succeed), so `make bench` can show the protocol's own
cost per request.  The control plane refuses it unless the config allows
it with a null: pattern in allowed_backings: a volume that keeps nothing
must not be created by accident for a guest's data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_client as vc  # noqa: E402
from apiserver import REPO, serving  # noqa: E402
from test_api import assert_error, ok  # noqa: E402
from test_export import Export, start_export, stop_export  # noqa: E402

MiB = 1 << 20


def start_null(tmp_path: Path, spec: str, *args: str) -> Export:
    return start_export(tmp_path, *args, backing=spec, name="null")


def test_null_export_reads_zeroes_and_drops_writes(tmp_path):
    e = start_null(tmp_path, "null:64M", "--queues", "2")
    try:
        with e.device(queues=2) as d:
            assert d.capacity == 64 * MiB // 512
            assert d.write(8, b"\x5a" * 8192, queue=1) == vc.BLK_S_OK
            # the guest buffer is pre-filled with something else: zeroes
            # are written into it, not left as they were
            st, data = d.read(8, 8192)
            assert st == vc.BLK_S_OK and data == bytes(8192)
            assert d.flush() == vc.BLK_S_OK
            assert d.discard(0, 64) == vc.BLK_S_OK
            assert d.write_zeroes(0, 64) == vc.BLK_S_OK
            assert d.get_id().rstrip(b"\0").startswith(b"bs-")
            # the capacity still bounds every request
            st, _ = d.read(64 * MiB // 512, 512)
            assert st == vc.BLK_S_IOERR
    finally:
        assert stop_export(e) == 0, e.logtext()
    assert not list(tmp_path.glob("null:*")) and not list(Path.cwd().glob("null:*")), \
        "a file was created for the null backing"


@pytest.mark.parametrize("args, message", [
    (["null:0"], "greater than zero"),
    (["null:1000"], "multiple of 512"),
    (["null:lots"], "null:SIZE"),
    (["null:1G", "--io-engine", "io_uring"], "does no I/O"),
    (["null:1G", "--backing-identity", "1:2"], "for files and block devices"),
])
def test_bad_null_backings_are_refused(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "blkserve", "export", *args, "--socket",
                        str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=30,
                       cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "s.sock").exists()


def test_the_control_plane_refuses_null_unless_the_config_allows_it(tmp_path):
    with serving() as api, api.client() as http:
        detail = assert_error(http.post("/v1/volumes", json={"name": "n1",
                                                             "backing": "null:1G"}), 403)
        assert "allowed_backings" in detail and "stores nothing" in detail
        assert http.get("/v1/volumes/n1").status_code == 404
    cfg = tmp_path / "blkserve.toml"
    cfg.write_text('allowed_backings = ["null:*"]\n')
    with serving(config=cfg) as api, api.client() as http:
        assert_error(http.post("/v1/volumes", json={"name": "n2", "backing": "null:1G",
                                                    "size_bytes": MiB}), 422)
        assert_error(http.post("/v1/volumes", json={"name": "n2", "backing": "null:7"}), 422)
        v = ok(http.post("/v1/volumes", json={"name": "n2", "backing": "null:16M"}), 201)
        assert (v["backing"], v["backing_kind"], v["size_bytes"], v["managed"]) == \
            ("null:16M", "null", 16 * MiB, False)
        assert_error(http.patch("/v1/volumes/n2", json={"size_bytes": 32 * MiB}), 409)
        ex = ok(http.put("/v1/volumes/n2/export"), 201)
        with vc.BlkDevice(ex["socket"], queues=1, connect_retry=5.0) as d:
            assert d.write(0, b"\x11" * 4096) == vc.BLK_S_OK
            assert d.read(0, 4096) == (vc.BLK_S_OK, bytes(4096))
        ok(http.delete("/v1/volumes/n2/export"), 204)
        ok(http.delete("/v1/volumes/n2"), 204)
        assert not list(Path(api.state_dir).rglob("null:*"))


def test_bench_measures_the_null_backing_against_qsd_null_co(tmp_path):
    """`bench/run.py --files null`: blkserve's null: against qsd's null-co
    and blkif, no host run (there is no host null device), and the report's
    sections on the protocol's own cost and on blkif.  Wiring only: no
    figure is asserted."""
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "bench/run.py", "--files", "null", "--rounds", "1",
                        "--runtime", "0.3", "--ramp", "0.1", "--qd", "1", "--queues", "1",
                        "--rw", "randread", "--blkserve-poll-us", "0", "--qsd-cache", "direct",
                        "--quiet-timeout", "0.1", "--no-doc", "--output", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    (row,) = res["summary"]
    assert row["file"] == "null"
    assert set(row["systems"]) == {"blkserve-none-poll0", "qsd-direct", "blkif"}
    assert all(s["iops"] > 0 for s in row["systems"].values())
    assert "null:" in res["meta"]["commands"]["blkserve-none-poll0"]
    assert "driver=null-co" in res["meta"]["commands"]["qsd-direct"]
    assert "bench-blkif null:" in res["meta"]["commands"]["blkif"]
    assert row["ratio_cpu_blkif_vs_virtio"] is not None
    assert "The protocol's own cost" in r.stdout and "The Xen blkif transport" in r.stdout
