"""The queue worker: deliver what lands in `queued/` and file each outcome in the spool.

After an attempt the message's status is saved first (so a recipient recorded as delivered is never sent
again, even after a crash), then the message moves: every recipient delivered → removed; any recipient
still pending → `deferred/`; only permanent failures left → `bounced/`. Retrying `deferred/` with
backoff and sending DSNs for `bounced/` are the scheduler's and the bounce module's work.
"""

from __future__ import annotations

import time

import structlog
import trio

from ..storage import DeliveryStatus, State, Storage, StorageError, StoredMessage
from .delivery import Deliverer
from .results import Delivered, PermanentFailure, Result, record

log = structlog.get_logger("hedwigpy.worker")

MAX_CONCURRENT_DELIVERIES = 100  # like Postfix's default_process_limit for smtp(8)


class Inbox:
    """Messages waiting for their first attempt, in arrival order. `submit` never blocks: the spool
    already bounds how many messages exist.

    A message submitted `fresh` was just committed by a receiver, so it has no saved status yet and
    its first attempt skips reading one (a thread round trip per message on the hot path).
    """

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[StoredMessage, bool]] = {}  # insertion order = arrival order
        self._event = trio.Event()

    def __len__(self) -> int:
        return len(self._waiting)

    def submit(self, message: StoredMessage, *, fresh: bool = False) -> None:
        if message.id not in self._waiting:
            self._waiting[message.id] = (message, fresh)
            self._event.set()

    def submit_fresh(self, message: StoredMessage) -> None:
        self.submit(message, fresh=True)

    async def get(self) -> tuple[StoredMessage, bool]:
        while not self._waiting:
            self._event = trio.Event()
            await self._event.wait()
        message_id = next(iter(self._waiting))
        return self._waiting.pop(message_id)


async def serve_worker(
    storage: Storage,
    deliverer: Deliverer,
    inbox: Inbox,
    *,
    concurrency: int = MAX_CONCURRENT_DELIVERIES,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Attempt every message in `queued/` at start, then each message submitted to `inbox`."""
    for message in await storage.list(State.QUEUED):
        inbox.submit(message)
    task_status.started()
    slots = trio.Semaphore(concurrency)
    async with trio.open_nursery() as nursery:
        while True:
            message, fresh = await inbox.get()
            await slots.acquire()
            nursery.start_soon(_attempt_and_release, storage, deliverer, message, fresh, slots)


async def _attempt_and_release(
    storage: Storage, deliverer: Deliverer, message: StoredMessage, fresh: bool, slots: trio.Semaphore
) -> None:
    try:
        await attempt(storage, deliverer, message, fresh=fresh)
    except* StorageError as group:  # the message stays where it is; a restart (or the scheduler) retries it
        exc: BaseException = group  # raised here, or (grouped) from inside deliver()'s nursery
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        log.error("spool error during delivery", id=message.id, error=str(exc))
    finally:
        slots.release()


async def attempt(
    storage: Storage, deliverer: Deliverer, message: StoredMessage, *, fresh: bool = False
) -> DeliveryStatus:
    """One delivery attempt of a queued message; returns its status afterwards."""
    status = DeliveryStatus.initial(message.envelope) if fresh else await storage.load_status(message.id)
    pending = status.pending()
    results = await deliverer.deliver(message, pending) if pending else []
    status = record(status, results, time.time())
    for result in results:
        _log_result(message.id, result)
    failed = any(r.state == "failed" for r in status.recipients)
    if not status.pending() and not failed:
        # Removing the message is its record: a status saved first would only widen nothing (a crash
        # before the removal resends either way) and cost a write and two fsyncs per message.
        await storage.delete(message.id)
        return status
    await storage.save_status(message.id, status)
    await storage.move(message.id, State.DEFERRED if status.pending() else State.BOUNCED)
    return status


def _log_result(message_id: str, result: Result) -> None:
    event = (
        "delivered"
        if isinstance(result, Delivered)
        else "failed"
        if isinstance(result, PermanentFailure)
        else "deferred"
    )
    reply = result.reply
    log.info(
        event,
        id=message_id,
        recipient=result.recipient,
        host=result.host,
        code=reply.code,
        enhanced=reply.enhanced,
        text=reply.text,
    )
