"""The Xen attach path of the REST API on a host that is not a Xen dom0
(this one: no xenstored).  The attach through a real Xen host is in
tests/test_xen.py."""

from __future__ import annotations

from apiserver import ApiServer


def test_xen_attach_without_xen_is_a_clear_501_and_leaves_nothing(tmp_path):
    with ApiServer(state_dir=tmp_path / "state") as api, api.client() as http:
        r = http.post("/v1/volumes", json={"name": "x1", "size_bytes": 1 << 20})
        assert r.status_code == 201, r.text
        r = http.post("/v1/volumes/x1/attachments", json={"hypervisor": "xen", "domain": "g1"})
        assert r.status_code == 501, r.text
        detail = r.json()["detail"]
        assert detail.startswith("Xen attach: ") and "xenstored" in detail, detail
        assert http.get("/v1/volumes/x1/attachments").json() == []
        assert http.get("/v1/volumes/x1/export").status_code == 404
        # bad input is refused before anything is looked up
        for body in ({"hypervisor": "xen", "domain": "g1", "vdev": "sda"},
                     {"hypervisor": "xen", "domain": "a/b"},
                     {"hypervisor": "xen"}):
            r = http.post("/v1/volumes/x1/attachments", json=body)
            assert r.status_code == 422, (body, r.text)
        assert api.proc.poll() is None  # the daemon is still up


def test_the_saved_marker_names_its_worker_and_is_never_a_symlink(tmp_path):
    """The file a Xen worker leaves beside its socket while its saved domain
    is away holds the worker's pid (the daemon keeps the attachment only
    for that worker); the root worker neither writes nor reads it through a
    symlink someone planted in the sockets directory."""
    import os

    from blkserve import export

    sock = str(tmp_path / "v.xen.sock")
    assert export.read_saved_marker(sock) is None
    export._write_saved_marker(sock)
    assert export.read_saved_marker(sock) == os.getpid()
    os.unlink(export.saved_marker(sock))
    victim = tmp_path / "victim"
    victim.write_text("1234\n")
    os.symlink(victim, export.saved_marker(sock))
    assert export.read_saved_marker(sock) is None
    try:
        export._write_saved_marker(sock)
    except OSError:
        pass
    assert victim.read_text() == "1234\n"
