"""QoS limits of `blkserve export`, driven by `blkserve bench` (no VM):

- a limit holds to within 5% over 10 s at QD32 (IOPS: reads, writes, mixed;
  bandwidth at 64 KiB requests), measured next to qemu-storage-daemon's
  throttle group with the same limits in the same test, and blkserve is at
  least as exact (within one percentage point of noise);
- a burst is allowed, then cut back to the rate;
- a noisy neighbour: an unthrottled volume keeps its rate while a throttled
  one runs beside it;
- a group shared by two exports holds its limit in sum;
- a limit written into the volume's QoS file applies to the running export;
- a limit changed thousands of times a second, and removed while requests
  wait, loses no request (bench --verify);
- bad --qos values exit 2 with a one-line reason.

Rates here are far below what the machine serves, so a busy machine does
not decide them; the bounds are the limits' own accuracy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from blkserve import qos

try:
    from .apiserver import wait_for
except ImportError:
    from apiserver import wait_for

ROOT = Path(__file__).resolve().parent.parent
QSD = shutil.which("qemu-storage-daemon")
IMG_SIZE = 256 << 20
RUNTIME = 10


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(IMG_SIZE)
    return path


@pytest.fixture(scope="module")
def work():
    # images in RAM (/dev/shm): what is measured is the limit, not a disk's
    # pace for fresh extents
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    d = Path(tempfile.mkdtemp(prefix="bs-qos-", dir=shm))
    _image(d / "disk.img")
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Backend:
    def __init__(self, argv: list[str], sock: str, log: Path):
        self.sock = sock
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=ROOT, env=_env())
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"backend did not start:\n{log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def export(work: Path, name: str, *args: str, img: Path | None = None) -> Backend:
    sock = str(work / f"{name}.sock")
    return Backend([sys.executable, "-m", "blkserve", "export", str(img or work / "disk.img"),
                    "--socket", sock, *args], sock, work / f"{name}.log")


def qsd(work: Path, name: str, limits: dict[str, int]) -> Backend:
    sock = str(work / f"{name}.sock")
    group = ",".join(f"x-{k.replace('_', '-')}={v}" for k, v in limits.items())
    return Backend(
        [QSD, "--object", f"throttle-group,id=tg0,{group}",
         "--blockdev", f"driver=file,node-name=f0,filename={work / 'disk.img'},"
         "cache.direct=off,aio=threads",
         "--blockdev", "driver=throttle,node-name=t0,throttle-group=tg0,file=f0",
         "--export", f"type=vhost-user-blk,id=e0,node-name=t0,addr.type=unix,"
         f"addr.path={sock},writable=on"],
        sock, work / f"{name}.log")


def bench(sock: str, *args: str, runtime: float = RUNTIME) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "blkserve", "bench", "--socket", sock, "--json",
         "--iodepth", "32", "--runtime", str(runtime), "--size", "64M", *args],
        capture_output=True, text=True, timeout=runtime + 120, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["errors"] == 0, out
    return out


class Bg(threading.Thread):
    """A bench run in the background."""

    def __init__(self, sock: str, *args: str, runtime: float = RUNTIME):
        super().__init__(daemon=True)
        self.argv = (sock, *args)
        self.runtime = runtime
        self.result: dict | None = None
        self.error: BaseException | None = None

    def run(self):
        try:
            self.result = bench(*self.argv, runtime=self.runtime)
        except BaseException as e:  # reported by the joining test
            self.error = e

    def get(self) -> dict:
        self.join(self.runtime + 150)
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


def _measured(out: dict, unit: str) -> float:
    return out["iops"] if unit == "iops" else out["bw_bytes"]


# (limits, bench arguments, what is measured)
CASES = {
    "iops-read": ({"iops_total": 4000}, ["--rw", "randread"], "iops"),
    "iops-write": ({"iops_write": 4000}, ["--rw", "randwrite"], "iops"),
    "iops-mixed": ({"iops_total": 4000}, ["--rw", "randrw"], "iops"),
    "bps-read": ({"bps_total": 64 << 20}, ["--rw", "randread", "--bs", "64k"], "bps"),
    "bps-write": ({"bps_write": 32 << 20}, ["--rw", "randwrite", "--bs", "64k"], "bps"),
}


@pytest.mark.parametrize("case", CASES)
def test_limit_holds_within_5_percent_and_as_exactly_as_qsd(work, case):
    limits, args, unit = CASES[case]
    want = next(iter(limits.values()))
    spec = ",".join(f"{k}={v}" for k, v in limits.items())
    # a 1 s unmeasured ramp on both: the steady state is compared, not the
    # bucket each starts with (blkserve's: 100 ms of the rate)
    with export(work, f"bs-{case}", "--qos", spec):
        got = _measured(bench(str(work / f"bs-{case}.sock"), "--ramp", "1", *args), unit)
    err = abs(got - want) / want
    assert err <= 0.05, f"blkserve held {got:.0f} against a limit of {want} ({err:.1%})"
    if QSD is None:
        pytest.skip("qemu-storage-daemon not installed: no reference to compare with")
    with qsd(work, f"qsd-{case}", limits):
        ref = _measured(bench(str(work / f"qsd-{case}.sock"), "--ramp", "1", *args), unit)
    ref_err = abs(ref - want) / want
    print(f"{case}: limit {want}: blkserve {got:.0f} ({err:.2%}), "
          f"qemu-storage-daemon {ref:.0f} ({ref_err:.2%})")
    assert err <= ref_err + 0.01, (
        f"blkserve {got:.0f} ({err:.2%}) is less exact than qemu-storage-daemon "
        f"{ref:.0f} ({ref_err:.2%}) for a limit of {want}")


def test_burst_is_allowed_then_cut_back(work):
    # 1000 IOPS, bursts of 4000 for 1 s: the credit is (4000 - 1000) * 1 s
    with export(work, "burst", "--qos",
                "iops_total=1000,iops_total_max=4000,iops_total_max_length=1"):
        sock = str(work / "burst.sock")
        first = bench(sock, runtime=1)
        # the pause between the runs refills some credit (at most a second
        # of burst): the unmeasured ramp spends it
        then = bench(sock, "--ramp", "1.5", runtime=3)
    assert first["iops"] >= 3000, f"the burst was not allowed: {first['iops']} IOPS"
    assert then["iops"] <= 1000 * 1.1, f"not cut back after the burst: {then['iops']} IOPS"
    assert then["iops"] >= 1000 * 0.95, then["iops"]


def test_noisy_neighbour_keeps_its_rate(work):
    img2 = _image(work / "other.img")
    with export(work, "quiet", "--qos", "iops_total=2000"), \
            export(work, "free", img=img2):
        alone = bench(str(work / "free.sock"), runtime=4)["iops"]
        bg = Bg(str(work / "quiet.sock"), runtime=6)
        bg.start()
        time.sleep(1)
        beside = bench(str(work / "free.sock"), runtime=4)["iops"]
        throttled = bg.get()["iops"]
    assert abs(throttled - 2000) / 2000 <= 0.05, throttled
    # the unthrottled volume is not held to its neighbour's limit (a shared
    # budget would put it near 2000); two benches and two exports now share
    # two cores, hence the margin
    assert beside >= 0.5 * alone and beside > 4 * 2000, (alone, beside)


def test_group_holds_its_limit_in_sum(work):
    img2 = _image(work / "g2.img")
    grp_file = work / "tenant.qos"
    g = qos.QosBlock(str(grp_file))
    g.apply(qos.parse_spec("iops_total=3000"))
    with export(work, "g1", "--qos-group-file", str(grp_file)), \
            export(work, "g2", "--qos-group-file", str(grp_file), img=img2):
        a = Bg(str(work / "g1.sock"))
        b = Bg(str(work / "g2.sock"))
        a.start()
        b.start()
        ia, ib = a.get()["iops"], b.get()["iops"]
    total = ia + ib
    assert abs(total - 3000) / 3000 <= 0.05, (ia, ib)
    assert min(ia, ib) >= 0.25 * total, (ia, ib)   # both got a share
    throttled, wait_ns, hist = g.counters()
    assert throttled > 0 and sum(hist) == throttled and wait_ns > 0


def test_a_limit_written_to_the_qos_file_applies_to_the_running_export(work):
    vol_file = work / "live.qos"
    with export(work, "live", "--qos-file", str(vol_file), "--qos", "iops_total=2000"):
        sock = str(work / "live.sock")
        before = bench(sock, runtime=3)["iops"]
        blk = qos.QosBlock(str(vol_file), create=False)
        assert qos.to_flat(blk.limits()) == {"iops_total": 2000}
        blk.apply(qos.parse_spec("iops_total=5000"))
        after = bench(sock, runtime=3)["iops"]
        # and while a run goes on: 2 s at 5000, then 2 s at 1000; the run
        # has started (and reached the limit) once requests are held again
        held = blk.counters()[0]
        bg = Bg(sock, runtime=4)
        bg.start()
        wait_for(lambda: blk.counters()[0] > held, 30, "the run to reach its limit")
        time.sleep(2)
        blk.apply(qos.parse_spec("iops_total=1000"))
        mixed = bg.get()["iops"]
    assert abs(before - 2000) / 2000 <= 0.05, before
    assert abs(after - 5000) / 5000 <= 0.05, after
    assert 1500 < mixed < 4500, mixed


def test_a_qos_file_from_a_previous_boot_does_not_hold_the_volume(work):
    """Bucket states are CLOCK_MONOTONIC times, which start again near 0 at
    boot: a block written late in a long previous boot holds times far in
    this boot's future.  An export that opens it starts the buckets at now."""
    vol_file = work / "reboot.qos"
    blk = qos.QosBlock(str(vol_file))
    blk.apply(qos.parse_spec("iops_total=2000,bps_total=100M"))
    ten_days = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 10 * 86400 * 10**9
    for i in range(len(qos.KINDS)):
        blk.ptr.lim[i].tat = ten_days
    with export(work, "reboot", "--qos-file", str(vol_file)):
        got = bench(str(work / "reboot.sock"), "--timeout", "5", runtime=2)["iops"]
    assert abs(got - 2000) / 2000 <= 0.1, got


