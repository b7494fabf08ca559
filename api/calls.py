"""Blocking hypervisor calls (libvirt) off the event loop, bounded.

asyncio.to_thread would queue them on the loop's default executor, whose
threads the interpreter joins at exit: a libvirt daemon that accepts and
never answers would then pin one thread per call until every slot hangs,
and keep the daemon from stopping on SIGTERM.  Here each call gets a daemon
thread of its own (never joined at exit), at most SLOTS at a time; a call
that finds every slot taken by calls still running fails at once (Busy,
the API answers 503) instead of queueing behind them.  A call the caller
gave up on (timeout) keeps its slot until it really returns."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable

SLOTS = 4
SLOT_WAIT_S = 1.0  # how long a call waits for a slot before Busy


class Busy(Exception):
    pass


def _settle(fut: asyncio.Future, ok: bool, value) -> None:
    if fut.done():  # the caller gave up (timeout or cancellation)
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class BoundedCalls:
    def __init__(self, slots: int = SLOTS, name: str = "hv-call") -> None:
        self.slots = slots
        self.name = name
        self._free = threading.BoundedSemaphore(slots)

    async def _acquire(self) -> None:
        deadline = asyncio.get_running_loop().time() + SLOT_WAIT_S
        while not self._free.acquire(blocking=False):
            if asyncio.get_running_loop().time() > deadline:
                raise Busy(f"{self.slots} hypervisor calls are still running (a hypervisor "
                           "that does not answer?); try again later")
            await asyncio.sleep(0.05)

    async def run(self, fn: Callable, *args, timeout: float | None):
        """FN(*ARGS) in a daemon thread; TimeoutError after TIMEOUT seconds
        (the thread goes on, holding its slot, until FN returns)."""
        await self._acquire()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        ctx = contextvars.copy_context()  # log lines keep the request id

        def work() -> None:
            try:
                try:
                    result = ctx.run(fn, *args)
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    outcome = (False, e)
                else:
                    outcome = (True, result)
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(_settle, fut, *outcome)
            finally:
                self._free.release()

        try:
            threading.Thread(target=work, name=self.name, daemon=True).start()
        except BaseException:
            self._free.release()
            raise
        return await asyncio.wait_for(fut, timeout)
