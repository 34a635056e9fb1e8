"""One delivery attempt of a spooled message, and filing its outcome in the spool.

The order of the writes is what makes a crash harmless:
1. a DSN for recipients that failed this time is spooled first (a crash before step 2 can only repeat it);
2. the status is saved (a recipient recorded as delivered is never sent again);
3. the message moves: every recipient delivered → removed (the removal is the record, so no status is
   saved first); any recipient pending → `deferred/`, its next due time kept as the file's mtime;
   only permanent failures left → `bounced/`, kept `bounced_retention`.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Protocol

import structlog
import trio

from ..config import Config
from ..events import EventBus
from ..storage import DeliveryStatus, RecipientStatus, State, Storage, StoredMessage
from .bounce import build_dsn, header_section
from .results import Result, record
from .schedule import expired, retry_delay

log = structlog.get_logger("hedwigpy.worker")

DSN_HEADER_LIMIT = 64 * 1024
_EVENT_TYPES = {"delivered": "delivered", "deferred": "deferred", "failed": "bounced"}


class Delivers(Protocol):
    """What an attempt needs from delivery (`delivery.Deliverer`; tests pass scripted ones)."""

    async def deliver(
        self,
        message: StoredMessage,
        recipients: Sequence[str],
        *,
        content: Callable[[], AsyncIterator[bytes]] | None = None,
        deadline: float | None = None,
    ) -> list[Result]: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    status: DeliveryStatus
    state: State | None  # where the message is now; None when it was removed
    due: float | None = None  # the next attempt, when deferred
    dsn: StoredMessage | None = None  # a bounce now in queued/, to be delivered


async def attempt(
    storage: Storage,
    deliverer: Delivers,
    config: Config,
    message: StoredMessage,
    *,
    fresh: bool = False,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.time,
    events: EventBus | None = None,
) -> Outcome:
    """Try the message's pending recipients once and file the outcome. `fresh`: just received, so there is
    no saved status to read. Raises StorageError when the spool fails (the message stays as it was)."""
    status = DeliveryStatus.initial(message.envelope) if fresh else await storage.load_status(message.id)
    pending = status.pending()
    results = await deliverer.deliver(message, pending) if pending else []
    # What the upstreams said must reach the spool even if the daemon is being stopped: a cancelled
    # filing would resend to recipients that were delivered.
    with trio.CancelScope(shield=True):
        now = clock()
        status = record(status, results, now)
        if status.pending() and expired(message.envelope.received_at, now, config.queue):
            status = _expire(status, message.id)
        outcome = await file_outcome(storage, config, message, status, results, now, rng=rng, events=events)
    return outcome


async def file_outcome(
    storage: Storage,
    config: Config,
    message: StoredMessage,
    status: DeliveryStatus,
    results: Sequence[Result],
    now: float,
    *,
    rng: random.Random | None = None,
    events: EventBus | None = None,
) -> Outcome:
    """Bounce what failed, save the status, move the message (see the module docstring for the order)."""
    unannounced = [r for r in status.recipients if r.state == "failed" and not r.bounced]
    if not status.pending() and not unannounced and all(r.state == "delivered" for r in status.recipients):
        log_results(message.id, results, status, None, events)  # true already; the removal only tidies up
        await storage.delete(message.id)
        return Outcome(status, None)
    dsn = None
    if unannounced:
        dsn = await _spool_dsn(storage, config, message, unannounced, now)
        announced = {r.address for r in unannounced}
        status = replace(
            status,
            recipients=tuple(
                replace(r, bounced=True) if r.address in announced else r for r in status.recipients
            ),
            bounce_sent=status.bounce_sent or dsn is not None,
        )
    if status.pending():
        due = now + retry_delay(status.attempts, config.queue, rng or random.Random())
        if status.next_attempt is not None:  # a rate limit said when
            due = min(due, status.next_attempt)
        status = replace(status, next_attempt=due)
        await storage.save_status(message.id, status)
        log_results(message.id, results, status, due, events)  # recorded: the move only files it
        await storage.move(message.id, State.DEFERRED)
        await storage.set_due(message.id, due)
        log.info("deferred message", id=message.id, attempts=status.attempts, next_attempt=due)
        return Outcome(status, State.DEFERRED, due, dsn)
    await storage.save_status(message.id, status)
    log_results(message.id, results, status, None, events)
    await storage.move(message.id, State.BOUNCED)
    await storage.set_due(message.id, now)  # bounced_retention counts from here
    log.info("bounced message", id=message.id, dsn=dsn.id if dsn else None)
    return Outcome(status, State.BOUNCED, None, dsn)


def _expire(status: DeliveryStatus, message_id: str) -> DeliveryStatus:
    """Past max_lifetime, the pending recipients fail with their last answer (the DSN says 4.4.7)."""
    recipients = []
    for rs in status.recipients:
        if rs.state == "pending":
            log.info("expired", id=message_id, recipient=rs.address, attempts=rs.attempts)
            rs = replace(rs, state="failed")
        recipients.append(rs)
    return replace(status, recipients=tuple(recipients))


async def _spool_dsn(
    storage: Storage, config: Config, message: StoredMessage, failed: Sequence[RecipientStatus], now: float
) -> StoredMessage | None:
    """Spool an RFC 3464 bounce for `failed` to the envelope sender (none for the null sender)."""
    head = bytearray()
    async with aclosing(storage.read_content(message.id)) as chunks:
        async for chunk in chunks:
            head += chunk
            if len(head) >= DSN_HEADER_LIMIT or b"\n\n" in head or b"\r\n\r\n" in head:
                break
    built = build_dsn(
        envelope=message.envelope,
        message_id=message.id,
        original_headers=header_section(bytes(head), DSN_HEADER_LIMIT),
        failed=failed,
        reporting_mta=config.server.hostname,
        now=now,
    )
    if built is None:
        log.info("no bounce for the null sender", id=message.id)
        return None
    envelope, content = built
    writer = storage.writer(envelope)
    try:
        await writer.write(content)
        dsn = await writer.commit()
    except BaseException:
        await writer.abort()
        raise
    log.info("bounce queued", id=message.id, dsn=dsn.id, to=envelope.recipients[0], recipients=len(failed))
    return dsn


def log_results(
    message_id: str,
    results: Sequence[Result],
    status: DeliveryStatus,
    next_attempt: float | None,
    events: EventBus | None = None,
) -> None:
    """One line per recipient once the outcome is on disk: event delivered, deferred or failed, with the
    reply, the host, the recipient's attempt count and (when deferred) the next attempt."""
    final = {r.address: r for r in status.recipients}
    for result in results:
        recorded = final.get(result.recipient)
        state = recorded.state if recorded is not None else "pending"  # an expired recipient has failed
        event = "deferred" if state == "pending" else state
        reply = result.reply
        fields: dict[str, object] = {
            "recipient": result.recipient,
            "attempt": recorded.attempts if recorded is not None else 0,
            "host": result.host,
            "code": reply.code,
            "enhanced": reply.enhanced,
            "text": reply.text,
        }
        if event == "deferred" and next_attempt is not None:
            fields["next_attempt"] = next_attempt
        log.info(event, id=message_id, **fields)  # the log line and the event say the same
        if events is not None:
            events.publish(_EVENT_TYPES[event], message_id, **fields)
