"""The admin API's JSON shapes: how a spooled message, its delivery status and a problem look on the
wire. The REST issue builds on these; change them only by adding keys.

Times are RFC 3339 strings in UTC with milliseconds (`"2026-01-02T03:04:05.678Z"`), or null.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from ..storage import Attempt, DeliveryStatus, RecipientStatus, StoredMessage
from ..submit import RecipientOutcome

JsonObject = dict[str, Any]

PROBLEM_JSON = "application/problem+json"


def timestamp(t: float | None) -> str | None:
    """Unix time → RFC 3339 UTC text (None stays None)."""
    if t is None:
        return None
    text = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def summary(message: StoredMessage) -> JsonObject:
    """One entry of `GET /v1/queue`:
    `{"id", "state", "from", "recipients": [address...], "size", "received_at"}`.
    `from` is "" for the null sender `<>`; `size` is bytes of content."""
    env = message.envelope
    return {
        "id": message.id,
        "state": message.state.value,
        "from": env.sender,
        "recipients": list(env.recipients),
        "size": message.size,
        "received_at": timestamp(env.received_at),
    }


def attempt(last: Attempt | None) -> JsonObject | None:
    """`{"at", "code", "enhanced", "text", "host"}`; code 0 means no reply (connection, DNS or TLS
    failure), host "" means no host was reached."""
    if last is None:
        return None
    return {
        "at": timestamp(last.at),
        "code": last.code,
        "enhanced": last.enhanced,
        "text": last.text,
        "host": last.host,
    }


def recipient(status: RecipientStatus) -> JsonObject:
    """`{"address", "state": "pending|delivered|failed", "attempts", "last": attempt|null}`."""
    return {
        "address": status.address,
        "state": status.state,
        "attempts": status.attempts,
        "last": attempt(status.last),
    }


def delivery(status: DeliveryStatus) -> JsonObject:
    """`{"attempts", "next_attempt": time|null, "bounce_sent", "recipients": [recipient...]}`."""
    return {
        "attempts": status.attempts,
        "next_attempt": timestamp(status.next_attempt),
        "bounce_sent": status.bounce_sent,
        "recipients": [recipient(r) for r in status.recipients],
    }


def detail(message: StoredMessage, status: DeliveryStatus) -> JsonObject:
    """`GET /v1/messages/{id}`: the summary plus `listener`, `client_addr`, `auth_user` (or null) and
    `status` (see `delivery`)."""
    env = message.envelope
    return summary(message) | {
        "listener": env.listener,
        "client_addr": env.client_addr,
        "auth_user": env.auth_user,
        "status": delivery(status),
    }


def outcome(result: RecipientOutcome) -> JsonObject:
    """`{"address", "status": "delivered|queued|rejected", "code", "enhanced", "message"}`: the reply that
    decided the recipient — the upstream's (its text prefixed with the host it came from) or ours."""
    text = f"{result.host}: {result.reply.text}" if result.host else result.reply.text
    return {
        "address": result.address,
        "status": result.status,
        "code": result.reply.code,
        "enhanced": result.reply.enhanced,
        "message": text,
    }


def submission(message_id: str, status: str, recipients: Sequence[RecipientOutcome]) -> JsonObject:
    """`POST /v1/messages`: `{"id", "status": "delivered|queued|partial|rejected", "recipients":
    [outcome...]}`, recipients in the order they were asked for."""
    return {"id": message_id, "status": status, "recipients": [outcome(r) for r in recipients]}


def problem(status: int, detail: str, *, title: str | None = None, **extra: Any) -> JsonObject:
    """An RFC 9457 problem: `{"type": "about:blank", "title", "status", "detail"}` (+ extension keys).
    With type about:blank the title is the HTTP status phrase."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return {"type": "about:blank", "title": title or phrase, "status": status, "detail": detail} | extra
