"""The on-disk format of a spool file: one JSON line describing the envelope, then the content bytes.

The file is written once and never modified; its directory says its state. A reader that cannot parse
the first line treats the file as corrupt (it is quarantined, never delivered).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any, BinaryIO

from .base import Envelope, StorageError

FORMAT_VERSION = 1
MAX_HEADER_LINE = 1024 * 1024


class CorruptFile(StorageError):
    """A spool file whose envelope line is missing, truncated or malformed."""


def encode_envelope(envelope: Envelope) -> bytes:
    data = asdict(envelope)
    data["recipients"] = list(envelope.recipients)
    data["v"] = FORMAT_VERSION
    try:
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError as exc:  # a lone surrogate in an address: refuse it, never crash
        raise StorageError(f"envelope not encodable: {exc}") from None


def decode_envelope(line: bytes) -> Envelope:
    if not line.endswith(b"\n"):
        raise CorruptFile("envelope line is truncated")
    try:
        data: dict[str, Any] = json.loads(line)
        if data.pop("v") != FORMAT_VERSION:
            raise CorruptFile("unknown format version")
        data["recipients"] = tuple(data["recipients"])
        envelope = Envelope(**data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptFile(f"bad envelope line: {exc}") from None
    if not isinstance(envelope.sender, str) or not all(isinstance(r, str) for r in envelope.recipients):
        raise CorruptFile("bad envelope types")
    return envelope


def read_envelope(f: BinaryIO) -> tuple[Envelope, int]:
    """Envelope and the offset where content starts."""
    line = f.readline(MAX_HEADER_LINE + 1)
    return decode_envelope(line), len(line)
