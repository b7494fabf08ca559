"""End-to-end tests: a real Linux guest (QEMU/TCG) doing I/O on a
vhost-user-blk disk served by a backend.

Parametrized over backends:
  * qsd      -- qemu-storage-daemon, the reference implementation;
  * blkserve -- ``python -m blkserve export IMG --socket SOCK``.

One guest is booted per backend (module-scoped fixtures) and all checks run
inside it, in file order; the shutdown checks come last.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:  # works whether or not tests/ is a package
    from . import guest as g
except ImportError:
    import guest as g

REPO = Path(__file__).resolve().parent.parent
DISK_SIZE = 1 << 30
GUEST_NUM_QUEUES = 1
BACKENDS = ["qsd", "blkserve"]

# (block size, bytes) -- each fio job gets its own region of the disk.
FIO_JOBS = [
    ("512", 4 << 20),
    ("4k", 16 << 20),
    ("64k", 32 << 20),
    ("128k", 32 << 20),
]
FIO_REGION = 64 << 20  # job i uses [i*64MiB, i*64MiB + size)


def _blkserve_env() -> dict:
    env = dict(os.environ)
    paths = [str(p) for p in (REPO / "src", REPO) if p.is_dir()]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class BackendUnderTest:
    def __init__(self, name: str, image: Path, proc: g.BackendProcess):
        self.name, self.image, self.proc = name, image, proc
        self.state: dict = {}  # results shared between the ordered checks


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, tmp_path_factory):
    name = request.param
    workdir = tmp_path_factory.mktemp(f"e2e-{name}")
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(DISK_SIZE)  # sparse
    sockdir = g.short_socket_dir(f"bs-{name}-")
    sock = sockdir / "vhost.sock"
    log = workdir / f"{name}.log"
    try:
        if name == "qsd":
            proc = g.StorageDaemon(image, sock, num_queues=GUEST_NUM_QUEUES, log_path=log)
        else:
            proc = g.BackendProcess(
                [sys.executable, "-m", "blkserve", "export", str(image), "--socket", str(sock)],
                sock,
                log_path=log,
                env=_blkserve_env(),
                cwd=str(REPO),
                name="blkserve",
            )
    except g.GuestUnavailable as e:
        pytest.skip(str(e))
    proc.start()
    try:
        yield BackendUnderTest(name, image, proc)
    finally:
        proc.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture(scope="module")
def vm(backend, guest_image, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp(f"guest-{backend.name}")
    try:
        guest = g.Guest(
            [backend.proc.socket_path],
            image=guest_image,
            smp=2,
            mem="512M",
            num_queues=GUEST_NUM_QUEUES,
            log_dir=log_dir,
        )
    except g.GuestUnavailable as e:
        pytest.skip(str(e))
    with guest:
        guest.wait_for_block_device("vda")
        yield guest


def _fio_engine(vm: g.Guest) -> str:
    engines = vm.check("/usr/bin/fio --enghelp", timeout=60)
    return "libaio" if re.search(r"\blibaio\b", engines) else "psync"


def _assert_backend_alive(backend: BackendUnderTest):
    assert backend.proc.alive(), f"{backend.name} backend died:\n{backend.proc.log()}"


# --------------------------------------------------------------------------
# checks inside one guest, in order
# --------------------------------------------------------------------------


def test_disk_visible_with_backing_file_size(vm, backend):
    size = int(vm.check("/sbin/blockdev --getsize64 /dev/vda").strip())
    assert size == DISK_SIZE
    sectors = int(vm.check("cat /sys/block/vda/size").strip())
    assert sectors * 512 == DISK_SIZE
    _assert_backend_alive(backend)


@pytest.mark.parametrize("bs,size", FIO_JOBS, ids=[bs for bs, _ in FIO_JOBS])
def test_fio_write_verify_crc32c(vm, backend, bs, size):
    idx = [b for b, _ in FIO_JOBS].index(bs)
    if "fio_engine" not in backend.state:
        backend.state["fio_engine"] = _fio_engine(vm)
    engine = backend.state["fio_engine"]
    depth = 8 if engine == "libaio" else 1
    cmd = (
        f"/usr/bin/fio --name=verify-{bs} --filename=/dev/vda --direct=1 --ioengine={engine} "
        f"--iodepth={depth} --rw=randwrite --bs={bs} --offset={idx * FIO_REGION} --size={size} "
        f"--verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 --randrepeat=0"
    )
    code, out = vm.run(cmd, timeout=600)
    assert code == 0, f"fio failed (exit {code}):\n{out}"
    assert re.search(r"err=\s*0\b", out), out
    # the verify phase really read back everything that was written
    m = re.search(r"issued rwts: total=(\d+),(\d+)", out)
    assert m and int(m.group(1)) == int(m.group(2)) > 0, out
    assert not re.search(r"(verify failed|bad magic|bad header|crc32c: verify)", out, re.I), out
    _assert_backend_alive(backend)


def test_ext4_file_checksum_survives_remount(vm, backend):
    vm.check("/sbin/mkfs.ext4 -F -q /dev/vda", timeout=300)
    vm.check("mkdir -p /mnt/t && mount -t ext4 /dev/vda /mnt/t")
    vm.check("dd if=/dev/urandom of=/mnt/t/data bs=1M count=8 2>&1", timeout=120)
    before = vm.check("/usr/bin/sha256sum /mnt/t/data").split()[0]
    vm.check("sync && umount /mnt/t && echo 3 > /proc/sys/vm/drop_caches", timeout=120)
    vm.check("mount -t ext4 /dev/vda /mnt/t")
    after = vm.check("/usr/bin/sha256sum /mnt/t/data").split()[0]
    vm.check("umount /mnt/t")
    assert re.fullmatch(r"[0-9a-f]{64}", before), before
    assert before == after, "file content changed across umount/drop_caches/mount"
    out = vm.check("/sbin/e2fsck -fn /dev/vda 2>&1", timeout=300)
    assert "clean" in out or "files" in out, out
    backend.state["data_sha256"] = before
    _assert_backend_alive(backend)


def test_backend_survives_guest_poweroff(vm, backend):
    vm.poweroff(timeout=60)
    assert not vm.alive()
    _assert_backend_alive(backend)
    # still listening for the next VM
    assert g.socket_accepts(backend.proc.socket_path), (
        f"{backend.name} no longer accepts connections"
    )
    _assert_backend_alive(backend)


def test_backing_file_holds_guest_filesystem(backend):
    """What the guest wrote is really in the backing file (checked on the host)."""
    if "data_sha256" not in backend.state:
        pytest.skip("depends on test_ext4_file_checksum_survives_remount")
    e2fsck = shutil.which("e2fsck") or "/sbin/e2fsck"
    debugfs = shutil.which("debugfs") or "/sbin/debugfs"
    res = subprocess.run([e2fsck, "-fn", str(backend.image)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = subprocess.run([debugfs, "-R", "cat /data", str(backend.image)], capture_output=True)
    assert res.returncode == 0, res.stderr
    assert hashlib.sha256(res.stdout).hexdigest() == backend.state["data_sha256"]
