"""Live migration (issue 17): a VM with vhost-user-blk disks moves to another
QEMU while it writes, and no byte is lost.

Each test runs one source QEMU and one destination QEMU (``-incoming``) with
the same devices: a 2-queue split-ring disk (vda) and a 2-queue disk with
packed=on (vdb), each served on both sides by its own backend process on the
SAME backing file (qemu-storage-daemon with file locking off, the reference
that supports dirty logging, or ``blkserve export``).

The guest first writes region A of each disk (fio, crc32c verify); then a
background loop runs fio passes that re-read and verify region A (the
backend writes guest RAM: only its dirty log tells QEMU to copy those pages
again) and rewrite and verify region B (randwrite, crc32c). The migration
runs with a low bandwidth cap and a 1 ms downtime limit, which keep it
iterating; once it has done MIN_SYNCS dirty-sync iterations under that load
the limit is raised and it completes. On the destination the loop must still
be running (fio spanned the whole migration), then finishes with every pass
clean, no I/O error in dmesg, and a final verify of both regions passes.

QEMU (both ends) traces the vhost-user messages it sends/receives
(vhost_user_write / vhost_user_read, vhost_dev_start / vhost_dev_stop) into
its qemu.log in the guest's log directory.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

# Under TCG (these hosts have no usable KVM) QEMU 7.2's live migration
# itself corrupts the destination guest's memory in some runs, with no disk
# I/O at all (seen in 5 of 8 runs with 2 vCPUs, 1 of 3 with 1): the guest
# then oopses or a program segfaults, whatever the backend.  With no disk
# and no blkserve at all, tests/tcg_migration_probe.py shows it (2026-12-05:
# 3 of 6 migrations broken, a RAM verify failure and two kernel panics).  So
# the tests run with another accelerator (BLKSERVE_MIGRATION_ACCEL=kvm) or
# when asked for (BLKSERVE_MIGRATION_TESTS=1).
pytestmark = pytest.mark.skipif(
    os.environ.get("BLKSERVE_MIGRATION_ACCEL", "tcg") == "tcg"
    and os.environ.get("BLKSERVE_MIGRATION_TESTS") != "1",
    reason="no usable KVM, and live migration under TCG is unreliable here (QEMU 7.2 "
           "corrupts the destination's RAM in some runs even without any disk: "
           "tests/tcg_migration_probe.py); BLKSERVE_MIGRATION_TESTS=1 runs them anyway")

try:
    from . import guest as g
except ImportError:
    import guest as g

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

DISK_SIZE = 64 * MiB
# region A: written before the migration, read and verified during it
A_OFF, A_SIZE = 0, 8 * MiB
# region B: rewritten and verified all through the migration
B_OFF, B_SIZE = 32 * MiB, 16 * MiB

BANDWIDTH = 32 * MiB  # bytes/s: the RAM copy takes a while at this rate
HOLD_DOWNTIME_MS = 1  # no switch-over possible: the migration keeps iterating
RELEASE_DOWNTIME_MS = 2000  # then it converges
MIN_SYNCS = 3  # dirty-sync iterations under I/O before the switch-over
MIGRATION_TIMEOUT = 240.0

# (guest device, chardev/Disk options); identical on both ends
LAYOUT = (
    ("vda", {"num_queues": 2}),
    ("vdb", {"num_queues": 2, "props": {"packed": "on"}}),
)
# CPU model and accelerator of both ends. -cpu max (the Guest default) has
# la57: after a migration the destination kernel died in its page-fault
# handler. Even with qemu64 / max,la57=off, QEMU 7.2 TCG migrations of this
# guest corrupt guest memory now and then, with or without disk I/O (open).
CPU = os.environ.get("BLKSERVE_MIGRATION_CPU", "qemu64")
ACCEL = os.environ.get("BLKSERVE_MIGRATION_ACCEL", "tcg")
SMP = int(os.environ.get("BLKSERVE_MIGRATION_SMP", "1"))
QEMU_TRACE = ("vhost_user_write", "vhost_user_read", "vhost_dev_start", "vhost_dev_stop")

BACKENDS = [
    pytest.param("qsd", id="qsd"),
    pytest.param("blkserve", id="blkserve"),
    # each disk an RBD image on the session's Ceph cluster, served on each
    # side by its own export as on two hosts: the image's exclusive lock
    # passes from the source's export to the destination's
    pytest.param("rbd", id="blkserve-rbd"),
]


def _job_a(dev: str, engine: str) -> str:
    return (
        f"--name=a --filename=/dev/{dev} --direct=1 --ioengine={engine} --iodepth=8 "
        f"--rw=write --bs=64k --offset={A_OFF} --size={A_SIZE} --verify=crc32c "
        f"--verify_fatal=1 --verify_state_save=0"
    )


def _job_b(dev: str, engine: str) -> str:
    # job b is always the second job of its fio run: its random offsets and
    # buffer contents (randrepeat) are the same in every run, so a
    # --verify_only run replays the last complete pass
    return (
        f"--name=b --filename=/dev/{dev} --direct=1 --ioengine={engine} --iodepth=16 "
        f"--rw=randwrite --bs=16k --offset={B_OFF} --size={B_SIZE} --verify=crc32c "
        f"--do_verify=1 --verify_fatal=1 --verify_state_save=0"
    )


# Background I/O loop, one per disk: fio passes until /tmp/stop-DEV exists.
BG_SCRIPT = r"""#!/bin/sh
dev=$1
n=0
rc=0
while [ ! -e /tmp/stop-$dev ]; do
    n=$((n+1))
    echo "start $n" >> /tmp/bg-$dev.log
    /usr/bin/fio @JOB_A@ --verify_only @JOB_B@ > /tmp/bg-$dev.$n.out 2>&1
    rc=$?
    echo "pass $n rc=$rc" >> /tmp/bg-$dev.log
    [ $rc -eq 0 ] || break
