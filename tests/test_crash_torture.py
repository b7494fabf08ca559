"""kill -9 of a `blkserve export` at random moments under a frontend that
behaves like Linux's virtio-blk driver, many times in a row (issue 16, item 0:
a guest that hung after its export was killed and restarted).

The frontend is what a guest kernel is to a vhost-user backend, minus the
guest: EVENT_IDX, a kick only when avail_event asks for one, completions
consumed *only* after a call notification (a driver never polls the used
ring, so a lost notification is a hang), full barriers where Linux has
them, QD32 always outstanding, random 4 KiB writes and reads of blocks whose
content it knows.  Every 5-120 ms the export is killed with SIGKILL wherever
it is, and a new export on the same socket is given the inflight region and
the ring at its used index, in the order of QEMU 7.2's vhost-user-blk
reconnect (call fd before the ring and again after it, a fresh unsignalled
kick fd).  After each kill, what the dead export left is checked as the next
one will read it (the requests the region marks plus the avail entries
after them are exactly the requests outstanding and not yet used); after
each restart every request outstanding at the kill completes, exactly once,
with status OK; reads return what was last written; at the end the file
holds every acknowledged write.

Two windows a random kill almost never hits are set up on purpose: used
entries published but never signalled, and requests queued while no export
ran (their kicks lost).

Run standalone for a longer hunt:
    .venv/bin/python tests/test_crash_torture.py --kills 500 [--engine sync] [--seed N]
"""

from __future__ import annotations

import argparse
import os
import random
import select
import signal
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vhost_client as vc  # noqa: E402
from test_export import Export, start_export, stop_export  # noqa: E402

BLOCK = 4096
NBLOCKS = 256
QD = 32
HANG = 3.0          # no notification for this long with requests outstanding
KILLS = 50           # per engine in make test (a hunt runs hundreds: see main())


