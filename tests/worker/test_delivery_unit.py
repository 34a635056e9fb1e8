"""`Deliverer` in-process: MemoryStorage, the loopback DNS server, a real ConnectionPool and scripted
upstreams on 127.0.0.N (all on one port, which is `[delivery].port`)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio
import trio.testing
import trustme

from hedwigpy.config import Config, parse_config
from hedwigpy.policy import RateLimiter
from hedwigpy.smtp import Reply
from hedwigpy.storage import Envelope, MemoryStorage, StorageError, StoredMessage
from hedwigpy.worker import delivery
from hedwigpy.worker.delivery import MAX_ADDRESSES_PER_ATTEMPT, Deliverer
from hedwigpy.worker.mx import MxResolver
from hedwigpy.worker.pool import ConnectionPool
from hedwigpy.worker.results import Delivered, PermanentFailure, Result, TransientFailure
from hedwigpy.worker.routes import Router
from hedwigpy.worker.scheduler import Scheduler
from tests.dns_server import DnsServer
from tests.scripted_upstream import BODY, PASSWORD, USER, Script, Upstream, start_upstreams, wait_for

pytestmark = pytest.mark.timeout(15)

HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
DEAD = "127.0.0.9"  # nothing listens there: connections are refused
SENDER = "alice@example.org"


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture
def dns(dns_server: DnsServer) -> Iterator[DnsServer]:
    dns_server.clear()
    dns_server.add_mx("example.net", [(10, "mx1.example.net")])
    dns_server.add_a("mx1.example.net", HOSTS[0])
    dns_server.add_mx("example.com", [(10, "mx.example.com")])
    dns_server.add_a("mx.example.com", HOSTS[1])
    dns_server.add_a("relay.test", HOSTS[2])
    dns_server.add_a("dead.example.net", DEAD)
    yield dns_server
    dns_server.clear()


@pytest.fixture
async def upstreams(nursery: trio.Nursery) -> list[Upstream]:
    return await start_upstreams(nursery, HOSTS)


@dataclass
class Harness:
    deliverer: Deliverer
    storage: MemoryStorage
    pool: ConnectionPool
    config: Config

    async def message(self, *recipients: str, sender: str = SENDER, body: bytes = BODY) -> StoredMessage:
        writer = self.storage.writer(Envelope(sender=sender, recipients=recipients))
        await writer.write(body)
        return await writer.commit()

    async def deliver(self, *recipients: str, sender: str = SENDER) -> list[Result]:
        message = await self.message(*recipients, sender=sender)
        return await self.deliverer.deliver(message, recipients)


class MakeHarness(Protocol):
    async def __call__(
        self,
        *,
        routes: Sequence[dict[str, Any]] = ...,
        delivery_cfg: dict[str, Any] | None = ...,
        rate_limits: dict[str, Any] | None = ...,
        rate_limiter: RateLimiter | None = ...,
    ) -> Harness: ...


@pytest.fixture
def make(nursery: trio.Nursery, dns: DnsServer, upstreams: list[Upstream]) -> MakeHarness:
    """Builds a Deliverer from a config dict (`[delivery].port` is the upstreams' port)."""

    async def factory(
        *,
        routes: Sequence[dict[str, Any]] = (),
        delivery_cfg: dict[str, Any] | None = None,
        rate_limits: dict[str, Any] | None = None,
        rate_limiter: RateLimiter | None = None,
    ) -> Harness:
        data: dict[str, Any] = {
            "server": {"hostname": "client.test"},
            "delivery": {"port": upstreams[0].port, "connect_timeout": "2s", **(delivery_cfg or {})},
            "routes": list(routes),
        }
        if rate_limits is not None:
            data["rate_limits"] = rate_limits
        config = parse_config(data, Path("/nonexistent"), {})
        storage = MemoryStorage()
        resolver = MxResolver([dns.nameserver], timeout=1.0)
        d = config.delivery
        pool = ConnectionPool(
            max_per_host=d.max_connections_per_host,
            max_messages=d.max_messages_per_connection,
            idle_timeout=d.idle_timeout,
        )
        await nursery.start(pool.serve)  # closes the idle sessions when the test ends
        deliverer = Deliverer(
            config, storage, resolver, pool, Router(config.routes), rate_limiter=rate_limiter
        )
        return Harness(deliverer, storage, pool, config)

    return factory


def label(name: str, address: str, port: int) -> str:
    return f"{name}[{address}]:{port}"


def outcome(results: Sequence[Result]) -> list[tuple[str, str, int]]:
    return [(r.recipient, type(r).__name__, r.reply.code) for r in results]


# --- grouping ----------------------------------------------------------------------------------------


async def test_one_transaction_per_domain(make: MakeHarness, upstreams: list[Upstream]) -> None:
    h: Harness = await make()
    rcpts = ["b@example.net", "c@example.com", "d@example.net", "b@example.net"]
    results = await h.deliver(*rcpts)
    assert outcome(results) == [
        ("b@example.net", "Delivered", 250),
        ("c@example.com", "Delivered", 250),
        ("d@example.net", "Delivered", 250),
    ]
    port = upstreams[0].port
    assert results[0].host == label("mx1.example.net", HOSTS[0], port)
    assert results[1].host == label("mx.example.com", HOSTS[1], port)
    net, com = upstreams[0].connections, upstreams[1].connections
    assert len(net) == 1 and len(com) == 1
    assert [c for c in net[0].commands if c.startswith("RCPT")] == [
        "RCPT TO:<b@example.net>",
        "RCPT TO:<d@example.net>",
    ]
    assert [c for c in com[0].commands if c.startswith("RCPT")] == ["RCPT TO:<c@example.com>"]
    assert net[0].commands[0] == "EHLO client.test"
    assert upstreams[0].messages == [BODY] and upstreams[1].messages == [BODY]


async def test_relay_takes_every_domain_in_one_transaction(
    make: MakeHarness, upstreams: list[Upstream]
) -> None:
    port = upstreams[0].port
    h: Harness = await make(routes=[{"transport": "relay", "hosts": [f"relay.test:{port}"]}])
    results = await h.deliver("b@example.net", "c@example.com", "d@example.org")
    assert [type(r) for r in results] == [Delivered] * 3
    assert {r.host for r in results} == {label("relay.test", HOSTS[2], port)}
    relay = upstreams[2]
    assert len(relay.connections) == 1 and relay.messages == [BODY]
    assert [c for c in relay.connections[0].commands if c.startswith("RCPT")] == [
        "RCPT TO:<b@example.net>",
        "RCPT TO:<c@example.com>",
        "RCPT TO:<d@example.org>",
    ]
    assert not upstreams[0].connections and not upstreams[1].connections


async def test_routes_split_a_message(make: MakeHarness, upstreams: list[Upstream]) -> None:
    port = upstreams[0].port
    h: Harness = await make(
        routes=[{"recipient_domains": ["example.com"], "transport": "relay", "hosts": [f"relay.test:{port}"]}]
    )
    results = await h.deliver("b@example.net", "c@example.com")
    assert [type(r) for r in results] == [Delivered, Delivered]
    assert results[1].host == label("relay.test", HOSTS[2], port)
    assert len(upstreams[0].messages) == 1 and len(upstreams[2].messages) == 1
    assert not upstreams[1].connections  # example.com's MX is not used: the relay route won


async def test_per_recipient_results(make: MakeHarness, upstreams: list[Upstream]) -> None:
    upstreams[0].script = Script(
        rcpt_replies={"gone@example.net": "550 5.1.1 no such user", "full@example.net": "452 4.2.2 full"}
    )
    h: Harness = await make()
    results = await h.deliver("ok@example.net", "gone@example.net", "full@example.net")
    assert outcome(results) == [
        ("ok@example.net", "Delivered", 250),
        ("gone@example.net", "PermanentFailure", 550),
        ("full@example.net", "TransientFailure", 452),
    ]
    assert results[1].reply == Reply(550, "5.1.1", "no such user")


async def test_final_reply_decides_for_accepted_recipients(
    make: MakeHarness, upstreams: list[Upstream]
) -> None:
    upstreams[0].script = Script(
        rcpt_replies={"gone@example.net": "550 5.1.1 no"}, final_reply="554 5.7.1 looks like spam"
    )
    h: Harness = await make()
    results = await h.deliver("a@example.net", "gone@example.net")
    assert outcome(results) == [
        ("a@example.net", "PermanentFailure", 554),
        ("gone@example.net", "PermanentFailure", 550),
    ]


async def test_mail_refused_decides_for_all(make: MakeHarness, upstreams: list[Upstream]) -> None:
    upstreams[0].script = Script(replies={"MAIL": "451 4.3.0 sender check failed"})
    h: Harness = await make()
    results = await h.deliver("a@example.net", "b@example.net")
    assert outcome(results) == [
        ("a@example.net", "TransientFailure", 451),
        ("b@example.net", "TransientFailure", 451),
    ]


# --- trying the next host ------------------------------------------------------------------------------


async def test_next_mx_after_a_refused_connection(
    make: MakeHarness, dns: DnsServer, upstreams: list[Upstream]
) -> None:
    dns.add_mx("example.net", [(5, "dead.example.net")])
    h: Harness = await make()
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], Delivered)
    assert results[0].host == label("mx1.example.net", HOSTS[0], upstreams[0].port)
    assert h.pool.statistics().failed == 1