done
echo "done rc=$rc passes=$n" >> /tmp/bg-$dev.log
"""


def _start_backend(kind: str, backing, sock: Path, log: Path, serial: str, queues: int,
                   ceph=None):
    if kind == "rbd":
        return g.BackendProcess(
            [sys.executable, "-m", "blkserve", "export", backing, "--ceph-conf", ceph.conf,
             "--socket", str(sock), "--serial", serial, "--queues", str(queues)],
            sock, log_path=log, cwd=str(REPO), name=f"export {serial}",
        ).start()
    if kind == "qsd":
        return g.StorageDaemon(
            backing, sock, num_queues=queues, locking="off", log_path=log
        ).start()
    return g.BackendProcess(
        [sys.executable, "-m", "blkserve", "export", str(backing), "--socket", str(sock),
         "--serial", serial, "--queues", str(queues)],
        sock, log_path=log, cwd=str(REPO), name=f"export {serial}",
    ).start()


class Pair:
    """Backing files, backends for both ends, the source guest (booted) and
    the destination guest (started on demand, waiting for the stream)."""

    def __init__(self, kind: str, image, work: Path, ceph=None):
        self.kind, self.image, self.work, self.ceph = kind, image, work, ceph
        self.sockdir = g.short_socket_dir("bs-mig-")
        self.backends: list[g.BackendProcess] = []
        self.backing = []
        work.mkdir(parents=True, exist_ok=True)
        for dev, _ in LAYOUT:
            if kind == "rbd":
                name = f"mig-{work.parent.name[-12:]}-{dev}".replace("_", "-")
                ceph.create_image(name, DISK_SIZE)
                self.backing.append(f"rbd:{ceph.pool}/{name}")
                continue
            path = work / f"{dev}.img"
            with open(path, "wb") as f:
                f.truncate(DISK_SIZE)
            self.backing.append(path)
        self.src: g.Guest | None = None
        self.dst: g.Guest | None = None
        self.uri = f"unix:{self.sockdir / 'migrate.sock'}"

    def start_source(self) -> g.Guest:
        self.src = self._guest("src")
        self.src.start()
        for dev, _ in LAYOUT:
            self.src.wait_for_block_device(dev)
        return self.src

    def _guest(self, side: str, incoming: str | None = None) -> g.Guest:
        disks = []
        for (dev, opts), backing in zip(LAYOUT, self.backing, strict=True):
            sock = self.sockdir / f"{side}-{dev}.sock"
            self.backends.append(_start_backend(
                self.kind, backing, sock, self.work / f"{side}-{dev}.log", dev,
                opts["num_queues"], self.ceph))
            disks.append(g.Disk(sock, num_queues=opts["num_queues"],
                                props=dict(opts.get("props", {})), reconnect=1))
        trace = [a for ev in QEMU_TRACE for a in ("-trace", ev)]
        return g.Guest(disks, image=self.image, log_dir=self.work / side,
                       incoming=incoming, extra_args=trace, cpu=CPU, accel=ACCEL,
                       smp=SMP)

    def start_destination(self) -> g.Guest:
        self.dst = self._guest("dst", incoming=self.uri)
        self.dst.start()
        return self.dst

    def close(self):
        for vm in (self.dst, self.src):
            if vm is not None:
                vm.kill()
        for b in self.backends:
            b.stop()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def logs(self) -> str:
        out = []
        for b in self.backends:
            out.append(f"--- {b.log_path.name} ---\n{b.log()[-3000:]}")
        for vm in (self.src, self.dst):
            if vm is not None:
                out.append(vm.diagnostics())
        return "\n".join(out)


@pytest.fixture
def pair_factory(guest_image, tmp_path, request):
    pairs = []

    def make(kind: str) -> Pair:
        ceph = request.getfixturevalue("ceph") if kind == "rbd" else None
        p = Pair(kind, guest_image, tmp_path / kind, ceph)
        pairs.append(p)
        p.start_source()
        return p

    yield make
    for p in pairs:
        p.close()


def _engine(vm: g.Guest) -> str:
    return "libaio" if re.search(r"\blibaio\b", vm.check("/usr/bin/fio --enghelp")) else "psync"


def _check_layout(vm: g.Guest, kind: str) -> None:
    for dev, opts in LAYOUT:
        queues = vm.check(f"ls /sys/block/{dev}/mq").split()
        # the driver makes one queue per vCPU at most
        assert len(queues) == min(opts["num_queues"], SMP), (dev, queues)
        # bit 34 of the negotiated features: VIRTIO_F_RING_PACKED (qsd's
        # libvhost-user does not offer it: its packed=on disk runs split)
        features = vm.check(f"cat /sys/block/{dev}/device/features")
        packed = "packed" in opts.get("props", {}) and kind != "qsd"
        assert features[34] == ("1" if packed else "0"), (dev, features)


def _prepare_io(vm: g.Guest, engine: str) -> None:
    """Write region A of every disk (verified), install the loop script."""
    for dev, _ in LAYOUT:
        vm.check(f"/usr/bin/fio {_job_a(dev, engine)} --do_verify=1", timeout=600)
    script = BG_SCRIPT.replace("@JOB_A@", _job_a("$dev", engine)).replace(
        "@JOB_B@", _job_b("$dev", engine))
    vm.check(f"cat > /tmp/bg.sh <<'EOF'\n{script}EOF\nchmod +x /tmp/bg.sh")


def _start_background_io(vm: g.Guest) -> None:
    """Start one loop per disk; return once every loop has finished one
    clean pass (the loops work) and runs the next."""
    vm.check("/bin/dmesg -c > /dev/null; rm -f /tmp/stop-* /tmp/bg-*")
    for dev, _ in LAYOUT:
        # setsid forks (the shell made it a process group leader): the loop
        # runs on in the background, in its own session
        vm.check(f"setsid /tmp/bg.sh {dev} > /dev/null 2>&1 < /dev/null")
    for dev, _ in LAYOUT:
        vm.check(
            f"( while ! grep -q '^start 2$' /tmp/bg-{dev}.log 2>/dev/null; do "
            f"if grep -q '^done' /tmp/bg-{dev}.log 2>/dev/null; then "
            f"cat /tmp/bg-{dev}.log /tmp/bg-{dev}.*.out; exit 1; fi; sleep 0.2; done )",
            timeout=600,
        )


def _assert_background_running(vm: g.Guest) -> None:
    for dev, _ in LAYOUT:
        log = vm.check(f"cat /tmp/bg-{dev}.log")
        assert "done" not in log, f"{dev}: the fio loop ended before the switch-over:\n{log}"


def _stop_background_io(vm: g.Guest) -> dict[str, int]:
    """Stop the loops after their current pass; assert every pass was
    clean; return {dev: passes}."""
    vm.check("touch " + " ".join(f"/tmp/stop-{dev}" for dev, _ in LAYOUT))
    passes = {}
    for dev, _ in LAYOUT:
        vm.check(f"while ! grep -q '^done' /tmp/bg-{dev}.log; do sleep 0.2; done", timeout=600)
        log = vm.check(f"cat /tmp/bg-{dev}.log")
        m = re.search(r"^done rc=(\d+) passes=(\d+)$", log, re.M)
        if m is None or m.group(1) != "0":
            outs = vm.check(f"tail -n 40 /tmp/bg-{dev}.*.out")
            pytest.fail(f"{dev}: a fio pass failed:\n{log}\n{outs}")
        outs = vm.check(f"cat /tmp/bg-{dev}.*.out")
        assert not re.search(r"verify: |verify failed", outs), outs
        errs = re.findall(r"err=\s*(\d+)", outs)
        assert errs and all(e == "0" for e in errs), outs
        passes[dev] = int(m.group(2))
    dmesg = vm.check("/bin/dmesg")
    assert "I/O error" not in dmesg, dmesg
    return passes


def _final_verify(vm: g.Guest, engine: str) -> None:
    for dev, _ in LAYOUT:
        vm.check(
            f"/usr/bin/fio {_job_a(dev, engine)} --verify_only {_job_b(dev, engine)} "
            f"--verify_only",
            timeout=600,
        )


def _iterating(info: dict) -> bool:
    return info.get("status") == "active" and info["max-dirty-sync-count"] >= MIN_SYNCS


@pytest.mark.parametrize("kind", BACKENDS)
def test_live_migration_while_writing_loses_nothing(pair_factory, kind):
    t0 = time.monotonic()
    p = pair_factory(kind)
    src = p.src
    _check_layout(src, kind)
    engine = _engine(src)
    _prepare_io(src, engine)
    _start_background_io(src)
    dst = p.start_destination()
    t_mig = time.monotonic()
    src.migrate(p.uri, max_bandwidth=BANDWIDTH, downtime_limit_ms=HOLD_DOWNTIME_MS)
    info = src.wait_migration(MIGRATION_TIMEOUT, until=_iterating)
    # the precondition: the migration really iterates while fio runs
    assert _iterating(info), f"migration ended before iterating: {info}\n{p.logs()}"
    src.qmp("migrate-set-parameters", **{"downtime-limit": RELEASE_DOWNTIME_MS})
    info = src.wait_migration(MIGRATION_TIMEOUT)
    assert info["status"] == "completed", f"{info}\n{p.logs()}"
    mig_time = time.monotonic() - t_mig
    assert info["max-dirty-sync-count"] >= MIN_SYNCS, info
    assert src.qmp("query-status")["status"] == "postmigrate"
    dst.wait_running()
    # the guest's shell came along with its RAM; fio is still in the middle
    # of a pass: it ran all through the migration
    _assert_background_running(dst)
    passes = _stop_background_io(dst)
    _final_verify(dst, engine)
    assert "I/O error" not in dst.check("/bin/dmesg")
    print(f"\n{kind}: migration {mig_time:.1f}s, {info['max-dirty-sync-count']} dirty syncs, "
          f"downtime {info.get('downtime')} ms, {info['ram'].get('transferred', 0) >> 20} MiB "
          f"sent, fio passes {passes}, test {time.monotonic() - t0:.0f}s")


@pytest.mark.parametrize("kind", BACKENDS)
def test_cancelled_migration_source_keeps_running(pair_factory, kind):
    p = pair_factory(kind)
    src = p.src
    engine = _engine(src)
    _prepare_io(src, engine)
    _start_background_io(src)
    p.start_destination()
    src.migrate(p.uri, max_bandwidth=BANDWIDTH, downtime_limit_ms=HOLD_DOWNTIME_MS)
    info = src.wait_migration(MIGRATION_TIMEOUT, until=_iterating)
    assert _iterating(info), f"migration ended before iterating: {info}\n{p.logs()}"
    src.migrate_cancel()
    info = src.wait_migration(60)
    assert info["status"] == "cancelled", f"{info}\n{p.logs()}"
    src.wait_running()
    _assert_background_running(src)
    _stop_background_io(src)
    _final_verify(src, engine)
    # the source's exports still serve: dirty logging is off again, I/O flows
    assert all(b.alive() for b in p.backends[: len(LAYOUT)]), p.logs()
