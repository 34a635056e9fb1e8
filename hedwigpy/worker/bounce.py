"""Delivery status notifications (RFC 3464): the bounce or delay warning sent to a message's sender.

Pure: envelope, statuses and the original header section in; the DSN's envelope and bytes out, ready to
spool. The message is composed by hand rather than through `email.policy.SMTP`, so the machine-readable
fields keep their exact form (no RFC 2047 words, our own folding) and 8-bit original headers pass through
byte for byte. Only the header section is returned, never the body (RFC 6522: privacy and size).
"""

from __future__ import annotations

import binascii
import email.utils
import math
import re
import textwrap
from collections.abc import Sequence

from ..smtp.framing import normalize_line_endings
from ..storage import Attempt, Envelope, RecipientStatus

HEADER_LIMIT = 64 * 1024  # original header bytes returned at most
MAX_DIAGNOSTIC = 1000  # characters of an upstream reply kept per recipient
MAX_LINE = 998  # RFC 5322 2.1.1: octets per line, CRLF excluded
_FOLD_AT = 78  # RFC 5322's "SHOULD" line length for the fields we write
_MAX_WORD = 200  # longer words are split (≤ 800 octets in UTF-8), so every line stays under MAX_LINE

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_TOKEN = re.compile(r"[^A-Za-z0-9.\-]")


def header_section(content_head: bytes, limit: int = HEADER_LIMIT) -> bytes:
    """The header section at the start of `content_head` (the first chunk(s) of stored content): the
    header lines up to the blank line, each with its own line ending, the blank line excluded.

    Longer than `limit` bytes, it is cut after the last line ending within the limit (or at the limit, for
    a single endless line). Content with no blank line is all header section (a headers-only message).
    """
    limit = max(limit, 0)
    if content_head.startswith((b"\r\n", b"\n")):
        return b""
    found = _HEADER_END.search(content_head, 0, limit + 4)
    if found is None:
        end = len(content_head)
    else:
        end = found.start() + (2 if content_head[found.start()] == 0x0D else 1)
    if end <= limit:
        return content_head[:end]
    cut = content_head.rfind(b"\n", 0, limit)
    return content_head[: cut + 1] if cut >= 0 else content_head[:limit]


def build_dsn(
    *,
    envelope: Envelope,
    message_id: str,
    original_headers: bytes,
    failed: Sequence[RecipientStatus],
    reporting_mta: str,
    now: float,
    delayed: Sequence[RecipientStatus] = (),
) -> tuple[Envelope, bytes] | None:
    """The DSN for a message whose `failed` recipients gave up (Action: failed) and whose `delayed` ones
    are still retried (Action: delayed); None when nothing may be sent: the sender is the null sender <>
    (never bounce a bounce) or there is nobody to report on.

    `failed` holds permanent failures and recipients that expired while still failing transiently (their
    Status becomes 4.4.7). The DSN goes from <> to the original sender; it is SMTPUTF8 (with the RFC 6533
    global types) only when an address in it is not ASCII.
    """
    if not envelope.sender or not (failed or delayed):
        return None
    mta = _TOKEN.sub("", reporting_mta)[:253] or "localhost"
    queue_id = _TOKEN.sub("", message_id)[:64] or "unknown"
    utf8 = not all(a.isascii() for a in (envelope.sender, *(r.address for r in (*failed, *delayed))))
    reports = [(r, "failed") for r in failed] + [(r, "delayed") for r in delayed]

    text, charset, text_cte = _notification(mta, reports, utf8)
    headers, headers_type, headers_cte = _returned_headers(original_headers, utf8)
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    status = _status_fields(envelope, queue_id, mta, reports, utf8, now)
    parts = [
        (["Notification", f"text/plain; charset={charset}", text_cte], text),
        (["Delivery report", status_type, "7bit" if status.isascii() else "8bit"], status),
    ]
    if headers:
        what = "Undelivered" if failed else "Delayed"
        parts.append(([f"{what} Message Headers", headers_type, headers_cte], headers))
    eightbit = any(cte == "8bit" for (_, _, cte), _ in parts)

    boundary = base = f"{queue_id}.{_int(now)}/{mta}"[:64]
    contents = b"".join(body for _, body in parts)
    for n in range(1, 1000):  # the original headers could, in theory, hold the boundary
        if f"--{boundary}".encode() not in contents:
            break
        boundary = f"{base}.{n}"
    kind = "bounce" if failed else "delay"
    subject = "Undelivered Mail Returned to Sender" if failed else "Delayed Mail (still being retried)"
    sender = _clean(envelope.sender)[:900]  # RFC 5321 allows 256; a line may not pass 998 whatever comes
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now, now)}",
        f"Message-ID: <{queue_id}.{kind}.{_int(now)}@{mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type={status_type.removeprefix('message/')};",
        f'\tboundary="{boundary}"',
        *(["Content-Transfer-Encoding: 8bit"] if eightbit else []),
        "",
        "This is a MIME-encapsulated message.",
    ]
    out = [_lines(head)]
    for (description, content_type, cte), body in parts:
        part_head = [f"Content-Description: {description}", f"Content-Type: {content_type}"]
        part_head += [f"Content-Transfer-Encoding: {cte}", ""] if cte != "7bit" else [""]
        out += [f"\r\n--{boundary}\r\n".encode(), _lines(part_head), body]
    out.append(f"\r\n--{boundary}--\r\n".encode())
    dsn_envelope = Envelope(
        sender="",
        recipients=(envelope.sender,),
        body_type="8BITMIME" if eightbit else "7BIT",
        smtputf8=utf8,
        received_at=now,
        listener="bounce",
    )
    return dsn_envelope, b"".join(out)


