"""Policy as plain functions: who may relay, which domains are filtered, how fast a client may send
and how fast we may send to a domain. No I/O; the callers turn the answers into replies."""

from __future__ import annotations

import ipaddress
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .config import FilterConfig
from .smtp import Mailbox

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def in_networks(addr: IPAddress | None, networks: Iterable[IPNetwork]) -> bool:
    return addr is not None and any(addr in net for net in networks if net.version == addr.version)


def is_loopback(addr: IPAddress | None) -> bool:
    return addr is not None and addr.is_loopback


def domain_matches(domain: str, domains: Iterable[str]) -> bool:
    """`domain` is one of `domains` or a subdomain of one (Postfix `parent_domain_matches_subdomains`)."""
    domain = domain.lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d) for d in domains)


# Local parts that some MTAs still treat as routing (percent hack, UUCP bang paths, quoted @).
_ROUTING_CHARS = frozenset("%!@")


def has_routing_syntax(mailbox: Mailbox) -> bool:
    return any(ch in _ROUTING_CHARS for ch in mailbox.local_part)


def filter_allows(domain: str, kind: str, filters: Sequence[FilterConfig]) -> bool:
    """First matching filter of this `kind` decides. With no match a domain is allowed, unless every
    filter of this kind is an `allow` list — then the lists are exhaustive and the domain is denied."""
    relevant = [f for f in filters if f.type == kind]
    for f in relevant:
        if domain_matches(domain, f.domains):
            return f.action == "allow"
    return not relevant or any(f.action == "deny" for f in relevant)


@dataclass
class RateLimiter:
    """A sliding one-minute window of events per key (client IP or user, recipient domain).

    `limit` applies to every key not in `overrides`; a limit of 0 disables limiting for that key.
    """

    limit: int
    window: float = 60.0
    overrides: Mapping[str, int] = field(default_factory=dict)
    _events: dict[str, deque[float]] = field(default_factory=dict)

    def allow(self, key: str, now: float | None = None) -> bool:
        """Record an event for `key` if it is within the limit; False when it is not."""
        limit = self.overrides.get(key, self.limit)
        if limit <= 0:
            return True
        now = time.monotonic() if now is None else now
        q = self._events.setdefault(key, deque())
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) >= limit:
            return False
        q.append(now)
        if len(self._events) > 100_000:  # bound memory: forget idle keys
            for k in [k for k, v in self._events.items() if not v or v[-1] <= now - self.window]:
                del self._events[k]
        return True

    def wait_time(self, key: str, now: float | None = None) -> float:
        """Seconds until `allow(key)` can succeed again (0 when it can now)."""
        limit = self.overrides.get(key, self.limit)
        q = self._events.get(key)
        if limit <= 0 or not q or len(q) < limit:
            return 0.0
        now = time.monotonic() if now is None else now
        return max(0.0, q[-limit] + self.window - now)
