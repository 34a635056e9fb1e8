"""`POST /v1/messages` after the request is checked (`_request` for raw mode, `_compose` for structured):
policy, the spool and the shared submit step.

A REST message takes the SMTP path from `IncomingMessage` on (DESIGN, data flow): the same trace header
(`with HTTP`), Bcc removal, Message-ID and loop check, then the same `Submitter` as a `submission`
listener — cut-through within its budget, the spool for whatever is not finally answered. The envelope
names listener "http", the client's address and, when keys are configured, the API key's name as
`auth_user`. The sender and recipient domain filters apply as they do to SMTP; a recipient they refuse
is answered `550 5.7.1` in the result, like a refused RCPT. Nothing is kept when the answer is an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence, Set
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal

import structlog
import trio

from .._offload import run_sync
from ..config import Config
from ..inbound import IncomingMessage, received_header
from ..policy import RateLimiter, filter_allows
from ..smtp import Reply
from ..storage import Envelope, InsufficientSpace, Storage, StorageError, new_message_id
from ..submit import RecipientOutcome, SubmitFn, Submitted
from . import _views as views
from ._compose import parse_structured
from ._idempotency import Claim, IdempotencyStore, idempotent
from ._request import FieldError, RequestProblem, Submission, is_structured, load_json, parse_raw

log = structlog.get_logger("hedwigpy.http")


LISTENER = "http"  # the envelope's listener name for REST messages (routes may match it)
BODY_SLACK = 1 << 20  # JSON around the base64: keys, recipients, escapes
_CHUNK = 1 << 20  # content goes to the spool in pieces this big
_IN_THREAD = 256 * 1024  # bodies bigger than this are parsed and decoded off the event loop

Status = Literal["delivered", "queued", "partial", "rejected"]


@dataclass(frozen=True, slots=True)
class Client:
    """Who sent the request: `ip` for the trace header, `addr` ("ip:port") for the envelope."""

    ip: str
    addr: str
    user: str | None = None  # the API key's name


@dataclass(frozen=True, slots=True)
class Answer:
    status: int  # 200: every recipient has a final answer; 202: any is queued
    body: views.JsonObject


class MessageIntake:
    """What `POST /v1/messages` needs from the daemon: its config, the spool and the submit step."""

    def __init__(
        self,
        config: Config,
        storage: Storage,
        submit: SubmitFn,
        client_rate: RateLimiter | None = None,
        idempotency: IdempotencyStore | None = None,
    ) -> None:
        self._config = config
        self._storage = storage
        self._submit = submit
        self._client_rate = client_rate
        self._idempotency = idempotency

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: limits and filters for requests from now on."""
        self._config = config

    @property
    def max_body(self) -> int:
        """The largest request body worth reading: the largest message base64-encoded (4/3, and line
        breaks if the client wrapped it), plus room for the rest of the document."""
        return math.ceil(self._config.limits.max_message_size * 4 / 3 * 1.04) + BODY_SLACK

    def idempotent(self, key: str | None, client: Client, body: bytes) -> AbstractAsyncContextManager[Claim]:
        """Hold the request's `Idempotency-Key` (`hedwigpy.api._idempotency`): the key's principal is the
        API key's name, else the client's IP address."""
        principal = f"key:{client.user}" if client.user else f"ip:{client.ip}"
        return idempotent(self._idempotency, key, principal, body)

    async def parse(self, body: bytes) -> Submission:
        """Check the request body; raises RequestProblem. Big bodies are decoded in a worker thread."""
        if len(body) > _IN_THREAD:
            return await run_sync(self._parse_sync, body)
        return self._parse_sync(body)

    def _parse_sync(self, body: bytes) -> Submission:
        limits = self._config.limits
        doc = load_json(body)
        parse = parse_structured if is_structured(doc) else parse_raw
        return parse(doc, max_size=limits.max_message_size, max_recipients=limits.max_recipients)

    async def accept(self, message: Submission, client: Client) -> Answer:
        """Filter, store and submit `message`; the answer, or RequestProblem (429, 400, 503) with
        nothing kept."""
        refused = self._filter(message)
        addresses = [str(r) for r in message.recipients]
        accepted = [a for a in addresses if a not in refused]
        outcomes: dict[str, RecipientOutcome] = dict(refused)
        message_id = new_message_id()
        path = "refused"
        if accepted:
            self._admit(client, len(message.content))
            submitted = await self._store(message, accepted, client, message_id)
            outcomes.update((r.address, r) for r in submitted.recipients)
            message_id, path = submitted.message_id, submitted.path
        results = [outcomes[a] for a in addresses]
        states = {r.status for r in results}
        status = _summary(states)
        log.info(
            "received",
            id=message_id,
            sender=str(message.sender),
            recipients=len(addresses),
            size=len(message.content),
            client=client.addr,
            listener=LISTENER,
            user=client.user,
            path=path,
            status=status,
        )
        code = 202 if "queued" in states else 200
        return Answer(code, views.submission(message_id, status, results))

    def _filter(self, message: Submission) -> dict[str, RecipientOutcome]:
        """The recipients `[[filters]]` refuse, each with the reply SMTP would have given."""
        filters = self._config.filters
        sender = message.sender
        refused: dict[str, RecipientOutcome] = {}
        if not sender.is_null and not filter_allows(sender.domain, "sender_domain", filters):
            reply = Reply(550, "5.7.1", f"<{sender}>: Sender address rejected: domain not allowed")
            return {str(r): RecipientOutcome(str(r), "rejected", reply) for r in message.recipients}
        for rcpt in message.recipients:
            if not rcpt.is_literal and not filter_allows(rcpt.domain, "recipient_domain", filters):
                reply = Reply(550, "5.7.1", f"<{rcpt}>: Recipient address rejected: domain not allowed")
                refused[str(rcpt)] = RecipientOutcome(str(rcpt), "rejected", reply)
        return refused

    def _admit(self, client: Client, size: int) -> None:
        """The per-client rate limit (shared with SMTP) and room in the spool, before anything is written."""
        rate = self._client_rate
        if rate is not None:
            key = client.user or client.ip
            if not rate.allow(key):
                wait = max(1, math.ceil(rate.wait_time(key)))
                raise RequestProblem(
                    429,
                    "too much mail from this client; try again later ([rate_limits].per_client)",
                    headers={"Retry-After": str(wait)},
                )
        try:
            self._storage.check_space(math.ceil(size * 1.5))
        except InsufficientSpace as exc:
            log.warning("spool full", client=client.addr, error=str(exc))
            raise _unavailable("the spool has no room for this message") from None

    async def _store(
        self, message: Submission, recipients: Sequence[str], client: Client, message_id: str
    ) -> Submitted:
        cfg = self._config
        hostname = cfg.server.hostname
        envelope = Envelope(
            sender=str(message.sender),
            recipients=tuple(recipients),
            body_type=message.body_type,
            smtputf8=message.smtputf8,
            received_at=time.time(),
            client_addr=client.addr,
            listener=LISTENER,
            auth_user=client.user,
        )
        trace = received_header(
            helo="",
            client_ip=client.ip,
            hostname=hostname,
            protocol="HTTP",
            message_id=message_id,
            recipients=list(recipients),
        )
        writer = self._storage.writer(envelope, message_id)
        incoming = IncomingMessage(
            writer,
            trace=trace,
            max_size=cfg.limits.max_message_size,
            max_hops=cfg.limits.max_hops,
            hostname=hostname,
        )
        submitted: Submitted | None = None
        try:
            content = message.content
            for start in range(0, len(content), _CHUNK):
                await incoming.write(content[start : start + _CHUNK])
            await incoming.finish()
            refusal = incoming.verdict(False)
            if refusal is not None:
                raise _refused(refusal, message_id)
            submitted = await self._submit(writer, incoming.stored_size, "submission")
        except InsufficientSpace:
            raise _unavailable("the spool has no room for this message") from None
        except StorageError as exc:
            log.error("spool write failed", id=message_id, error=str(exc))
            raise _unavailable("the spool could not store the message") from None
        finally:
            if submitted is None:  # refused, failed or cancelled (the client left): keep nothing
                with trio.CancelScope(shield=True):
                    await writer.abort()
        return submitted


def _summary(states: Set[str]) -> Status:
    """As `Submitted.status`: any queued, all delivered, all refused, or some delivered and some refused."""
    if "queued" in states:
        return "queued"
    if states == {"delivered"}:
        return "delivered"
    return "rejected" if states == {"rejected"} else "partial"


def _refused(reply: Reply, message_id: str) -> RequestProblem:
    """What `IncomingMessage.verdict` said, as an HTTP problem: storage trouble is 503, the rest (a mail
    loop, 554 5.4.6) is the client's message at fault."""
    log.info("rejected", id=message_id, reply=str(reply), listener=LISTENER)
    if reply.code in (451, 452):
        return _unavailable("the spool could not store the message")
    if reply.code == 552:
        return RequestProblem(413, reply.text, [FieldError("raw", reply.text)])
    detail = f"{reply.code} {reply.enhanced} {reply.text}"
    return RequestProblem(400, f"the message is refused: {detail}", [FieldError("raw", detail)])


def _unavailable(detail: str) -> RequestProblem:
    retry = {"Retry-After": "60"}
    return RequestProblem(503, f"{detail}; nothing was queued, try again later", headers=retry)
