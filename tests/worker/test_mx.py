"""MX resolution against the loopback DNS server (real wire format, UDP and TCP)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest
import trio

from hedwigpy.worker._dns_cache import TtlCache
from hedwigpy.worker.mx import DnsFailure, MxHost, MxResolver
from tests.dns_server import DnsServer


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer() as srv:
        yield srv


@pytest.fixture
def dns(server: DnsServer) -> Iterator[DnsServer]:
    server.clear()
    yield server
    server.clear()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(dns: DnsServer, clock: FakeClock) -> MxResolver:
    return MxResolver([dns.nameserver], timeout=0.5, clock=clock, rng=random.Random(1))


async def failure(resolver: MxResolver, domain: str) -> DnsFailure:
    with pytest.raises(DnsFailure) as info:
        await resolver.resolve(domain)
    return info.value


async def test_mx_sorted_by_preference(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_mx("example.test", [(30, "mx3.example.test"), (10, "mx1.example.test"), (20, "mx2.example.test")])
    dns.add_a("mx1.example.test", "192.0.2.1")
    dns.add_a("mx2.example.test", "192.0.2.2")
    dns.add_aaaa("mx2.example.test", "2001:db8::2")
    dns.add_a("mx3.example.test", "192.0.2.3")
    dns.add_a("mx3.example.test", "192.0.2.33")
    hosts = await resolver.resolve("example.test")
    assert hosts[0] == MxHost("mx1.example.test", 10, ("192.0.2.1",))
    assert hosts[1] == MxHost("mx2.example.test", 20, ("192.0.2.2", "2001:db8::2"))
    assert hosts[2].name == "mx3.example.test"
    assert sorted(hosts[2].addresses) == ["192.0.2.3", "192.0.2.33"]


async def test_equal_preferences_shuffled(dns: DnsServer, clock: FakeClock) -> None:
    dns.add_mx("example.test", [(10, "a.example.test"), (10, "b.example.test"), (5, "first.example.test")])
    for host in ("a", "b", "first"):
        dns.add_a(f"{host}.example.test", "192.0.2.1")
    orders = set()
    for seed in range(12):
        resolver = MxResolver([dns.nameserver], timeout=0.5, clock=clock, rng=random.Random(seed))
        hosts = await resolver.resolve("example.test")
        assert hosts[0].name == "first.example.test"
        orders.add(tuple(h.name for h in hosts[1:]))
    assert orders == {("a.example.test", "b.example.test"), ("b.example.test", "a.example.test")}


async def test_implicit_mx(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_a("plain.test", "192.0.2.7")
    dns.add_aaaa("plain.test", "2001:db8::7")
    assert await resolver.resolve("plain.test") == [MxHost("plain.test", 0, ("192.0.2.7", "2001:db8::7"))]
    assert dns.queries("plain.test", "MX") == 1


async def test_no_mx_no_address_is_permanent(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_txt("textonly.test", "v=spf1 -all")
    exc = await failure(resolver, "textonly.test")
    assert exc.permanent
    assert (exc.reply.code, exc.reply.enhanced) == (550, "5.4.4")


async def test_null_mx(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_null_mx("nomail.test")
    exc = await failure(resolver, "nomail.test")
    assert exc.permanent
    assert (exc.reply.code, exc.reply.enhanced) == (556, "5.1.10")
    assert "null MX" in exc.reply.text


async def test_nxdomain_is_permanent(dns: DnsServer, resolver: MxResolver) -> None:
    exc = await failure(resolver, "nowhere.test")
    assert exc.permanent
    assert (exc.reply.code, exc.reply.enhanced) == (550, "5.1.2")
    assert "not found" in exc.reply.text


async def test_servfail_is_transient_and_not_cached(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_mx("broken.test", [(10, "mx.broken.test")])
    dns.add_a("mx.broken.test", "192.0.2.9")
    dns.servfail("broken.test")
    exc = await failure(resolver, "broken.test")
    assert not exc.permanent
    assert (exc.reply.code, exc.reply.enhanced) == (451, "4.4.3")
    dns.restore("broken.test")
    assert [h.name for h in await resolver.resolve("broken.test")] == ["mx.broken.test"]


async def test_timeout_is_transient(dns: DnsServer, resolver: MxResolver) -> None:
    dns.drop("slow.test")
    start = time.monotonic()
    with trio.fail_after(3):
        exc = await failure(resolver, "slow.test")
    assert time.monotonic() - start < 1.5
    assert not exc.permanent
    assert (exc.reply.code, exc.reply.enhanced) == (451, "4.4.3")
    assert "timed out" in exc.reply.text


async def test_mx_host_without_address_skipped(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_mx(
        "example.test", [(10, "ghost.example.test"), (20, "noaddr.example.test"), (30, "mx.example.test")]
    )
    dns.add_txt("noaddr.example.test", "exists but has no A/AAAA")
    dns.add_a("mx.example.test", "192.0.2.5")
    assert await resolver.resolve("example.test") == [MxHost("mx.example.test", 30, ("192.0.2.5",))]


async def test_one_mx_host_failing_is_skipped(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_mx("example.test", [(10, "sick.example.test"), (20, "mx.example.test")])
    dns.add_a("sick.example.test", "192.0.2.4")
    dns.servfail("sick.example.test")
    dns.add_a("mx.example.test", "192.0.2.5")
    assert [h.name for h in await resolver.resolve("example.test")] == ["mx.example.test"]


async def test_no_mx_host_has_an_address_is_transient(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_mx("example.test", [(10, "ghost1.example.test"), (20, "ghost2.example.test")])
    exc = await failure(resolver, "example.test")
    assert not exc.permanent
    assert (exc.reply.code, exc.reply.enhanced) == (451, "4.4.4")


async def test_mx_hosts_all_failing_is_transient(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_mx("example.test", [(10, "sick.example.test")])
    dns.servfail("sick.example.test")
    exc = await failure(resolver, "example.test")
    assert (exc.reply.code, exc.reply.enhanced) == (451, "4.4.3")


async def test_address_literals(dns: DnsServer, resolver: MxResolver) -> None:
    assert await resolver.resolve("[192.0.2.1]") == [MxHost("192.0.2.1", 0, ("192.0.2.1",))]
    assert await resolver.resolve("[IPv6:2001:DB8::1]") == [MxHost("2001:db8::1", 0, ("2001:db8::1",))]
    for bad in ("[300.1.1.1]", "[IPv6:zz]", "[2001:db8::1]"):
        assert (await failure(resolver, bad)).permanent
    assert resolver.statistics()["misses"] == 0  # no DNS at all


async def test_invalid_domain_is_permanent(resolver: MxResolver) -> None:
    for bad in ("", ".", "a..b", "x" * 64 + ".test"):
        assert (await failure(resolver, bad)).reply.code == 550


async def test_idna_domain(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_mx("xn--bcher-kva.test", [(10, "mx.xn--bcher-kva.test")])
    dns.add_a("mx.xn--bcher-kva.test", "192.0.2.8")
    assert await resolver.resolve("Bücher.test") == [MxHost("mx.xn--bcher-kva.test", 10, ("192.0.2.8",))]
    assert dns.queries("xn--bcher-kva.test", "MX") == 1


async def test_case_and_final_dot_share_the_cache(dns: DnsServer, resolver: MxResolver) -> None:
    dns.add_mx("example.test", [(10, "MX.Example.Test")])
    dns.add_a("mx.example.test", "192.0.2.1")
    first = await resolver.resolve("EXAMPLE.test.")
    assert first == await resolver.resolve("example.test")
    assert first[0].name == "mx.example.test"
    assert dns.queries("example.test", "MX") == 1


async def test_positive_cache_follows_ttl(dns: DnsServer, resolver: MxResolver, clock: FakeClock) -> None:
    dns.add_mx("example.test", [(10, "mx.example.test")], ttl=300)
    dns.add_a("mx.example.test", "192.0.2.1", ttl=60)
    await resolver.resolve("example.test")
    await resolver.resolve("example.test")
    assert dns.queries("example.test", "MX") == 1
    assert dns.queries("mx.example.test", "A") == 1
    assert dns.queries("mx.example.test", "AAAA") == 1  # NODATA, cached for the SOA minimum (60 s)
    stats = resolver.statistics()
    assert stats["hits"] == 3
    assert stats["misses"] == 3
    assert stats["entries"] == 3

    clock.now += 61  # the A record (and the NODATA) expired, the MX did not
    await resolver.resolve("example.test")
    assert dns.queries("example.test", "MX") == 1
    assert dns.queries("mx.example.test", "A") == 2

    clock.now += 240  # now the MX expired too
    dns.add_a("mx.example.test", "192.0.2.2", ttl=60)
    hosts = await resolver.resolve("example.test")
    assert dns.queries("example.test", "MX") == 2
    assert sorted(hosts[0].addresses) == ["192.0.2.1", "192.0.2.2"]


async def test_negative_caching(dns: DnsServer, resolver: MxResolver, clock: FakeClock) -> None:
    assert dns.negative_ttl == 60
    for _ in range(3):
        assert (await failure(resolver, "nowhere.test")).reply.code == 550
    assert dns.queries("nowhere.test", "MX") == 1
    clock.now += 61
    dns.add_mx("nowhere.test", [(10, "mx.nowhere.test")])
    dns.add_a("mx.nowhere.test", "192.0.2.1")
    assert [h.name for h in await resolver.resolve("nowhere.test")] == ["mx.nowhere.test"]
    assert dns.queries("nowhere.test", "MX") == 2


async def test_failures_are_not_cached(dns: DnsServer, resolver: MxResolver) -> None:
    dns.servfail("flaky.test")
    for _ in range(2):
        assert not (await failure(resolver, "flaky.test")).permanent
    assert dns.queries("flaky.test", "MX") == 2


async def test_tcp_fallback_for_a_big_answer(dns: DnsServer, clock: FakeClock) -> None:
    mxs = [(i // 4, f"mx{i:02d}.a-rather-long-mail-exchanger-name.big.test") for i in range(40)]
    dns.add_mx("big.test", mxs)
    for _, host in mxs:
        dns.add_a(host, "192.0.2.1")
    resolver = MxResolver([dns.nameserver], timeout=2, clock=clock, max_hosts=40)
    hosts = await resolver.resolve("big.test")
    assert len(hosts) == 40
    assert [h.preference for h in hosts] == sorted(h.preference for h in hosts)
    assert dns.queries("big.test", "MX", transport="udp") == 1
    assert dns.queries("big.test", "MX", transport="tcp") == 1
    # by default only the best few hosts get their addresses looked up
    limited = MxResolver([dns.nameserver], timeout=2, clock=clock)
    assert len(await limited.resolve("big.test")) == 10


async def test_unreachable_nameserver_is_transient(clock: FakeClock) -> None:
    with DnsServer() as gone:
        address = gone.nameserver
    resolver = MxResolver([address], timeout=0.5, clock=clock)
    exc = await failure(resolver, "example.test")
    assert (exc.reply.code, exc.reply.enhanced) == (451, "4.4.3")


def test_cache_is_bounded_and_expires() -> None:
    clock = FakeClock()
    cache: TtlCache[str, int] = TtlCache(3, clock=clock)
    for i in range(5):
        cache.put(str(i), i, ttl=10)
    assert len(cache) == 3
    assert cache.get("0") is None
    assert cache.get("2") == 2  # now the most recently used
    cache.put("5", 5, ttl=10)
    assert cache.get("3") is None  # the least recently used went first
    assert cache.get("2") == 2
    cache.put("zero", 0, ttl=0)
    assert cache.get("zero") is None
    clock.now += 10
    assert cache.get("2") is None
    assert cache.statistics() == {"hits": 2, "misses": 4, "entries": 2, "evictions": 3}
