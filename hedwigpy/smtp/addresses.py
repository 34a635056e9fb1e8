"""RFC 5321 paths and mailboxes (with RFC 6531 UTF-8 when SMTPUTF8 is in use).

Parsing is strict about structure — that is what defeats open-relay tricks such as `a@ext@local` — and
lenient where real clients are sloppy (a space after the colon, no angle brackets), as Postfix is.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_PATH = 256  # RFC 5321 4.5.3.1.3, including the angle brackets
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = r"\u0080-\U0010ffff"
_DOT_STRING = rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"'
_LABEL = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[^\[\]\\\s]+\]"
_MAILBOX = re.compile(rf"({_DOT_STRING}|{_QUOTED})@({_DOMAIN}|{_LITERAL})")
_ADL = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")


class AddressError(ValueError):
    """The path is not a valid RFC 5321 path; the message says why, for the reply text."""


@dataclass(frozen=True, slots=True)
class Mailbox:
    """`local_part@domain`; the local part keeps its quotes if it had them. Null sender: both empty."""

    local_part: str
    domain: str

    @property
    def is_null(self) -> bool:
        return not self.local_part and not self.domain

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    def __str__(self) -> str:
        if self.is_null:
            return ""
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part


NULL_SENDER = Mailbox("", "")


def parse_path(text: str, *, allow_null: bool, allow_postmaster: bool = False) -> Mailbox:
    """Parse the argument of `MAIL FROM:` / `RCPT TO:` up to its parameters (already split off).

    A source route (`<@a,@b:user@c>`) is accepted and discarded, as RFC 5321 4.1.1.3 requires; the
    mailbox after it is what policy sees. Address literals must hold a real IPv4/IPv6 address.
    """
    if len(text) > MAX_PATH:
        raise AddressError("Path too long")
    inner = text[1:-1] if text.startswith("<") and text.endswith(">") else text
    if "<" in inner or ">" in inner:
        raise AddressError("Syntax error in path")
    if not inner:
        if allow_null:
            return NULL_SENDER
        raise AddressError("Empty path not allowed")
    if inner.startswith("@"):
        route = _ADL.match(inner)
        if route is None:
            raise AddressError("Syntax error in source route")
        inner = inner[route.end() :]
    if allow_postmaster and inner.lower() == "postmaster":
        return Mailbox("postmaster", "")
    match = _MAILBOX.fullmatch(inner)
    if match is None:
        raise AddressError("Syntax error in mailbox address")
    local, domain = match.group(1), match.group(2)
    if len(local.encode()) > MAX_LOCAL_PART:
        raise AddressError("Local part too long")
    if len(domain.encode()) > MAX_DOMAIN:
        raise AddressError("Domain too long")
    if domain.startswith("["):
        _check_literal(domain[1:-1])
    return Mailbox(local, domain.lower())


def _check_literal(body: str) -> None:
    try:
        if body[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(body[5:])
        else:
            ipaddress.IPv4Address(body)
    except ValueError:
        raise AddressError("Bad address literal") from None


def is_ascii(text: str) -> bool:
    return text.isascii()
