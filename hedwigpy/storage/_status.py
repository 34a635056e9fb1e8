"""The on-disk format of a delivery status file: one JSON object with a version field.

A status file sits beside its message's data file and is replaced whole (tmp file, fsync, rename). It is
read strictly: anything unexpected raises `CorruptStatus`, and the spool quarantines the message rather
than guess which recipients were already delivered.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any, cast

from ._format import CorruptFile
from .base import Attempt, DeliveryStatus, RecipientState, RecipientStatus

STATUS_VERSION = 1
MAX_STATUS_SIZE = 16 * 1024 * 1024  # a larger status file is not one we wrote
_STATES: frozenset[str] = frozenset(("pending", "delivered", "failed"))


class CorruptStatus(CorruptFile):
    """A status file that is truncated, malformed or of an unknown version."""


def encode_status(status: DeliveryStatus) -> bytes:
    # ensure_ascii: reply texts may carry lone surrogates (undecodable upstream bytes); \u escapes keep them
    data = {
        "v": STATUS_VERSION,
        "attempts": status.attempts,
        "next_attempt": status.next_attempt,
        "bounce_sent": status.bounce_sent,
        "recipients": [_encode_recipient(r) for r in status.recipients],
    }
    return json.dumps(data, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode() + b"\n"


def _encode_recipient(r: RecipientStatus) -> dict[str, Any]:
    last = r.last
    return {
        "address": r.address,
        "state": r.state,
        "attempts": r.attempts,
        "last": None if last is None else asdict(last),
        "bounced": r.bounced,
    }


def decode_status(raw: bytes) -> DeliveryStatus:
    if len(raw) > MAX_STATUS_SIZE:
        raise CorruptStatus("status file is too large")
    if not raw.endswith(b"\n"):
        raise CorruptStatus("status file is truncated")
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise CorruptStatus("status is not an object")
        if data.get("v") != STATUS_VERSION:
            raise CorruptStatus(f"unknown status version {data.get('v')!r}")
        next_attempt = data["next_attempt"]
        bounce_sent = _bool(data["bounce_sent"])
        return DeliveryStatus(
            recipients=tuple(_decode_recipient(r, bounce_sent) for r in _list(data["recipients"])),
            attempts=_int(data["attempts"]),
            next_attempt=None if next_attempt is None else _float(next_attempt),
            bounce_sent=bounce_sent,
        )
    except CorruptStatus:
        raise
    except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptStatus(f"bad status file: {exc!r}") from None


def _decode_recipient(data: object, bounce_sent: bool) -> RecipientStatus:
    if not isinstance(data, dict):
        raise CorruptStatus("recipient is not an object")
    state = data["state"]
    if state not in _STATES:
        raise CorruptStatus(f"unknown recipient state {state!r}")
    last = data["last"]
    return RecipientStatus(
        address=_str(data["address"]),
        state=cast(RecipientState, state),
        attempts=_int(data["attempts"]),
        last=None if last is None else _decode_attempt(last),
        # Files written before per-recipient tracking: the message-level flag said the DSN went out.
        bounced=_bool(data.get("bounced", bounce_sent and state == "failed")),
    )


def _decode_attempt(data: object) -> Attempt:
    if not isinstance(data, dict):
        raise CorruptStatus("attempt is not an object")
    return Attempt(
        at=_float(data["at"]),
        code=_int(data["code"]),
        enhanced=_str(data["enhanced"]),
        text=_str(data["text"]),
        host=_str(data["host"]),
    )


def _list(value: object) -> list[object]:
    if not isinstance(value, list):
        raise CorruptStatus(f"expected a list, got {type(value).__name__}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise CorruptStatus(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CorruptStatus(f"expected a count, got {value!r}")
    return value


def _float(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise CorruptStatus(f"expected a time, got {value!r}")
    return float(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise CorruptStatus(f"expected a boolean, got {value!r}")
    return value
