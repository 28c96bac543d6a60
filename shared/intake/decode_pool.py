"""Where a Router process decodes user images: a bounded pool of worker threads that cannot stall
the event loop, whatever the images.

- Bounded: `limits.decode_workers` threads (default: the CPU cores). A request that finds them
  all busy waits up to `limits.decode_wait_s` for one, then gets 429 `intake_busy` with
  Retry-After — it never queues unboundedly, and it never decodes on the event loop.
- Lower CPU priority: each worker lowers its own nice value (Linux keeps it per thread), so on a
  machine whose cores are all decoding, the event loop, the health probe and Serve's proxy still
  get the CPU first. Pillow's decoders release the GIL while they work.
- A time budget: a request's images that take longer than `limits.decode_timeout_s` are answered
  422 `image_decode_timeout`. A thread cannot be stopped, so the slot stays taken until the
  decode really ends: the pool never holds more work than it has threads.

One pool per process (per Router replica), made on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from shared.config import LimitsConfig
from shared.errors import BusyError, InvalidRequestError

T = TypeVar("T")
NICE = 10  # the workers' nice value above the process's own


def _lower_priority() -> None:
    # Not Linux, or not permitted: the worker runs at normal priority.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(0, 0) + NICE)


class DecodePool:
    """Runs intake work (image decoding, fitting, control maps) off the event loop, bounded."""

    def __init__(self, workers: int, wait_s: float, timeout_s: float) -> None:
        self.workers = workers
        self._wait_s = wait_s
        self._timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="intake-decode", initializer=_lower_priority
        )
        self._free = workers
        self._changed: asyncio.Condition | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def busy(self) -> int:
        """Workers running a task now (including ones past their time budget)."""
        return self.workers - self._free

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a worker; 429 if none frees up in time, 422 if it runs too long."""
        changed = self._condition()
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(lambda: self._free > 0), self._wait_s)
            except TimeoutError:
                retry = max(1, math.ceil(self._timeout_s))
                raise BusyError(
                    f"all {self.workers} image decoders are busy; retry in {retry} s",
                    code="intake_busy",
                ) from None
            self._free -= 1
        future = self._executor.submit(fn, *args)
        future.add_done_callback(self._released)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._timeout_s)
        except TimeoutError:
            raise InvalidRequestError(
                f"the request's images took longer than {self._timeout_s:g} s to decode; send "
                "smaller or simpler images",
                code="image_decode_timeout",
            ) from None

    def _condition(self) -> asyncio.Condition:
        loop = asyncio.get_running_loop()
        if self._changed is None or self._loop is not loop:
            self._changed, self._loop = asyncio.Condition(), loop
        return self._changed

    def _released(self, _: Future[Any]) -> None:
        loop, changed = self._loop, self._changed
        assert loop is not None and changed is not None

        async def release() -> None:
            async with changed:
                self._free += 1
                changed.notify()

        if loop.is_closed():  # the loop that waited is gone (tests): nobody waits on it
            self._free += 1
        else:
            asyncio.run_coroutine_threadsafe(release(), loop)


_POOLS: dict[tuple[int, float, float], DecodePool] = {}


def decode_pool(limits: LimitsConfig) -> DecodePool:
    """This process's pool for these limits."""
    workers = limits.decode_workers or os.cpu_count() or 1
    key = (workers, limits.decode_wait_s, limits.decode_timeout_s)
    if key not in _POOLS:
        _POOLS[key] = DecodePool(*key)
    return _POOLS[key]
