"""Live migration of a VM with a blkserve disk through the REST API (issue 17).

The orchestrator starts the destination QEMU (`-incoming defer`, the same
devices), asks blkserve for an `incoming` attachment of the volume there
(`migrate_from`: the source's attachment), then migrates the VM itself; once
the destination has received the VM, blkserve's watcher makes the incoming
attachment the volume's one and stops the source's export.

The QEMUs here run no guest OS (the firmware finds nothing to boot): TCG
migrations of such a VM are quick and reliable, and what is checked is the
control plane's part (where the disk goes, which export serves whom, what
is left after a completed, cancelled or failed migration).  A real guest
writing all through a migration, with its rings handed from one export to
the other, is tests/test_migration.py."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from apiserver import wait_for, worker_pids  # noqa: E402
from test_api_peers import QEMU, detail, server, start_qemu  # noqa: E402
from test_api_peers import kill as kill_qemu  # noqa: E402
from test_cli_client import run_cli  # noqa: E402

from blkserve import stats as bstats  # noqa: E402

pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

MiB = 1 << 20
SETTLE_S = 30  # the watcher looks every 5 s; a QMP round trip under load
RESTARTS = 20  # daemon kill -9 and restart during a migration


def vm(sock: Path, incoming: bool = False):
    """A QEMU with two QMP monitors: SOCK for blkserve, SOCK.test for the
    test (the orchestrator's; a QMP monitor takes one client at a time)."""
    extra = ("-qmp", f"unix:{sock}.test,server=on,wait=off")
    if incoming:
        extra += ("-incoming", "defer")
    return start_qemu(str(sock), target=True, extra=extra)


def qmp(sock: Path, opened: list):
    """The test's QMP monitor of the QEMU vm() started on SOCK (added to
    OPENED, to close before the QEMUs go)."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    m = QEMUMonitorProtocol(f"{sock}.test")
    m.connect()
    opened.append(m)
    return m


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def attachments(c, vol: str) -> list[dict]:
    r = c.get(f"/v1/volumes/{vol}/attachments")
    assert r.status_code == 200, r.text
    return r.json()


def test_migration_through_the_api_hands_the_disk_to_the_destination(tmp):
    src = vm(tmp / "src.sock")
    s = server(tmp, qmp_socket_dirs=[str(tmp)], qmp_timeout_s=10, worker_start_timeout_s=20)
    dst = None
    monitors: list = []
    try:
        with s.client(timeout=60) as c:
            assert c.post("/v1/volumes", json={"name": "m1", "size_bytes": 16 * MiB}) \
                .status_code == 201
            r = c.post("/v1/volumes/m1/attachments",
                       json={"hypervisor": "qemu", "qmp_socket": str(tmp / "src.sock")})
            assert r.status_code == 201, r.text
            a_src = r.json()
            export = c.get("/v1/volumes/m1/export").json()
            m_src = qmp(tmp / "src.sock", monitors)
            m_src.cmd("cont")  # a running VM migrates
            addr = m_src.cmd("qom-get", path=f"/machine/peripheral/{a_src['device_id']}",
                             property="addr")

            dst = vm(tmp / "dst.sock", incoming=True)
            body = {"hypervisor": "qemu", "qmp_socket": str(tmp / "dst.sock"),
                    "migrate_from": a_src["id"]}
            # where the source has the disk is where the destination gets it
            assert "bus" in detail(c.post("/v1/volumes/m1/attachments",
                                          json={**body, "bus": "hp0"}), 422)
            r = c.post("/v1/volumes/m1/attachments", json=body)
            assert r.status_code == 201, r.text
            a_dst = r.json()
            assert a_dst["state"] == "incoming" and a_dst["migrate_from"] == a_src["id"]
            assert (a_dst["device_id"], a_dst["bus"]) == (a_src["device_id"], a_src["bus"])
            m_dst = qmp(tmp / "dst.sock", monitors)
            assert m_dst.cmd("qom-get", path=f"/machine/peripheral/{a_dst['device_id']}",
                             property="addr") == addr
            # a second export of the volume serves the destination
            pids = worker_pids(s.state_dir)
            assert len(pids) == 2 and export["pid"] in pids, pids
            incoming_pid, = set(pids) - {export["pid"]}
            # the source cannot go, nor a second destination come, meanwhile
            assert "migrating" in detail(c.delete(f"/v1/volumes/m1/attachments/{a_src['id']}"),
                                         409)
            assert "already migrating" in detail(c.post("/v1/volumes/m1/attachments",
                                                        json=body), 409)
            assert {a["state"] for a in attachments(c, "m1")} == {"attached", "incoming"}
            # a daemon killed meanwhile: the next one takes both exports back
            for _ in range(RESTARTS):
                s.stop(signal.SIGKILL)
                s.start()
                assert sorted(worker_pids(s.state_dir)) == sorted(pids)
                assert {a["id"]: a["state"] for a in attachments(c, "m1")} == \
                    {a_src["id"]: "attached", a_dst["id"]: "incoming"}

            # the orchestrator migrates the VM
            mig = str(tmp / "mig.sock")
            m_dst.cmd("migrate-incoming", uri=f"unix:{mig}")
            wait_for(lambda: os.path.exists(mig), 10, "the migration socket")
            m_src.cmd("migrate", uri=f"unix:{mig}")
            wait_for(lambda: m_src.cmd("query-migrate").get("status")
                     in ("completed", "failed"), 120, "the migration to end")
            assert m_src.cmd("query-migrate")["status"] == "completed"

            # blkserve sees the VM arrive: the destination's attachment and
            # export are the volume's, the source's are gone
            wait_for(lambda: [a["state"] for a in attachments(c, "m1")] == ["attached"],
                     SETTLE_S, "the incoming attachment to take over")
            a, = attachments(c, "m1")
            assert a["id"] == a_dst["id"] and a["migrate_from"] is None
            assert a["qmp_socket"] == str(tmp / "dst.sock")
            exp = c.get("/v1/volumes/m1/export").json()
            assert exp["pid"] == incoming_pid and exp["socket"] != export["socket"], exp
            assert exp["state"] == "running"
            wait_for(lambda: not alive(export["pid"]), 15, "the source's export to stop")
            # the volume's engine stats are the new export's now
            assert bstats.read(str(s.state_dir / "stats" / "m1.stats")).pid == incoming_pid
            # the VM runs on at the destination (started with -S: the
            # orchestrator resumes it), connected to the export that came with
            # the attachment (which admitted it: both QEMUs are the VM's)
            assert m_dst.cmd("query-status")["status"] == "paused"
            m_dst.cmd("cont")
            assert m_dst.cmd("query-status")["status"] == "running"
            log, = (s.state_dir / "logs").glob("m1.in-*.log")
            assert "frontend connected" in log.read_text() and \
                "refusing" not in log.read_text(), log.read_text()
            # and it is an attachment like any other: detach stops the export
            r = c.delete(f"/v1/volumes/m1/attachments/{a['id']}", params={"timeout_s": 20})
            assert r.status_code == 204, r.text
            assert c.get("/v1/volumes/m1/export").status_code == 404
            wait_for(lambda: not alive(incoming_pid), 15, "the export to stop")
            assert "attachment.migrated" in s.log()
    finally:
        for m in monitors:
            m.close()
        s.cleanup()
        kill_qemu(src)
        if dst is not None:
            kill_qemu(dst)


def test_a_cancelled_or_dead_destination_leaves_the_source_served(tmp):
    src = vm(tmp / "src.sock")
    s = server(tmp, qmp_socket_dirs=[str(tmp)], qmp_timeout_s=10, worker_start_timeout_s=20)
    dsts = []
    try:
        with s.client(timeout=60) as c:
            c.post("/v1/volumes", json={"name": "m2", "size_bytes": 16 * MiB})
            r = c.post("/v1/volumes/m2/attachments",
                       json={"hypervisor": "qemu", "qmp_socket": str(tmp / "src.sock")})
            assert r.status_code == 201, r.text
            a_src = r.json()
            export = c.get("/v1/volumes/m2/export").json()
            for how in ("cancel", "dies"):
                dst_sock = tmp / f"dst-{how}.sock"
                dsts.append(vm(dst_sock, incoming=True))
                if how == "cancel":  # the command-line client's way
                    r = run_cli("attach", "m2", "--qmp", str(dst_sock), "--migrate-from",
                                a_src["id"], "--json", url=s.url, token=s.token)
                    assert r.returncode == 0, r.stderr
                    a_dst = json.loads(r.stdout)
                else:
                    r = c.post("/v1/volumes/m2/attachments",
                               json={"hypervisor": "qemu", "qmp_socket": str(dst_sock),
                                     "migrate_from": a_src["id"]})
                    assert r.status_code == 201, r.text
                    a_dst = r.json()
                assert a_dst["state"] == "incoming", a_dst
                incoming_pid, = set(worker_pids(s.state_dir)) - {export["pid"]}
                if how == "cancel":
                    r = c.delete(f"/v1/volumes/m2/attachments/{a_dst['id']}")
                    assert r.status_code == 204, r.text
                else:  # the destination QEMU dies: the watcher ends its export
                    kill_qemu(dsts[-1])
                    wait_for(lambda a_id=a_dst["id"]: {a["id"]: a["state"] for a in
                                                       attachments(c, "m2")}.get(a_id)
                             == "stale", SETTLE_S, "the stale destination")
                    wait_for(lambda pid=incoming_pid: not alive(pid), 15, "its export to stop")
                    r = c.delete(f"/v1/volumes/m2/attachments/{a_dst['id']}")
                    assert r.status_code == 204, r.text
                wait_for(lambda pid=incoming_pid: not alive(pid), 15, "the incoming export to stop")
                # the source is untouched: same attachment, same export process
                a, = attachments(c, "m2")
                assert (a["id"], a["state"]) == (a_src["id"], "attached")
                assert c.get("/v1/volumes/m2/export").json()["pid"] == export["pid"]
                assert worker_pids(s.state_dir) == [export["pid"]]
                peers_file = (s.state_dir / "peers" / "m2.peers").read_text()
                assert str(dsts[-1].pid) not in peers_file, peers_file
    finally:
        s.cleanup()
        kill_qemu(src)
        for d in dsts:
            kill_qemu(d)


def test_a_migration_between_two_hosts_daemons(tmp):
    """Each host has its own daemon; the volume is on storage both reach (a
    shared file here; an RBD image in production), registered with each.
    The destination host's daemon gets an `incoming` attachment naming the
    source attachment's device id and bus (as the source host's daemon
    reports them): its own export serves the destination QEMU.  Once the VM
    has moved, the destination's attachment is `attached` and the source
    host's daemon, seeing its QEMU hand the VM over (postmigrate), retires
    its attachment and export.  A destination that dies before (a cancelled
    migration) leaves the source's attachment and export as they were."""
    disk = tmp / "shared.img"
    with open(disk, "wb") as f:
        f.truncate(16 * MiB)
    keys = dict(qmp_socket_dirs=[str(tmp)], allowed_backings=[str(disk)], qmp_timeout_s=10,
                worker_start_timeout_s=20)
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    src = vm(tmp / "src.sock")
    host_a = server(tmp / "a", **keys)
    host_b = server(tmp / "b", **keys)
    monitors: list = []
    dsts = []
    try:
        with host_a.client(timeout=60) as ca, host_b.client(timeout=60) as cb:
            for c in (ca, cb):
                r = c.post("/v1/volumes", json={"name": "x1", "backing": str(disk)})
                assert r.status_code == 201, r.text
            r = ca.post("/v1/volumes/x1/attachments",
                        json={"hypervisor": "qemu", "qmp_socket": str(tmp / "src.sock")})
            assert r.status_code == 201, r.text
            a_src = r.json()
            export_a = ca.get("/v1/volumes/x1/export").json()
            m_src = qmp(tmp / "src.sock", monitors)
            m_src.cmd("cont")
            addr = m_src.cmd("qom-get", path=f"/machine/peripheral/{a_src['device_id']}",
                             property="addr")

            # first a destination that dies before the migration
            dsts.append(vm(tmp / "dead.sock", incoming=True))
            body = {"hypervisor": "qemu", "qmp_socket": str(tmp / "dead.sock"),
                    "incoming": True, "device_id": a_src["device_id"], "bus": a_src["bus"]}
            r = cb.post("/v1/volumes/x1/attachments", json=body)
            assert r.status_code == 201, r.text
            kill_qemu(dsts[-1])
            wait_for(lambda: [a["state"] for a in attachments(cb, "x1")] == ["stale"],
                     SETTLE_S, "the dead destination to go stale")
            ok_del = cb.delete(f"/v1/volumes/x1/attachments/{r.json()['id']}")
            assert ok_del.status_code == 204, ok_del.text
            a, = attachments(ca, "x1")
            assert (a["id"], a["state"]) == (a_src["id"], "attached")
            assert alive(export_a["pid"])

            # refused: no device id; both kinds of migration at once
            dst_sock = tmp / "dst.sock"
            dsts.append(vm(dst_sock, incoming=True))
            body["qmp_socket"] = str(dst_sock)
            assert "device_id" in detail(cb.post("/v1/volumes/x1/attachments", json={
                k: v for k, v in body.items() if k != "device_id"}), 422)
            assert "migrate_from" in detail(cb.post("/v1/volumes/x1/attachments", json={
                **body, "migrate_from": "0badc0de"}), 422)
            # the command-line client's way
            r = run_cli("attach", "x1", "--qmp", str(dst_sock), "--incoming", "--device-id",
                        a_src["device_id"], "--bus", a_src["bus"], "--json",
                        url=host_b.url, token=host_b.token)
            assert r.returncode == 0, r.stderr
            a_dst = json.loads(r.stdout)
            assert a_dst["state"] == "incoming" and a_dst["migrate_from"] is None
            assert (a_dst["device_id"], a_dst["bus"]) == (a_src["device_id"], a_src["bus"])
            m_dst = qmp(dst_sock, monitors)
            assert m_dst.cmd("qom-get", path=f"/machine/peripheral/{a_dst['device_id']}",
                             property="addr") == addr
            export_b = cb.get("/v1/volumes/x1/export").json()
            assert export_b["state"] == "running"

            mig = str(tmp / "mig.sock")
            m_dst.cmd("migrate-incoming", uri=f"unix:{mig}")
            wait_for(lambda: os.path.exists(mig), 10, "the migration socket")
            m_src.cmd("migrate", uri=f"unix:{mig}")
            wait_for(lambda: m_src.cmd("query-migrate").get("status")
                     in ("completed", "failed"), 120, "the migration to end")
            assert m_src.cmd("query-migrate")["status"] == "completed"

            # host B: the attachment is the volume's; host A: retired
            wait_for(lambda: [a["state"] for a in attachments(cb, "x1")] == ["attached"],
                     SETTLE_S, "host B's attachment to take over")
            wait_for(lambda: attachments(ca, "x1") == [], SETTLE_S,
                     "host A to retire the source attachment")
            wait_for(lambda: ca.get("/v1/volumes/x1/export").status_code == 404, 15,
                     "host A's export to stop")
            wait_for(lambda: not alive(export_a["pid"]), 15, "host A's worker to exit")
            assert cb.get("/v1/volumes/x1/export").json()["pid"] == export_b["pid"]
            assert "attachment.migrated_away" in host_a.log()
            assert "attachment.migrated" in host_b.log()
            m_dst.cmd("cont")
            assert m_dst.cmd("query-status")["status"] == "running"
    finally:
        for m in monitors:
            m.close()
        host_a.cleanup()
        host_b.cleanup()
        kill_qemu(src)
        for d in dsts:
            kill_qemu(d)
