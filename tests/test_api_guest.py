"""Hot-attach through the REST API to a running, disk-less QEMU guest (q35,
two empty pcie-root-ports, a QMP socket of its own for blkserve), then
detach; the guest sees the disk come and go without a reboot.

One guest and one `blkserve serve` serve every check, in file order: attach
and fio verify, a second disk on the second port, no free port left, a QEMU
error passed through, a daemon restart (kill -9) that keeps the attachment and
the worker, a detach timeout that leaves the attachment consistent, detach,
and finally a VM that disappears, leaving a stale attachment to delete.
"""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from blkserve import stats

try:
    from . import guest as g
    from .apiserver import ApiServer, wait_for, wait_inflight, worker_pids
except ImportError:
    import guest as g
    from apiserver import ApiServer, wait_for, wait_inflight, worker_pids

MiB = 1 << 20
VOL1_SIZE = 256 * MiB
VOL2_SIZE = 64 * MiB


class Ctx:
    def __init__(self, vm: g.Guest, api: ApiServer, qmp: str):
        self.vm, self.api, self.qmp = vm, api, qmp
        self.http = api.client()
        self.att: dict[str, str] = {}
        self.engine = None

    def fio_engine(self) -> str:
        if self.engine is None:
            engines = self.vm.check("/usr/bin/fio --enghelp", timeout=60)
            self.engine = "libaio" if re.search(r"\blibaio\b", engines) else "psync"
        return self.engine

    def fio_verify(self, dev: str, size: str, bs: str = "4k", offset: str = "0") -> str:
        code, out = self.vm.run(
            f"/usr/bin/fio --name=v --filename=/dev/{dev} --direct=1 "
            f"--ioengine={self.fio_engine()} --iodepth=8 --rw=randwrite --bs={bs} --size={size} "
            f"--offset={offset} --verify=crc32c --do_verify=1 --verify_fatal=1 "
            f"--verify_state_save=0 --randrepeat=0", timeout=600)
        assert code == 0, f"fio failed (exit {code}):\n{out}\n{self.api.log()}"
        assert re.search(r"err=\s*0\b", out), out
        return out

    def disk_by_serial(self, serial: str) -> str | None:
        out = self.vm.check("for d in /sys/block/vd*; do [ -e $d ] && "
                            "echo $(basename $d) $(cat $d/serial); done; true")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == serial:
                return parts[0]
        return None

    def wait_disk(self, serial: str, present: bool, timeout: float = 60) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dev = self.disk_by_serial(serial)
            if (dev is not None) == present:
                return dev
            time.sleep(0.5)
        raise AssertionError(f"disk {serial} {'never appeared' if present else 'never left'}"
                             f":\n{self.vm.check('ls /sys/block; dmesg | tail -20')}")


@pytest.fixture(scope="module")
def ctx(guest_image, tmp_path_factory, request):
    # RBD volumes (test_rbd_volume_in_the_guest) on the session's Ceph
    # cluster, where there is one: its client settings and an allow-list
    config = None
    try:
        ceph = request.getfixturevalue("ceph")
    except pytest.skip.Exception:
        ceph = None
    if ceph is not None:
        config = tmp_path_factory.mktemp("api-guest-cfg") / "blkserve.toml"
        config.write_text(f'allowed_backings = ["rbd:{ceph.pool}/guest-*"]\n[storage]\n'
                          f'conf = "{ceph.conf}"\nkeyring = "{ceph.keyring}"\n'
                          f'pool = "{ceph.pool}"\n')
    api = ApiServer(config=config).start()
    sockdir = g.short_socket_dir("bs-apiqmp-")
    qmp = str(sockdir / "api-qmp.sock")  # a second monitor, only for blkserve
    try:
        vm = g.Guest([], image=guest_image, hotplug_ports=2,
                     extra_args=["-qmp", f"unix:{qmp},server=on,wait=off"],
                     log_dir=tmp_path_factory.mktemp("api-guest"))
    except g.GuestUnavailable as e:
        api.cleanup()
        pytest.skip(str(e))
    try:
        with vm:
            yield Ctx(vm, api, qmp)
    finally:
        api.cleanup()


