"""MX resolution for delivery (RFC 5321 section 5.1, RFC 7505 null MX), with a bounded TTL cache.

`MxResolver.resolve(domain)` returns the hosts to try, best first, each with its addresses; or raises
`DnsFailure` carrying the `Reply` to report (DESIGN rule 3: DNS errors become replies here and nowhere else):

- NXDOMAIN                                   → 550 5.1.2 (permanent)
- null MX (`MX 0 .`)                         → 556 5.1.10 (permanent)
- no MX and no A/AAAA                        → 550 5.4.4 (permanent)
- SERVFAIL, timeout, no nameserver answering → 451 4.4.3 (transient)
- MX hosts exist but none has an address     → 451 4.4.4 (transient; maybe a passing glue problem)

Answers are cached for their TTL (negative answers for the SOA minimum, at most an hour); failures are not.
dnspython's own cache stays off.
"""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.rdtypes.ANY.MX
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.resolver
import trio

from ..smtp.replies import Reply
from ._dns_cache import TtlCache

__all__ = ["DnsFailure", "MxHost", "MxResolver"]

MAX_CACHE_ENTRIES = 10_000
MAX_POSITIVE_TTL = 86_400
MAX_NEGATIVE_TTL = 3_600
MAX_MX_HOSTS = 10  # hosts whose addresses are looked up (after sorting); Postfix tries even fewer
_IDNA = dns.name.IDNA_2008_Practical if dns.name.have_idna_2008 else dns.name.IDNA_2003
_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA
_MX = dns.rdatatype.MX


@dataclass(frozen=True, slots=True)
class MxHost:
    """One host to deliver to. `name` is the A-label host name (the bare IP for an address literal)."""

    name: str
    preference: int
    addresses: tuple[str, ...]  # IPs to try, in order (IPv4 first)


