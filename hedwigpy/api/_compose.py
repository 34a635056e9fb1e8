"""`POST /v1/messages` in structured mode: a message composed from JSON fields (INTERFACE.md, REST/JSON).

    {"from": "...", "to": [...], "cc": [...], "bcc": [...], "reply_to": "...", "subject": "...",
     "text": "...", "html": "...", "attachments": [{"filename", "content_type", "content": base64}],
     "headers": {"X-Tag": "..."}, "metadata": {...}}

Built with the stdlib `email` package: text and html become multipart/alternative, attachments make it
multipart/mixed, non-ASCII display names and subjects become RFC 2047 encoded-words and file names RFC
2231 parameters (or plain UTF-8 when an address needs SMTPUTF8 anyway). `Date` is set here; the
`Message-ID` is added on the way into the spool, as for SMTP. The envelope is `from` → `to`+`cc`+`bcc`;
Bcc never appears in the message. `metadata` must be an object and is not used yet.

Every value that becomes a header is refused (400) with CR, LF, NUL or another control character in it:
no field can add a header of its own.
"""

from __future__ import annotations

import email.errors
import email.policy
import email.utils
import mimetypes
import re
from collections.abc import Sequence
from email.headerregistry import Address
from email.message import EmailMessage
from typing import Any

from ._request import (
    STRUCTURED_FIELDS,
    FieldError,
    NamedAddress,
    Submission,
    decode_base64,
    encodable,
    has_long_line,
    invalid,
    named_address,
    plain_text,
    too_large,
    unique,
)

MESSAGE = "(message)"  # the field name for the composed message as a whole

ATTACHMENT_FIELDS = frozenset({"filename", "content_type", "content"})
# Headers made from their own fields or by the composition itself; `headers` may not set them.
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "mime-version", "content-type"}
    | {"content-transfer-encoding", "content-disposition", "content-id", "content-description"}
)
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext (printable ASCII but ':'), bounded
_MEDIA_TYPE = re.compile(r"([A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*)/([A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*)")
_LONGEST_WORD = 900  # a header word longer than this could not be folded under 998 octets


def parse_structured(doc: dict[str, Any], *, max_size: int, max_recipients: int) -> Submission:
    """Check a structured document and compose its message; raises RequestProblem (400, or 413)."""
    errors: list[FieldError] = []
    for key in doc:
        if key in ("envelope_from", "recipients"):
            errors.append(FieldError(key, "only with raw; structured mode takes from, to, cc, bcc"))
        elif key not in STRUCTURED_FIELDS:
            errors.append(FieldError(key, "unknown field"))
    sender = _sender(doc, errors)
    lists = {name: _address_list(doc, name, errors) for name in ("to", "cc", "bcc")}
    reply_to = _address_list(doc, "reply_to", errors) if "reply_to" in doc else []
    given = sum(len(v) for v in lists.values())
    if given == 0 and not any(e.field.startswith(("to", "cc", "bcc")) for e in errors):
        errors.append(FieldError("to", "at least one recipient (to, cc or bcc) is required"))
    elif given > max_recipients:
        errors.append(FieldError("to", f"at most {max_recipients} recipients in to, cc and bcc together"))
    subject = _header_value(doc["subject"], "subject", errors) if "subject" in doc else None
    bodies = {name: _body(doc, name, errors) for name in ("text", "html")}
    headers = _headers(doc, errors)
    attachments = _attachments(doc, errors, max_size)
    if "metadata" in doc and not isinstance(doc["metadata"], dict):
        errors.append(FieldError("metadata", "must be an object"))
    if not errors and bodies["text"] is None and bodies["html"] is None and not attachments:
        errors.append(FieldError("text", "text, html or attachments are required"))
    if errors:
        raise invalid(errors)
    assert sender is not None
    everyone = [a for v in lists.values() for a in v]
    utf8 = not all(str(a.mailbox).isascii() for a in (sender, *everyone, *reply_to))
    msg = EmailMessage(policy=email.policy.SMTPUTF8 if utf8 else email.policy.SMTP)
    try:
        msg["From"] = _address(sender)
        for name, header in (("to", "To"), ("cc", "Cc"), ("reply_to", "Reply-To")):
            addresses = reply_to if name == "reply_to" else lists[name]
            if addresses:
                msg[header] = [_address(a) for a in addresses]
        if subject is not None:
            msg["Subject"] = subject
        if "date" not in {name.lower() for name in headers}:
            msg["Date"] = email.utils.formatdate(localtime=True)
        for name, value in headers.items():
            msg[name] = value
        _set_body(msg, bodies["text"], bodies["html"], attachments)
        content = msg.as_bytes()
    except (ValueError, TypeError, LookupError, email.errors.MessageError) as exc:
        raise invalid([FieldError(MESSAGE, f"cannot be composed: {exc}")]) from None
    if len(content) > max_size:
        raise too_large(len(content), max_size, MESSAGE)
    if has_long_line(content):
        raise invalid([FieldError(MESSAGE, "would have a line longer than 998 octets")])
    return Submission(sender.mailbox, unique(a.mailbox for a in everyone), content)


def _address(a: NamedAddress) -> Address:
    """The header form; the local part goes in unquoted (Address quotes it again when it must), and
    not as an addr-spec, which the email package would refuse when it is UTF-8."""
    local = a.mailbox.local_part
    if len(local) >= 2 and local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return Address(display_name=a.display_name, username=local, domain=a.mailbox.domain)


