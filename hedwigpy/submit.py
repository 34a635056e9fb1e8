"""The submit step, where SMTP and REST meet (DESIGN, data flow): cut-through first, then the spool.

With `[delivery].cut_through`, a message whose content is complete (but not yet committed) is delivered
at once, through the same `Deliverer` the queue worker uses, within `cut_through_timeout`. Then:

- all delivered: the upstream's reply when every recipient got the same one, else our 250; nothing kept
  (the upstream has the message);
- all refused for good (5xx): the first refusal, verbatim; nothing kept;
- all unfinished (4xx or no answer in time) on an `ingress` listener: the upstream's 4xx when shared, else
  451; nothing kept (the sending MTA retries);
- anything else (mixed results, or unfinished on a `submission` listener or REST): 250, kept in the spool.

"Verbatim" keeps the upstream's code and enhanced code and prefixes its text with the host it came from.
Kept messages are committed together with a status recording what was already delivered or refused, so
the queue never resends the former and bounces the latter; no fsync happens for mail the upstream took.

DKIM signing (`Signer`, when the From domain has keys) happens first, once: cut-through sends the signed
bytes, and the spool keeps them for every later attempt.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog
import trio

from .config import Config, ListenerRole
from .dkim import Signer
from .events import EventBus
from .lifecycle import Drain
from .smtp import Reply
from .storage import DeliveryStatus, MessageWriter, State, Storage, StoredMessage
from .worker.results import Delivered, PermanentFailure, Result, record
from .worker.runner import Delivers, log_results
from .worker.schedule import retry_delay
from .worker.scheduler import Scheduler

log = structlog.get_logger("hedwigpy.submit")

Path = Literal["cut-through", "queued", "refused"]
RecipientState = Literal["delivered", "queued", "rejected"]


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    address: str
    status: RecipientState
    reply: Reply
    host: str = ""


@dataclass(frozen=True, slots=True)
class Submitted:
    message_id: str
    reply: Reply  # what an SMTP client is told after its data
    recipients: tuple[RecipientOutcome, ...]
    path: Path  # "cut-through": nothing kept; "queued": in the spool; "refused": nothing kept, not delivered
    stored: StoredMessage | None = None

    @property
    def status(self) -> Literal["delivered", "queued", "partial", "rejected"]:
        """The REST summary: all delivered, any queued, some delivered and some refused, or all refused."""
        states = {r.status for r in self.recipients}
        if "queued" in states:
            return "queued"
        if states == {"delivered"}:
            return "delivered"
        return "rejected" if states == {"rejected"} else "partial"


class SubmitFn(Protocol):
    """`Submitter.submit`, as the SMTP receiver and the REST intake hold it."""

    async def __call__(
        self, writer: MessageWriter, size: int, role: ListenerRole, *, sign: bool = True
    ) -> Submitted: ...


class Submitter:
    def __init__(
        self,
        config: Config,
        storage: Storage,
        deliverer: Delivers,
        scheduler: Scheduler,
        *,
        rng: random.Random | None = None,
        events: EventBus | None = None,
        drain: Drain | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.signer = signer  # public: a configuration reload replaces it
        self._events = events
        self._drain = drain
        self._config = config
        self._storage = storage
        self._deliverer = deliverer
        self._scheduler = scheduler
        self._rng = rng if rng is not None else random.Random()

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: messages submitted from now on use its delivery and queue settings."""
        self._config = config

    async def submit(
        self, writer: MessageWriter, size: int, role: ListenerRole, *, sign: bool = True
    ) -> Submitted:
        """Deliver or spool a complete message. Raises StorageError when it had to be kept and could not.

        `sign`: DKIM-sign it (when its From domain has keys). Only for mail we send on the sender's
        behalf - an authenticated or trusted SMTP client, or the REST API - never for mail a stranger
        hands to an ingress listener: signing that would lend our domain's name to forged mail."""
        envelope = writer.envelope
        recipients = list(dict.fromkeys(envelope.recipients))
        if self._events is not None:  # first, so subscribers see it before any delivery event
            self._events.publish(
                "received",
                writer.message_id,
                sender=envelope.sender,
                recipients=recipients,
                listener=envelope.listener,
                size=size,
            )
        if sign and self.signer is not None:
            size += await self.signer.sign_writer(writer)
        delivery = self._config.delivery
        if not delivery.cut_through or (self._drain is not None and self._drain.draining):
            # Draining: the spool is the quickest durable answer; the upstream can wait for the restart.
            return await self._keep(writer, None, [])
        message = StoredMessage(writer.message_id, State.QUEUED, envelope, size)
        deadline = trio.current_time() + delivery.cut_through_timeout
        results = await self._deliverer.deliver(
            message, recipients, content=writer.content, deadline=deadline
        )
        status = record(DeliveryStatus.initial(envelope), results, time.time())
        log_results(writer.message_id, results, status, None, self._events)
        delivered = [r for r in results if isinstance(r, Delivered)]
        refused = [r for r in results if isinstance(r, PermanentFailure)]
        unfinished = len(results) - len(delivered) - len(refused)
        if not unfinished and (not refused or not delivered):
            # Every answer is final and of one kind: the upstream has the message, or nobody will take it.
            await writer.abort()
            if refused:
                return self._answer(writer, results, _relayed(refused[0]), "refused")
            same = _shared_reply(results)
            reply = same or Reply(
                250, "2.0.0", f"Ok: delivered to {len(results)} recipients as {writer.message_id}"
            )
            return self._answer(writer, results, reply, "cut-through")
        if role == "ingress" and not delivered and not refused:
            # An MX answers for the upstream: 4xx or a timeout goes back, and the sender retries.
            await writer.abort()
            reply = _shared_reply(results) or Reply(451, "4.4.2", "upstream not available, try again later")
            return self._answer(writer, results, reply, "refused")
        return await self._keep(writer, DeliveryStatus.initial(envelope), results)

    async def _keep(
        self, writer: MessageWriter, status: DeliveryStatus | None, results: Sequence[Result]
    ) -> Submitted:
        """Commit (with the status when something is already decided) and hand over to the queue."""
        now = time.time()
        if status is None:
            stored = await writer.commit()
            self._scheduler.submit_fresh(stored)
        else:
            status = record(status, results, now)
            stored = await writer.commit(status)
            due = now
            if status.pending():
                due = now + retry_delay(status.attempts, self._config.queue, self._rng)
                if status.next_attempt is not None:  # a rate limit said when
                    due = min(due, status.next_attempt)
            self._scheduler.submit(stored, due, has_status=True)
        reply = Reply(250, "2.0.0", f"Ok: queued as {stored.id}")
        outcomes = {r.recipient: r for r in results}
        recipients = tuple(
            _outcome(outcomes[a], kept=True)
            if a in outcomes and not _unfinished(outcomes[a])
            else RecipientOutcome(a, "queued", reply)
            for a in dict.fromkeys(writer.envelope.recipients)
        )
        log.info("submitted", id=stored.id, path="queued", reply=str(reply), cut_through=bool(results))
        return Submitted(stored.id, reply, recipients, "queued", stored)

    def _answer(
        self, writer: MessageWriter, results: Sequence[Result], reply: Reply, path: Path
    ) -> Submitted:
        log.info("submitted", id=writer.message_id, path=path, reply=str(reply))
        return Submitted(writer.message_id, reply, tuple(_outcome(r, kept=False) for r in results), path)


