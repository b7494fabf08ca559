"""The Xen testbed (tests/xen/testbed.py) itself works: a real Xen 4.17 host
under QEMU TCG, the project's code running in its dom0, and a PV domU with
the real xen-blkfront that takes shell commands.

One boot serves the whole module (about 25 s to the dom0 agent, 15 s more
for the domU, a minute or two in all).  Skipped, with the reason, where the
machine cannot run it (no qemu-system-x86_64, no Debian packages via apt).
"""

from __future__ import annotations

import re
import time

import pytest
from xen.testbed import REPO, XenCommandError, XenHost, XenTimeout, XenUnavailable


@pytest.fixture(scope="module")
def xen_host(tmp_path_factory):
    try:
        host = XenHost(tmp_path_factory.mktemp("xen"))
        host.start()
    except XenUnavailable as e:
        pytest.skip(str(e))
    t0 = time.monotonic()
    try:
        yield host
    finally:
        host.close()
        print(
            f"\nXen testbed: agent ready after {host.boot_time:.1f}s, "
            f"{time.monotonic() - t0:.1f}s more to power-off; logs in {host.workdir}"
        )


@pytest.fixture(scope="module")
def domu(xen_host):
    domid = xen_host.create_domu("domu1")
    print(f"\ndomU domu1 is domid {domid}: {xen_host.domu_timings['domu1']}")
    return domid


# --------------------------------------------------------------------------
# dom0
# --------------------------------------------------------------------------


def test_dom0_xl_info_reports_xen_4_17(xen_host):
    out = xen_host.dom0_check("xl info")
    fields = dict(
        (k.strip(), v.strip())
        for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)
    )
    assert fields["xen_major"] == "4", out
    assert fields["xen_minor"] == "17", out


def test_dom0_has_xen_devices(xen_host):
    xen_host.dom0_check("test -c /dev/xen/gntdev && test -c /dev/xen/evtchn")


def test_dom0_runs_the_repository_venv(xen_host):
    out = xen_host.dom0_check(
        ".venv/bin/python -c 'import os, blkserve; print(os.getcwd()); print(blkserve.__file__)'"
    )
    cwd, module = out.split()
    assert cwd == str(REPO)
    assert module.startswith(str(REPO) + "/"), out


def test_dom0_tmp_is_writable(xen_host):
    out = xen_host.dom0_check(
        "echo written-in-dom0 > /tmp/probe && cat /tmp/probe && rm /tmp/probe"
    )
    assert out.strip() == "written-in-dom0"


def test_dom0_cffi_loads_libxenstore(xen_host):
    out = xen_host.dom0_check(
        '.venv/bin/python -c "import cffi; f=cffi.FFI(); '
        "f.cdef('void *xs_open(unsigned long flags);'); l=f.dlopen('libxenstore.so.4'); "
        'print(l.xs_open(0) != f.NULL)"'
    )
    assert out.strip() == "True", out


def test_dom0_command_failure_raises(xen_host):
    rc, out = xen_host.dom0("echo to-stderr >&2; exit 3")
    assert (rc, out.strip()) == (3, "to-stderr")
    with pytest.raises(XenCommandError) as info:
        xen_host.dom0_check("exit 5")
    assert info.value.code == 5


def test_dom0_spawn_runs_in_background(xen_host):
    pid = xen_host.dom0_spawn("sleep 1; echo spawned-output", "/tmp/spawn.log")
    assert pid > 1
    deadline = time.monotonic() + 60
    while True:
        rc, out = xen_host.dom0("cat /tmp/spawn.log")
        if "spawned-output" in out:
            break
        assert time.monotonic() < deadline, f"spawned command wrote nothing: {out}"
        time.sleep(1)
    # Reaped by the agent once finished: the pid is gone.
    xen_host.dom0_check(
        f"for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 {pid} 2>/dev/null || exit 0; "
        "sleep 1; done; exit 1"
    )


# --------------------------------------------------------------------------
# domU
# --------------------------------------------------------------------------


def test_domu_runs_the_same_kernel(xen_host, domu):
    assert domu > 0
    out = xen_host.domu_check("uname -r")
    assert out.strip() == xen_host.images.kernel_release
    assert "domu1" in xen_host.dom0_check("xl list")


def test_domu_has_blkfront_loaded(xen_host, domu):
    out = xen_host.domu_check("cat /proc/modules")
    assert re.search(r"^xen_blkfront ", out, re.M), out


def test_domu_fio_verify_job(xen_host, domu):
    out = xen_host.domu_check(
        "/usr/bin/fio --name=v --filename=/tmp/f --size=8M --rw=randwrite --bs=4k "
        "--verify=crc32c --do_verify=1",
        timeout=300,
    )
    assert "err= 0" in out, out


def test_domu_tools_and_large_output(xen_host, domu):
    xen_host.domu_check("/sbin/blockdev --version && /sbin/blkdiscard --version && /bin/sync")
    rc, out = xen_host.domu("seq 1 30000; echo end-of-output; exit 7")
    assert rc == 7
    assert out.endswith("29999\n30000\nend-of-output\n")  # the tail arrives intact
    assert out.startswith("[... ")  # ... and the cut is marked


def test_domu_long_script(xen_host, domu):
    script = "\n".join(f"echo line-{i}" for i in range(600))  # > one xenstore value
    out = xen_host.domu_check(script)
    assert out.splitlines() == [f"line-{i}" for i in range(600)]


def test_domu_timeout_raises_with_context(xen_host, domu):
    t0 = time.monotonic()
    with pytest.raises(XenTimeout) as info:
        xen_host.domu("echo before-the-hang; sleep 600", timeout=5)
    assert time.monotonic() - t0 < 60
    msg = str(info.value)
    assert "timed out after 5" in msg
    assert "before-the-hang" in msg  # output so far
    assert "domU domu1 console" in msg and "serial.log" in msg  # logs for debugging
    # The domU killed the command (its whole session) and still serves.
    assert xen_host.domu_check("echo alive; ps | grep '[s]leep 600'; true").strip() == "alive"


def test_domu_console_is_logged(xen_host, domu):
    console = xen_host.domu_console("domu1")
    assert "Linux version" in console
    assert "domu-init: serving commands" in console