async def test_next_mx_after_a_421_greeting(
    make: MakeHarness, dns: DnsServer, upstreams: list[Upstream]
) -> None:
    dns.add_mx("example.net", [(20, "mx2.example.net")])
    dns.add_a("mx2.example.net", HOSTS[1])
    upstreams[0].script = Script(greeting="421 4.3.2 too busy")
    h: Harness = await make()
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], Delivered)
    assert results[0].host == label("mx2.example.net", HOSTS[1], upstreams[0].port)
    assert len(upstreams[0].connections) == 1 and upstreams[1].messages == [BODY]


async def test_next_mx_after_a_broken_starttls(
    make: MakeHarness, dns: DnsServer, upstreams: list[Upstream]
) -> None:
    dns.add_mx("example.net", [(20, "mx2.example.net")])
    dns.add_a("mx2.example.net", HOSTS[1])
    upstreams[0].script = Script(extensions=("STARTTLS",), starttls="broken")
    h: Harness = await make()
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], Delivered) and HOSTS[1] in results[0].host
    assert "MAIL" not in upstreams[0].connections[0].verbs


async def test_every_host_failing_is_transient_with_the_last_reply(
    make: MakeHarness, dns: DnsServer, upstreams: list[Upstream]
) -> None:
    dns.add_mx("example.net", [(20, "mx2.example.net")])
    dns.add_a("mx2.example.net", HOSTS[1])
    upstreams[0].script = Script(greeting="421 4.3.2 too busy")
    upstreams[1].script = Script(greeting="554 5.7.1 go away")
    h: Harness = await make()
    results = await h.deliver("b@example.net", "c@example.net")
    for result in results:
        # like Postfix's smtp_skip_5xx_greeting: a banner refusal defers, whatever its code
        assert isinstance(result, TransientFailure)
        assert result.reply == Reply(554, "5.7.1", "go away")
        assert result.host == label("mx2.example.net", HOSTS[1], upstreams[0].port)


