"""`POST /v1/messages`: reading and checking the JSON body (INTERFACE.md, REST/JSON).

Everything a request can get wrong is found here, before anything touches the spool, and reported
together: a `RequestProblem` carries the HTTP status and one `FieldError` per field at fault, named as
a client would point at it (`recipients[2]`, `raw`, `(body)` for the document as a whole).

Raw mode: `{"envelope_from": "...", "recipients": [...], "raw": "<RFC 5322 message, base64>"}`; the
structured mode is in `hedwigpy.api._compose`. Every address is checked by the parser SMTP uses for its
paths, so what SMTP would refuse REST refuses too; a display name around it (`Ann <ann@example.com>`) is
allowed and, in an envelope, ignored. `""` (or `<>`) as `envelope_from` is the null sender.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..smtp.addresses import AddressError, Mailbox, parse_path
from ..smtp.framing import LineLengthTracker

BODY = "(body)"  # the field name for the request document as a whole

RAW_FIELDS = ("envelope_from", "recipients", "raw")
STRUCTURED_FIELDS = frozenset(
    {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "attachments", "headers", "metadata"}
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NAMED = re.compile(r"\s*(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]*)>\s*")
_BASE64_SPACE = re.compile(rb"[ \t\r\n]+")
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    detail: str

    def json(self) -> dict[str, str]:
        return {"field": self.field, "detail": self.detail}


class RequestProblem(Exception):
    """The request cannot be served: answered with a problem document listing `errors`."""

    def __init__(
        self,
        status: int,
        detail: str,
        errors: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = tuple(errors)
        self.headers = headers or {}


def invalid(errors: Sequence[FieldError]) -> RequestProblem:
    """400 for `errors`; the detail names the first few so a human reading a log sees them at once."""
    shown = "; ".join(f"{e.field}: {e.detail}" for e in errors[:3])
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return RequestProblem(400, f"invalid request: {shown}{more}", errors)


@dataclass(frozen=True, slots=True)
class Submission:
    """A checked request: the envelope and the message (decoded in raw mode, composed in structured)."""

    sender: Mailbox
    recipients: tuple[Mailbox, ...]  # duplicates removed, order kept
    content: bytes

    @property
    def smtputf8(self) -> bool:
        """Non-ASCII in an envelope address needs SMTPUTF8 (RFC 6531) on the way out."""
        return not all(str(m).isascii() for m in (self.sender, *self.recipients))

    @property
    def body_type(self) -> str:
        """`8BITMIME` when the content has 8-bit octets, as a client would declare with MAIL BODY=."""
        return "7BIT" if self.content.isascii() else "8BITMIME"


def load_json(body: bytes) -> dict[str, Any]:
    """The request document: a JSON object with no key twice (a parser that kept the first and one that
    kept the last would disagree about what was asked)."""
    try:
        doc = json.loads(body, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise invalid([FieldError(exc.key, "given more than once")]) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid([FieldError(BODY, f"not JSON: {exc}")]) from None
    if not isinstance(doc, dict):
        raise invalid([FieldError(BODY, "must be a JSON object")])
    return doc


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise _DuplicateKey(key)
        doc[key] = value
    return doc


def is_structured(doc: dict[str, Any]) -> bool:
    """Structured mode: no `raw`, and at least one of the structured fields."""
    return "raw" not in doc and bool(STRUCTURED_FIELDS & doc.keys())


def parse_raw(doc: dict[str, Any], *, max_size: int, max_recipients: int) -> Submission:
    """Check a raw-mode document; raises RequestProblem (400, or 413 over `max_size` decoded octets)."""
    errors: list[FieldError] = []
    for key in doc:
        if key not in RAW_FIELDS:
            why = "not allowed with raw" if key in STRUCTURED_FIELDS else "unknown field"
            errors.append(FieldError(key, why))
    sender = None
    if "envelope_from" not in doc:
        errors.append(FieldError("envelope_from", 'required: the envelope sender ("" for the null sender)'))
    else:
        sender = named_address(doc["envelope_from"], "envelope_from", errors, allow_null=True)
    recipients = _recipients(doc, errors, max_recipients)
    content = _content(doc, errors, max_size)
    if errors:
        raise invalid(errors)
    assert sender is not None and content is not None
    return Submission(sender.mailbox, recipients, content)


def _recipients(doc: dict[str, Any], errors: list[FieldError], limit: int) -> tuple[Mailbox, ...]:
    value = doc.get("recipients")
    if value is None:
        errors.append(FieldError("recipients", "required: a list of at least one address"))
        return ()
    if not isinstance(value, list):
        errors.append(FieldError("recipients", "must be a list of addresses"))
        return ()
    if not value:
        errors.append(FieldError("recipients", "at least one recipient is required"))
        return ()
    if len(value) > limit:
        detail = f"at most {limit} recipients per message ({len(value)} given)"
        errors.append(FieldError("recipients", detail))
        return ()
    found = [named_address(item, f"recipients[{i}]", errors) for i, item in enumerate(value)]
    return unique(a.mailbox for a in found if a is not None)


def unique(mailboxes: Iterable[Mailbox]) -> tuple[Mailbox, ...]:
    """Each address once, in order of first appearance."""
    found: dict[str, Mailbox] = {}
    for mailbox in mailboxes:
        found.setdefault(str(mailbox), mailbox)
    return tuple(found.values())


@dataclass(frozen=True, slots=True)
class NamedAddress:
    """An address as a client wrote it: `ann@example.com`, `<ann@example.com>` or
    `Ann Example <ann@example.com>` (the display name may be quoted)."""

    display_name: str
    mailbox: Mailbox


def named_address(
    value: object, name: str, errors: list[FieldError], *, allow_null: bool = False
) -> NamedAddress | None:
    """`value` checked as an address (the mailbox by SMTP's own path parser); None after adding to
    `errors` when it is not one."""
    if not isinstance(value, str):
        errors.append(FieldError(name, "must be a string"))
        return None
    if not plain_text(value, name, errors):
        return None
    display, path = "", value.strip()
    named = _NAMED.fullmatch(value)
    if named is not None:
        display, path = named["name"], f"<{named['addr']}>"
        if len(display) >= 2 and display.startswith('"') and display.endswith('"'):
            display = re.sub(r"\\(.)", r"\1", display[1:-1])
    try:
        return NamedAddress(display, parse_path(path, allow_null=allow_null))
    except AddressError as exc:
        errors.append(FieldError(name, f"{exc}: {value.strip()[:80]!r}"))
        return None


def plain_text(value: str, name: str, errors: list[FieldError], *, allow: str = "") -> bool:
    """True when `value` may go into a header: no control characters (CR, LF, NUL...) but those in
    `allow`, and no lone surrogates."""
    found = _CONTROL.search(value.translate({ord(c): None for c in allow}) if allow else value)
    if found:
        errors.append(FieldError(name, "must not contain CR, LF, NUL or other control characters"))
        return False
    return encodable(value, name, errors)


def encodable(value: str, name: str, errors: list[FieldError]) -> bool:
    """True when `value` encodes as UTF-8 (JSON can carry lone surrogates, a message cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        errors.append(FieldError(name, "is not valid Unicode (a lone surrogate)"))
        return False
    return True


def _content(doc: dict[str, Any], errors: list[FieldError], max_size: int) -> bytes | None:
    value = doc.get("raw")
    if value is None:
        errors.append(FieldError("raw", "required: the RFC 5322 message, base64-encoded"))
        return None
    content = decode_base64(value, "raw", errors, max_size)
    if content is None:
        return None
    if not content:
        errors.append(FieldError("raw", "the message is empty"))
        return None
    if has_long_line(content):
        errors.append(FieldError("raw", "a line is longer than 998 octets (RFC 5322 2.1.1)"))
        return None
    return content


def decode_base64(value: object, name: str, errors: list[FieldError], max_size: int) -> bytes | None:
    """Standard base64 (line breaks and spaces allowed, padding required); raises the 413 when the
    decoded octets would exceed `max_size`."""
    if not isinstance(value, str):
        errors.append(FieldError(name, "must be a string (base64)"))
        return None
    try:
        encoded = value.encode("ascii")
        if _BASE64_SPACE.search(encoded):
            encoded = _BASE64_SPACE.sub(b"", encoded)
        size = len(encoded) // 4 * 3 - encoded[-2:].count(b"=")
        if size > max_size:  # an early answer, without decoding it
            raise too_large(size, max_size, name)
        return base64.b64decode(encoded, validate=True)
    except (UnicodeEncodeError, binascii.Error) as exc:
        errors.append(FieldError(name, f"not valid base64: {exc}"))
        return None


def has_long_line(content: bytes) -> bool:
    """Any line over 998 octets (without its line break), as SMTP's DATA check counts them."""
    lines = LineLengthTracker()
    for start in range(0, len(content), _CHUNK):
        lines.update(content[start : start + _CHUNK])
    last_line = len(content) - content.rfind(b"\n") - 1  # unterminated: the tracker never closes it
    return lines.exceeded or last_line > 998


def too_large(size: int, max_size: int, name: str) -> RequestProblem:
    return RequestProblem(
        413,
        f"the message is {size} octets; the limit is {max_size} ([limits].max_message_size)",
        [FieldError(name, f"larger than {max_size} octets once decoded")],
    )
