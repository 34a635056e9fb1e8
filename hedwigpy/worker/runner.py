"""The queue worker: deliver what lands in `queued/` and file each outcome in the spool.

After an attempt the message's status is saved first (so a recipient recorded as delivered is never sent
again, even after a crash), then the message moves: every recipient delivered → removed; any recipient
still pending → `deferred/`; only permanent failures left → `bounced/`. Retrying `deferred/` with
backoff and sending DSNs for `bounced/` are the scheduler's and the bounce module's work.
"""

from __future__ import annotations

import time
from collections import deque

import structlog
import trio

from ..storage import DeliveryStatus, State, Storage, StorageError
from .delivery import Deliverer
from .results import Delivered, PermanentFailure, Result, record

log = structlog.get_logger("hedwigpy.worker")

MAX_CONCURRENT_DELIVERIES = 100  # like Postfix's default_process_limit for smtp(8)


class Inbox:
    """Message ids waiting for their first attempt, in arrival order. `submit` never blocks: the ids are
    small and the spool already bounds how many messages exist."""

    def __init__(self) -> None:
        self._ids: deque[str] = deque()
        self._queued: set[str] = set()
        self._event = trio.Event()

    def __len__(self) -> int:
        return len(self._ids)

    def submit(self, message_id: str) -> None:
        if message_id not in self._queued:
            self._queued.add(message_id)
            self._ids.append(message_id)
            self._event.set()

    async def get(self) -> str:
        while not self._ids:
            self._event = trio.Event()
            await self._event.wait()
        message_id = self._ids.popleft()
        self._queued.discard(message_id)
        return message_id


async def serve_worker(
    storage: Storage,
    deliverer: Deliverer,
    inbox: Inbox,
    *,
    concurrency: int = MAX_CONCURRENT_DELIVERIES,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Attempt every message in `queued/` at start, then each id submitted to `inbox`."""
    for message in await storage.list(State.QUEUED):
        inbox.submit(message.id)
    task_status.started()
    slots = trio.Semaphore(concurrency)
    async with trio.open_nursery() as nursery:
        while True:
            message_id = await inbox.get()
            await slots.acquire()
            nursery.start_soon(_attempt_and_release, storage, deliverer, message_id, slots)


async def _attempt_and_release(
    storage: Storage, deliverer: Deliverer, message_id: str, slots: trio.Semaphore
) -> None:
    try:
        await attempt(storage, deliverer, message_id)
    except* StorageError as group:  # the message stays where it is; a restart (or the scheduler) retries it
        exc: BaseException = group  # raised here, or (grouped) from inside deliver()'s nursery
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        log.error("spool error during delivery", id=message_id, error=str(exc))
    finally:
        slots.release()


async def attempt(storage: Storage, deliverer: Deliverer, message_id: str) -> DeliveryStatus | None:
    """One delivery attempt of a queued message; returns its status afterwards (None if it is gone)."""
    message = await storage.get(message_id)
    if message is None or message.state is not State.QUEUED:
        return None
    status = await storage.load_status(message_id)
    pending = status.pending()
    results = await deliverer.deliver(message, pending) if pending else []
    status = record(status, results, time.time())
    await storage.save_status(message_id, status)
    for result in results:
        _log_result(message_id, result)
    if status.pending():
        await storage.move(message_id, State.DEFERRED)
    elif any(r.state == "failed" for r in status.recipients):
        await storage.move(message_id, State.BOUNCED)
    else:
        await storage.delete(message_id)
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
