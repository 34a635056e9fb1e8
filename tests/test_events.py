"""The event bus, and the events the queue publishes for a message's life."""

from __future__ import annotations

import trio
import trio.testing

from hedwigpy.events import SUBSCRIBER_BUFFER, EventBus
from hedwigpy.storage import MemoryStorage, State
from hedwigpy.worker.scheduler import Scheduler
from tests.worker.test_scheduler import ScriptedDelivery, config, spool, until, wall


async def test_subscribers_get_what_is_published_while_subscribed() -> None:
    bus = EventBus()
    bus.publish("received", "before")
    async with bus.subscribe(lambda e: e["type"] != "held") as sub:
        bus.publish("received", "a", sender="x@example.org")
        bus.publish("held", "a")
        bus.publish("delivered", "a", recipient="r@example.net")
        first, second = await sub.receive(), await sub.receive()
    bus.publish("deleted", "a")
    assert (first["type"], first["id"], first["sender"]) == ("received", "a", "x@example.org")
    assert (second["type"], second["recipient"]) == ("delivered", "r@example.net")
    assert isinstance(first["at"], float) and bus.subscribers == 0 and bus.published == 5


async def test_a_slow_subscriber_loses_events_instead_of_blocking_the_publisher() -> None:
    bus = EventBus()
    async with bus.subscribe() as sub:
        for i in range(SUBSCRIBER_BUFFER + 5):
            bus.publish("deferred", str(i))  # never blocks
        assert sub.dropped == 5
        assert (await sub.receive())["id"] == "0"


async def test_the_queue_publishes_each_state_change(autojump_clock: trio.testing.MockClock) -> None:
    storage = MemoryStorage()
    delivery = ScriptedDelivery(
        {"r@example.net": ["450 4.2.1 busy", "250 2.0.0 ok"], "gone@example.net": ["550 5.1.1 no"]}
    )
    bus = EventBus()
    scheduler = Scheduler(storage, delivery, config(), clock=wall, events=bus)
    async with trio.open_nursery() as nursery, bus.subscribe(lambda e: e["type"] != "received") as sub:
        await nursery.start(scheduler.serve)
        message = await spool(storage, "r@example.net", "gone@example.net")
        scheduler.submit_fresh(message)
        await until(lambda: storage.messages[message.id][0].state is State.DEFERRED)
        assert await scheduler.hold(message.id) and await scheduler.release(message.id)
        await until(lambda: delivery.attempts_of("r@example.net") == 2)
        seen: list[tuple[object, object, object]] = []
        while len(seen) < 5:
            with trio.fail_after(3600):
                event = await sub.receive()
            if event["id"] == message.id:
                seen.append((event["type"], event.get("recipient"), event.get("code")))
        nursery.cancel_scope.cancel()
    assert seen == [
        ("deferred", "r@example.net", 450),
        ("bounced", "gone@example.net", 550),
        ("held", None, None),
        ("released", None, None),
        ("delivered", "r@example.net", 250),
    ]
