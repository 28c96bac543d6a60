"""The intake's decode pool (shared/intake/decode_pool.py): bounded, refuses with 429 when full past
its wait, answers a slow decode with 422 while keeping its slot until the thread really ends, and
runs its workers at a lower CPU priority than the caller."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from shared.errors import BusyError, InvalidRequestError
from shared.intake.decode_pool import NICE, DecodePool


def test_work_runs_on_a_worker_and_returns() -> None:
    async def main() -> None:
        pool = DecodePool(2, wait_s=1, timeout_s=5)
        caller = threading.get_ident()
        assert await pool.run(lambda x: (x * 2, threading.get_ident() != caller), 21) == (42, True)
        assert pool.busy == 0

    asyncio.run(main())


def test_a_full_pool_refuses_after_its_wait_and_frees_up_again() -> None:
    release = threading.Event()

    async def main() -> None:
        pool = DecodePool(2, wait_s=0.2, timeout_s=30)
        running = [asyncio.create_task(pool.run(release.wait)) for _ in range(2)]
        while pool.busy < 2:
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(BusyError) as info:
            await pool.run(lambda: None)
        waited = time.perf_counter() - started
        assert info.value.status == 429 and info.value.code == "intake_busy"
        assert 0.2 <= waited < 1.0
        waiter = asyncio.create_task(pool.run(lambda: "third"))  # waits for a slot
        await asyncio.sleep(0.05)
        assert not waiter.done()
        release.set()
        assert await waiter == "third"
        await asyncio.gather(*running)
        assert pool.busy == 0

    asyncio.run(main())


def test_a_slow_decode_is_refused_but_keeps_its_slot_until_it_ends() -> None:
    release = threading.Event()

    async def main() -> None:
        pool = DecodePool(1, wait_s=0.05, timeout_s=0.2)
        with pytest.raises(InvalidRequestError) as info:
            await pool.run(release.wait)
        assert info.value.code == "image_decode_timeout"
        assert pool.busy == 1, "the thread still runs: its slot is not handed out"
        with pytest.raises(BusyError):
            await pool.run(lambda: None)
        release.set()
        while pool.busy:
            await asyncio.sleep(0.01)
        assert await pool.run(lambda: "free") == "free"

    asyncio.run(main())


def test_workers_run_at_a_lower_priority() -> None:
    async def main() -> tuple[int, int]:
        pool = DecodePool(1, wait_s=1, timeout_s=5)
        worker = await pool.run(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return worker, os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    worker, caller = asyncio.run(main())
    assert worker == min(19, caller + NICE)