def _unfinished(result: Result) -> bool:
    return not isinstance(result, Delivered | PermanentFailure)


def _outcome(result: Result, *, kept: bool) -> RecipientOutcome:
    """A recipient's summary; an unfinished one is "queued" only when the message was kept."""
    status: RecipientState = (
        "delivered"
        if isinstance(result, Delivered)
        else "queued"
        if kept and not isinstance(result, PermanentFailure)
        else "rejected"
    )
    return RecipientOutcome(result.recipient, status, result.reply, result.host)


def _shared_reply(results: Sequence[Result]) -> Reply | None:
    """The upstream reply every recipient got (same code, text and host), relayed; None if they differ."""
    first = results[0]
    if all(r.reply == first.reply and r.host == first.host for r in results):
        return _relayed(first)
    return None


def _relayed(result: Result) -> Reply:
    """An upstream reply as we pass it on: its codes, its text prefixed with the host, no control
    characters (a bare CR from upstream must never reach our client's wire). Two changes: a missing
    enhanced code becomes X.0.0 (every reply of ours carries one), and 421 becomes 451 — the upstream
    closing its session is no reason to close ours."""
    reply = result.reply
    lines = ["".join(c if c.isprintable() else " " for c in line) for line in reply.text.split("\n")]
    if result.host:
        lines[0] = f"{result.host}: {lines[0]}"
    code = 451 if reply.code == 421 else reply.code
    enhanced = reply.enhanced or f"{code // 100}.0.0"
    return Reply(code, enhanced, "\n".join(lines))