class DnsFailure(Exception):
    """Resolution failed; `reply` is what to report upstream (4xx: retry later, 5xx: bounce)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply

    @property
    def permanent(self) -> bool:
        return self.reply.is_permanent


class _Transient(Exception):
    """A lookup got no usable answer (SERVFAIL, timeout, network error...): not cached, retried later."""


@dataclass(frozen=True, slots=True)
class _Answer:
    status: Literal["ok", "nxdomain", "nodata"]
    mx: tuple[tuple[int, str], ...] = ()
    addresses: tuple[str, ...] = ()


@dataclass(slots=True)
class _HostLookup:
    addresses: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    nxdomain: bool = False


def _transient(text: str) -> DnsFailure:
    return DnsFailure(Reply(451, "4.4.3", f"{text}, try again later"))


class MxResolver:
    """Resolves a mail domain to the hosts to try. One instance per daemon (it owns the cache)."""

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        max_cache_entries: int = MAX_CACHE_ENTRIES,
        max_hosts: int = MAX_MX_HOSTS,
    ) -> None:
        """`nameservers` are (ip, port) pairs, used exactly; empty means the system's (/etc/resolv.conf).

        `timeout` bounds each DNS lookup (dnspython's lifetime; each try gets half of it, so a lost UDP
        packet is retried once). The A/AAAA lookups of the MX hosts run concurrently, so `resolve` takes
        at most about twice `timeout`.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_hosts < 1:
            raise ValueError("max_hosts must be at least 1")
        self._timeout = timeout
        self._rng = rng if rng is not None else random.Random()
        self._max_hosts = max_hosts
        self._cache: TtlCache[tuple[str, int], _Answer] = TtlCache(max_cache_entries, clock=clock)
        self._backend = dns.asyncbackend.get_backend("trio")
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._config_error = ""
        try:
            resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        except dns.exception.DNSException as exc:  # e.g. no /etc/resolv.conf: every lookup is transient
            self._config_error = f"no DNS resolver configured ({exc})"
        else:
            if nameservers:
                resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
            resolver.cache = None
            resolver.timeout = timeout / 2
            resolver.lifetime = timeout
            resolver.retry_servfail = False
            self._resolver = resolver

    def statistics(self) -> dict[str, int]:
        """Cache counters: hits, misses, entries, evictions."""
        return self._cache.statistics()

    async def resolve(self, domain: str) -> list[MxHost]:
        """The hosts to try for `domain` (a domain or an address literal), best first.

        Raises `DnsFailure` when there is nothing to try.
        """
        literal = _address_literal(domain)
        if literal is not None:
            return [MxHost(literal, 0, (literal,))]
        name = _a_label(domain)
        try:
            mx = await self._lookup(name, _MX)
        except _Transient as exc:
            raise _transient(f"Temporary DNS failure for {name}: {exc}") from None
        if mx.status == "nxdomain":
            raise DnsFailure(Reply(550, "5.1.2", f"Host or domain name not found: {name} (NXDOMAIN)"))
        if mx.status == "nodata":
            return await self._implicit_mx(name)
        if len(mx.mx) == 1 and mx.mx[0][1] == ".":
            raise DnsFailure(Reply(556, "5.1.10", f"Recipient domain {name} does not accept mail (null MX)"))
        ordered = self._order(mx.mx)
        lookups = await self._host_addresses([host for _, host in ordered])
        hosts = [
            MxHost(host, pref, tuple(lookups[host].addresses))
            for pref, host in ordered
            if lookups[host].addresses
        ]
        if hosts:
            return hosts
        if any(lookup.errors for lookup in lookups.values()):
            details = "; ".join(err for lookup in lookups.values() for err in lookup.errors)
            raise _transient(f"Temporary DNS failure resolving the MX hosts of {name}: {details}")
        raise DnsFailure(Reply(451, "4.4.4", f"No MX host of {name} has an address, try again later"))

    async def resolve_host(self, host: str) -> MxHost:
        """The addresses of one host name (a smarthost: no MX lookup, like Postfix's `[host]`).

        Raises `DnsFailure` as `resolve` does.
        """
        try:
            literal: str | None = str(ipaddress.ip_address(host))
        except ValueError:
            literal = _address_literal(host)
        if literal is not None:
            return MxHost(literal, 0, (literal,))
        return (await self._implicit_mx(_a_label(host)))[0]

    async def _implicit_mx(self, name: str) -> list[MxHost]:
        """RFC 5321 5.1: no MX records, so the domain itself is the host (preference 0)."""
        lookup = (await self._host_addresses([name]))[name]
        if lookup.addresses:
            return [MxHost(name, 0, tuple(lookup.addresses))]
        if lookup.errors:
            raise _transient(f"Temporary DNS failure for {name}: {'; '.join(lookup.errors)}")
        if lookup.nxdomain:  # the name vanished between the MX and the address lookups
            raise DnsFailure(Reply(550, "5.1.2", f"Host or domain name not found: {name} (NXDOMAIN)"))
        raise DnsFailure(Reply(550, "5.4.4", f"Domain {name} has no MX and no address records"))

    def _order(self, records: tuple[tuple[int, str], ...]) -> list[tuple[int, str]]:
        """By preference, ties in random order; "." dropped, each host once, at most `max_hosts`."""
        by_pref: dict[int, list[str]] = {}
        for pref, host in sorted(records):
            if host != ".":
                by_pref.setdefault(pref, []).append(host)
        ordered: list[tuple[int, str]] = []
        seen: set[str] = set()
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self._rng.shuffle(group)
            for host in group:
                if host not in seen:
                    seen.add(host)
                    ordered.append((pref, host))
        return ordered[: self._max_hosts]

    async def _host_addresses(self, names: list[str]) -> dict[str, _HostLookup]:
        """A and AAAA of every name, all concurrently; IPv4 addresses first."""
        results = {name: _HostLookup() for name in names}
        found: dict[tuple[str, int], tuple[str, ...]] = {}

        async def one(name: str, rdtype: dns.rdatatype.RdataType) -> None:
            try:
                answer = await self._lookup(name, rdtype)
            except _Transient as exc:
                results[name].errors.append(f"{name}/{rdtype.name}: {exc}")
                return
            if answer.status == "nxdomain":
                results[name].nxdomain = True
            found[(name, int(rdtype))] = answer.addresses

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name, _A)
                nursery.start_soon(one, name, _AAAA)
        for name, lookup in results.items():
            for rdtype in (_A, _AAAA):
                for address in found.get((name, int(rdtype)), ()):
                    if address not in lookup.addresses:
                        lookup.addresses.append(address)
        return results

    async def _lookup(self, name: str, rdtype: dns.rdatatype.RdataType) -> _Answer:
        """One cached query. Raises `_Transient` when there is no usable answer."""
        key = (name, int(rdtype))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if self._resolver is None:
            raise _Transient(self._config_error)
        qname = dns.name.from_text(name)
        try:
            answer = await self._resolver.resolve(
                qname, rdtype, raise_on_no_answer=False, search=False, backend=self._backend
            )
        except dns.resolver.NXDOMAIN as exc:
            result = _Answer("nxdomain")
            responses: dict[dns.name.Name, dns.message.Message] = exc.responses()  # type: ignore[no-untyped-call]
            self._cache.put(key, result, _negative_ttl(next(iter(responses.values()), None)))
            return result
        except dns.resolver.LifetimeTimeout:
            raise _Transient(f"timed out after {self._timeout:g}s") from None
        except dns.resolver.NoNameservers:
            raise _Transient("no nameserver answered (SERVFAIL or refused)") from None
        except (dns.exception.DNSException, OSError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None
        if answer.rrset is None:
            result = _Answer("nodata")
            self._cache.put(key, result, _negative_ttl(answer.response))
            return result
        if rdtype == _MX:
            mx = tuple(
                (rd.preference, _host_text(rd.exchange))
                for rd in answer.rrset
                if isinstance(rd, dns.rdtypes.ANY.MX.MX)
            )
            result = _Answer("ok", mx=mx)
        else:
            addresses = tuple(
                rd.address
                for rd in answer.rrset
                if isinstance(rd, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA)
            )
            result = _Answer("ok", addresses=addresses)
        self._cache.put(key, result, min(answer.chaining_result.minimum_ttl, MAX_POSITIVE_TTL))
        return result


def _negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308: min(SOA TTL, SOA minimum), capped; an answer without SOA is not cached."""
    if not isinstance(response, dns.message.QueryMessage):
        return 0
    if not any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority):
        return 0
    try:
        ttl = response.resolve_chaining().minimum_ttl
    except dns.exception.DNSException:
        return 0
    return min(int(ttl), MAX_NEGATIVE_TTL)


def _host_text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return "."
    return name.to_text(omit_final_dot=True).lower()


def _a_label(domain: str) -> str:
    """The ASCII (IDNA A-label) form of `domain`, lower case, no final dot."""
    try:
        name = dns.name.from_text(domain.strip(), idna_codec=_IDNA)
    except (dns.exception.DNSException, UnicodeError):
        name = dns.name.root
    if len(name.labels) <= 1:
        raise DnsFailure(Reply(550, "5.1.2", f"Invalid domain name: {domain[:100]!r}"))
    return name.to_text(omit_final_dot=True).lower()


def _address_literal(domain: str) -> str | None:
    """The IP of `[1.2.3.4]` or `[IPv6:2001:db8::1]`; None if `domain` is not a literal."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise DnsFailure(Reply(550, "5.1.2", f"Invalid address literal: {domain[:100]!r}")) from None
