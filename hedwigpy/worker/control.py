"""What operators can do to the queue of a running daemon: the contract between the scheduler (which
owns the queue) and its front ends (the HTTP admin routes, and through them the `hedwigpy queue` CLI).

Acting through the daemon, never on the spool directly, keeps the daemon's view consistent: a message
held here is taken out of the schedule in the same step.
"""

from __future__ import annotations

from typing import Protocol

from ..storage import DeliveryStatus, State, StoredMessage


class QueueControl(Protocol):
    async def list(self, state: State | None = None) -> list[StoredMessage]:
        """Messages in `state` (every state but corrupt when None), oldest first."""

    async def show(self, message_id: str) -> tuple[StoredMessage, DeliveryStatus] | None:
        """A message with its per-recipient status; None for an unknown id."""

    def stats(self) -> dict[str, int]:
        """Messages per state (every State value as a key) plus "scheduled" (entries in the schedule)
        and "in_flight" (attempts running now)."""

    async def flush(self) -> int:
        """Make every deferred message due now (postqueue -f); returns how many."""

    async def retry(self, message_id: str) -> bool:
        """Make one queued or deferred message due now; False if unknown or in another state."""

    async def hold(self, message_id: str) -> bool:
        """Move a queued or deferred message to held/: it is not attempted until released. An attempt
        already running finishes first. False if unknown, bounced or corrupt."""

    async def release(self, message_id: str) -> bool:
        """Move a held message back to deferred/, due now. False unless it is held."""

    async def delete(self, message_id: str) -> bool:
        """Remove a message in any state (postsuper -d); an attempt already running finishes first.
        False if unknown."""