async def test_no_next_host_after_data(make: MakeHarness, dns: DnsServer, upstreams: list[Upstream]) -> None:
    dns.add_mx("example.net", [(20, "mx2.example.net")])
    dns.add_a("mx2.example.net", HOSTS[1])
    upstreams[0].script = Script(drop_after_dot=True)
    h: Harness = await make()
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], TransientFailure)
    assert HOSTS[0] in results[0].host
    assert upstreams[0].messages == [BODY]
    assert not upstreams[1].connections  # it may have been delivered: never a second copy now


async def test_recipient_421_moves_on_to_the_next_host(
    make: MakeHarness, dns: DnsServer, upstreams: list[Upstream]
) -> None:
    dns.add_mx("example.net", [(20, "mx2.example.net")])
    dns.add_a("mx2.example.net", HOSTS[1])
    upstreams[0].script = Script(rcpt_replies={"b@example.net": "421 4.3.2 shutting down"})
    h: Harness = await make()
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], Delivered) and HOSTS[1] in results[0].host
    assert upstreams[0].messages == []


async def test_address_limit_per_attempt(make: MakeHarness, dns: DnsServer, nursery: trio.Nursery) -> None:
    addresses = [f"127.0.0.{i}" for i in range(20, 27)]
    busy = await start_upstreams(nursery, addresses, [Script(greeting="421 4.3.2 busy")] * len(addresses))
    dns.add_mx("many.test", [(10, "a.many.test"), (20, "b.many.test"), (30, "c.many.test")])
    for name, chosen in (("a", addresses[:3]), ("b", addresses[3:5]), ("c", addresses[5:])):
        for address in chosen:  # in whatever order DNS returns them
            dns.add_a(f"{name}.many.test", address)
    h: Harness = await make(delivery_cfg={"port": busy[0].port})
    results = await h.deliver("x@many.test")
    assert isinstance(results[0], TransientFailure) and results[0].reply.code == 421
    tried = [len(u.connections) for u in busy]
    assert MAX_ADDRESSES_PER_ATTEMPT == 5
    assert tried == [1, 1, 1, 1, 1, 0, 0]  # c.many.test is beyond the limit


