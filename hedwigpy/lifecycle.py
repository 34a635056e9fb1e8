"""`Drain`: the one shutdown signal every service watches (DESIGN rule 2).

SIGTERM (or SIGINT) starts the drain: listeners stop accepting, `/readyz` and `POST /v1/messages`
answer 503, SMTP sessions that are between transactions get `421` and are closed, the queue worker starts
no new attempt. What is already in flight — an SMTP transaction, an HTTP request, a delivery attempt — gets
`[server].drain_timeout` to finish; the root nursery cancels whatever is left after that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class Drain:
    """Set once; waiters and interruptible waits notice at once."""

    def __init__(self) -> None:
        self._event = trio.Event()
        # Waits that the drain should end early (an idle SMTP session waiting for its next command).
        self._interruptible: set[trio.CancelScope] = set()

    @property
    def draining(self) -> bool:
        return self._event.is_set()

    def start(self) -> None:
        """Begin draining (idempotent)."""
        self._event.set()
        for scope in self._interruptible:
            scope.cancel()

    async def wait(self) -> None:
        await self._event.wait()

    @contextmanager
    def interruptible(self) -> Iterator[trio.CancelScope]:
        """A cancel scope the drain cancels: for waits that are pointless once draining. Already
        cancelled when the drain has begun. Check `scope.cancelled_caught` to tell a drain from a result."""
        scope = trio.CancelScope()
        if self.draining:
            scope.cancel()
        self._interruptible.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._interruptible.discard(scope)