def _ok(r, status: int) -> dict:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} " \
                                    f"{r.text}"
    return r.json() if r.content else {}


def test_guest_starts_without_disks(ctx):
    assert ctx.vm.check("ls /sys/block | grep vd || true").strip() == ""
    _ok(ctx.http.post("/v1/volumes", json={"name": "hot1", "size_bytes": VOL1_SIZE,
                                           "queues": 2}), 201)
    _ok(ctx.http.post("/v1/volumes", json={"name": "hot2", "size_bytes": VOL2_SIZE}), 201)
    _ok(ctx.http.post("/v1/volumes", json={"name": "hot3", "size_bytes": VOL2_SIZE}), 201)


def test_hot_attach_disk_appears(ctx):
    att = _ok(ctx.http.post("/v1/volumes/hot1/attachments",
                            json={"hypervisor": "qemu", "qmp_socket": ctx.qmp}), 201)
    assert att["state"] == "attached" and att["bus"] == "hp0", att
    ctx.att["hot1"] = att["id"]
    dev = ctx.wait_disk("hot1", present=True)
    assert int(ctx.vm.check(f"cat /sys/block/{dev}/size")) * 512 == VOL1_SIZE
    # two queues as the volume asked
    assert ctx.vm.check(f"ls /sys/block/{dev}/mq").split() == ["0", "1"]
    vol = _ok(ctx.http.get("/v1/volumes/hot1"), 200)
    assert vol["export"]["state"] == "running" and not vol["export"]["explicit"]
    assert [a["id"] for a in vol["attachments"]] == [att["id"]]
    # the device sits on the port blkserve chose, as QEMU reports it
    pci = ctx.vm.qmp("query-pci")
    ports = {d.get("qdev_id"): d for b in pci for d in b["devices"]}
    assert [d["qdev_id"] for d in ports["hp0"]["pci_bridge"]["devices"]] == [att["device_id"]]


def test_fio_verify_on_hot_attached_disk(ctx):
    dev = ctx.disk_by_serial("hot1")
    ctx.fio_verify(dev, "32M", bs="4k")
    ctx.fio_verify(dev, "32M", bs="64k", offset="64M")


def test_second_volume_takes_second_port_then_none_is_free(ctx):
    att = _ok(ctx.http.post("/v1/volumes/hot2/attachments",
                            json={"hypervisor": "qemu", "qmp_socket": ctx.qmp}), 201)
    assert att["bus"] == "hp1"
    ctx.att["hot2"] = att["id"]
    dev = ctx.wait_disk("hot2", present=True)
    ctx.fio_verify(dev, "16M")
    r = ctx.http.post("/v1/volumes/hot3/attachments",
                      json={"hypervisor": "qemu", "qmp_socket": ctx.qmp})
    assert r.status_code == 409 and "pcie-root-port" in r.json()["detail"], r.text
    # the export started for the failed attach is not left behind
    assert _ok(ctx.http.get("/v1/volumes/hot3"), 200)["export"] is None
    # already attached to this VM
    r = ctx.http.post("/v1/volumes/hot1/attachments",
                      json={"hypervisor": "qemu", "qmp_socket": ctx.qmp})
    assert r.status_code == 409, r.text


def test_qemu_error_is_502_with_qemus_message(ctx):
    r = ctx.http.post("/v1/volumes/hot3/attachments",
                      json={"hypervisor": "qemu", "qmp_socket": ctx.qmp, "bus": "nosuchbus"})
    assert r.status_code == 502, r.text
    assert "nosuchbus" in r.json()["detail"] and "device_add" in r.json()["detail"], r.text
    assert _ok(ctx.http.get("/v1/volumes/hot3"), 200)["export"] is None
    # the chardev added before device_add failed was removed again
    chardevs = [c["label"] for c in ctx.vm.qmp("query-chardev")]
    assert not [c for c in chardevs if c.startswith("blkserve-")
                and c.removesuffix("-chr").removeprefix("blkserve-")
                not in ctx.att.values()], chardevs