def pattern(tag: int) -> bytes:
    return struct.pack("<Q", tag) * (BLOCK // 8) if tag else bytes(BLOCK)


_FENCE = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier (Linux's virtio_mb): taking a lock is a locked
    instruction on x86.  Without it the store of used_event (or avail->idx)
    may pass the load of the used index (or avail_event) that follows it,
    and driver and device each miss the other's update: a hang of the
    driver's own making."""
    _FENCE.acquire()
    _FENCE.release()


class Hang(AssertionError):
    pass


class LinuxLikeDriver:
    """One split queue driven the way Linux's virtio_ring + virtio_blk do
    (EVENT_IDX on): see the module docstring."""

    def __init__(self, d: vc.BlkDevice, rng: random.Random):
        self.d, self.rng = d, rng
        self.vq = d.vqs[0]
        assert self.vq.event_idx, "the backend must offer EVENT_IDX"
        mem = d.mem
        self.slots = [(mem.alloc(16, 16), mem.alloc(BLOCK, BLOCK), mem.alloc(1, 1))
                      for _ in range(QD)]
        self.free = list(range(QD))
        self.by_head: dict[int, tuple[int, str, int, int, int]] = {}
        self.serial = 0          # requests submitted (their identity: heads are reused)
        self.content = [0] * NBLOCKS     # tag of the last acknowledged write
        self.busy: set[int] = set()
        self.kick_old = self.vq.avail_idx
        self.tag = 0
        self.completed = 0
        self.kicks = 0
        self.errors: list[str] = []
        self.quiescing = False

    # -- submission (virtio_queue_rq + virtqueue_kick_prepare) ---------------
    def refill(self) -> None:
        vq, heads = self.vq, []
        while self.free and not self.quiescing:
            idle = [b for b in range(NBLOCKS) if b not in self.busy] \
                if len(self.busy) > NBLOCKS // 2 else None
            block = self.rng.choice(idle) if idle else self.rng.randrange(NBLOCKS)
            while block in self.busy:
                block = self.rng.randrange(NBLOCKS)
            slot = self.free.pop()
            hdr, data, status = self.slots[slot]
            write = self.rng.random() < 0.7
            if write:
                self.tag += 1
                tag = self.tag
                self.d.mem.write(data, pattern(tag))
            else:
                tag = 0
                self.d.mem.fill(data, BLOCK, 0xA5)
            self.d.mem.write(hdr, vc.blk_header(vc.BLK_T_OUT if write else vc.BLK_T_IN,
                                                block * (BLOCK // 512)))
            self.d.mem.fill(status, 1, 0xFF)
            head = vq.add_chain([(hdr, 16, False), (data, BLOCK, not write),
                                 (status, 1, True)], publish=False)
            self.serial += 1
            self.by_head[head] = (slot, "w" if write else "r", block, tag, self.serial)
            self.busy.add(block)
            heads.append(head)
        if heads:
            # Linux writes avail->idx per request; used_event is left alone
            for h in heads:
                slot_i = vq.avail_idx % vq.size
                vq.mem.pack_into(struct.Struct("<H"), vq.avail_gpa + 4 + 2 * slot_i, h)
                vq.set_avail_idx(vq.avail_idx + 1)
            full_barrier()
            if vq.need_kick(self.kick_old):
                vq.kick()
                self.kicks += 1
            self.kick_old = vq.avail_idx

    # -- completion (vring_interrupt -> virtblk_done) -------------------------
    def on_notification(self) -> int:
        """The interrupt handler: consume what is used, then re-arm
        (used_event = last used) and look once more, as
        virtqueue_enable_cb does."""
        n = 0
        for uid, ulen in self.poll_used():
            n += 1
            info = self.by_head.pop(uid, None)
            if info is None:
                self.errors.append(f"used id {uid} (len {ulen}) was not in flight")
                continue
            slot, kind, block, tag, _ = info
            hdr, data, status = self.slots[slot]
            st = self.d.mem.read(status, 1)[0]
            if st != vc.BLK_S_OK:
                self.errors.append(f"head {uid} {kind} block {block}: status {st:#x}")
            elif kind == "w":
                self.content[block] = tag
            elif self.d.mem.read(data, BLOCK) != pattern(self.content[block]):
                got = struct.unpack_from("<Q", self.d.mem.read(data, 8))[0]
                self.errors.append(f"read of block {block}: tag {got}, "
                                   f"wanted {self.content[block]}")
            self.busy.discard(block)
            self.free.append(slot)
        self.completed += n
        return n

    def poll_used(self) -> list[tuple[int, int]]:
        """virtqueue_get_buf until empty, then virtqueue_enable_cb: used_event
        = last used, a full barrier, and one more look."""
        vq, out = self.vq, []
        while True:
            used = vq.used_idx
            if used == vq.last_used_idx:
                return out
            while vq.last_used_idx != used:
                slot = vq.last_used_idx % vq.size
                uid, ulen = vq.mem.unpack_from(vc.USED_ELEM,
                                               vq.used_gpa + 4 + vc.USED_ELEM.size * slot)
                ids = vq.chains.pop(uid, None)
                if ids is None:
                    vq.bad_used.append((uid, ulen))
                else:
                    vq.free.extend(ids)
                out.append((uid, ulen))
                vq.last_used_idx = (vq.last_used_idx + 1) & 0xFFFF
            vq.set_used_event(vq.last_used_idx)
            full_barrier()

    def wait(self, until: float) -> None:
        """Serve notifications until *until* (monotonic); Hang if none comes
        for HANG seconds while requests are outstanding."""
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= until:
                return
            r, _, _ = select.select([self.vq.call_fd], [], [], min(until - now, 0.5))
            if r:
                os.eventfd_read(self.vq.call_fd)
                if self.on_notification():
                    last = time.monotonic()
                self.refill()
            elif self.by_head and time.monotonic() - last > HANG:
                raise Hang(self.state(f"no notification for {HANG:.0f} s"))

    def outstanding(self) -> set[int]:
        return {v[4] for v in self.by_head.values()}

    def state(self, why: str) -> str:
        vq = self.vq
        return (f"{why}: {len(self.by_head)} outstanding, avail_idx {vq.avail_idx}, "
                f"used_idx {vq.used_idx}, last_used {vq.last_used_idx}, "
                f"avail_event {vq.avail_event}, kicks {self.kicks}, "
                f"completed {self.completed}")


def recovery_check(d: vc.BlkDevice, drv: LinuxLikeDriver) -> tuple[str | None, int]:
    """What a dead backend left, read as the next one will: the requests the
    inflight region marks plus the avail entries after used + marked must be
    exactly the requests outstanding and not already in the used ring."""
    import mmap as _mmap
    fd, size, off = d.inflight_region
    m = _mmap.mmap(fd, size, offset=off)
    try:
        version, num, last_batch, in_used = struct.unpack_from("<HHHH", m, 8)
        vq = drv.vq
        used = vq.used_idx
        marked = {}
        for h in range(num):
            flag, nxt, counter = struct.unpack_from("<B5xHQ", m, 16 + 16 * h)
            if flag:
                marked[h] = counter
        fixed = dict(marked)
        if in_used != used:   # the batch that reached the used ring
            h, n = last_batch, 0
            while h < num and n < num:
                fixed.pop(h, None)
                h = struct.unpack_from("<B5xHQ", m, 16 + 16 * h)[1]
                n += 1
    finally:
        m.close()
    done = set()
    for i in range((used - vq.last_used_idx) & 0xFFFF):
        slot = (vq.last_used_idx + i) % vq.size
        done.add(vq.mem.unpack_from(vc.USED_ELEM, vq.used_gpa + 4 + vc.USED_ELEM.size * slot)[0])
    pending = set(drv.by_head) - done
    resume = (used + len(fixed)) & 0xFFFF
    later = [vq.mem.unpack_from(struct.Struct("<H"),
                                vq.avail_gpa + 4 + 2 * ((resume + i) % vq.size))[0]
             for i in range((vq.avail_idx - resume) & 0xFFFF)]
    if set(fixed) | set(later) == pending and not set(fixed) & set(later):
        return None, len(fixed)
    return (f"region: used {in_used} (ring {used}), last batch {last_batch}, marked "
            f"{sorted(marked.items(), key=lambda x: x[1])}, after fix {sorted(fixed)}; "
            f"avail {vq.avail_idx} last_used {vq.last_used_idx} avail_event {vq.avail_event}; "
            f"done-unseen {sorted(done)}; pending {sorted(pending)}; "
            f"avail after {resume}: {later}; missing {sorted(pending - set(fixed) - set(later))}; "
            f"extra {sorted((set(fixed) | set(later)) - pending)}"), len(fixed)


def qemu_reconnect(d: vc.BlkDevice, path: str) -> None:
    """Reconnect the way QEMU 7.2's vhost-user-blk does after its backend
    died (vhost_user_blk_connect -> vhost_user_blk_start): negotiate, the
    call fd as the guest notifiers are bound (before any ring), features,
    the inflight region, memory, each ring at its used index with a new
    kick fd and no kick, rings enabled, and the call fd once more as the
    vectors are unmasked after the start."""
    d.client.close()
    d.client = vc.VhostUserClient(path, timeout=d.timeout, connect_retry=5.0)
    d.negotiate()
    c = d.client
    vq = d.vqs[0]
    c.set_vring_call(0, vq.call_fd)
    c.set_features(d.features)
    d.setup_inflight()
    d.setup_memory()
    os.close(vq.kick_fd)      # the host notifier is a new eventfd, not signalled
    vq.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    c.set_vring_num(0, vq.size)
    c.set_vring_base(0, vq.used_idx)
    c.set_vring_addr(0, vq.desc_uva, vq.used_uva, vq.avail_uva)
    c.set_vring_kick(0, vq.kick_fd)
    c.set_vring_enable(0, True)
    c.set_vring_call(0, vq.call_fd)


def _device(e: Export) -> vc.BlkDevice:
    d = vc.BlkDevice(e.sock, queues=1, connect_retry=5.0, setup=False,
                     mem_size=8 << 20,
                     protocol_features=vc.BlkDevice.WANTED_PROTOCOL_FEATURES
                     | vc.bit(vc.PROTOCOL_F_INFLIGHT_SHMFD))
    d.negotiate()
    d.setup_inflight()
    d.setup_memory()
    d.setup_queue(0)
    return d


def torture(tmp: Path, kills: int, engine: str, seed: int, log=print,
            qemu_order: bool = True) -> dict:
    rng = random.Random(seed)
    log(f"seed {seed} (rerun: tests/test_crash_torture.py --seed {seed} --kills {kills} "
        f"--engine {engine})")
    args = ("--io-engine", engine, "--queues", "1")
    e = start_export(tmp, *args, size=NBLOCKS * BLOCK, name="export0")
    d = _device(e)
    drv = LinuxLikeDriver(d, rng)
    exports = [e]
    resubmitted = 0
    try:
        drv.refill()
        drv.wait(time.monotonic() + 0.2)
        for k in range(kills):
            # let it serve for a random while, then kill it wherever it is
            drv.wait(time.monotonic() + rng.uniform(0.005, 0.12))
            e.proc.send_signal(signal.SIGKILL)
            e.proc.wait()
            bad, marked = recovery_check(d, drv)
            assert bad is None, f"kill {k + 1}: {bad}"
            resubmitted += marked > 0
            # the restart gap: QEMU drops the connection, re-dials later
            e = start_export(tmp, *args, size=NBLOCKS * BLOCK, name=f"export{k + 1}")
            exports.append(e)
            if qemu_order:
                qemu_reconnect(d, e.sock)
            else:
                d.reconnect(e.sock)
            drv.vq = d.vqs[0]
            # every request outstanding at the kill must complete now
            outstanding = drv.outstanding()
            deadline = time.monotonic() + HANG
            while outstanding & drv.outstanding():
                if time.monotonic() > deadline:
                    lost = sorted(h for h, v in drv.by_head.items() if v[4] in outstanding)
                    pos = {h: [i for i in range(drv.vq.size)
                               if drv.vq.mem.unpack_from(struct.Struct("<H"),
                                                         drv.vq.avail_gpa + 4 + 2 * i)[0] == h]
                           for h in lost}
                    try:
                        base = d.client.get_vring_base(0)
                    except Exception as ex:  # noqa: BLE001
                        base = repr(ex)
                    raise Hang(f"lost {lost} at avail slots {pos}; backend base {base}; " +
                               drv.state(f"kill {k + 1}: {len(lost)} "
                                         "requests of the killed export never completed")
                               + "\n" + e.logtext()[-2000:])
                drv.wait(time.monotonic() + 0.05)
            assert not drv.errors, drv.errors[:5]
            assert not drv.vq.bad_used, drv.vq.bad_used[:5]
        drv.wait(time.monotonic() + 0.2)
        # quiesce: nothing new, everything outstanding completes
        drv.quiescing = True
        deadline = time.monotonic() + HANG
        while drv.by_head:
            if time.monotonic() > deadline:
                st = drv.state("quiesce")
                drv.vq.kick()
                time.sleep(0.5)
                st += f"; after a kick: used_idx {drv.vq.used_idx} avail_event {drv.vq.avail_event}"
                st += f"; base {d.client.get_vring_base(0)}"
                raise Hang(st + "\n" + e.logtext()[-3000:])
            drv.wait(time.monotonic() + 0.05)
        assert not drv.errors, drv.errors[:5]
    finally:
        d.close()
        for x in exports[:-1]:
            if x.proc.poll() is None:
                x.proc.kill()
                x.proc.wait()
    assert stop_export(exports[-1]) == 0, exports[-1].logtext()
    image = exports[-1].img.read_bytes()
    for b in range(NBLOCKS):
        assert image[b * BLOCK:(b + 1) * BLOCK] == pattern(drv.content[b]), f"block {b}"
    result = {"kills": kills, "completed": drv.completed, "writes": drv.tag,
              "restarts_that_resubmitted": resubmitted}
    log(result)
    return result


@pytest.mark.parametrize("engine", ["io_uring", "sync"])
def test_kill9_at_random_points_never_hangs_or_loses_a_request(tmp_path, engine):
    """KILLS kills at random moments of a QD32 stream; after each, every
    request outstanding at the kill completes (notified, never polled for),
    exactly once, with the right data; the file holds every acknowledged
    write at the end."""
    r = torture(tmp_path, KILLS, engine, seed=random.SystemRandom().randrange(1 << 30))
    assert r["completed"] > KILLS * QD
    # at least one kill caught requests in flight (the point of the test)
    assert r["restarts_that_resubmitted"] > 0, r


# -- the two notifications a dead backend can take with it -------------------

def _kill(e: Export) -> None:
    e.proc.send_signal(signal.SIGKILL)
    e.proc.wait()


def _writes(d: vc.BlkDevice, n: int, kick: bool) -> list[vc.Request]:
    reqs = [d.prepare(vc.BLK_T_OUT, 8 * i, out=pattern(i + 1)) for i in range(n)]
    d._publish(reqs, kick=kick)
    return reqs


def _notified_and_done(d: vc.BlkDevice, reqs: list[vc.Request], timeout: float = 10.0) -> None:
    """The driver sleeps until the call eventfd fires (it never polls), then
    finds every request completed, OK."""
    vq = d.vqs[0]
    deadline = time.monotonic() + timeout
    while not all(r.done for r in reqs):
        assert vq.wait_notification(max(0.0, deadline - time.monotonic())), (
            f"no notification in {timeout} s: used_idx {vq.used_idx}, driver's last "
            f"used {vq.last_used_idx}, {sum(not r.done for r in reqs)} not done")
        d.poll()
    assert [r.status for r in reqs] == [vc.BLK_S_OK] * len(reqs)


def test_completions_a_killed_export_never_signalled_are_signalled_by_the_next(tmp_path):
    """The old export published used entries and died before its eventfd
    write (a window of a few microseconds a random kill rarely hits): the
    driver, asleep, was never told.  The next export, restarted at that used
    index with nothing to redo, must notify once at start, or the guest
    waits forever for requests that are long done."""
    e1 = start_export(tmp_path, "--queues", "1", size=NBLOCKS * BLOCK, name="export1")
    d = _device(e1)
    e2 = None
    try:
        vq = d.vqs[0]
        reqs = _writes(d, 4, kick=True)
        deadline = time.monotonic() + 10
        while vq.used_idx != vq.avail_idx:      # done, seen by the test only
            assert time.monotonic() < deadline, "the first export never completed them"
            time.sleep(0.01)
        _kill(e1)
        while vq.wait_notification(0):           # the signal it sent never arrived
            pass
        e2 = start_export(tmp_path, "--queues", "1", size=NBLOCKS * BLOCK, name="export2")
        qemu_reconnect(d, e2.sock)
        _notified_and_done(d, reqs)
        assert not any(r.segment_data is None for r in reqs)
    finally:
        d.close()
        if e2 is not None:
            assert stop_export(e2) == 0, e2.logtext()
    assert "resubmitted" not in e2.logtext()


def test_requests_queued_while_no_export_ran_start_without_a_kick(tmp_path):
    """Between the kill and QEMU's reconnect the guest goes on queueing
    requests; its kicks land in QEMU, which drops them, and the new ring's
    kick eventfd starts unsignalled.  The next export must look at the avail
    ring once at start, or the requests wait for a kick that never comes
    (with EVENT_IDX the driver kicks only when avail_event asks for it)."""
    e1 = start_export(tmp_path, "--queues", "1", size=NBLOCKS * BLOCK, name="export1")
    d = _device(e1)
    e2 = None
    try:
        _notified_and_done(d, _writes(d, 2, kick=True))
        _kill(e1)
        reqs = _writes(d, 4, kick=True)          # kicks nobody reads
        e2 = start_export(tmp_path, "--queues", "1", size=NBLOCKS * BLOCK, name="export2")
        qemu_reconnect(d, e2.sock)
        _notified_and_done(d, reqs)
    finally:
        d.close()
        if e2 is not None:
            assert stop_export(e2) == 0, e2.logtext()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--engine", default="io_uring")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--client-order", action="store_true",
                    help="reconnect in the test client's order (kick after) instead of QEMU's")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        torture(Path(t), a.kills, a.engine, a.seed, qemu_order=not a.client_order)


if __name__ == "__main__":
    main()
