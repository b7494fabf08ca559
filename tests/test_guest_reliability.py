"""Reliability seen from a real guest, with standalone `blkserve export`
processes that the test itself kills and restarts (QEMU's chardevs have
reconnect=1):

- kill -9 of an export while the guest's fio verify runs (writes throttled so
  requests are surely in flight), a new export on the same socket: QEMU hands
  it the inflight region, it redoes what was in flight, fio sees no error;
  once on a split ring (vda) and once on a packed ring (vdc, packed=on: QEMU
  restarts a packed ring at a stale base, the region alone says where it is);
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
    from .test_api_guest import _throttle_writes, _unthrottle
except ImportError:
    import guest as g
    from test_api_guest import _throttle_writes, _unthrottle

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


class Exports:
    def __init__(self, work: Path, sockdir: Path):
        self.work, self.sockdir = work, sockdir
        self.procs: dict[str, g.BackendProcess] = {}

    def start(self, name: str, backing: Path) -> g.BackendProcess:
        sock = self.sockdir / f"{name}.sock"
        p = g.BackendProcess(
            [sys.executable, "-m", "blkserve", "export", str(backing), "--socket", str(sock),
             "--serial", name], sock, log_path=self.work / f"{name}.log", cwd=str(REPO),
            name=f"export {name}")
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


@pytest.mark.parametrize("dev", ["vda", "vdc"], ids=["split", "packed"])
def test_standalone_export_kill9_restart_guest_sees_no_error(setup, dev):
    vm, ex, _, disks = setup
    name, data = disks[dev]
    # bit 34 of the negotiated features: VIRTIO_F_RING_PACKED
    features = vm.check(f"cat /sys/block/{dev}/device/features")
    assert features[34] == ("1" if dev == "vdc" else "0"), features
    engine = _engine(vm)
    vm.check("/bin/dmesg -c > /dev/null; rm -f /tmp/k.out")
    vm.check(
        f"setsid sh -c '/usr/bin/fio --name=k --filename=/dev/{dev} --direct=1 "
        f"--ioengine={engine} --iodepth=16 --rw=randwrite --bs=4k --size=48M "
        f"--verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 "
        f"--randrepeat=0 > /tmp/k.out 2>&1; echo fio-rc=$? >> /tmp/k.out' "
        f"> /dev/null 2>&1 < /dev/null")
    time.sleep(2)
    old = ex.procs[name]
    throttled = _throttle_writes(old.proc.pid, data.parent)
    time.sleep(2)
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait()
    if throttled:
        _unthrottle()
    new = ex.start(name, data)  # same socket; QEMU re-dials within a second
    deadline = time.monotonic() + 600
    out = ""
    while time.monotonic() < deadline:
        out = vm.check("cat /tmp/k.out 2>/dev/null; true")
        if "fio-rc=" in out:
            break
        time.sleep(2)
    assert "fio-rc=0" in out and re.search(r"err=\s*0\b", out), out
    dmesg = vm.check("/bin/dmesg")
    assert "I/O error" not in dmesg, dmesg
    if throttled:
        deadline = time.monotonic() + 5
        while "resubmitted" not in new.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        m = re.search(r"(\d+) request\(s\) a previous backend left in flight, resubmitted",
                      new.log())
        assert m and int(m.group(1)) > 0, new.log()[-3000:]


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


def test_guest_reboot_reconnects_cleanly(setup):
    """A reset of the whole VM (what a guest reboot does to the devices):
    QEMU stops every ring (GET_VRING_BASE), drops its inflight regions, and
    the rebooted guest's drivers set the devices up again on the same
    connections, with new regions; split and packed disks verify data, the
    same export processes serve them, nothing is resubmitted."""
    vm, ex, _, disks = setup
    before = {name: ex.procs[name].proc.pid for name in ("data", "packed")}
    logs = {name: len(ex.procs[name].log()) for name in before}
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
        new_log = p.log()[logs[name]:]
        assert "resubmitted" not in new_log and "Traceback" not in new_log, new_log