def test_daemon_restart_keeps_attachments_and_workers(ctx):
    before = _ok(ctx.http.get("/v1/volumes/hot1"), 200)
    pid = before["export"]["pid"]
    ctx.api.stop(signal.SIGKILL)
    assert pid in worker_pids(ctx.api.state_dir)  # the worker outlived the daemon
    dev = ctx.disk_by_serial("hot1")
    ctx.fio_verify(dev, "8M", offset="128M")  # guest I/O with no daemon at all
    ctx.api.start()
    after = _ok(ctx.http.get("/v1/volumes/hot1"), 200)
    assert after["export"]["pid"] == pid and after["export"]["state"] == "running", after
    assert after["export"]["restarts"] == 0
    assert after["attachments"] == before["attachments"]
    ctx.fio_verify(dev, "8M", offset="160M")


def test_online_grow_seen_by_guest(ctx):
    """PATCH grows the file; the (adopted) worker serves the new size and QEMU,
    told over the backend channel, updates the guest's config space: the
    guest sees the new capacity without a reboot and writes past the old end."""
    dev = ctx.disk_by_serial("hot1")
    new_size = VOL1_SIZE + 128 * MiB
    vol = _ok(ctx.http.patch("/v1/volumes/hot1", json={"size_bytes": new_size}), 200)
    assert vol["size_bytes"] == new_size
    deadline = time.monotonic() + 30
    sectors = 0
    while time.monotonic() < deadline:
        sectors = int(ctx.vm.check(f"cat /sys/block/{dev}/size"))
        if sectors * 512 == new_size:
            break
        time.sleep(0.5)
    assert sectors * 512 == new_size, (sectors, ctx.vm.check("dmesg | tail -5"),
                                       ctx.api.log())
    ctx.fio_verify(dev, "64M", offset=str(VOL1_SIZE))  # entirely past the old end
    # shrinking under an attached guest is refused
    r = ctx.http.patch("/v1/volumes/hot1", json={"size_bytes": VOL1_SIZE})
    assert r.status_code == 409, r.text


def _fio_iops(ctx: Ctx, dev: str, seconds: int, background: bool = False) -> float | None:
    cmd = (f"/usr/bin/fio --name=q --filename=/dev/{dev} --direct=1 "
           f"--ioengine={ctx.fio_engine()} "
           f"--iodepth=16 --rw=randread --bs=4k --size=64M --time_based --ramp_time=1 "
           f"--runtime={seconds}")
    if background:
        ctx.vm.check(f"rm -f /tmp/q.out; setsid sh -c '{cmd} > /tmp/q.out 2>&1; "
                     "echo fio-rc=$? >> /tmp/q.out' > /dev/null 2>&1 < /dev/null")
        return None
    code, out = ctx.vm.run(cmd, timeout=120)
    assert code == 0, out
    return _parse_iops(out)


def _parse_iops(out: str) -> float:
    m = re.search(r"IOPS=([\d.]+)(k?)", out)
    assert m, out
    return float(m.group(1)) * (1000 if m.group(2) else 1)


def test_qos_limit_is_seen_by_the_guest_and_changes_live(ctx):
    """PATCH puts a limit on the attached volume's running export: the
    guest's fio sees it; a second PATCH while fio runs changes its rate
    midway; `{"qos": null}` lifts it.  The worker is never restarted."""
    dev = ctx.disk_by_serial("hot1")
    pid = _ok(ctx.http.get("/v1/volumes/hot1"), 200)["export"]["pid"]
    free = _fio_iops(ctx, dev, 3)
    assert free > 3 * 600, f"the guest cannot outrun the limits tested here: {free} IOPS"
    _ok(ctx.http.patch("/v1/volumes/hot1", json={"qos": {"iops_read": 200}}), 200)
    got = _fio_iops(ctx, dev, 5)
    assert abs(got - 200) / 200 <= 0.1, got
    # 4 s at 200, then 4 s at 600: about 400 on average.  The run has begun
    # once the export holds requests again; then fio's 1 s ramp and half of
    # its measured 8 s go by before the change
    stats_file = str(ctx.api.state_dir / "stats" / "hot1.stats")

    def throttled() -> int:
        return sum(q.throttled for q in stats.read(stats_file).queues)
    before = throttled()
    _fio_iops(ctx, dev, 8, background=True)
    wait_for(lambda: throttled() > before, 30, "the guest's fio to reach the limit")
    time.sleep(1 + 4)
    _ok(ctx.http.patch("/v1/volumes/hot1", json={"qos": {"iops_total": 600}}), 200)
    out = ""
    deadline = time.monotonic() + 60
    while "fio-rc=" not in out and time.monotonic() < deadline:
        time.sleep(0.5)
        out = ctx.vm.check("cat /tmp/q.out 2>/dev/null; true")
    assert "fio-rc=0" in out, out
    mixed = _parse_iops(out)
    assert 300 < mixed < 500, mixed
    _ok(ctx.http.patch("/v1/volumes/hot1", json={"qos": None}), 200)
    assert _fio_iops(ctx, dev, 3) > 3 * 600
    assert _ok(ctx.http.get("/v1/volumes/hot1"), 200)["export"]["pid"] == pid
    assert "I/O error" not in ctx.vm.check("/bin/dmesg")


