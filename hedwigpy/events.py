"""The in-process event bus: every state change of a message, for the WebSocket stream, webhooks and metrics.

Events are plain JSON-able dicts with at least `type` (received, delivered, deferred, bounced, held,
released, deleted), `id` (the message id) and `at` (unix time); per-recipient events add `recipient`,
`code`, `enhanced`, `text` and `host`. Publishing never blocks and never fails: a subscriber that
cannot keep up loses events (and is told how many) rather than slowing delivery down.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

Event = dict[str, Any]
SUBSCRIBER_BUFFER = 1000


class Subscription:
    """One subscriber's view of the bus: `receive()` the next event; `dropped` counts what it missed."""

    def __init__(self, predicate: Callable[[Event], bool]) -> None:
        self._send, self._receive = trio.open_memory_channel[Event](SUBSCRIBER_BUFFER)
        self._predicate = predicate
        self.dropped = 0

    def _offer(self, event: Event) -> None:
        if not self._predicate(event):
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1

    async def receive(self) -> Event:
        return await self._receive.receive()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._receive.__aiter__()


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self.published = 0

    def publish(self, type: str, message_id: str, **fields: Any) -> None:
        """Hand an event to every current subscriber (synchronously; never blocks)."""
        event: Event = {"type": type, "id": message_id, "at": time.time(), **fields}
        self.published += 1
        for subscription in list(self._subscribers):
            subscription._offer(event)

    @asynccontextmanager
    async def subscribe(
        self, predicate: Callable[[Event], bool] = lambda _: True
    ) -> AsyncIterator[Subscription]:
        """Events published while the context is open (and matching `predicate`)."""
        subscription = Subscription(predicate)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
