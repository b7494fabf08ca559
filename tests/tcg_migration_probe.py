"""Is QEMU's live migration under TCG sound on this host, with no disk at all?

The migration tests (tests/test_migration.py, tests/test_api_migration.py's
guest checks) run only where it is: under TCG, QEMU 7.2 corrupts the
destination guest's RAM in some migrations with no disk, no vhost-user
device and no blkserve involved.  This probe shows it: a guest like the
tests' (memfd RAM shared, as vhost-user needs; -cpu qemu64, 1 vCPU) runs a
RAM workload (fio writing and verifying a file on tmpfs, i.e. guest pages
written and read back), is migrated to an -incoming QEMU with the bandwidth
capped so that the migration iterates while the workload dirties pages,
and the destination then finishes the workload and looks at its kernel log.

    .venv/bin/python tests/tcg_migration_probe.py [ROUNDS]

Each round prints ok, or CORRUPT (the workload failed its verify, or the
destination kernel oopsed or panicked: its console log is named).  Not part
of `make test`: it tests QEMU, not blkserve."""

from __future__ import annotations

import re
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guest as g  # noqa: E402

WORKLOAD = ("/usr/bin/fio --name=m --filename=/dev/shm/m --size=96M --rw=randwrite --bs=4k "
            "--ioengine=psync --verify=crc32c --do_verify=1 --verify_fatal=1 "
            "--verify_state_save=0")
LOOP = f"""#!/bin/sh
n=0
while [ ! -e /tmp/stop ]; do
    n=$((n+1))
    {WORKLOAD} > /tmp/w.$n.out 2>&1 || {{ echo FAIL $n >> /tmp/w.log; break; }}
    echo ok $n >> /tmp/w.log
done
echo done >> /tmp/w.log
"""
BAD = re.compile(r"BUG|Oops|general protection|segfault|Kernel panic")


def one_round(image, work: Path) -> str:
    uri = f"unix:{g.short_socket_dir('bs-tcgp-') / 'm.sock'}"
    src = g.Guest([], image=image, log_dir=work / "src", cpu="qemu64", smp=1)
    dst = None
    try:
        src.start()
        src.check("mkdir -p /dev/shm && (grep -q ' /dev/shm ' /proc/mounts || "
                  "mount -t tmpfs tmpfs /dev/shm)")
        src.check(f"cat > /tmp/w.sh <<'EOF'\n{LOOP}EOF\nchmod +x /tmp/w.sh")
        src.check("setsid /tmp/w.sh > /dev/null 2>&1 < /dev/null")
        src.check("while ! grep -q '^ok 1' /tmp/w.log 2>/dev/null; do sleep 0.2; done",
                  timeout=300)
        dst = g.Guest([], image=image, log_dir=work / "dst", cpu="qemu64", smp=1, incoming=uri)
        dst.start()
        src.migrate(uri, max_bandwidth=32 << 20, downtime_limit_ms=1)
        src.wait_migration(240, until=lambda i: i.get("status") == "active"
                           and i["max-dirty-sync-count"] >= 3)
        src.qmp("migrate-set-parameters", **{"downtime-limit": 2000})
        info = src.wait_migration(240)
        if info["status"] != "completed":
            return f"migration {info['status']}"
        dst.wait_running()
        time.sleep(5)                       # the workload runs on the destination
        dst.check("touch /tmp/stop")
        log = dst.check("while ! grep -q done /tmp/w.log; do sleep 0.5; done; cat /tmp/w.log",
                        timeout=300)
        dmesg = dst.check("/bin/dmesg")
        if "FAIL" in log or BAD.search(dmesg):
            return f"CORRUPT ({log.split()[-3:]}, {BAD.findall(dmesg)[:3]})"
        return f"ok ({info['max-dirty-sync-count']} dirty syncs)"
    except (g.GuestError, OSError) as e:
        return f"CORRUPT (the destination went away: {str(e)[:200]}; console: {work / 'dst'})"
    finally:
        for vm in (dst, src):
            if vm is not None:
                vm.kill()


class RoundTimeout(Exception):
    pass


def _alarm(*_):
    raise RoundTimeout


def main() -> int:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    image = g.build_guest_image()
    root = Path(tempfile.mkdtemp(prefix="bs-tcg-probe-"))
    bad = 0
    signal.signal(signal.SIGALRM, _alarm)
    for r in range(rounds):
        # a destination wedged by the corruption may stop answering anything
        signal.alarm(600)
        try:
            verdict = one_round(image, root / f"r{r}")
        except RoundTimeout:
            verdict = (f"CORRUPT (no answer from the destination in 10 min; console: "
                       f"{root}/r{r}/dst)")
        finally:
            signal.alarm(0)
        bad += verdict.startswith("CORRUPT")
        print(f"round {r}: {verdict}", flush=True)
    print(f"{bad} of {rounds} migrations corrupted the guest (logs in {root})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
