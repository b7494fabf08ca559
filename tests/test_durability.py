"""Durability, seen in the kernel rather than inferred from a status byte: a
guest that switched its write cache to writethrough gets every write made
durable before its status (`RWF_DSYNC`), and a guest FLUSH reaches the
backing as an `fdatasync` — on both engines, through O_DIRECT and through
the page cache (`--cache writeback`); and the blkif ring engine (Xen) does
the same for FLUSH_DISKCACHE and WRITE_BARRIER, shown on the C harness.

What the engine asked for is read from tracepoints in a private tracefs
instance (tests/tracefs.py):

- `iomap:iomap_dio_rw_begin` (filtered on the backing's inode): the kiocb
  flags of every O_DIRECT write, `DSYNC` among them when it carried
  `RWF_DSYNC`, whichever engine submitted it;
- `ext4:ext4_sync_file_enter` (same inode): an fsync of the backing,
  `datasync 1` for `fdatasync` and for a `RWF_DSYNC` buffered write;
- `io_uring:io_uring_submit_req` (the export's threads): the opcode, `FSYNC`
  for a flush on the io_uring engine;
- `syscalls:sys_enter_pwritev2` / `sys_enter_fdatasync` (the export's
  threads): the sync engine's syscalls, with `flags: 2` (RWF_DSYNC)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tracefs  # noqa: E402
import vhost_client as vc  # noqa: E402
from test_export import start_export, stop_export  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EVENTS = ("iomap/iomap_dio_rw_begin", "ext4/ext4_sync_file_enter",
          "io_uring/io_uring_submit_req", "syscalls/sys_enter_pwritev2",
          "syscalls/sys_enter_fdatasync")
N_WRITES = 4
RWF_DSYNC = 2
WCE = 32  # offset of virtio_blk_config.writeback


def _fs_type(path: Path) -> str:
    """The type of the filesystem PATH is on (longest matching mount point)."""
    best, fstype = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, typ = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (str(path) == mnt or str(path).startswith(mnt.rstrip("/") + "/")) and \
                    len(mnt) >= len(best):
                best, fstype = mnt, typ
    return fstype


@pytest.fixture
def trace_ready(tmp_path):
    why = tracefs.unavailable(*EVENTS)
    if why is None and _fs_type(tmp_path) != "ext4":
        why = f"{tmp_path} is on {_fs_type(tmp_path)}, not ext4 (ext4_sync_file_enter)"
    if why:
        pytest.skip(why)


def _trace_export(e) -> tracefs.Instance:
    st = os.stat(e.img)
    on_file = f"ino == {st.st_ino} && dev == {tracefs.kernel_dev(st.st_dev)}"
    threads = tracefs.pid_filter(e.proc.pid)  # after the rings started: queue threads exist
    t = tracefs.Instance("blkserve-durability")
    try:
        t.enable("iomap/iomap_dio_rw_begin", on_file)
        t.enable("ext4/ext4_sync_file_enter", f"ino == {st.st_ino}")
        for ev in EVENTS[2:]:
            t.enable(ev, threads)
    except BaseException:
        t.close()
        raise
    return t


def _names(events, name):
    return [e for e in events if e.name == name]


@pytest.mark.parametrize("cache", ["none", "writeback"])
@pytest.mark.parametrize("engine", ["io_uring", "sync"])
def test_writethrough_writes_are_dsync_and_flush_is_fdatasync(tmp_path, trace_ready, engine,
                                                              cache):
    e = start_export(tmp_path, "--io-engine", engine, "--cache", cache, "--queues", "1")
    t = None
    try:
        dev = e.device(queues=1,
                       features=vc.BlkDevice.WANTED_FEATURES | vc.bit(vc.BLK_F_CONFIG_WCE))
        dev.data_align = 4096  # O_DIRECT-able buffers: with --cache none, the direct fd
        t = _trace_export(e)
        direct = cache == "none"

        def writes(first_sector: int) -> list[tracefs.Event]:
            t.clear()
            for i in range(N_WRITES):
                assert dev.write(first_sector + 16 * i, os.urandom(8192)) == vc.BLK_S_OK
            return t.take()

        # writeback (the default): plain writes, nothing synced
        assert dev.client.get_config(WCE, 1) == b"\x01"
        ev = writes(2048)
        assert _names(ev, "ext4_sync_file_enter") == [], ev
        if direct:
            dio = _names(ev, "iomap_dio_rw_begin")
            assert len(dio) == N_WRITES, ev  # every write went through O_DIRECT
            assert not [d for d in dio if "DSYNC" in d.field("flags").split("|")], dio
        if engine == "sync":
            assert not [s for s in _names(ev, "sys_pwritev2")
                        if int(s.field("flags"), 0) & RWF_DSYNC], ev

        # a guest FLUSH: one fdatasync of the backing, by the engine's own means
        t.clear()
        assert dev.flush() == vc.BLK_S_OK
        ev = t.take()
        syncs = _names(ev, "ext4_sync_file_enter")
        assert [s.field("datasync") for s in syncs] == ["1"], ev
        fsync_sqes = [s for s in _names(ev, "io_uring_submit_req")
                      if s.field("opcode") == "FSYNC"]
        if engine == "io_uring":
            assert len(fsync_sqes) == 1 and _names(ev, "sys_fdatasync") == [], ev
        else:
            assert fsync_sqes == [] and len(_names(ev, "sys_fdatasync")) == 1, ev

        # the guest switches to writethrough: every write carries RWF_DSYNC
        assert dev.client.set_config(WCE, b"\x00", ack=True) == 0
        ev = writes(4096)
        if direct:
            dio = _names(ev, "iomap_dio_rw_begin")
            assert len(dio) == N_WRITES, ev
            assert all("DSYNC" in d.field("flags").split("|") for d in dio), dio
        else:  # through the page cache, RWF_DSYNC is an fdatasync of the range
            syncs = _names(ev, "ext4_sync_file_enter")
            assert len(syncs) >= N_WRITES and {s.field("datasync") for s in syncs} == {"1"}, ev
        if engine == "sync":
            pw = _names(ev, "sys_pwritev2")
            assert len(pw) == N_WRITES, ev
            assert all(int(s.field("flags"), 0) & RWF_DSYNC for s in pw), pw

        # and back to writeback: no more RWF_DSYNC
        assert dev.client.set_config(WCE, b"\x01", ack=True) == 0
        ev = writes(8192)
        assert _names(ev, "ext4_sync_file_enter") == [], ev
        if direct:
            assert not [d for d in _names(ev, "iomap_dio_rw_begin")
                        if "DSYNC" in d.field("flags").split("|")], ev
        dev.close()
    finally:
        if t is not None:
            t.close()
        assert stop_export(e) == 0, e.logtext()


@pytest.mark.parametrize("cache", ["none", "writeback"])
def test_last_ring_stop_syncs_the_backing_before_it_answers(tmp_path, trace_ready, cache):
    """A migration's destination (maybe on another host) starts its rings
    once the source answered its last GET_VRING_BASE: by then the source's
    writes must be durable.  The first of two rings stopping syncs nothing
    (the other still runs); the last one's reply comes after an fdatasync
    of the backing has returned (its exit tracepoint is already recorded)."""
    why = tracefs.unavailable("ext4/ext4_sync_file_exit")
    if why:
        pytest.skip(why)
    e = start_export(tmp_path, "--cache", cache, "--queues", "2")
    t = None
    try:
        dev = e.device(queues=2)
        dev.data_align = 4096
        t = _trace_export(e)
        t.enable("ext4/ext4_sync_file_exit", f"ino == {os.stat(e.img).st_ino}")
        for q in (0, 1):
            assert dev.write(4096 * (q + 1), os.urandom(65536), queue=q) == vc.BLK_S_OK
        t.clear()
        dev.get_vring_base(0)
        ev = t.take()
        assert _names(ev, "ext4_sync_file_enter") == [], ev
        dev.get_vring_base(1)
        ev = t.take()
        assert [s.field("datasync") for s in _names(ev, "ext4_sync_file_enter")] == ["1"], ev
        assert [s.field("ret") for s in _names(ev, "ext4_sync_file_exit")] == ["0"], ev
        dev.close()
    finally:
        if t is not None:
            t.close()
        assert stop_export(e) == 0, e.logtext()


# -- Xen blkif: the C harness's FLUSH_DISKCACHE and WRITE_BARRIER --------------

def _harness(name: str) -> Path:
    exe = REPO / "build" / name
    if not exe.exists():
        pytest.skip(f"{exe} is not built (make build/{name})")
    return exe


def test_blkif_flush_is_fdatasync_and_barrier_write_is_dsync(trace_ready):
    """native/tests/test_blkif.c drives the blkif ring engine with a fake
    grant table: its FLUSH_DISKCACHE requests (and barriers without data)
    must reach the backing as an io_uring FSYNC, its WRITE_BARRIER with data
    (test_barrier, O_DIRECT on /var/tmp) as a write with RWF_DSYNC, and its
    plain writes without.  The harness is traced from its first instruction:
    it starts stopped, its pid (and through event-fork every thread it
    creates) is the filter of the io_uring events; its O_DIRECT writes, also
    done by io_uring's kernel workers, are told apart by their file: on
    /var/tmp's filesystem and of the harness's capacity (4 MiB)."""
    exe = _harness("test_blkif")
    st = os.stat("/var/tmp")
    if _fs_type(Path("/var/tmp")) != "ext4":
        pytest.skip("/var/tmp is not on ext4")
    sqes = tracefs.Instance("blkserve-blkif-sqe")
    dio = None
    proc = None
    try:
        dio = tracefs.Instance("blkserve-blkif-dio")
        dio.enable("iomap/iomap_dio_rw_begin",
                   f"dev == {tracefs.kernel_dev(st.st_dev)} && isize == {4 << 20}")
        sqes._write("options/event-fork", "1")
        proc = subprocess.Popen(["/bin/sh", "-c", 'kill -STOP $$; exec "$0"', str(exe)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "the harness did not stop itself"
            time.sleep(0.01)
        sqes._write("set_event_pid", str(proc.pid))
        sqes.enable("io_uring/io_uring_submit_req")
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode(errors="replace")[-3000:]
        submitted = sqes.events("io_uring_submit_req")
        writes = [d.field("flags").split("|") for d in dio.events("iomap_dio_rw_begin")
                  if "WRITE" in d.field("flags").split("|")]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        sqes.close()
        if dio is not None:
            dio.close()
    opcodes = [s.field("opcode") for s in submitted]
    assert opcodes.count("FSYNC") >= 2, sorted(set(opcodes))  # flush, barrier without data
    assert writes, "the harness made no O_DIRECT write"
    assert [f for f in writes if "DSYNC" in f], "no WRITE_BARRIER with data was RWF_DSYNC"
    assert [f for f in writes if "DSYNC" not in f], "every write was RWF_DSYNC"