async def test_address_limit_is_the_module_constant(
    make: MakeHarness, dns: DnsServer, upstreams: list[Upstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "MAX_ADDRESSES_PER_ATTEMPT", 1)
    dns.add_mx("example.net", [(5, "dead.example.net")])
    h: Harness = await make()
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], TransientFailure) and results[0].reply.enhanced == "4.4.1"
    assert not upstreams[0].connections


# --- DNS -------------------------------------------------------------------------------------------------


async def test_nxdomain_is_permanent(make: MakeHarness) -> None:
    h: Harness = await make()
    results = await h.deliver("b@nowhere.test", "c@example.net")
    assert isinstance(results[0], PermanentFailure)
    assert (results[0].reply.code, results[0].reply.enhanced, results[0].host) == (550, "5.1.2", "")
    assert isinstance(results[1], Delivered)  # the other domain is not held back


async def test_servfail_is_transient(make: MakeHarness, dns: DnsServer) -> None:
    dns.servfail("example.net")
    h: Harness = await make()
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], TransientFailure)
    assert (results[0].reply.code, results[0].reply.enhanced) == (451, "4.4.3")


async def test_null_mx_is_permanent(make: MakeHarness, dns: DnsServer) -> None:
    dns.add_null_mx("example.net")
    h: Harness = await make()
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], PermanentFailure) and results[0].reply.enhanced == "5.1.10"


async def test_relay_skips_a_smarthost_that_does_not_resolve(
    make: MakeHarness, upstreams: list[Upstream]
) -> None:
    port = upstreams[0].port
    h: Harness = await make(
        routes=[{"transport": "relay", "hosts": [f"missing.test:{port}", f"relay.test:{port}"]}]
    )
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], Delivered) and "relay.test" in results[0].host


async def test_relay_without_resolvable_smarthost_defers(
    make: MakeHarness, upstreams: list[Upstream]
) -> None:
    """A smarthost name that does not resolve is the operator's configuration problem: defer (Postfix's
    "relayhost configuration problem", 4.3.5) instead of bouncing every message with 550 5.1.2."""
    port = upstreams[0].port
    h: Harness = await make(routes=[{"transport": "relay", "hosts": [f"missing.test:{port}"]}])
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], TransientFailure)
    assert (results[0].reply.code, results[0].reply.enhanced) == (451, "4.3.5")
    assert "missing.test" in results[0].reply.text


async def test_failing_strategy_is_transient(make: MakeHarness, upstreams: list[Upstream]) -> None:
    port = upstreams[0].port
    h: Harness = await make(
        routes=[
            {
                "transport": "relay",
                "hosts": [f"relay.test:{port}"],
                "strategy": "tests.worker.test_routes:failing_strategy",
            }
        ]
    )
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], TransientFailure)
    assert (results[0].reply.code, results[0].reply.enhanced) == (451, "4.3.5")
    assert not upstreams[2].connections


