"""What a delivery attempt says about each recipient (DESIGN rule 3: replies are data).

Every result carries the `Reply` that decided it — the upstream's own words when there was an answer, a
reply we composed (with a real code and enhanced code) when there was none: a refused connection, a TLS
failure, DNS — and the host it came from, so a DSN, a log line or a cut-through answer can name both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..smtp.replies import Reply
from ..storage import Attempt, DeliveryStatus, RecipientStatus
from ..storage.base import RecipientState


@dataclass(frozen=True, slots=True)
class Delivered:
    recipient: str
    reply: Reply
    host: str


@dataclass(frozen=True, slots=True)
class TransientFailure:
    """Try again later. `not_before` (unix time) is set when we know when (an outbound rate limit)."""

    recipient: str
    reply: Reply
    host: str
    not_before: float | None = None


@dataclass(frozen=True, slots=True)
class PermanentFailure:
    recipient: str
    reply: Reply
    host: str


Result = Delivered | TransientFailure | PermanentFailure


def result_for(recipient: str, reply: Reply, host: str) -> Result:
    """The result an upstream reply means: 2xx delivered, 5xx give up, anything else retry."""
    if reply.code // 100 == 2:  # only a 2xx: a 3xx after the end of data is nobody's acceptance
        return Delivered(recipient, reply, host)
    if reply.is_permanent:
        return PermanentFailure(recipient, reply, host)
    return TransientFailure(recipient, reply, host)


def record(status: DeliveryStatus, results: Sequence[Result], now: float) -> DeliveryStatus:
    """The status after an attempt: each result's recipient becomes delivered, failed, or stays pending,
    with the answer kept as its last attempt. Recipients without a result are left as they were; those a
    rate limit only rescheduled keep that reason but count no attempt (none was made), so their backoff
    does not grow. `next_attempt` becomes the earliest time a rate limit asked for, else None: the
    scheduler adds the backoff."""
    by_recipient = {r.recipient: r for r in results}
    recipients = []
    for rs in status.recipients:
        result = by_recipient.get(rs.address)
        if result is None or rs.state != "pending":
            recipients.append(rs)
            continue
        state: RecipientState = (
            "delivered"
            if isinstance(result, Delivered)
            else "failed"
            if isinstance(result, PermanentFailure)
            else "pending"
        )
        reply = result.reply
        last = Attempt(now, reply.code, reply.enhanced, reply.text, result.host)
        tried = 0 if _rescheduled(result) else 1
        recipients.append(RecipientStatus(rs.address, state, rs.attempts + tried, last))
    waits = [r.not_before for r in results if isinstance(r, TransientFailure) and r.not_before is not None]
    attempted = any(not _rescheduled(r) for r in results)
    return replace(
        status,
        recipients=tuple(recipients),
        attempts=status.attempts + (1 if attempted else 0),
        next_attempt=min(waits) if waits else None,
    )


def _rescheduled(result: Result) -> bool:
    return isinstance(result, TransientFailure) and result.not_before is not None
