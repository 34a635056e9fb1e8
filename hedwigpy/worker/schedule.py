"""When to try again: the backoff arithmetic and the in-memory schedule, as plain code (no I/O, no clock).

The scheduler shell keeps one `Schedule` of (due time, message id), rebuilt from the spool at start, and
sleeps until the earliest entry instead of rescanning directories; so an idle daemon with a deep queue
uses no CPU between retries.
"""

from __future__ import annotations

import heapq
import itertools
import random

from ..config import QueueConfig


def retry_delay(attempts: int, cfg: QueueConfig, rng: random.Random) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1 = the first):
    `retry_initial * retry_factor ** (attempts - 1)`, capped at `retry_max`, then spread by ±`retry_jitter`
    so messages that failed together do not all come back together. Never negative."""
    exponent = max(attempts - 1, 0)
    try:
        base = min(cfg.retry_initial * cfg.retry_factor**exponent, cfg.retry_max)
    except OverflowError:  # a huge attempt count: the cap applies
        base = cfg.retry_max
    return max(0.0, base * (1.0 + cfg.retry_jitter * rng.uniform(-1.0, 1.0)))


def expired(received_at: float, now: float, cfg: QueueConfig) -> bool:
    """Has the message been queued longer than `max_lifetime` (Postfix's maximal_queue_lifetime)?"""
    return now - received_at >= cfg.max_lifetime


class Schedule:
    """Message ids by due time. Re-adding an id moves it; removal is lazy (stale heap entries are skipped),
    so every operation is O(log n) and memory stays proportional to the entries."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, tuple[float, int]] = {}
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, message_id: object) -> bool:
        return message_id in self._due

    def add(self, message_id: str, due: float) -> None:
        entry = (due, next(self._counter))
        self._due[message_id] = entry
        heapq.heappush(self._heap, (*entry, message_id))
        if len(self._heap) > 2 * len(self._due) + 64:  # many moves/removals: drop the stale entries
            self._heap = [(d, c, i) for i, (d, c) in self._due.items()]
            heapq.heapify(self._heap)

    def remove(self, message_id: str) -> bool:
        return self._due.pop(message_id, None) is not None

    def due_time(self, message_id: str) -> float | None:
        entry = self._due.get(message_id)
        return entry[0] if entry else None

    def next_due(self) -> float | None:
        """The earliest due time, or None when nothing is scheduled."""
        self._drop_stale()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> str | None:
        """The id of the earliest entry due at or before `now` (removed), or None."""
        self._drop_stale()
        if not self._heap or self._heap[0][0] > now:
            return None
        _, _, message_id = heapq.heappop(self._heap)
        del self._due[message_id]
        return message_id

    def ids(self) -> list[str]:
        return list(self._due)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap:
            due, counter, message_id = heap[0]
            if self._due.get(message_id) == (due, counter):
                return
            heapq.heappop(heap)