# --- relay with TLS and AUTH -------------------------------------------------------------------------------


async def test_relay_with_starttls_and_auth(
    make: MakeHarness, dns: DnsServer, nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the relay context verifies against the system store
    script = Script(extensions=("PIPELINING", "STARTTLS", "AUTH PLAIN LOGIN"))
    (relay,) = await start_upstreams(nursery, ["127.0.0.5"], [script], ca=ca)
    dns.add_a("secure.relay.test", "127.0.0.5")
    h: Harness = await make(
        routes=[
            {
                "transport": "relay",
                "hosts": [f"secure.relay.test:{relay.port}"],
                "tls": "required",
                "username": USER,
                "password": PASSWORD,
            }
        ]
    )
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], Delivered), results
    conn = relay.connections[0]
    assert conn.tls and conn.auth == [("PLAIN", USER, PASSWORD)]
    assert relay.messages == [BODY]


# --- rate limits -----------------------------------------------------------------------------------------


async def test_rate_limit_reschedules_without_connecting(
    make: MakeHarness, dns: DnsServer, upstreams: list[Upstream]
) -> None:
    h: Harness = await make(rate_limits={"per_domain": 1, "domains": {"example.com": 0}})
    first = await h.deliver("b@example.net")
    assert isinstance(first[0], Delivered)
    queries = dns.queries("example.net", "MX")
    before = time.time()
    second = await h.deliver("c@example.net", "d@example.com")
    result = second[0]
    assert isinstance(result, TransientFailure)
    assert (result.reply.code, result.reply.enhanced, result.host) == (451, "4.4.5", "")
    assert result.not_before is not None and before + 55 <= result.not_before <= time.time() + 61
    assert isinstance(second[1], Delivered)  # example.com's override: no limit
    assert len(upstreams[0].messages) == 1 and len(upstreams[0].connections) == 1
    assert h.pool.statistics().reused == 0
    assert dns.queries("example.net", "MX") == queries  # not even looked up


class Saturated(RateLimiter):
    """Refuses everything, and has no events to say how long to wait (wait_time 0)."""

    def allow(self, key: str, now: float | None = None) -> bool:
        return False


async def test_rate_limit_waits_at_least_a_second(make: MakeHarness) -> None:
    h: Harness = await make(rate_limiter=Saturated(1))
    before = time.time()
    results = await h.deliver("b@example.net", "c@example.net")
    for result in results:
        assert isinstance(result, TransientFailure) and result.not_before is not None
        assert result.not_before >= before + 1.0


async def test_rate_limit_counts_a_message_once_per_domain(
    make: MakeHarness, upstreams: list[Upstream]
) -> None:
    h: Harness = await make(rate_limits={"per_domain": 2})
    first = await h.deliver("a@example.net", "b@example.net", "c@example.net")
    second = await h.deliver("d@example.net")
    third = await h.deliver("e@example.net")
    assert [type(r) for r in first + second + third] == [Delivered] * 4 + [TransientFailure]


# --- pooled sessions -------------------------------------------------------------------------------------


async def test_sessions_are_reused_across_messages(make: MakeHarness, upstreams: list[Upstream]) -> None:
    h: Harness = await make()
    for i in range(3):
        results = await h.deliver(f"r{i}@example.net")
        assert isinstance(results[0], Delivered)
    assert len(upstreams[0].connections) == 1 and len(upstreams[0].messages) == 3


async def test_stale_pooled_session_is_replaced(make: MakeHarness, upstreams: list[Upstream]) -> None:
    upstreams[0].script = Script(idle_close=0.05, idle_close_reply="421 4.4.2 idle timeout")
    h: Harness = await make()
    assert isinstance((await h.deliver("a@example.net"))[0], Delivered)
    with trio.fail_after(2):
        await upstreams[0].connections[0].gone.wait()
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], Delivered), results
    assert len(upstreams[0].connections) == 2
    assert len(upstreams[0].messages) == 2


