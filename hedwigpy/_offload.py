"""Blocking calls (fsync, open, read, unlink) moved off the event loop with the least overhead.

`trio.to_thread.run_sync` names the worker thread before and after every job (two `pthread_setname_np`
calls through ctypes) and copies the context; on the spool's hot path, where each message costs a few
thread round trips, profiles put that bookkeeping at 5-10% of the daemon's CPU. `run_sync` keeps what
matters — a bound on concurrent threads, results and exceptions handed back, no cancellation while the
call runs (the file system call finishes either way, so its outcome must be seen) — and drops the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import trio

if TYPE_CHECKING:
    import outcome

T = TypeVar("T")

MAX_THREADS = 40  # trio's default bound: at most this many blocking calls at once; more wait their turn
_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("hedwigpy_offload")


def _current_limiter() -> trio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:  # one per trio run, so tests that start many runs never share one
        limiter = trio.CapacityLimiter(MAX_THREADS)
        _limiter.set(limiter)
        return limiter


async def run_sync(fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` in a worker thread and return its result (or raise its exception).

    Not cancellable once started, like `trio.to_thread.run_sync`'s default: the caller sees how the call
    ended. A cancellation pending on entry is raised before anything runs."""
    await trio.lowlevel.checkpoint_if_cancelled()
    async with _current_limiter():
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[T]) -> None:
            try:
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            except trio.RunFinishedError:  # the loop is gone; nobody is waiting any more
                pass

        trio.lowlevel.start_thread_soon(lambda: fn(*args), deliver)
        result: T = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        return result
