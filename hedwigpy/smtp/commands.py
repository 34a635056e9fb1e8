"""Splitting a command line into verb, path and ESMTP parameters (RFC 5321 4.1, RFC 1870/6152/6531)."""

from __future__ import annotations

from .addresses import AddressError, Mailbox, parse_path
from .replies import Reply

MAIL_PARAMS = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH"})
RCPT_PARAMS: frozenset[str] = frozenset()
BODY_TYPES = frozenset({"7BIT", "8BITMIME"})


class CommandSyntaxError(Exception):
    """Carries the reply that explains the syntax error to the client."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


def split_verb(line: str) -> tuple[str, str]:
    verb, _, rest = line.partition(" ")
    return verb.upper(), rest.strip(" ")


def parse_path_argument(
    rest: str, keyword: str, *, allow_null: bool, allow_postmaster: bool, enhanced: str
) -> tuple[Mailbox, dict[str, str | None]]:
    """`FROM:<path> PARAMS` → (mailbox, params). `keyword` is "FROM" or "TO"."""
    head, colon, tail = rest.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise CommandSyntaxError(
            Reply(501, "5.5.4", f"Syntax: {'MAIL FROM' if keyword == 'FROM' else 'RCPT TO'}:<address>")
        )
    tail = tail.lstrip(" ")
    if tail.startswith("<"):
        close = tail.find(">")
        if close < 0:
            raise CommandSyntaxError(Reply(501, enhanced, "Syntax error in path: missing '>'"))
        path, params_text = tail[: close + 1], tail[close + 1 :]
        if params_text and not params_text.startswith(" "):
            raise CommandSyntaxError(Reply(501, enhanced, "Syntax error after path"))
    else:
        path, _, params_text = tail.partition(" ")
    try:
        mailbox = parse_path(path, allow_null=allow_null, allow_postmaster=allow_postmaster)
    except AddressError as exc:
        raise CommandSyntaxError(Reply(501, enhanced, str(exc))) from None
    return mailbox, parse_params(params_text)


def parse_params(text: str) -> dict[str, str | None]:
    """`KEY=VALUE KEY2` → {"KEY": "VALUE", "KEY2": None}; keys upper-cased, duplicates refused."""
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        key = key.upper()
        if not key or not key.isascii() or not key.replace("-", "").isalnum() or (eq and not value):
            raise CommandSyntaxError(Reply(501, "5.5.4", f"Bad parameter syntax: {word[:40]}"))
        if key in params:
            raise CommandSyntaxError(Reply(501, "5.5.4", f"Duplicate parameter: {key}"))
        params[key] = value if eq else None
    return params


def check_mail_params(params: dict[str, str | None]) -> tuple[int | None, str, bool]:
    """Validate MAIL parameters → (declared size, body type, smtputf8)."""
    for key in params:
        if key not in MAIL_PARAMS:
            raise CommandSyntaxError(Reply(555, "5.5.4", f"Unsupported parameter: {key}"))
    size: int | None = None
    if "SIZE" in params:
        raw = params["SIZE"]
        if raw is None or not raw.isdigit() or len(raw) > 20:
            raise CommandSyntaxError(Reply(501, "5.5.4", "Bad SIZE parameter"))
        size = int(raw)
    body = (params.get("BODY") or "7BIT").upper()
    if "BODY" in params and body not in BODY_TYPES:
        raise CommandSyntaxError(Reply(555, "5.5.4", f"Unsupported BODY type: {body[:20]}"))
    if "SMTPUTF8" in params and params["SMTPUTF8"] is not None:
        raise CommandSyntaxError(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
    return size, body, "SMTPUTF8" in params


def check_rcpt_params(params: dict[str, str | None]) -> None:
    for key in params:
        if key not in RCPT_PARAMS:
            raise CommandSyntaxError(Reply(555, "5.5.4", f"Unsupported parameter: {key}"))


def parse_bdat(rest: str) -> tuple[int, bool]:
    parts = rest.split()
    if not 1 <= len(parts) <= 2 or not parts[0].isdigit() or len(parts[0]) > 15:
        raise CommandSyntaxError(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
    if len(parts) == 2 and parts[1].upper() != "LAST":
        raise CommandSyntaxError(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]"))
    return int(parts[0]), len(parts) == 2