async def test_failed_session_is_not_reused(make: MakeHarness, upstreams: list[Upstream]) -> None:
    upstreams[0].script = Script(rcpt_replies={"a@example.net": "421 4.3.2 bye"})
    h: Harness = await make()
    first = await h.deliver("a@example.net")
    assert isinstance(first[0], TransientFailure) and first[0].reply.code == 421
    assert h.pool.statistics().idle == 0
    assert isinstance((await h.deliver("b@example.net"))[0], Delivered)
    assert len(upstreams[0].connections) == 2


async def test_groups_go_out_concurrently(make: MakeHarness, upstreams: list[Upstream]) -> None:
    hold = trio.Event()
    upstreams[0].script = Script(hold=hold)
    upstreams[1].script = Script(hold=hold)
    h: Harness = await make()
    message = await h.message("a@example.net", "b@example.com")
    async with trio.open_nursery() as tasks:
        tasks.start_soon(h.deliverer.deliver, message, ["a@example.net", "b@example.com"])
        # both transactions reach the end of the content before either is answered
        await wait_for(lambda: upstreams[0].messages == [BODY] and upstreams[1].messages == [BODY])
        hold.set()


# --- the queue worker around it --------------------------------------------------------------------------


async def test_spool_error_while_sending_is_a_storage_error(
    make: MakeHarness, upstreams: list[Upstream]
) -> None:
    h: Harness = await make()
    message = await h.message("b@example.net")
    del h.storage.messages[message.id]  # gone (or unreadable) by the time the content is read
    with pytest.RaisesGroup(StorageError, allow_unwrapped=True, flatten_subgroups=True):
        await h.deliverer.deliver(message, ["b@example.net"])
    await wait_for(lambda: bool(upstreams[0].connections) and upstreams[0].connections[0].closed)
    assert upstreams[0].messages == []  # the transaction was abandoned, never ended with a dot


class UnreadableStorage(MemoryStorage):
    """Every message is listed and has a status, but the content of `broken` ones cannot be read."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: set[str] = set()

    async def read_content(self, message_id: str) -> AsyncGenerator[bytes, None]:
        if message_id in self.broken:
            raise StorageError(f"reading {message_id}: Input/output error")
        async for chunk in super().read_content(message_id):
            yield chunk


async def test_worker_survives_a_spool_error_during_delivery(
    make: MakeHarness, nursery: trio.Nursery, upstreams: list[Upstream]
) -> None:
    h: Harness = await make()
    storage = UnreadableStorage()
    h.storage = storage
    deliverer = Deliverer(h.config, storage, h.deliverer._resolver, h.pool, Router(()))
    scheduler = Scheduler(storage, deliverer, h.config)
    await nursery.start(scheduler.serve)
    bad = await h.message("b@example.net")
    storage.broken.add(bad.id)
    scheduler.submit_fresh(bad)
    await wait_for(lambda: bool(upstreams[0].connections) and upstreams[0].connections[0].closed)
    good = await h.message("c@example.net")
    scheduler.submit_fresh(good)
    await wait_for(lambda: good.id not in storage.messages)  # delivered and removed
    assert upstreams[0].messages == [BODY]
    assert (await storage.get(bad.id)) is not None  # left where it was, for a later attempt


async def test_an_mx_route_can_require_tls_for_one_domain(
    make: MakeHarness, upstreams: list[Upstream]
) -> None:
    """`[[routes]] recipient_domains = [...], tls = "required"` keeps MX delivery but never in plaintext;
    other domains keep `[delivery].tls`."""
    h: Harness = await make(routes=[{"recipient_domains": ["example.net"], "tls": "required"}])
    results = await h.deliver("b@example.net")  # the upstream offers no STARTTLS
    assert isinstance(results[0], TransientFailure)
    assert (results[0].reply.code, results[0].reply.enhanced) == (451, "4.7.4")
    assert upstreams[0].messages == []


async def test_a_route_without_tls_follows_delivery_tls(make: MakeHarness, upstreams: list[Upstream]) -> None:
    port = upstreams[0].port
    h: Harness = await make(
        routes=[{"transport": "relay", "hosts": [f"{HOSTS[0]}:{port}"]}], delivery_cfg={"tls": "required"}
    )
    results = await h.deliver("b@example.net")
    assert isinstance(results[0], TransientFailure) and results[0].reply.enhanced == "4.7.4"
