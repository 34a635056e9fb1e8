"""The queue worker: an in-memory schedule of due messages, attempts bounded in number, and the operator's
controls (`QueueControl`).

At start the schedule is rebuilt from the spool: everything in `queued/` is due now, everything in
`deferred/` at the time kept in its file's mtime — ids and stat() only, no file is opened. Then the
worker sleeps until the earliest entry is due or something new arrives; nothing rescans directories, so
a daemon idling with a deep queue uses no CPU. Messages just received come in through `submit_fresh`
with their metadata, so their first attempt reads nothing back from disk.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable

import structlog
import trio

from ..config import Config
from ..events import EventBus
from ..lifecycle import Drain
from ..storage import DeliveryStatus, State, Storage, StorageError, StoredMessage
from .runner import Delivers, attempt
from .schedule import Schedule

log = structlog.get_logger("hedwigpy.scheduler")

MAX_CONCURRENT_DELIVERIES = 100  # like Postfix's default_process_limit for smtp(8)
RETENTION_SWEEP = 3600.0  # how often bounced/ is checked for messages past bounced_retention
_ACTIVE = (State.QUEUED, State.DEFERRED)


class Scheduler:
    """Owns the schedule; implements `worker.control.QueueControl`."""

    def __init__(
        self,
        storage: Storage,
        deliverer: Delivers,
        config: Config,
        *,
        concurrency: int = MAX_CONCURRENT_DELIVERIES,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        events: EventBus | None = None,
    ) -> None:
        self._storage = storage
        self._events = events
        self._deliverer = deliverer
        self._config = config
        self._concurrency = concurrency
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._schedule = Schedule()
        # Just spooled: metadata known (no need to read it back); the flag says whether a status exists.
        self._known: dict[str, tuple[StoredMessage, bool]] = {}
        self._running: set[str] = set()
        self._after_attempt: dict[str, str] = {}  # id -> "hold" | "delete", asked for while running
        self._wakeup = trio.Event()

    # -- the worker ----------------------------------------------------------------------------------

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: retry backoff, lifetime and retention from now on."""
        self._config = config

    def submit_fresh(self, message: StoredMessage) -> None:
        """A message just committed to `queued/` with no status: due now."""
        self.submit(message, self._clock(), has_status=False)

    def submit(self, message: StoredMessage, due: float, *, has_status: bool) -> None:
        """A message just committed to `queued/`, due at `due`; `has_status` when it was committed with
        one (cut-through recorded what it delivered or what failed)."""
        self._known[message.id] = (message, has_status)
        self._add(message.id, due)

    async def serve(
        self, drain: Drain | None = None, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run attempts as they fall due. Once `drain` starts, no new attempt starts and this returns when
        the running ones are done (cancelled ones leave their message where it was: not done)."""
        await self._rebuild()
        task_status.started()
        slots = trio.Semaphore(self._concurrency)
        async with trio.open_nursery() as attempts:
            async with trio.open_nursery() as background:
                background.start_soon(self._sweep_bounced)
                with drain.interruptible() if drain is not None else contextlib.nullcontext():
                    while True:
                        await slots.acquire()
                        message_id = await self._next_due()  # no checkpoint from here to start_soon
                        self._running.add(message_id)
                        attempts.start_soon(self._run, message_id, slots)
                background.cancel_scope.cancel()
            log.info("scheduler draining", in_flight=len(self._running))
        log.info("scheduler stopped")

    async def _rebuild(self) -> None:
        started = time.monotonic()
        now = self._clock()
        for message_id, _ in sorted(await self._storage.due_times(State.QUEUED)):
            self._schedule.add(message_id, now)
        for message_id, due in await self._storage.due_times(State.DEFERRED):
            self._schedule.add(message_id, due)
        log.info(
            "schedule rebuilt", messages=len(self._schedule), seconds=round(time.monotonic() - started, 3)
        )

    def _add(self, message_id: str, due: float) -> None:
        earliest = self._schedule.next_due()
        self._schedule.add(message_id, due)
        if earliest is None or due < earliest:
            self._wakeup.set()

    async def _next_due(self) -> str:
        while True:
            now = self._clock()
            message_id = self._schedule.pop_due(now)
            if message_id is not None:
                return message_id
            due = self._schedule.next_due()
            self._wakeup = trio.Event()
            with trio.move_on_after(math.inf if due is None else max(due - now, 0.0)):
                await self._wakeup.wait()

    async def _run(self, message_id: str, slots: trio.Semaphore) -> None:
        try:
            await self._attempt(message_id)
        except* StorageError as group:
            exc: BaseException = group  # raised here, or (grouped) from inside deliver()'s nursery
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            log.error("spool error during delivery; retrying later", id=message_id, error=str(exc))
            self._add(message_id, self._clock() + self._config.queue.retry_initial)
        finally:
            self._running.discard(message_id)
            slots.release()
            action = self._after_attempt.pop(message_id, None)
            try:
                if action == "hold":
                    await self._hold_now(message_id)
                elif action == "delete":
                    await self._delete_now(message_id)
            except StorageError as exc:  # the action is lost, not the daemon
                log.error(f"could not {action} after the attempt", id=message_id, error=str(exc))

    async def _attempt(self, message_id: str) -> None:
        known = self._known.pop(message_id, None)
        message, fresh = (known[0], not known[1]) if known else (None, False)
        if message is None:
            message = await self._storage.get(message_id)
            if message is None or message.state not in _ACTIVE:
                return
        outcome = await attempt(
            self._storage,
            self._deliverer,
            self._config,
            message,
            fresh=fresh,
            rng=self._rng,
            clock=self._clock,
            events=self._events,
        )
        if outcome.dsn is not None:
            self.submit_fresh(outcome.dsn)
        if outcome.state is State.DEFERRED and outcome.due is not None:
            self._add(message_id, outcome.due)

    async def _sweep_bounced(self) -> None:
        """Remove bounced messages past `bounced_retention` (their mtime is when they bounced)."""
        while True:
            retention = self._config.queue.bounced_retention  # each round: a reload may change it
            now = self._clock()
            try:
                for message_id, since in await self._storage.due_times(State.BOUNCED):
                    if since + retention <= now:
                        await self._storage.delete(message_id)
                        log.info("bounced message removed", id=message_id, retention=retention)
            except StorageError as exc:
                log.error("could not sweep bounced/", error=str(exc))
            await trio.sleep(min(RETENTION_SWEEP, max(retention / 10, 1.0)))

    def _publish(self, type: str, message_id: str) -> None:
        if self._events is not None:
            self._events.publish(type, message_id)

    # -- QueueControl --------------------------------------------------------------------------------

    async def list(self, state: State | None = None) -> list[StoredMessage]:
        states = [state] if state is not None else [s for s in State if s is not State.CORRUPT]
        found: list[StoredMessage] = []
        for s in states:
            found += await self._storage.list(s)
        return sorted(found, key=lambda m: m.id)

    async def show(self, message_id: str) -> tuple[StoredMessage, DeliveryStatus] | None:
        message = await self._storage.get(message_id)
        if message is None:
            return None
        try:
            return message, await self._storage.load_status(message_id)
        except StorageError:  # removed, or quarantined, meanwhile
            return None

    def stats(self) -> dict[str, int]:
        counts = self._storage.statistics()
        return {**counts, "scheduled": len(self._schedule), "in_flight": len(self._running)}

    async def flush(self) -> int:
        now = self._clock()
        ids = self._schedule.ids()
        for message_id in ids:
            self._schedule.add(message_id, now)
        self._wakeup.set()
        log.info("queue flushed", messages=len(ids))
        return len(ids)

    async def retry(self, message_id: str) -> bool:
        message = await self._storage.get(message_id)
        if message is None or message.state not in _ACTIVE:
            return False
        if message_id not in self._running:
            self._add(message_id, self._clock())
        log.info("retry requested", id=message_id)
        return True

    async def hold(self, message_id: str) -> bool:
        if message_id in self._running:
            if await self._storage.get(message_id) is None:
                return False
            self._after_attempt[message_id] = "hold"
            return True
        # Out of the schedule before the first await, so no attempt can start while we look it up.
        due = self._schedule.due_time(message_id)
        self._schedule.remove(message_id)
        message = await self._storage.get(message_id)
        if message is None or message.state not in _ACTIVE:
            if due is not None:
                self._add(message_id, due)
            return False
        await self._hold_now(message_id)
        return True

    async def _hold_now(self, message_id: str) -> None:
        message = await self._storage.get(message_id)
        if message is None or message.state not in _ACTIVE:
            return  # delivered, bounced or deleted by the attempt that was running
        self._schedule.remove(message_id)
        self._known.pop(message_id, None)  # once released it is read back like any deferred message
        await self._storage.move(message_id, State.HELD)
        log.info("held", id=message_id)
        self._publish("held", message_id)

    async def release(self, message_id: str) -> bool:
        message = await self._storage.get(message_id)
        if message is None or message.state is not State.HELD:
            return False
        now = self._clock()
        await self._storage.move(message_id, State.DEFERRED)
        await self._storage.set_due(message_id, now)
        self._add(message_id, now)
        log.info("released", id=message_id)
        self._publish("released", message_id)
        return True

    async def delete(self, message_id: str) -> bool:
        if await self._storage.get(message_id) is None:
            return False
        if message_id in self._running:
            self._after_attempt[message_id] = "delete"
        else:
            await self._delete_now(message_id)
        return True

    async def _delete_now(self, message_id: str) -> None:
        self._schedule.remove(message_id)
        self._known.pop(message_id, None)
        await self._storage.delete(message_id)
        log.info("deleted", id=message_id)
        self._publish("deleted", message_id)
