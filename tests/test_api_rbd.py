"""Volumes on Ceph RBD through the REST API, against a real `blkserve
serve` configured with `[storage] backend = "rbd"` and the session's real
cluster (tests/ceph.py): managed volumes are images in the pool (created,
served, resized online, deleted), external rbd:POOL/IMAGE backings are
allow-listed like files, GET shows the backing kind, the metrics cover
RBD volumes, and a cluster that does not answer (or refuses the key) is a
502 within the configured bound, never a hung API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from .apiserver import ApiServer
except ImportError:
    from apiserver import ApiServer

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def ok(r, status=200):
    assert r.status_code == status, f"{r.status_code}: {r.text}"
    return r.json() if r.content else None


def config(tmp_path: Path, ceph, **storage) -> Path:
    st = {"backend": "rbd", "pool": ceph.pool, "conf": ceph.conf, "keyring": ceph.keyring,
          "connect_timeout_s": 5, "timeout_s": 30, **storage}
    lines = [f'allowed_backings = ["rbd:{ceph.pool}/ext-*"]', "[storage]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in st.items()]
    p = tmp_path / "blkserve.toml"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture(scope="module")
def srv(ceph, tmp_path_factory):
    s = ApiServer(config=config(tmp_path_factory.mktemp("rbdcfg"), ceph))
    s.start()
    yield s
    s.cleanup()


@pytest.fixture
def http(srv):
    with srv.client() as c:
        yield c


def bench(sock: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "blkserve", "bench", "--socket", sock, "--json",
                        "--runtime", "2", "--size", "16M", *args],
                       capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["errors"] == 0
    return out


def test_managed_rbd_volume_lifecycle(ceph, http):
    """POST makes an image in the pool; the export serves it (bench
    --verify); a PATCH grows it online (the running worker, same pid, serves
    the new size); the metrics have the volume; DELETE removes the image."""
    v = ok(http.post("/v1/volumes", json={"name": "r1", "size_bytes": 64 * MiB,
                                          "queues": 2}), 201)
    assert v["backing"] == f"rbd:{ceph.pool}/r1" and v["backing_kind"] == "rbd"
    assert v["managed"] is True
    assert ceph.image_size("r1") == 64 * MiB
    sock = ok(http.put("/v1/volumes/r1/export"), 201)["socket"]
    bench(sock, "--rw", "randrw", "--verify", "--queues", "2")
    pid = ok(http.get("/v1/volumes/r1"))["export"]["pid"]
    v = ok(http.patch("/v1/volumes/r1", json={"size_bytes": 96 * MiB}))
    assert v["size_bytes"] == 96 * MiB and ceph.image_size("r1") == 96 * MiB
    deadline = time.monotonic() + 20
    while True:   # the worker re-reads the size on SIGHUP
        out = bench(sock, "--rw", "randread", "--runtime", "1")
        if out["backend"]["capacity"] == 96 * MiB or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert out["backend"]["capacity"] == 96 * MiB, out["backend"]
    assert ok(http.get("/v1/volumes/r1"))["export"]["pid"] == pid
    metrics = http.get("/metrics").text
    assert 'blkserve_requests_total{' in metrics and 'volume="r1"' in metrics
    ok(http.delete("/v1/volumes/r1/export"), 204)
    ok(http.delete("/v1/volumes/r1"), 204)
    assert "r1" not in ceph.list_images()


def test_external_rbd_backings_are_allow_listed(ceph, http):
    """An existing image matching allowed_backings is registered with its
    size (a wrong size_bytes is 422); one that does not match is 403; a
    missing one is created with size_bytes; deleting the volume leaves an
    external image in place; a bad spec is 422 and one image cannot back
    two volumes (409)."""
    ceph.create_image("ext-a", 32 * MiB)
    try:
        bad = http.post("/v1/volumes", json={"name": "e0", "backing": f"rbd:{ceph.pool}/ext-a",
                                             "size_bytes": 64 * MiB})
        assert bad.status_code == 422 and "does not match" in bad.text
        v = ok(http.post("/v1/volumes", json={"name": "e1",
                                              "backing": f"rbd:{ceph.pool}/ext-a"}), 201)
        assert v["size_bytes"] == 32 * MiB and v["managed"] is False
        dup = http.post("/v1/volumes", json={"name": "e2", "backing": f"rbd:{ceph.pool}/ext-a"})
        assert dup.status_code == 409
        r = http.post("/v1/volumes", json={"name": "e3", "backing": f"rbd:{ceph.pool}/other"})
        assert r.status_code == 403 and "allowed_backings" in r.text
        r = http.post("/v1/volumes", json={"name": "e4", "backing": "rbd:nopool"})
        assert r.status_code == 422 and "rbd:POOL/IMAGE" in r.text
        v = ok(http.post("/v1/volumes", json={"name": "e5", "backing": f"rbd:{ceph.pool}/ext-new",
                                              "size_bytes": 8 * MiB}), 201)
        assert ceph.image_size("ext-new") == 8 * MiB
        ok(http.delete("/v1/volumes/e1"), 204)
        ok(http.delete("/v1/volumes/e5"), 204)
        assert "ext-a" in ceph.list_images() and "ext-new" in ceph.list_images()
    finally:
        ceph.remove_image("ext-a")
        if "ext-new" in ceph.list_images():
            ceph.remove_image("ext-new")


def test_a_managed_image_that_exists_already_is_409(ceph, http):
    ceph.create_image("r9", 4 * MiB)
    try:
        r = http.post("/v1/volumes", json={"name": "r9", "size_bytes": 4 * MiB})
        assert r.status_code == 409 and "belongs to no volume" in r.text
    finally:
        ceph.remove_image("r9")


@pytest.mark.parametrize("case", ["monitor", "key", "pool"])
def test_a_cluster_that_does_not_answer_is_a_bounded_error(ceph, tmp_path, case):
    """Monitors nobody listens on or a wrong key: POST /v1/volumes answers
    502 within the bound (connect_timeout_s = 5), and the API stays
    responsive meanwhile; an unknown pool is 422."""
    storage = {}
    if case == "monitor":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        text = Path(ceph.conf).read_text().splitlines()
        conf = tmp_path / "nomon.conf"
        conf.write_text("\n".join(f"mon host = v2:127.0.0.1:{port}"
                                  if ln.strip().startswith("mon host") else ln
                                  for ln in text) + "\n")
        storage["conf"] = str(conf)
    elif case == "key":
        bad = tmp_path / "bad.keyring"
        bad.write_text("[client.admin]\n\tkey = AQBmT0VlAAAAABAAnv9fRGJbm3qOIEszpPNDyg==\n")
        storage["keyring"] = str(bad)
    else:
        storage["pool"] = "nosuchpool"
    s = ApiServer(config=config(tmp_path, ceph, **storage))
    s.start()
    try:
        with s.client() as http:
            import threading
            result = {}

            def post():
                t0 = time.monotonic()
                result["r"] = http.post("/v1/volumes", json={"name": "x1", "size_bytes": MiB})
                result["took"] = time.monotonic() - t0

            t = threading.Thread(target=post)
            t.start()
            # the API answers other requests while the cluster call waits
            with s.client() as other:
                assert other.get("/healthz").status_code == 200
            t.join(60)
            assert not t.is_alive()
            r = result["r"]
            want = 422 if case == "pool" else 502
            assert r.status_code == want, r.text
            assert ("no such pool" if case == "pool" else "cannot connect") in r.text, r.text
            assert result["took"] < 30, result["took"]
            assert ok(http.get("/v1/volumes")) == []
    finally:
        s.cleanup()


def test_two_daemons_one_volume(ceph, tmp_path):
    """Two `blkserve serve` daemons with their own state dirs (as on two
    hosts) on one pool: A owns the managed volume, B registers the same
    image as an external backing; both export it (a migration's source and
    destination).  B's rings are refused while A's run, and once A's stop
    (the source's last GET_VRING_BASE) B serves A's data."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import vhost_client as vc

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ApiServer(config=config(tmp_path / "a", ceph))
    cfg = config(tmp_path / "b", ceph)    # B may use A's images as external backings
    cfg.write_text(cfg.read_text().replace("/ext-*", "/two-*"))
    b = ApiServer(config=cfg)
    a.start()
    b.start()
    try:
        with a.client() as ha, b.client() as hb:
            ok(ha.post("/v1/volumes", json={"name": "two-1", "size_bytes": 16 * MiB}), 201)
            spec = f"rbd:{ceph.pool}/two-1"
            v = ok(hb.post("/v1/volumes", json={"name": "two-1", "backing": spec}), 201)
            assert v["managed"] is False and v["size_bytes"] == 16 * MiB
            sock_a = ok(ha.put("/v1/volumes/two-1/export"), 201)["socket"]
            sock_b = ok(hb.put("/v1/volumes/two-1/export"), 201)["socket"]
            da = vc.BlkDevice(sock_a, queues=1, connect_retry=2.0)
            data = os.urandom(8192)
            assert da.write(64, data) == vc.BLK_S_OK
            with pytest.raises(vc.VhostError):
                db = vc.BlkDevice(sock_b, queues=1, connect_retry=2.0)
                db.read(64, 8192)
            da.close()
            db = vc.BlkDevice(sock_b, queues=1, connect_retry=2.0)
            try:
                assert db.read(64, 8192) == (vc.BLK_S_OK, data)
            finally:
                db.close()
            ok(hb.delete("/v1/volumes/two-1/export"), 204)
            ok(hb.delete("/v1/volumes/two-1"), 204)
            assert "two-1" in ceph.list_images()   # B's was external: left
            ok(ha.delete("/v1/volumes/two-1/export"), 204)
            ok(ha.delete("/v1/volumes/two-1"), 204)
            assert "two-1" not in ceph.list_images()
    finally:
        a.cleanup()
        b.cleanup()
