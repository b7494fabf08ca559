"""The complete device seen from a real Linux guest (QEMU/TCG): two queues on
two vCPUs, serial, topology, discard and write-zeroes, the guest switching the
write cache, a read-only disk, a driver reset (what a reboot does to the
device), and a QEMU restart reconnecting to the same export.

One export of each kind and one guest serve every check, in file order.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

try:
    from . import guest as g
except ImportError:
    import guest as g

REPO = Path(__file__).resolve().parent.parent
DISK_SIZE = 1 << 30
RO_SIZE = 64 << 20
SERIAL = "blkserve-e2e-0001"
MiB = 1 << 20


class Exports:
    def __init__(self, rw: g.BackendProcess, ro: g.BackendProcess, rw_img: Path, ro_img: Path,
                 ro_digest: str):
        self.rw, self.ro, self.rw_img, self.ro_img, self.ro_digest = rw, ro, rw_img, ro_img, \
            ro_digest
        self.state: dict = {}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    work = tmp_path_factory.mktemp("device")
    rw_img, ro_img = work / "rw.img", work / "ro.img"
    with open(rw_img, "wb") as f:
        f.truncate(DISK_SIZE)
    with open(ro_img, "wb") as f:
        f.write(os.urandom(RO_SIZE))
    sockdir = g.short_socket_dir("bs-dev-")
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def export(img: Path, sock: Path, log: Path, *args: str) -> g.BackendProcess:
        return g.BackendProcess(
            [sys.executable, "-m", "blkserve", "export", str(img), "--socket", str(sock), *args],
            sock, log_path=log, env=env, cwd=str(REPO), name="blkserve",
        ).start()

    rw = export(rw_img, sockdir / "rw.sock", work / "rw.log", "--queues", "2",
                "--serial", SERIAL)
    ro = export(ro_img, sockdir / "ro.sock", work / "ro.log", "--read-only")
    pk_img = work / "packed.img"
    with open(pk_img, "wb") as f:
        f.truncate(256 << 20)
    pk = export(pk_img, sockdir / "pk.sock", work / "pk.log", "--queues", "2")
    try:
        ex = Exports(rw, ro, rw_img, ro_img, _sha256(ro_img))
        ex.packed = pk
        yield ex
    finally:
        rw.stop()
        ro.stop()
        pk.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def _boot(exports: Exports, image, log_dir: Path) -> g.Guest:
    return g.Guest(
        [g.Disk(exports.rw.socket_path, num_queues=2),
         g.Disk(exports.ro.socket_path, num_queues=1),
         g.Disk(exports.packed.socket_path, num_queues=2, props={"packed": "on"})],
        image=image, smp=2, mem="512M", log_dir=log_dir,
    )


@pytest.fixture(scope="module")
def vm(exports, guest_image, tmp_path_factory):
    guest = _boot(exports, guest_image, tmp_path_factory.mktemp("guest-device"))
    with guest:
        guest.wait_for_block_device("vda")
        guest.wait_for_block_device("vdb")
        guest.wait_for_block_device("vdc")
        yield guest


def sha_of(vm: g.Guest, dev: str, offset_mib: int, length_mib: int) -> str:
    out = vm.check(f"dd if={dev} bs=1M skip={offset_mib} count={length_mib} iflag=direct "
                   f"2>/dev/null | /usr/bin/sha256sum", timeout=120)
    return out.split()[0]


ZERO_4M = hashlib.sha256(bytes(4 * MiB)).hexdigest()


def test_serial_queues_and_topology(vm, exports):
    assert vm.check("cat /sys/block/vda/serial").strip() == SERIAL
    assert vm.check("ls /sys/block/vda/mq").split() == ["0", "1"]
    q = "/sys/block/vda/queue"
    assert vm.check(f"cat {q}/logical_block_size").strip() == "512"
    # the file's allocation unit, as the export advertises it
    assert int(vm.check(f"cat {q}/physical_block_size")) == os.stat(exports.rw_img).st_blksize
    assert int(vm.check(f"cat {q}/discard_max_bytes")) > 0
    assert int(vm.check(f"cat {q}/write_zeroes_max_bytes")) > 0
    assert vm.check("cat /sys/block/vda/cache_type").strip() == "write back"
    assert vm.check("/sbin/blockdev --getro /dev/vdb").strip() == "1"


def test_two_queues_two_vcpus_fio_verify(vm, exports):
    """One fio job per vCPU: blk-mq maps each CPU to its own virtqueue."""
    out = vm.check(
        "/usr/bin/fio --name=mq --filename=/dev/vda --direct=1 --ioengine=libaio "
        "--rw=randwrite --bs=4k --iodepth=8 --size=16M --numjobs=2 --offset_increment=64M "
        "--cpus_allowed=0,1 --cpus_allowed_policy=split --verify=crc32c --do_verify=1 "
        "--verify_fatal=1 --group_reporting", timeout=300)
    assert "err= 0" in out or "err=0" in out, out


def test_packed_virtqueues_fio_verify(vm, exports):
    """vdc is a vhost-user-blk-pci with packed=on: the guest negotiates
    VIRTIO_F_RING_PACKED and all I/O goes through packed rings."""
    feats = vm.check("cat /sys/block/vdc/device/features").strip()
    assert feats[34] == "1", feats  # VIRTIO_F_RING_PACKED
    for bs in ("512", "4k", "64k"):
        out = vm.check(
            f"/usr/bin/fio --name=pk{bs} --filename=/dev/vdc --direct=1 --ioengine=libaio "
            f"--rw=randwrite --bs={bs} --iodepth=16 --size=8M --numjobs=2 "
            "--offset_increment=32M --cpus_allowed=0,1 --cpus_allowed_policy=split "
            "--verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting", timeout=300)
        assert "err= 0" in out or "err=0" in out, out
    vm.check("/sbin/blkdiscard -o 0 -l $((4<<20)) /dev/vdc")
    assert sha_of(vm, "/dev/vdc", 0, 4) == ZERO_4M
    assert exports.packed.alive()


def test_blkdiscard_and_zeroout_read_back_zeroes(vm, exports):
    vm.check("dd if=/dev/urandom of=/dev/vda bs=1M seek=256 count=12 oflag=direct 2>/dev/null")
    kept = sha_of(vm, "/dev/vda", 264, 4)
    vm.check("/sbin/blkdiscard -o $((256<<20)) -l $((4<<20)) /dev/vda")
    vm.check("/sbin/blkdiscard -z -o $((260<<20)) -l $((4<<20)) /dev/vda")
    vm.check("echo 3 > /proc/sys/vm/drop_caches")
    assert sha_of(vm, "/dev/vda", 256, 4) == ZERO_4M
    assert sha_of(vm, "/dev/vda", 260, 4) == ZERO_4M
    assert sha_of(vm, "/dev/vda", 264, 4) == kept
    # and on the host: the discarded range reads as zeroes in the file
    with open(exports.rw_img, "rb") as f:
        f.seek(256 * MiB)
        assert f.read(8 * MiB) == bytes(8 * MiB)


def test_guest_switches_to_writethrough(vm, exports):
    vm.check("echo 'write through' > /sys/block/vda/cache_type")
    assert vm.check("cat /sys/block/vda/cache_type").strip() == "write through"
    out = vm.check(
        "/usr/bin/fio --name=wt --filename=/dev/vda --direct=1 --ioengine=libaio "
        "--rw=randwrite --bs=4k --iodepth=4 --size=4M --offset=512M --verify=crc32c "
        "--do_verify=1 --verify_fatal=1", timeout=180)
    assert "err= 0" in out or "err=0" in out, out
    vm.check("echo 'write back' > /sys/block/vda/cache_type")
    log = exports.rw.log()
    assert "switched the write cache to writethrough" in log
    assert "switched the write cache to writeback" in log


def test_read_only_disk_rejects_writes(vm, exports):
    before = sha_of(vm, "/dev/vdb", 0, 4)
    # force the kernel to send the write anyway: the device must refuse it
    vm.check("/sbin/blockdev --setrw /dev/vdb")
    code, out = vm.run("dd if=/dev/urandom of=/dev/vdb bs=4k count=4 oflag=direct")
    assert code != 0, out
    assert sha_of(vm, "/dev/vdb", 0, 4) == before
    assert _sha256(exports.ro_img) == exports.ro_digest


def test_driver_reset_keeps_data(vm, exports):
    """Unbind and rebind virtio_blk: the device is reset and restarted on the
    same connection (GET_VRING_BASE, then a new ring setup), as on a reboot."""
    vm.check("dd if=/dev/urandom of=/dev/vda bs=1M seek=300 count=4 oflag=direct 2>/dev/null")
    digest = sha_of(vm, "/dev/vda", 300, 4)
    exports.state["digest"] = digest
    dev = vm.check("basename $(readlink /sys/block/vda/device)").strip()
    vm.check(f"echo {dev} > /sys/bus/virtio/drivers/virtio_blk/unbind")
    vm.check(f"echo {dev} > /sys/bus/virtio/drivers/virtio_blk/bind")
    vm.wait_for_block_device("vda")
    assert sha_of(vm, "/dev/vda", 300, 4) == digest
    assert exports.rw.alive()


def test_qemu_restart_reconnects(vm, exports, guest_image, tmp_path_factory):
    vm.kill()
    # both queues carried I/O: the export logs per-queue totals on disconnect
    # (first wait until it logged them for both queues, then check every one)
    deadline = time.monotonic() + 10
    while True:
        totals = {int(q): int(n) for q, n in re.findall(
            r"queue (\d+): (\d+) requests served so far", exports.rw.log())}
        if sorted(totals) == [0, 1]:
            break
        assert time.monotonic() < deadline, exports.rw.log()
        time.sleep(0.2)
    assert all(n > 0 for n in totals.values()), totals
    assert exports.rw.alive() and exports.ro.alive()
    with _boot(exports, guest_image, tmp_path_factory.mktemp("guest-restart")) as vm2:
        vm2.wait_for_block_device("vda")
        assert sha_of(vm2, "/dev/vda", 300, 4) == exports.state["digest"]
        vm2.check("/sbin/mkfs.ext4 -q -F /dev/vda && /sbin/e2fsck -fn /dev/vda", timeout=180)
