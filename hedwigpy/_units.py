"""Parsers for the human-friendly values in hedwig.toml: durations ("1h30m"), sizes ("25MiB") and
network addresses ("[::1]:2525").

Each parser raises `ValueError` with a message that reads well after a key path, e.g.
`limits.data_timeout: invalid duration 'ten minutes' (use e.g. "30s", "5m", "4h", "5d")`, so the
config loader can report it verbatim.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from fractions import Fraction

__all__ = [
    "HostPort",
    "parse_domain",
    "parse_duration",
    "parse_hostname",
    "parse_hostport",
    "parse_network",
    "parse_size",
    "typename",
]

_DURATION_UNITS: dict[str, float] = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_NUMBER = r"\d+(?:\.\d+)?"
# "ms" must come before "m" so that "250ms" is not read as 250 minutes followed by garbage.
_DURATION_PART = re.compile(rf"({_NUMBER})(ms|s|m|h|d|w)\s*")
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d|w)\s*)+")
_PLAIN_NUMBER = re.compile(_NUMBER)
_DURATION_HINT = '(use e.g. "250ms", "30s", "5m", "4h", "5d", "1h30m")'

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(rf"({_NUMBER})\s*([A-Za-z]*)")
_SIZE_HINT = '(use bytes or e.g. "512KiB", "25MiB", "1GiB", "10MB")'


_TYPENAMES = {"dict": "table", "list": "array"}


def typename(value: object) -> str:
    """The name of a value's type as errors show it: Python's, but "table" and "array" as in TOML."""
    name = type(value).__name__
    return _TYPENAMES.get(name, name)


def parse_duration(s: str | float) -> float:
    """Seconds in `s`: "30s", "5m", "4h", "5d", "1w", "250ms", combinations such as "1h30m", or a plain
    number of seconds (as a number or a numeric string). Negative, empty and unknown forms are errors."""
    if isinstance(s, bool) or not isinstance(s, str | int | float):
        raise ValueError(f'expected a duration string like "30s" (got {typename(s)})')
    if not isinstance(s, str):
        seconds = float(s)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"duration must be a finite number of seconds >= 0 (got {s!r})")
        return seconds
    text = s.strip()
    if not text:
        raise ValueError(f"empty duration {_DURATION_HINT}")
    if text.startswith("-"):
        raise ValueError(f"duration must not be negative (got {s!r})")
    if _PLAIN_NUMBER.fullmatch(text):
        return float(text)
    if not _DURATION.fullmatch(text):
        raise ValueError(f"invalid duration {s!r} {_DURATION_HINT}")
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(text))


def parse_size(v: int | str) -> int:
    """Bytes in `v`: an integer, or a string with an optional unit — B, binary KiB/MiB/GiB/TiB, decimal
    KB/MB/GB/TB (case-insensitive). Fractions are allowed when they come to whole bytes ("1.5KiB")."""
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise ValueError(f'expected a size in bytes or a string like "25MiB" (got {typename(v)})')
    if isinstance(v, int):
        if v < 0:
            raise ValueError(f"size must not be negative (got {v})")
        return v
    text = v.strip()
    if not text:
        raise ValueError(f"empty size {_SIZE_HINT}")
    if text.startswith("-"):
        raise ValueError(f"size must not be negative (got {v!r})")
    m = _SIZE.fullmatch(text)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {v!r} {_SIZE_HINT}")
    amount = Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    if amount.denominator != 1:
        raise ValueError(f"size {v!r} is not a whole number of bytes")
    return int(amount)


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (name or IP address, IPv6 without brackets) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")


def parse_hostport(s: str, default_port: int | None = None, *, allow_port_zero: bool = False) -> HostPort:
    """Parse "host:port", "1.2.3.4:port" or "[v6addr]:port". With `default_port` the port may be left out
    ("smtp.example.com", "[::1]"). Port 0 ("let the OS choose") only with `allow_port_zero`."""
    if not isinstance(s, str):
        raise ValueError(f'expected a string like "127.0.0.1:2525" (got {typename(s)})')
    text = s.strip()
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"missing ']' in {s!r}")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address (in {s!r})") from None
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected ':port' after ']' in {s!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        raise ValueError(f'IPv6 addresses need brackets, e.g. "[::1]:25" (got {s!r})')
    else:
        host, sep, port_text_ = text.partition(":")
        port_text = port_text_ if sep else None
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"invalid host {host!r} in {s!r} (expected host:port)")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"missing port in {s!r} (expected host:port)")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not port_text.isascii():
        raise ValueError(f"invalid port {port_text!r} in {s!r}")
    port = int(port_text)
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ValueError(f"port must be 1-65535 (got {port} in {s!r})")
    return HostPort(host, port)


_DNS_HOSTNAME = re.compile(
    r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_NOT_IN_DOMAIN = frozenset("@/\\[]:;,\"'<>()")


def parse_hostname(s: object) -> str:
    """A DNS host name (RFC 1123 letters, digits, hyphens), as used in greetings and EHLO."""
    if not isinstance(s, str):
        raise ValueError(f"expected a string (got {typename(s)})")
    if not _DNS_HOSTNAME.fullmatch(s):
        raise ValueError(f"not a valid host name (got {s!r})")
    return s


def parse_domain(s: object) -> str:
    """A mail domain, lower-cased and without a trailing dot, for matching against addresses.
    Non-ASCII (internationalised) names are kept as written."""
    if not isinstance(s, str):
        raise ValueError(f"expected a string (got {typename(s)})")
    d = s.strip().lower().rstrip(".")
    if d.startswith("."):
        raise ValueError(f"write the domain without a leading dot; subdomains match too (got {s!r})")
    if not d or ".." in d or any(c.isspace() or c in _NOT_IN_DOMAIN for c in d):
        raise ValueError(f"not a domain name (got {s!r})")
    return d


def parse_network(s: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IP network in CIDR notation ("10.0.0.0/8", "::1/128"); host bits are ignored and a bare
    address is a single-host network."""
    if not isinstance(s, str):
        raise ValueError(f"expected a string (got {typename(s)})")
    try:
        return ipaddress.ip_network(s.strip(), strict=False)
    except ValueError:
        raise ValueError(f'not an IP network like "10.0.0.0/8" or "::1/128" (got {s!r})') from None
