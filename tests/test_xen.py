"""blkserve's blkif backend on a real Xen host emulated under QEMU TCG.

One boot of Xen 4.17 (dom0 + one PV domU with Linux's xen-blkfront, see
tests/xen/testbed.py) runs every check: the project's own code runs in dom0
(the host's filesystem over 9p), `blkserve export --xen-domain` hot-plugs a
disk into the running domU through xenstore, and the guest verifies data
through it.  The checks run in file order and share the guest.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from xen.testbed import XenHost, XenUnavailable

pytestmark = pytest.mark.slow

SIZE_MB = 64
A_IMG, A_LOG, A_STATS = "/tmp/xa.img", "/tmp/xa.log", "/tmp/xa.stats"
B_IMG, B_LOG = "/tmp/xb.img", "/tmp/xb.log"
C_IMG, C_LOG = "/tmp/xc.img", "/tmp/xc.log"
DOMID = 0   # set by the fixture


@pytest.fixture(scope="module")
def xen(tmp_path_factory):
    try:
        host = XenHost(tmp_path_factory.mktemp("xen")).start()
    except XenUnavailable as e:
        pytest.skip(f"cannot run a Xen host: {e}")
    try:
        global DOMID
        # two vCPUs: blkfront opens one ring per vCPU (multi-queue)
        DOMID = host.create_domu("domu1", mem_mb=384, extra_config=["vcpus = 2"])
        for img in (A_IMG, B_IMG, C_IMG):
            host.dom0_check(f"truncate -s {SIZE_MB}M {img}")
        # something to read on the read-only disk
        host.dom0_check(f"dd if=/dev/urandom of={B_IMG} bs=1M count=4 conv=notrunc 2>&1")
        yield host
    finally:
        host.close()


def export(xen: XenHost, img: str, log: str, *args: str) -> int:
    """Start `blkserve export IMG --xen-domain domu1 ARGS` in dom0 and wait
    until its disk is offered (Python starts slowly under TCG); its pid."""
    pid = xen.dom0_spawn(f"exec .venv/bin/blkserve export {img} --xen-domain domu1 "
                         f"{' '.join(args)}", log)
    wait_log(xen, log, "offering a")
    return pid


def wait_log(xen: XenHost, log: str, text: str, timeout: int = 180) -> str:
    out = xen.dom0(f"for i in $(seq {timeout}); do grep -q '{text}' {log} && exit 0; "
                   f"sleep 1; done; exit 1", timeout=timeout + 30)
    logtext = xen.dom0(f"cat {log}")[1]
    assert out[0] == 0, f"{text!r} not in {log} within {timeout} s:\n{logtext}"
    return logtext


def wait_disk(xen: XenHost, dev: str, present: bool = True, timeout: int = 60) -> None:
    test = "-e" if present else "! -e"
    rc, out = xen.domu(f"for i in $(seq {timeout}); do [ {test} /sys/block/{dev} ] && exit 0; "
                       f"sleep 1; done; ls /sys/block; dmesg | tail -5; exit 1",
                       timeout=timeout + 30)
    assert rc == 0, f"/dev/{dev} {'did not appear' if present else 'is still there'}:\n{out}"


def alive(xen: XenHost, pid: int) -> bool:
    return xen.dom0(f"kill -0 {pid}")[0] == 0


def xs_read(xen: XenHost, path: str) -> str | None:
    rc, out = xen.dom0(".venv/bin/python -c 'import sys; from blkserve.xen import XenStore; "
                       f"v = XenStore().read(\"{path}\"); print(\"<none>\" if v is None else v)'")
    assert rc == 0, out
    v = out.strip().splitlines()[-1]
    return None if v == "<none>" else v


def fio(xen: XenHost, dev: str, bs: str, size: str = "16M", extra: str = "") -> str:
    return xen.domu_check(
        f"/usr/bin/fio --name=v --filename=/dev/{dev} --size={size} --rw=randwrite --bs={bs} "
        f"--direct=1 --ioengine=libaio --iodepth=8 --verify=crc32c --do_verify=1 "
        f"--verify_fatal=1 --output-format=terse {extra} 2>&1", timeout=600)


state: dict[str, int] = {}


def test_hot_attach_negotiates_blkif_features(xen):
    state["a"] = export(xen, A_IMG, A_LOG, "--vdev xvdb --cache writeback",
                        f"--stats-file {A_STATS}")
    wait_disk(xen, "xvdb")
    assert xen.domu_check("cat /sys/block/xvdb/size").strip() == str(SIZE_MB * 2048)
    dmesg = xen.domu_check("dmesg | grep 'blkfront: xvdb'")
    assert "persistent grants: enabled" in dmesg and "indirect descriptors: enabled" in dmesg, \
        dmesg
    log = wait_log(xen, A_LOG, "connected")
    assert "2 ring(s) of 1 page(s), persistent grants" in log, log
    fe = f"/local/domain/{DOMID}/device/vbd/51728"
    assert xs_read(xen, f"{fe}/state") == "4"
    assert xs_read(xen, f"/local/domain/0/backend/vbd/{DOMID}/51728/state") == "4"


@pytest.mark.parametrize("bs", ["4k", "64k", "1M"])
def test_fio_crc32c_verify(xen, bs):
    # 1M requests need indirect segments (a plain blkif request carries 44 KiB)
    out = fio(xen, "xvdb", bs)      # exits non-zero on any I/O or verify error
    # terse line: version;fio-x;jobname;groupid;error
    assert re.search(r"^3;fio-[^;]*;v;\d+;0;", out, re.M), out


def test_flush_reaches_the_backing(xen):
    fio(xen, "xvdb", "4k", size="4M", extra="--fsync=4")
    out = xen.dom0_check(
        ".venv/bin/python -c 'from blkserve import stats; "
        f"s = stats.read(\"{A_STATS}\"); q = s.queues[0]; "
        "print(q.op_status[2][0], q.op_status[1][0], q.bad_chains, q.io_errors)'")
    flushes, writes, bad, errs = (int(x) for x in out.split()[-4:])
    assert flushes > 0 and writes > 0 and bad == 0 and errs == 0, out


def test_discard_punches_holes_in_the_backing(xen):
    xen.domu_check("dd if=/dev/urandom of=/dev/xvdb bs=1M count=16 oflag=direct 2>&1")
    before = int(xen.dom0_check(f"du -k {A_IMG}").split()[0])
    xen.domu_check("/usr/sbin/blkdiscard -o 0 -l 16777216 /dev/xvdb 2>&1 || "
                   "/sbin/blkdiscard -o 0 -l 16777216 /dev/xvdb 2>&1")
    after = int(xen.dom0_check(f"du -k {A_IMG}").split()[0])
    assert after <= before - 15 * 1024, (before, after)
    assert xen.domu_check("cat /sys/block/xvdb/queue/discard_granularity").strip() != "0"


def test_read_only_disk(xen):
    state["b"] = export(xen, B_IMG, B_LOG, "--vdev xvdc --read-only --cache writeback")
    wait_disk(xen, "xvdc")
    assert xen.domu_check("cat /sys/block/xvdc/ro").strip() == "1"
    guest = xen.domu_check("dd if=/dev/xvdc bs=1M count=4 2>/dev/null | md5sum").split()[0]
    host = xen.dom0_check(f"dd if={B_IMG} bs=1M count=4 2>/dev/null | md5sum").split()[0]
    assert guest == host
    rc, out = xen.domu("dd if=/dev/zero of=/dev/xvdc bs=4k count=1 oflag=direct 2>&1")
    assert rc != 0, out


def test_detach_the_guest_sees_the_disk_go(xen):
    xen.dom0_check(f"kill -TERM {state['b']}")
    wait_disk(xen, "xvdc", present=False)
    log = wait_log(xen, B_LOG, "vbd removed", timeout=60)
    assert "Traceback" not in log
    for _ in range(30):
        if not alive(xen, state["b"]):
            break
        time.sleep(1)
    assert not alive(xen, state["b"])
    assert xs_read(xen, f"/local/domain/0/backend/vbd/{DOMID}/51744/state") is None
    assert xs_read(xen, f"/local/domain/{DOMID}/device/vbd/51744/state") is None


def test_a_second_export_of_the_same_vbd_is_refused(xen):
    rc, out = xen.dom0(f".venv/bin/blkserve export {C_IMG} --xen-domain domu1 --vdev xvdb",
                       timeout=180)
    assert rc == 2 and "another blkserve export serves vbd 51728" in out, out


def test_kill_9_then_restart_offers_the_disk_again(xen):
    xen.domu_check("dd if=/dev/urandom of=/dev/xvdb bs=1M count=4 oflag=direct 2>&1")
    before = xen.domu_check("dd if=/dev/xvdb bs=1M count=4 iflag=direct 2>/dev/null | md5sum")
    xen.dom0_check(f"kill -KILL {state['a']}")
    # Linux's blkfront cannot resume a ring whose backend died: the restarted
    # export closes the stale device in the guest and offers it again
    state["a"] = export(xen, A_IMG, A_LOG, "--vdev xvdb --cache writeback")
    log = wait_log(xen, A_LOG, "left by a backend that died")
    wait_log(xen, A_LOG, "connected")
    wait_disk(xen, "xvdb")
    after = xen.domu_check("dd if=/dev/xvdb bs=1M count=4 iflag=direct 2>/dev/null | md5sum")
    assert before.split()[0] == after.split()[0], log
    fio(xen, "xvdb", "16k", size="8M")


API = "curl -sS -H \"Authorization: Bearer $(cat /tmp/bs-state/api-token)\" http://127.0.0.1:8470"


def api(xen: XenHost, method: str, path: str, body: str | None = None) -> tuple[int, dict]:
    data = f"-H 'Content-Type: application/json' -d '{body}'" if body else ""
    out = xen.dom0_check(f"{API}{path} -X {method} {data} -o /tmp/api.out -w '%{{http_code}}'; "
                         "echo; cat /tmp/api.out", timeout=400)
    code, _, rest = out.partition("\n")
    return int(code), (json.loads(rest) if rest.strip() else {})


def test_rest_api_attaches_and_detaches_a_volume(xen):
    """blkserve serve in dom0: POST .../attachments {"hypervisor": "xen"}
    hot-plugs the volume into the running domU, DELETE unplugs it."""
    xen.dom0_check("mkdir -p /tmp/bs-state && printf 'worker_start_timeout_s = 300\\n"
                   "detach_timeout_s = 120\\n' > /tmp/bs.toml")
    state["serve"] = xen.dom0_spawn("exec .venv/bin/blkserve serve --state-dir /tmp/bs-state "
                                    "--config /tmp/bs.toml", "/tmp/serve.log")
    xen.dom0_check("for i in $(seq 150); do curl -sf http://127.0.0.1:8470/healthz && exit 0; "
                   "sleep 2; done; cat /tmp/serve.log; exit 1", timeout=500)
    code, vol = api(xen, "POST", "/v1/volumes", '{"name": "xv1", "size_bytes": 33554432}')
    assert code == 201, vol
    code, err = api(xen, "POST", "/v1/volumes/xv1/attachments",
                    '{"hypervisor": "xen", "domain": "nosuchdomain"}')
    assert code == 422 and "nosuchdomain" in err["detail"], err
    code, att = api(xen, "POST", "/v1/volumes/xv1/attachments",
                    '{"hypervisor": "xen", "domain": "domu1"}')
    assert code == 201 and att["state"] == "attached", att
    dev = att["target"]
    assert dev.startswith("xvd") and dev not in ("xvdb",), att   # xvdb is taken
    wait_disk(xen, dev)
    assert xen.domu_check(f"cat /sys/block/{dev}/size").strip() == str(32 * 2048)
    fio(xen, dev, "32k", size="8M")
    code, err = api(xen, "PUT", "/v1/volumes/xv1/export")
    assert code in (200, 201), err      # the blkif worker is the volume's export
    state["xv1_dev"], state["xv1_att"] = dev, att["id"]


def wait_export(xen: XenHost, volume: str, check, what: str, timeout: int = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, exp = api(xen, "GET", f"/v1/volumes/{volume}/export")
        if code == 200 and check(exp):
            return exp
        assert time.monotonic() < deadline, f"{what}: export is {exp}"
        time.sleep(3)


def test_the_supervisor_restarts_a_killed_xen_worker(xen):
    """kill -9 of the blkif worker under `blkserve serve`: the supervisor
    starts it again, the new worker reclaims the vbd the dead one left, the
    guest gets the disk back with its data."""
    dev = state["xv1_dev"]
    xen.domu_check(f"dd if=/dev/urandom of=/dev/{dev} bs=1M count=2 oflag=direct 2>&1")
    before = xen.domu_check(f"dd if=/dev/{dev} bs=1M count=2 iflag=direct 2>/dev/null | md5sum")
    code, exp = api(xen, "GET", "/v1/volumes/xv1/export")
    assert code == 200 and exp["state"] == "running" and exp["restarts"] == 0, exp
    xen.dom0_check(f"kill -KILL {exp['pid']}")
    new = wait_export(xen, "xv1", lambda e: e["restarts"] >= 1 and e["state"] == "running",
                      "no supervised restart")
    assert new["pid"] != exp["pid"], new
    wlog = "/tmp/bs-state/logs/xv1.log"     # appended to by every worker
    wait_log(xen, wlog, "left by a backend that died")
    rc, out = xen.dom0(f"for i in $(seq 180); do [ $(grep -c ' connected: ' {wlog}) -ge 2 ] "
                       "&& exit 0; sleep 1; done; exit 1", timeout=240)
    assert rc == 0, xen.dom0(f"cat {wlog}")[1]
    wait_disk(xen, dev)
    after = xen.domu_check(f"dd if=/dev/{dev} bs=1M count=2 iflag=direct 2>/dev/null | md5sum")
    assert before.split()[0] == after.split()[0]
    fio(xen, dev, "4k", size="4M")
    code, atts = api(xen, "GET", "/v1/volumes/xv1/attachments")
    assert [a["state"] for a in atts] == ["attached"], atts
    serve_log = xen.dom0_check("cat /tmp/serve.log")
    assert "worker.restarted" in serve_log, serve_log[-3000:]


def test_detach_after_the_restart(xen):
    dev = state["xv1_dev"]
    code, _ = api(xen, "DELETE", f"/v1/volumes/xv1/attachments/{state['xv1_att']}")
    assert code == 204
    wait_disk(xen, dev, present=False)
    code, atts = api(xen, "GET", "/v1/volumes/xv1/attachments")
    assert code == 200 and atts == [], atts


def test_xl_save_and_restore_under_fio_verify(xen):
    """`xl save` of a domain in the middle of a fio verify on a volume
    attached through the API, then `xl restore` (not paused): the worker
    releases the saved domain's rings, keeps the attachment, offers the disk
    to the restored domain (another domid, same name) before blkfront
    resumes, and blkfront redoes what it had in flight there: fio finishes
    with no I/O or verify error, on the same worker."""
    xen.create_domu("domu3", mem_mb=256, timeout=600)
    code, _ = api(xen, "POST", "/v1/volumes", '{"name": "xv3", "size_bytes": 33554432}')
    assert code == 201
    code, att = api(xen, "POST", "/v1/volumes/xv3/attachments",
                    '{"hypervisor": "xen", "domain": "domu3"}')
    assert code == 201 and att["state"] == "attached", att
    dev = att["target"]
    rc, out = xen.domu(f"for i in $(seq 120); do [ -e /sys/block/{dev} ] && exit 0; sleep 1; "
                       "done; exit 1", timeout=180, name="domu3")
    assert rc == 0, out
    code, exp = api(xen, "GET", "/v1/volumes/xv3/export")
    assert code == 200, exp
    # paced: minutes of writes and verifies
    xen.domu_check(f"setsid sh -c '/usr/bin/fio --name=s --filename=/dev/{dev} --size=8M "
                   "--rate_iops=100 --rw=randwrite --bs=4k --direct=1 --ioengine=libaio "
                   "--iodepth=8 --verify=crc32c --do_verify=1 --verify_fatal=1 --loops=8 "
                   "> /tmp/s.out 2>&1; echo fio-rc=$? >> /tmp/s.out' > /dev/null 2>&1 "
                   "< /dev/null &", name="domu3")   # (setsid does not fork here)
    # the precondition: fio is writing (seen from dom0) when the domain is
    # suspended, and far from done (8 x 2048 writes)
    # (the volume's blocks get allocated as they are first written)
    rc, out = xen.dom0("for i in $(seq 240); do n=$(stat -c %b /tmp/bs-state/volumes/xv3.img); "
                       "[ $n -ge 2400 ] && exit 0; sleep 1; done; echo $n; exit 1",
                       timeout=300)
    assert rc == 0, f"fio did not write 300 blocks: {out}"
    old_domid = xen.domids["domu3"]
    xen.dom0_check("xl save domu3 /tmp/domu3.save 2>&1", timeout=900)
    wlog = "/tmp/bs-state/logs/xv3.log"
    log = wait_log(xen, wlog, "was saved or is migrating")
    writes = int(re.search(r"is gone \(saved or migrating\) after \d+ reads and (\d+) writes",
                           log).group(1))
    assert 300 <= writes < 8 * 2048, log
    xen.dom0_check("xl restore /tmp/domu3.save 2>&1 && rm -f /tmp/domu3.save", timeout=900)
    new_domid = xen.adopt_domu("domu3")
    assert new_domid != old_domid
    log = wait_log(xen, wlog, f"is back as domain {new_domid}")
    out = ""
    deadline = time.monotonic() + 900
    while "fio-rc=" not in out and time.monotonic() < deadline:
        out = xen.domu_check("cat /tmp/s.out; true", timeout=120, name="domu3")
        time.sleep(2)
    assert "fio-rc=0" in out and re.search(r"err=\s*0\b", out), \
        out + "\n" + xen.dom0(f"cat {wlog}")[1]
    assert "I/O error" not in xen.domu_check("dmesg", name="domu3")
    # one worker throughout, the attachment never stale
    code, after = api(xen, "GET", "/v1/volumes/xv3/export")
    assert code == 200 and after["pid"] == exp["pid"] and after["restarts"] == 0, after
    code, atts = api(xen, "GET", "/v1/volumes/xv3/attachments")
    assert [a["state"] for a in atts] == ["attached"], atts
    assert "Traceback" not in xen.dom0(f"cat {wlog}")[1], log
    code, _ = api(xen, "DELETE", f"/v1/volumes/xv3/attachments/{att['id']}")
    assert code == 204
    xen.destroy_domu("domu3")


def test_a_destroyed_domain_makes_its_attachment_stale(xen):
    """`xl destroy` of a domain with an attached volume: the daemon marks the
    attachment stale, stops its worker, and the attachment can be deleted."""
    xen.create_domu("domu2", mem_mb=256)
    code, _ = api(xen, "POST", "/v1/volumes", '{"name": "xv2", "size_bytes": 8388608}')
    assert code == 201
    code, att = api(xen, "POST", "/v1/volumes/xv2/attachments",
                    '{"hypervisor": "xen", "domain": "domu2"}')
    assert code == 201 and att["state"] == "attached", att
    wait_disk_in = xen.domu(f"for i in $(seq 60); do [ -e /sys/block/{att['target']} ] && "
                            "exit 0; sleep 1; done; exit 1", timeout=90, name="domu2")
    assert wait_disk_in[0] == 0, wait_disk_in
    code, exp = api(xen, "GET", "/v1/volumes/xv2/export")
    assert code == 200, exp
    xen.destroy_domu("domu2")
    deadline = time.monotonic() + 120
    while True:
        code, atts = api(xen, "GET", "/v1/volumes/xv2/attachments")
        if atts and atts[0]["state"] == "stale":
            break
        assert time.monotonic() < deadline, atts
        time.sleep(3)
    assert "the Xen domain is gone" in (atts[0]["error"] or ""), atts
    assert not alive(xen, exp["pid"]), "the stale attachment's worker still runs"
    code, _ = api(xen, "GET", "/v1/volumes/xv2/export")
    assert code == 404
    code, _ = api(xen, "DELETE", f"/v1/volumes/xv2/attachments/{att['id']}")
    assert code == 204
    xen.dom0_check(f"kill -TERM {state['serve']}")


def test_malformed_frontend_values_close_the_device_not_the_backend(xen):
    """A frontend publishing a bogus ring (grant that does not map, a ring
    order above the offer, a 32-bit ABI): the backend refuses the
    connection and closes the device; it stays up and exits cleanly."""
    xen.dom0_check(f"kill -TERM {state['a']}")
    wait_disk(xen, "xvdb", present=False)
    # no blkfront in the guest any more: dom0 plays a malformed frontend
    xen.domu_check("rmmod xen_blkfront 2>&1 || rmmod xen-blkfront 2>&1")
    be = f"/local/domain/0/backend/vbd/{DOMID}/51760"
    fe = f"/local/domain/{DOMID}/device/vbd/51760"
    cases = [
        ("ring-ref=4000000000 event-channel=5", "cannot map the ring"),
        ("ring-page-order=9 ring-ref0=8 event-channel=5", "ring-page-order 9"),
        ("protocol=x86_32-abi ring-ref=8 event-channel=5", "x86_32-abi"),
    ]
    for values, message in cases:
        pid = export(xen, C_IMG, C_LOG, "--vdev xvdd --drain-timeout 2")
        writes = "".join(f"x.write({fe + '/' + k!r}, {v!r})\n"
                         for k, v in (kv.split("=") for kv in values.split()))
        xen.dom0_check("cat > /tmp/fe.py <<'EOF'\nfrom blkserve.xen import XenStore\n"
                       f"x = XenStore()\n{writes}x.write({fe + '/state'!r}, 3)\nEOF\n"
                       ".venv/bin/python /tmp/fe.py")
        log = wait_log(xen, C_LOG, message, timeout=60)
        assert "closing the device" in log
        assert xs_read(xen, f"{be}/state") == "5"
        assert alive(xen, pid)
        xen.dom0_check(f"kill -TERM {pid}")
        log = wait_log(xen, C_LOG, "vbd removed", timeout=90)
        assert "Traceback" not in log
        xen.dom0_check(f": > {C_LOG}")
    assert xs_read(xen, f"{be}/state") is None


def test_a_disk_offered_before_blkfront_starts_is_there_when_it_does(xen):
    """The cold-attach order (deploy/xen/README.md: `xl create -p`, attach,
    `xl unpause`): the vbd exists before the guest's blkfront looks.  With
    multi-page rings (max-ring-page-order) and two queues."""
    pid = export(xen, C_IMG, C_LOG, "--vdev xvde")
    mod = xen.domu_check("grep blkfront /etc/domu-modules").split()[0]
    # multi-page rings this time (blkfront uses one page unless told)
    xen.domu_check(f"insmod /lib/modules/{mod} max_ring_page_order=2")
    wait_disk(xen, "xvde")
    log = wait_log(xen, C_LOG, "connected")
    assert "2 ring(s) of 4 page(s)" in log, log
    fio(xen, "xvde", "8k", size="8M")
    xen.dom0_check(f"kill -TERM {pid}")
    wait_disk(xen, "xvde", present=False)


def test_no_engine_fault_in_the_logs(xen):
    logs = xen.dom0_check(f"cat {A_LOG} {B_LOG}")
    assert not re.search(r"Traceback|broken|Segmentation", logs), logs
    serial = Path(xen.serial_log).read_text(errors="replace")
    assert "general protection" not in serial and "BUG:" not in serial