def test_limits_changed_thousands_of_times_a_second_lose_nothing(work):
    vol_file = work / "churn.qos"
    with export(work, "churn", "--qos-file", str(vol_file), "--qos", "iops_total=500"):
        blk = qos.QosBlock(str(vol_file), create=False)
        stop = threading.Event()
        changes = 0

        def churn():
            nonlocal changes
            specs = [qos.parse_spec("iops_total=500"), qos.parse_spec("iops_total=200000"),
                     {}, qos.parse_spec("iops_write=300,bps_total=1M"),
                     qos.parse_spec("iops_read=50,iops_read_max=100000")]
            while not stop.is_set():
                blk.apply(specs[changes % len(specs)])
                changes += 1

        t = threading.Thread(target=churn, daemon=True)
        t0 = time.monotonic()
        t.start()
        try:
            # verify: writes a pattern, checks every read, reads it all back
            out = bench(str(work / "churn.sock"), "--rw", "randrw", "--verify",
                        "--size", "4M", "--bs", "4k", runtime=5)
        finally:
            stop.set()
            t.join()
        rate = changes / (time.monotonic() - t0)
    assert out["errors"] == 0 and out["ios"] > 0
    assert rate > 1000, f"only {rate:.0f} changes a second"
    # held requests were released by removals and rate changes, none lost:
    # bench fails on a request that never completes (its --timeout)


@pytest.mark.parametrize("spec,msg", [
    ("iops_total=0", "must be above 0"),
    ("iops_total=-1", "must be above 0"),
    ("iops_totl=5", "unknown QoS key 'iops_totl'"),
    ("iops_total_max=10", "needs iops_total"),
    ("iops_total=10,iops_total_max=5", "must be above iops_total"),
    ("bps_write=12Q", "invalid size"),
])
def test_bad_qos_exits_2_with_a_reason(work, spec, msg):
    r = subprocess.run([sys.executable, "-m", "blkserve", "export", str(work / "disk.img"),
                        "--socket", str(work / "bad.sock"), "--qos", spec],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env())
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