def _sender(doc: dict[str, Any], errors: list[FieldError]) -> NamedAddress | None:
    if "from" not in doc:
        errors.append(FieldError("from", "required: the sender's address"))
        return None
    return named_address(doc["from"], "from", errors)


def _address_list(doc: dict[str, Any], name: str, errors: list[FieldError]) -> list[NamedAddress]:
    value = doc.get(name)
    if value is None:
        return []
    items: Sequence[object] = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        errors.append(FieldError(name, "must be a list of addresses (or one address)"))
        return []
    found = [named_address(item, f"{name}[{i}]", errors) for i, item in enumerate(items)]
    return [a for a in found if a is not None]


def _header_value(value: object, name: str, errors: list[FieldError]) -> str | None:
    """A header's value: a string with no control character but tab, whose words can be folded."""
    if not isinstance(value, str):
        errors.append(FieldError(name, "must be a string"))
        return None
    if not plain_text(value, name, errors, allow="\t"):
        return None
    if max(map(len, value.split()), default=0) > _LONGEST_WORD:
        errors.append(FieldError(name, f"has a word longer than {_LONGEST_WORD} characters"))
        return None
    return value


def _body(doc: dict[str, Any], name: str, errors: list[FieldError]) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        errors.append(FieldError(name, "must be a string"))
        return None
    if "\0" in value:
        errors.append(FieldError(name, "must not contain NUL"))
        return None
    return value if encodable(value, name, errors) else None


def _headers(doc: dict[str, Any], errors: list[FieldError]) -> dict[str, str]:
    value = doc.get("headers")
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(FieldError("headers", "must be an object of header names and values"))
        return {}
    headers: dict[str, str] = {}
    seen: set[str] = set()
    for name, text in value.items():
        valid = _FIELD_NAME.fullmatch(name) is not None
        field = f"headers.{name}" if valid else f"headers[{name!r}]"
        if not valid:
            errors.append(FieldError(field, "not a header name (printable ASCII, no ':' or space)"))
            continue
        if name.lower() in RESERVED_HEADERS:
            errors.append(FieldError(field, "set by its own field or by the composition"))
            continue
        if name.lower() in seen:
            errors.append(FieldError(field, "given more than once (in another case)"))
            continue
        seen.add(name.lower())
        checked = _header_value(text, field, errors)
        if checked is not None:
            headers[name] = checked
    return headers


def _attachments(
    doc: dict[str, Any], errors: list[FieldError], max_size: int
) -> list[tuple[str, str, bytes]]:
    value = doc.get("attachments")
    if value is None:
        return []
    if not isinstance(value, list):
        errors.append(FieldError("attachments", "must be a list of objects"))
        return []
    found: list[tuple[str, str, bytes]] = []
    total = 0
    for i, item in enumerate(value):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            errors.append(FieldError(where, "must be an object with filename, content_type and content"))
            continue
        before = len(errors)
        for key in item:
            if key not in ATTACHMENT_FIELDS:
                errors.append(FieldError(f"{where}.{key}", "unknown field"))
        filename = item.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            errors.append(FieldError(f"{where}.filename", "required: a non-empty string"))
        elif plain_text(filename, f"{where}.filename", errors) and len(filename) > 255:
            errors.append(FieldError(f"{where}.filename", "longer than 255 characters"))
        media_type = _media_type(item, where, filename, errors)
        if "content" not in item:
            errors.append(FieldError(f"{where}.content", "required: the file, base64-encoded"))
            continue
        data = decode_base64(item["content"], f"{where}.content", errors, max_size - total)
        if data is None or len(errors) > before:
            continue
        total += len(data)
        assert isinstance(filename, str) and media_type is not None
        found.append((filename, media_type, data))
    return found


def _media_type(item: dict[str, Any], where: str, filename: object, errors: list[FieldError]) -> str | None:
    value = item.get("content_type")
    if value is None:
        guessed = mimetypes.guess_type(filename)[0] if isinstance(filename, str) else None
        value = guessed or "application/octet-stream"
    if not isinstance(value, str) or not _MEDIA_TYPE.fullmatch(value.strip()):
        errors.append(FieldError(f"{where}.content_type", "must be a media type such as application/pdf"))
        return None
    media_type = value.strip().lower()
    if media_type.startswith(("multipart/", "message/")):
        # the email package would have to parse the bytes as a message; send them as a file instead
        errors.append(FieldError(f"{where}.content_type", f"{media_type} cannot be attached as a file"))
        return None
    return media_type


def _set_body(
    msg: EmailMessage, text: str | None, html: str | None, attachments: Sequence[tuple[str, str, bytes]]
) -> None:
    """text/plain, text/html, or both as multipart/alternative; with attachments, all in multipart/mixed.
    Non-ASCII text is quoted-printable, so the message stays 7-bit (no 8BITMIME needed on the way out)
    and survives any relay byte for byte."""
    if text is not None:
        msg.set_content(text, cte=_cte(text))
        if html is not None:
            msg.add_alternative(html, subtype="html", cte=_cte(html))
    elif html is not None:
        msg.set_content(html, subtype="html", cte=_cte(html))
    for filename, media_type, data in attachments:
        maintype, _, subtype = media_type.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    for part in msg.walk():  # the email package repeats it in each part it adds
        if part is not msg:
            del part["MIME-Version"]
    if "MIME-Version" not in msg:  # a message of attachments only gets none
        msg["MIME-Version"] = "1.0"


def _cte(text: str) -> str | None:
    return None if text.isascii() else "quoted-printable"