def _notification(mta: str, reports: list[tuple[RecipientStatus, str]], utf8: bool) -> tuple[bytes, str, str]:
    """The human-readable part, in the words of Postfix's bounce(8): (bytes, charset, encoding)."""
    failed = [_human(r, action, utf8) for r, action in reports if action == "failed"]
    delayed = [_human(r, action, utf8) for r, action in reports if action == "delayed"]
    lines = [f"This is the mail system at host {mta}.", ""]
    if failed:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. The headers of your",
            "message are attached below.",
        ]
    else:
        lines += [
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to one or more recipients.",
            "It will be retried until it is delivered or it expires; you will",
            "be notified if it cannot be delivered.",
        ]
    lines += [
        "",
        "For further assistance, please send mail to postmaster.",
        "",
        "If you do so, please include this problem report. You can",
        "delete your own text from the attached returned message.",
        "",
        "                   The mail system",
        "",
    ]
    for entry in failed:
        lines += [*entry, ""]
    if failed and delayed:
        lines += ["Delivery to these recipients is still being retried (no need to resend):", ""]
    for entry in delayed:
        lines += [*entry, ""]
    body = _lines(lines[:-1])
    return (body, "us-ascii", "7bit") if body.isascii() else (body, "utf-8", "8bit")


def _human(rs: RecipientStatus, action: str, utf8: bool) -> list[str]:
    last = rs.last
    if last is None:
        said = "no delivery attempt was made" if action == "failed" else "not yet attempted"
    else:
        reply = _reply_text(last, utf8)
        host = _text(last.host, utf8)
        said = f"host {host} said: {reply}" if host else reply
        if action == "failed" and _status(action, last) == "4.4.7":
            said = f"delivery time expired; last attempt: {said}"
    entry = f"<{_text(rs.address, utf8)}>: {said}"
    return textwrap.wrap(entry, width=76, subsequent_indent="    ", break_on_hyphens=False)


def _status_fields(
    envelope: Envelope,
    queue_id: str,
    mta: str,
    reports: list[tuple[RecipientStatus, str]],
    utf8: bool,
    now: float,
) -> bytes:
    """The delivery-status content: the per-message field group, then one group per recipient, each
    separated by a blank line (RFC 3464 2.1)."""
    groups = [
        [
            ("Reporting-MTA", f"dns; {mta}"),
            ("X-Hedwig-Queue-ID", queue_id),
            ("X-Hedwig-Sender", _address(envelope.sender, utf8)),
            ("Arrival-Date", _date(envelope.received_at, now)),
        ]
    ]
    for rs, action in reports:
        last = rs.last
        group = [
            ("Final-Recipient", _address(rs.address, utf8)),
            ("Action", action),
            ("Status", _status(action, last)),
        ]
        if last is not None:
            remote = _remote_mta(last.host, utf8)
            if remote:
                group.append(("Remote-MTA", f"dns; {remote}"))
            reply = _reply_text(last, utf8)
            if reply:
                group.append(("Diagnostic-Code", f"smtp; {reply}" if last.code else f"X-Hedwig; {reply}"))
            group.append(("Last-Attempt-Date", _date(last.at, now)))
        groups.append(group)
    blocks = [_lines([_fold(name, value) for name, value in group]) for group in groups]
    return b"\r\n".join(blocks)