KILL_TRIES = 10


def test_worker_kill9_mid_fio_guest_sees_no_error(ctx):
    """kill -9 of the export worker while the guest's fio verify runs with
    requests in flight (its stats block says so first): the supervisor
    restarts it on the same socket, QEMU (chardev reconnect=1) reconnects
    and hands back the inflight region, the new worker redoes what was in
    flight, and fio finishes with no I/O or verify error.  Repeated until a
    kill caught requests that the next worker resubmitted (a request
    completing between the look and the kill is not left in flight)."""
    _kill9_under_fio(ctx, "hot1")


def _kill9_under_fio(ctx: Ctx, volume: str) -> None:
    dev = ctx.disk_by_serial(volume)
    stats_file = ctx.api.state_dir / "stats" / f"{volume}.stats"
    log_path = ctx.api.state_dir / "logs" / f"{volume}.log"
    resubmitted = 0
    for attempt in range(KILL_TRIES):
        ctx.vm.check("/bin/dmesg -c > /dev/null; rm -f /tmp/k.out")
        # in a session of its own: a background job of the control shell would
        # take the shell down when it ends
        ctx.vm.check(
            f"setsid sh -c '/usr/bin/fio --name=k --filename=/dev/{dev} --direct=1 "
            f"--ioengine={ctx.fio_engine()} --iodepth=16 --rw=randwrite --bs=4k --size=16M "
            f"--verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 "
            f"--randrepeat=0 > /tmp/k.out 2>&1; echo fio-rc=$? >> /tmp/k.out' "
            f"> /dev/null 2>&1 < /dev/null")
        old = _ok(ctx.http.get(f"/v1/volumes/{volume}/export"), 200)
        assert wait_inflight(stats_file, 60), f"attempt {attempt}: no request ever in flight"
        log_from = log_path.stat().st_size
        os.kill(old["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            e = _ok(ctx.http.get(f"/v1/volumes/{volume}/export"), 200)
            if e["pid"] not in (None, old["pid"]) and e["state"] == "running":
                break
            time.sleep(0.1)
        assert e["pid"] != old["pid"] and e["state"] == "running", e
        assert e["restarts"] == old["restarts"] + 1 and e["socket"] == old["socket"]
        deadline = time.monotonic() + 600
        out = ""
        while time.monotonic() < deadline:
            out = ctx.vm.check("cat /tmp/k.out 2>/dev/null; true")
            if "fio-rc=" in out:
                break
            time.sleep(1)
        assert "fio-rc=0" in out, out
        assert re.search(r"err=\s*0\b", out), out
        dmesg = ctx.vm.check("/bin/dmesg")
        assert "I/O error" not in dmesg and "blk_update_request" not in dmesg, dmesg
        # the new worker logs what it redid within a second of starting
        deadline = time.monotonic() + 3
        m = None
        while m is None and time.monotonic() < deadline:
            log = log_path.read_bytes()[log_from:].decode(errors="replace")
            m = re.search(r"(\d+) request\(s\) a previous backend left in flight, "
                          r"resubmitted", log)
            time.sleep(0.2)
        if m:
            resubmitted = int(m.group(1))
            break
    assert resubmitted > 0, f"no kill in {KILL_TRIES} left a request in flight to redo"


def test_detach_timeout_leaves_consistent_state_then_retry(ctx):
    att = ctx.att["hot2"]
    r = ctx.http.delete(f"/v1/volumes/hot2/attachments/{att}", params={"timeout_s": 0.001})
    if r.status_code == 204:
        pytest.skip("the guest released the disk within 1 ms; no timeout to observe")
    assert r.status_code == 504, r.text
    a = _ok(ctx.http.get(f"/v1/volumes/hot2/attachments/{att}"), 200)
    assert a["state"] == "detaching" and a["error"], a
    assert _ok(ctx.http.get("/v1/volumes/hot2"), 200)["export"]["state"] == "running"
    _ok(ctx.http.delete(f"/v1/volumes/hot2/attachments/{att}"), 204)
    ctx.wait_disk("hot2", present=False)
    assert _ok(ctx.http.get("/v1/volumes/hot2"), 200)["export"] is None
    ctx.att.pop("hot2")


def test_detach_guest_sees_disk_go(ctx):
    vol = _ok(ctx.http.get("/v1/volumes/hot1"), 200)
    sock, pid = vol["export"]["socket"], vol["export"]["pid"]
    _ok(ctx.http.delete(f"/v1/volumes/hot1/attachments/{ctx.att.pop('hot1')}"), 204)
    ctx.wait_disk("hot1", present=False)
    assert ctx.vm.check("ls /sys/block | grep vd || true").strip() == ""
    vol = _ok(ctx.http.get("/v1/volumes/hot1"), 200)
    assert vol["attachments"] == [] and vol["export"] is None
    assert not os.path.exists(sock)
    assert pid not in worker_pids(ctx.api.state_dir)
    assert not [c["label"] for c in ctx.vm.qmp("query-chardev")
                if c["label"].startswith("blkserve-")]
    # the port is free again: re-attach and read back what fio wrote earlier
    att = _ok(ctx.http.post("/v1/volumes/hot1/attachments",
                            json={"hypervisor": "qemu", "qmp_socket": ctx.qmp}), 201)
    ctx.att["hot1"] = att["id"]
    dev = ctx.wait_disk("hot1", present=True)
    ctx.vm.check(f"/bin/dd if=/dev/{dev} of=/dev/null bs=1M count=4 iflag=direct")


def test_rbd_volume_in_the_guest(ctx, request):
    """A volume on the session's Ceph cluster (an allow-listed rbd: backing,
    2 queues) hot-attached to the running guest: fio crc32c verify from 4k
    to 128k, WRITE_ZEROES (blkdiscard -z) reads back zeroes and DISCARD is
    accepted, mkfs.ext4 then e2fsck -fn, kill -9 of its worker under fio
    verify (the next worker redoes what librbd had in flight), a daemon
    kill -9 and restart that adopts the worker, online grow, detach."""
    try:
        ceph = request.getfixturevalue("ceph")
    except pytest.skip.Exception as e:
        pytest.skip(f"no Ceph cluster for an RBD volume: {e}")
    spec = f"rbd:{ceph.pool}/guest-rbd1"
    v = _ok(ctx.http.post("/v1/volumes", json={"name": "rbd1", "backing": spec,
                                               "size_bytes": VOL1_SIZE, "queues": 2}), 201)
    assert v["backing_kind"] == "rbd" and not v["managed"]
    try:
        att = _ok(ctx.http.post("/v1/volumes/rbd1/attachments",
                                json={"hypervisor": "qemu", "qmp_socket": ctx.qmp}), 201)
        dev = ctx.wait_disk("rbd1", present=True)
        assert int(ctx.vm.check(f"cat /sys/block/{dev}/size")) * 512 == VOL1_SIZE
        assert ctx.vm.check(f"ls /sys/block/{dev}/mq").split() == ["0", "1"]
        ctx.fio_verify(dev, "16M", bs="4k")
        ctx.fio_verify(dev, "32M", bs="128k", offset="32M")
        ctx.fio_verify(dev, "16M", bs="4k --bsrange=4k-128k", offset="64M")
        # WRITE_ZEROES reads back zeroes; DISCARD (a hint to librbd) is accepted
        ctx.vm.check(f"/sbin/blkdiscard -z -o 33554432 -l 1048576 /dev/{dev}")
        nonzero = ctx.vm.check(f"/bin/dd if=/dev/{dev} bs=1M skip=32 count=1 iflag=direct "
                               "2>/dev/null | tr -d '\\000' | wc -c").strip()
        assert nonzero == "0", nonzero
        ctx.vm.check(f"/sbin/blkdiscard -o 41943040 -l 4194304 /dev/{dev}")
        _kill9_under_fio(ctx, "rbd1")
        pid = _ok(ctx.http.get("/v1/volumes/rbd1"), 200)["export"]["pid"]
        ctx.api.stop(signal.SIGKILL)
        ctx.fio_verify(dev, "8M", offset="96M")   # no daemon: the worker serves on
        ctx.api.start()
        after = _ok(ctx.http.get("/v1/volumes/rbd1"), 200)
        assert after["export"]["pid"] == pid and after["export"]["state"] == "running"
        _ok(ctx.http.patch("/v1/volumes/rbd1", json={"size_bytes": VOL1_SIZE + 64 * MiB}), 200)
        wait_for(lambda: int(ctx.vm.check(f"cat /sys/block/{dev}/size")) * 512
                 == VOL1_SIZE + 64 * MiB, 30, "the guest to see the grown RBD volume")
        ctx.vm.check(f"/sbin/mkfs.ext4 -q -F /dev/{dev}", timeout=300)
        ctx.vm.check(f"/sbin/e2fsck -fn /dev/{dev}", timeout=300)
        assert "I/O error" not in ctx.vm.check("/bin/dmesg")
        _ok(ctx.http.delete(f"/v1/volumes/rbd1/attachments/{att['id']}"), 204)
        ctx.wait_disk("rbd1", present=False)
    finally:
        if ctx.http.delete("/v1/volumes/rbd1").status_code == 204:
            ceph.run("rbd", "rm", "--no-progress", f"{ceph.pool}/guest-rbd1")


def test_vm_gone_attachment_goes_stale_and_deletes(ctx):
    ctx.vm.kill()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        a = _ok(ctx.http.get(f"/v1/volumes/hot1/attachments/{ctx.att['hot1']}"), 200)
        if a["state"] == "stale":
            break
        time.sleep(0.5)
    assert a["state"] == "stale", a
    r = ctx.http.delete("/v1/volumes/hot1")
    assert r.status_code == 409, r.text
    _ok(ctx.http.delete(f"/v1/volumes/hot1/attachments/{ctx.att.pop('hot1')}"), 204)
    vol = _ok(ctx.http.get("/v1/volumes/hot1"), 200)
    assert vol["attachments"] == [] and vol["export"] is None
    _ok(ctx.http.delete("/v1/volumes/hot1"), 204)


def test_pc_machine_hot_attach_on_pci0(guest_image, tmp_path_factory):
    """On an i440fx (pc) VM there are no root ports: the disk goes on pci.0
    (ACPI PCI hotplug) and leaves again."""
    with ApiServer() as api:
        http = api.client()
        _ok(http.post("/v1/volumes", json={"name": "pcvol", "size_bytes": VOL2_SIZE}), 201)
        qmp = str(g.short_socket_dir("bs-pcqmp-") / "api-qmp.sock")
        vm = g.Guest([], image=guest_image, machine="pc", smp=1,
                     extra_args=["-qmp", f"unix:{qmp},server=on,wait=off"],
                     log_dir=tmp_path_factory.mktemp("api-guest-pc"))
        with vm:
            c = Ctx(vm, api, qmp)
            att = _ok(http.post("/v1/volumes/pcvol/attachments",
                                json={"hypervisor": "qemu", "qmp_socket": qmp}), 201)
            assert att["bus"] == "pci.0", att
            dev = c.wait_disk("pcvol", present=True)
            c.fio_verify(dev, "8M")
            _ok(http.delete(f"/v1/volumes/pcvol/attachments/{att['id']}"), 204)
            c.wait_disk("pcvol", present=False)
