"""Reliability seen from a real guest, with standalone `blkserve export`
processes that the test itself kills and restarts (QEMU's chardevs have
reconnect=1):

- kill -9 of an export while the guest's fio verify runs with requests in
  flight (the export's stats block says so before the kill), a new export on
  the same socket at once or a second later (the guest queues requests
  meanwhile, their kicks dropped by QEMU): QEMU hands it the inflight region, it redoes what
  was in flight, fio sees no error and no request is lost (a hang would be);
  20 times on a split ring (vda) and 20 times on a packed ring (vdc,
  packed=on: QEMU restarts a packed ring at a stale base, the region alone
  says where it is), no write throttling;
- a sparse volume on a full filesystem (a 4 MiB tmpfs): the guest's writes
  fail with I/O errors, the export keeps serving, and once the filesystem has
  room again the same writes succeed.

One guest serves all checks."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from . import guest as g
    from .apiserver import wait_inflight
except ImportError:
    import guest as g
    from apiserver import wait_inflight

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class Exports:
    def __init__(self, work: Path, sockdir: Path):
        self.work, self.sockdir = work, sockdir
        self.procs: dict[str, g.BackendProcess] = {}

    def stats_path(self, name: str) -> Path:
        return self.work / f"{name}.stats"

    def start(self, name: str, backing: Path) -> g.BackendProcess:
        sock = self.sockdir / f"{name}.sock"
        p = g.BackendProcess(
            [sys.executable, "-m", "blkserve", "export", str(backing), "--socket", str(sock),
             "--serial", name, "--stats-file", str(self.stats_path(name))],
            sock, log_path=self.work / f"{name}.log", cwd=str(REPO), name=f"export {name}")
        p.start()
        self.procs[name] = p
        return p

    def stop_all(self):
        for p in self.procs.values():
            p.stop()


@pytest.fixture(scope="module")
def setup(guest_image, tmp_path_factory):
    work = tmp_path_factory.mktemp("reliability")
    small = work / "small"
    small.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs CAP_SYS_ADMIN): {r.stderr.strip()}")
    data = work / "data.img"
    with open(data, "wb") as f:
        f.truncate(256 * MiB)
    full = small / "full.img"
    with open(full, "wb") as f:
        f.truncate(64 * MiB)  # sparse: 64 MiB promised on a 4 MiB filesystem
    packed = work / "packed.img"
    with open(packed, "wb") as f:
        f.truncate(256 * MiB)
    ex = Exports(work, g.short_socket_dir("bs-rel-"))
    try:
        ex.start("data", data)
        ex.start("full", full)
        ex.start("packed", packed)
        vm = g.Guest([g.Disk(ex.procs["data"].socket_path, reconnect=1),
                      g.Disk(ex.procs["full"].socket_path, reconnect=1),
                      g.Disk(ex.procs["packed"].socket_path, reconnect=1,
                             props={"packed": "on"})],
                     image=guest_image, log_dir=work / "guest")
        with vm:
            vm.wait_for_block_device("vdc")
            yield vm, ex, small, {"vda": ("data", data), "vdc": ("packed", packed)}
    finally:
        ex.stop_all()
        subprocess.run(["umount", "-l", str(small)], check=False)


def _engine(vm) -> str:
    return "libaio" if re.search(r"\blibaio\b", vm.check("/usr/bin/fio --enghelp")) else "psync"


def test_guest_reboot_reconnects_cleanly(setup):
    """A reset of the whole VM (what a guest reboot does to the devices):
    QEMU stops every ring (GET_VRING_BASE), drops its inflight regions, and
    the rebooted guest's drivers set the devices up again on the same
    connections, with new regions; split and packed disks verify data, the
    same export processes serve them, nothing is resubmitted.  First in the
    module: after minutes of fio in a TCG guest its reboot takes 150-230 s,
    whichever the backend (qemu-storage-daemon's disks too), against 5-20 s
    after a fresh boot."""
    vm, ex, _, disks = setup
    before = {name: ex.procs[name].proc.pid for name in ("data", "packed")}
    # offsets in the log files (every restart of an export appends to its
    # file: a tail of it would shift under the new lines)
    logs = {name: ex.procs[name].log_path.stat().st_size for name in before}
    vm.reboot()
    vm.wait_for_block_device("vdc")
    engine = _engine(vm)
    for dev in ("vda", "vdc"):
        vm.check(f"/usr/bin/fio --name=r --filename=/dev/{dev} --direct=1 --ioengine={engine} "
                 f"--iodepth=8 --rw=randwrite --bs=16k --size=8M --verify=crc32c "
                 f"--do_verify=1 --verify_fatal=1 --verify_state_save=0", timeout=600)
    assert "I/O error" not in vm.check("/bin/dmesg")
    for name, pid in before.items():
        p = ex.procs[name]
        assert p.alive() and p.proc.pid == pid
        new_log = p.log_path.read_bytes()[logs[name]:].decode(errors="replace")
        assert "resubmitted" not in new_log and "Traceback" not in new_log, new_log


KILL_ROUNDS = 20


@pytest.mark.parametrize("dev", ["vda", "vdc"], ids=["split", "packed"])
def test_standalone_export_kill9_restart_guest_sees_no_error(setup, dev):
    """kill -9 with requests in flight and a new export at once (even
    rounds) or a second later (odd rounds), 20 times in a row under one fio
    verify each: the guest sees no error and never hangs (a lost request
    would hang fio until its timeout)."""
    vm, ex, _, disks = setup
    name, data = disks[dev]
    # bit 34 of the negotiated features: VIRTIO_F_RING_PACKED
    features = vm.check(f"cat /sys/block/{dev}/device/features")
    assert features[34] == ("1" if dev == "vdc" else "0"), features
    engine = _engine(vm)
    resubmitted = 0
    for rnd in range(KILL_ROUNDS):
        vm.check("/bin/dmesg -c > /dev/null; rm -f /tmp/k.out")
        vm.check(
            f"setsid sh -c '/usr/bin/fio --name=k --filename=/dev/{dev} --direct=1 "
            f"--ioengine={engine} --iodepth=32 --rw=randwrite --bs=4k --size=8M "
            f"--offset={(rnd % 8) * 8}M --verify=crc32c --do_verify=1 --verify_fatal=1 "
            f"--verify_state_save=0 --randrepeat=0 > /tmp/k.out 2>&1; "
            f"echo fio-rc=$? >> /tmp/k.out' > /dev/null 2>&1 < /dev/null")
        old = ex.procs[name]
        # the precondition: requests really in flight in this export
        seen = wait_inflight(ex.stats_path(name), 60)
        assert seen, f"round {rnd}: no request ever in flight\n{old.log()[-2000:]}"
        old.proc.send_signal(signal.SIGKILL)
        old.proc.wait()
        log_from = old.log_path.stat().st_size  # both write the same log file
        if rnd % 2:
            # the scenario: the next export a second later, the
            # guest queueing requests meanwhile whose kicks nobody reads
            time.sleep(1)
        new = ex.start(name, data)  # same socket; QEMU re-dials within a second
        deadline = time.monotonic() + 180
        out = ""
        while time.monotonic() < deadline:
            out = vm.check("cat /tmp/k.out 2>/dev/null; true")
            if "fio-rc=" in out:
                break
            time.sleep(0.5)
        assert "fio-rc=0" in out and re.search(r"err=\s*0\b", out), (
            f"round {rnd}: fio did not finish cleanly\n{out}\n--- new export ---\n"
            f"{new.log()[-3000:]}")
        dmesg = vm.check("/bin/dmesg")
        assert "I/O error" not in dmesg, dmesg
        new_log = new.log_path.read_bytes()[log_from:].decode(errors="replace")
        m = re.search(r"(\d+) request\(s\) a previous backend left in flight, resubmitted",
                      new_log)
        resubmitted += int(m.group(1)) if m else 0
    # in flight at the kill, some requests were redone by the next export
    # (each round only proves one was in flight a moment before the kill)
    assert resubmitted > 0, f"no request resubmitted in {KILL_ROUNDS} kills"


def test_full_filesystem_is_a_guest_io_error_then_recovers(setup):
    vm, ex, small, _ = setup
    assert vm.check("cat /sys/block/vdb/serial") == "full"
    vm.check("/bin/dmesg -c > /dev/null")
    # 8 MiB of writes onto a filesystem with 4 MiB: some must fail
    code, out = vm.run("/bin/dd if=/dev/urandom of=/tmp/pat bs=1M count=8 2>&1 && "
                       "/bin/dd if=/tmp/pat of=/dev/vdb bs=1M count=8 oflag=direct 2>&1")
    assert code != 0, out
    dmesg = vm.check("/bin/dmesg")
    assert "I/O error" in dmesg and "vdb" in dmesg, dmesg
    assert ex.procs["full"].alive()
    # the export still serves: reads work
    vm.check("/bin/dd if=/dev/vdb of=/dev/null bs=1M count=4 iflag=direct")
    # room again (the operator grew the filesystem): the same writes succeed
    subprocess.run(["mount", "-o", "remount,size=32m", str(small)], check=True)
    vm.check("/bin/dd if=/tmp/pat of=/dev/vdb bs=1M count=8 oflag=direct")
    vm.check("/bin/dd if=/dev/vdb of=/tmp/back bs=1M count=8 iflag=direct && "
             "/usr/bin/cmp /tmp/pat /tmp/back")
    # logged by the export's once-per-second error summary
    deadline = time.monotonic() + 5
    while "No space left on device" not in ex.procs["full"].log() and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    log = ex.procs["full"].log()
    assert "No space left on device" in log, log[-2000:]