def _status(action: str, last: Attempt | None) -> str:
    """RFC 3463 status: the attempt's own enhanced code when it fits the action, else derived from the
    reply code; a recipient that failed while its last answer was transient expired (4.4.7)."""
    if last is None:
        return "5.0.0" if action == "failed" else "4.0.0"
    enhanced = last.enhanced if _ENHANCED.fullmatch(last.enhanced) else ""
    if action == "delayed":
        return enhanced if enhanced.startswith("4") else "4.0.0"
    transient = 400 <= last.code < 500 or (last.code == 0 and not enhanced.startswith("5"))
    if transient:
        return "4.4.7"
    return enhanced if enhanced.startswith("5") else "5.0.0"


def _returned_headers(original: bytes, utf8: bool) -> tuple[bytes, str, str]:
    """(content, type, encoding) of the returned header section. 8-bit headers go as they are (8bit) when
    every line is legal; NULs or overlong lines are quoted-printable, which keeps every byte."""
    data = normalize_line_endings(header_section(original))
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    if b"\x00" in data or max(map(len, data.split(b"\r\n"))) > MAX_LINE:
        return binascii.b2a_qp(data, istext=True), "text/rfc822-headers", "quoted-printable"
    if data.isascii():
        return data, "text/rfc822-headers", "7bit"
    if utf8 and _is_utf8(data):
        return data, "message/global-headers", "8bit"
    return data, "text/rfc822-headers", "8bit"


def _reply_text(last: Attempt, utf8: bool) -> str:
    """`550 5.1.1 text` on one line (a multi-line reply joined with spaces), capped."""
    enhanced = last.enhanced if _ENHANCED.fullmatch(last.enhanced) else ""
    code = str(last.code) if last.code else ""
    words = " ".join(filter(None, (code, enhanced, _text(last.text[: MAX_DIAGNOSTIC * 2], utf8))))
    return words[:MAX_DIAGNOSTIC]


def _remote_mta(host: str, utf8: bool) -> str:
    """The host name of a Postfix-style label: `mx.example.net[192.0.2.1]:2525` → `mx.example.net`."""
    name, bracket, rest = host.partition("[")
    if not bracket:
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
    elif not name.strip():
        name = rest.partition("]")[0]  # no name, only an address
    return _text(name, utf8).replace(" ", "")


def _address(address: str, utf8: bool) -> str:
    """An address-type field value: rfc822 for ASCII, RFC 6533's utf-8 type otherwise."""
    kind = "rfc822" if address.isascii() else "utf-8"
    return f"{kind}; {_text(address, utf8)}"


def _text(value: str, utf8: bool) -> str:
    """Printable text on one line: controls become spaces, runs of spaces one; lone surrogates become
    "?"; outside SMTPUTF8, non-ASCII becomes RFC 6533's `\\x{HEX}` so the field stays 7-bit."""
    value = " ".join(_CONTROL.sub(" ", value).split())
    value = value.encode("utf-8", "replace").decode("utf-8")
    return value if utf8 else _NON_ASCII.sub(lambda m: f"\\x{{{ord(m.group()):X}}}", value)


def _clean(value: str) -> str:
    return _CONTROL.sub("", value).encode("utf-8", "replace").decode("utf-8")


def _fold(name: str, value: str) -> str:
    """`Name: value`, folded at spaces before 78 characters; overlong words are split (RFC 5322 2.2.3)."""
    words = [w[i : i + _MAX_WORD] for w in value.split() for i in range(0, len(w), _MAX_WORD)]
    lines: list[str] = []
    line, fresh = f"{name}:", True
    for word in words:
        if not fresh and len(line) + 1 + len(word) > _FOLD_AT:
            lines.append(line)
            line = ""
        line, fresh = f"{line} {word}", False
    lines.append(line)
    return "\r\n".join(lines)


def _lines(lines: list[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8", "replace")


def _date(timestamp: float, fallback: float) -> str:
    """RFC 5322 date in local time; a timestamp that cannot be one (NaN, out of range) uses `fallback`."""
    for value in (timestamp, fallback):
        try:
            return email.utils.formatdate(value, localtime=True)
        except (OverflowError, ValueError, OSError):
            continue
    return email.utils.formatdate(0, localtime=True)


def _int(value: float) -> int:
    return int(value) if math.isfinite(value) else 0


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
