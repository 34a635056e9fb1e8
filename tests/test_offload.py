"""`hedwigpy._offload.run_sync`: trio.to_thread.run_sync's contract without its per-job bookkeeping."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from hedwigpy import _offload
from hedwigpy._offload import run_sync


async def test_returns_the_result_from_another_thread() -> None:
    main = threading.get_ident()
    value, ident = await run_sync(lambda a, b: (a + b, threading.get_ident()), 2, 3)
    assert value == 5 and ident != main


async def test_raises_the_exception() -> None:
    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        await run_sync(fail)


async def test_a_pending_cancellation_runs_nothing() -> None:
    ran: list[int] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await run_sync(ran.append, 1)
    assert scope.cancelled_caught and ran == []


async def test_a_started_call_finishes_and_its_result_is_seen() -> None:
    """Cancelling while the call runs does not abandon it: the caller gets its result (a spool write
    that happened must be known to have happened)."""
    results: list[str] = []

    def slow() -> str:
        time.sleep(0.2)
        return "done"

    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                results.append(await run_sync(slow))

            nursery.start_soon(call)
            await trio.sleep(0.05)
            scope.cancel()
    assert results == ["done"]


async def test_concurrent_calls_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_offload, "MAX_THREADS", 3)
    running = peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.02)
        with lock:
            running -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(12):
            nursery.start_soon(run_sync, work)
    assert peak == 3
