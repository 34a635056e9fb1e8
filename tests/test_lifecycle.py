"""`Drain`: the shutdown signal, and the waits it interrupts."""

from __future__ import annotations

import trio
import trio.lowlevel
import trio.testing

from hedwigpy.lifecycle import Drain


async def test_start_interrupts_the_waits_under_way_and_every_later_one() -> None:
    drain = Drain()
    interrupted: list[bool] = []

    async def idle() -> None:
        with drain.interruptible() as scope:
            await trio.sleep_forever()
        interrupted.append(scope.cancelled_caught)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle)
        nursery.start_soon(idle)
        await trio.testing.wait_all_tasks_blocked()
        assert not drain.draining
        drain.start()
    assert interrupted == [True, True] and drain.draining
    with drain.interruptible() as scope:
        await trio.sleep(1)  # already cancelled: returns at once
    assert scope.cancelled_caught
    drain.start()  # idempotent
    await drain.wait()


async def test_a_wait_that_ended_on_its_own_is_not_interrupted_later() -> None:
    drain = Drain()
    with drain.interruptible() as scope:
        await trio.lowlevel.checkpoint()
    drain.start()
    assert not scope.cancelled_caught
