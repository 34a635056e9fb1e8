"""Outbound delivery over MX (issue 3): the real daemon, a loopback DNS server and aiosmtpd upstreams.

Mail goes in with smtplib, store-and-forward (`cut_through = false`): the daemon spools it, answers 250,
and a worker delivers it. Each test then checks what the upstreams received and what the spool and log
say. Upstreams share one port on 127.0.0.2, .3, ...; DNS names mx1.example.net → 127.0.0.2 etc.
MX selection, DNS outcomes, per-recipient replies, connection pooling and grouping are here; TLS, the wire
form, Bcc, SMTPUTF8 and rate limits in test_delivery_wire.py; relay routes and strategies in test_routes.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import (
    HOST1,
    HOST2,
    MX1,
    MX2,
    SENDER,
    Host,
    events,
    publish,
    read_status,
    recipient,
    run,
    send,
    send_many,
    settle,
    settle_all,
    status_path,
    two_mx,
)
from .upstream import Upstream, UpstreamPool, wait_until

pytestmark = pytest.mark.timeout(60)


# ---- the basic path ----------------------------------------------------------------------------------


def test_delivers_to_the_mx_and_clears_the_spool(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams, helo_hostname="out.test.example")
    rcpts = ["ann@example.net", "bob@example.net"]
    msg_id = send(d, rcpts, "basic")
    assert settle(d, msg_id) == "gone"
    assert not status_path(d, msg_id).exists()
    assert d.spooled("queued") == [] and d.spooled("deferred") == [] and d.spooled("bounced") == []

    [conn] = mx1.connections
    assert conn.ehlo == ["out.test.example"]
    [txn] = mx1.transactions
    assert txn.mail_from == SENDER
    assert txn.rcpt_tos == rcpts
    assert txn.subject == "basic"
    assert txn.content.startswith(b"Received: ")
    assert txn.content.endswith(b"\r\n\r\nThis is basic.\r\n")

    delivered = events(d, "delivered", msg_id)
    assert sorted(e["recipient"] for e in delivered) == rcpts
    for e in delivered:
        assert e["host"] == HOST1
        assert e["code"] == 250
        assert e["enhanced"] == "2.0.0"
        assert "accepted" in e["text"]


def test_helo_defaults_to_the_server_hostname(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    assert settle(d, send(d, ["ann@example.net"], "helo")) == "gone"
    assert mx1.connections[0].ehlo == [config["server"]["hostname"]]


# ---- MX selection --------------------------------------------------------------------------------------


def test_lowest_preference_mx_is_used_while_it_is_up(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    # Published worst first: the daemon must sort by preference, not trust the answer's order.
    publish(dns, "example.net", (20, "mx2.example.net", MX2), (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    mx2 = upstreams.add(MX2, name="mx2.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    ids = send_many(d, [(["ann@example.net"], f"pref {i}", None) for i in range(3)])
    assert set(settle_all(d, ids).values()) == {"gone"}
    assert sorted(mx1.subjects()) == ["pref 0", "pref 1", "pref 2"]
    assert mx2.connections == []


@pytest.mark.parametrize("failure", ["refused", "connect timeout", "greeting 421", "greeting 554"])
def test_next_mx_when_the_first_cannot_be_used(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    failure: str,
) -> None:
    two_mx(dns)
    mx1: Upstream | None = None
    if failure == "greeting 421":
        mx1 = upstreams.add(MX1, name="mx1.example.net", greeting="421 4.3.2 mx1 is shutting down")
    elif failure == "greeting 554":
        mx1 = upstreams.add(MX1, name="mx1.example.net", greeting="554 5.3.2 mx1 takes no mail")
    elif failure == "connect timeout":
        upstreams.add_unresponsive(MX1)
    # "refused": nothing listens on mx1's address
    mx2 = upstreams.add(MX2, name="mx2.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams, connect_timeout="1s")
    msg_id = send(d, ["ann@example.net"], "fallback")
    assert settle(d, msg_id) == "gone"
    assert mx2.subjects() == ["fallback"]
    if mx1 is not None:
        assert mx1.connections, "mx1 was never tried"
        assert mx1.count("MAIL") == 0
    [event] = events(d, "delivered", msg_id)
    assert event["host"] == HOST2


def test_every_mx_down_defers(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    two_mx(dns)
    d = run(tmp_path, config, daemon_factory, dns, upstreams)  # no upstream listens anywhere
    msg_id = send(d, ["ann@example.net"], "nobody home")
    assert settle(d, msg_id) == "deferred"
    d.stop()
    rcpt = recipient(read_status(d, msg_id), "ann@example.net")
    assert rcpt.state == "pending"
    assert rcpt.last is not None and rcpt.last.code in (0, 421, 451)
    assert d.spooled("queued") == []


def test_equal_preference_mx_share_the_mail(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    two_mx(dns, 10, 10)
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    mx2 = upstreams.add(MX2, name="mx2.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    ids = send_many(d, [(["ann@example.net"], f"spread {i}", None) for i in range(20)])
    assert set(settle_all(d, ids).values()) == {"gone"}
    # Each order is a coin toss; all 20 on one host has probability 2 * 2**-20.
    assert len(mx1.transactions) >= 1 and len(mx2.transactions) >= 1
    assert len(mx1.transactions) + len(mx2.transactions) == 20


@pytest.mark.parametrize(("rdtype", "ip"), [("A", MX1), ("AAAA", "::1")])
def test_implicit_mx_is_the_domains_own_address(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    rdtype: str,
    ip: str,
) -> None:
    if rdtype == "A":
        dns.add_a("example.net", ip)  # no MX records
    else:
        dns.add_aaaa("example.net", ip)
    mx = upstreams.add(ip, name="example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    msg_id = send(d, ["ann@example.net"], "implicit")
    assert settle(d, msg_id) == "gone"
    assert mx.subjects() == ["implicit"]
    [event] = events(d, "delivered", msg_id)
    assert event["host"] == Host("example.net", ip)


@pytest.mark.parametrize(
    ("case", "spool", "state", "code", "enhanced"),
    [
        ("null mx", "bounced", "failed", 556, "5.1.10"),
        ("nxdomain", "bounced", "failed", 550, "5.1.2"),
        ("servfail", "deferred", "pending", 451, "4.4.3"),
        ("no answer", "deferred", "pending", 451, "4.4.3"),  # waits out the daemon's DNS timeout (5 s)
    ],
)
def test_dns_answers_decide_the_outcome(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    case: str,
    spool: str,
    state: str,
    code: int,
    enhanced: str,
) -> None:
    decoy = upstreams.add(MX1, name="decoy")
    dns.add_a("example.net", MX1)  # the domain's own address must not be used in any of these cases
    if case == "null mx":
        dns.add_null_mx("example.net")
    elif case == "nxdomain":
        dns.remove("example.net")
    elif case == "servfail":
        dns.servfail("example.net")
    else:
        dns.drop("example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    msg_id = send(d, ["ann@example.net"], case)
    assert settle(d, msg_id, timeout=20) == spool
    d.stop()
    rcpt = recipient(read_status(d, msg_id), "ann@example.net")
    assert rcpt.state == state
    assert rcpt.last is not None
    assert (rcpt.last.code, rcpt.last.enhanced) == (code, enhanced)
    assert decoy.connections == []
    kind = "failed" if state == "failed" else "deferred"
    [event] = events(d, kind, msg_id)
    assert (event["recipient"], event["code"], event["enhanced"]) == ("ann@example.net", code, enhanced)


def test_a_message_ends_where_its_worst_recipient_says(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    dns.add_mx("servfail.example", [(10, "mx1.example.net")])
    dns.servfail("servfail.example")
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    bounced = send(d, ["ok1@example.net", "x@nxdomain.example"], "delivered and failed")
    deferred = send(d, ["ok2@example.net", "y@servfail.example"], "delivered and pending")
    assert settle(d, bounced) == "bounced"
    assert settle(d, deferred) == "deferred"
    assert sorted(mx1.recipients) == ["ok1@example.net", "ok2@example.net"]
    d.stop()
    status = read_status(d, bounced)
    assert recipient(status, "ok1@example.net").state == "delivered"
    assert recipient(status, "x@nxdomain.example").state == "failed"
    status = read_status(d, deferred)
    ok2 = recipient(status, "ok2@example.net")
    assert ok2.state == "delivered"
    assert ok2.last is not None and ok2.last.code == 250 and ok2.last.host == HOST1
    assert recipient(status, "y@servfail.example").state == "pending"


# ---- per-recipient replies -----------------------------------------------------------------------------


def test_recipient_replies_decide_each_recipient(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(
        MX1,
        name="mx1.example.net",
        rcpt_replies={
            "busy@example.net": "450 4.2.1 Mailbox busy, try later",
            "gone@example.net": "550 5.1.1 No such user",
            "gone2@example.net": "550 5.1.1 No such user either",
        },
    )
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    mixed = send(d, ["ok@example.net", "busy@example.net", "gone@example.net"], "mixed")
    assert settle(d, mixed) == "deferred"
    partly_failed = send(d, ["ok2@example.net", "gone2@example.net"], "partly failed")
    assert settle(d, partly_failed) == "bounced"

    assert [(t.subject, t.rcpt_tos) for t in mx1.transactions] == [
        ("mixed", ["ok@example.net"]),
        ("partly failed", ["ok2@example.net"]),
    ]
    [e] = events(d, "delivered", mixed)
    assert (e["recipient"], e["host"], e["code"]) == ("ok@example.net", HOST1, 250)
    [e] = events(d, "deferred", mixed)
    assert (e["recipient"], e["host"], e["code"], e["enhanced"]) == ("busy@example.net", HOST1, 450, "4.2.1")
    assert "Mailbox busy" in e["text"]
    [e] = events(d, "failed", mixed)
    assert (e["recipient"], e["host"], e["code"], e["enhanced"]) == ("gone@example.net", HOST1, 550, "5.1.1")
    assert "No such user" in e["text"]

    d.stop()
    status = read_status(d, mixed)
    expected = {
        "ok@example.net": ("delivered", 250, "2.0.0"),
        "busy@example.net": ("pending", 450, "4.2.1"),
        "gone@example.net": ("failed", 550, "5.1.1"),
    }
    for address, (state, code, enhanced) in expected.items():
        r = recipient(status, address)
        assert r.state == state, address
        assert r.last is not None and (r.last.code, r.last.enhanced) == (code, enhanced), address
        assert r.last.host == HOST1
    status = read_status(d, partly_failed)
    assert [r.state for r in status.recipients] == ["delivered", "failed"]


def test_421_to_a_recipient_ends_the_transaction_and_drops_the_connection(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    # The upstream keeps the socket open after its 421: dropping the connection is the client's job.
    mx1 = upstreams.add(
        MX1,
        name="mx1.example.net",
        rcpt_replies={
            "busy@example.net": "450 4.2.1 Mailbox busy",
            "gone@example.net": "550 5.1.1 No such user",
            "shut@example.net": "421 4.3.2 Service shutting down",
        },
        close_on_421=False,
    )
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    rcpts = ["ok@example.net", "busy@example.net", "gone@example.net", "shut@example.net"]
    first = send(d, rcpts, "gets 421")
    assert settle(d, first) == "deferred"
    second = send(d, ["ok@example.net"], "after 421")
    assert settle(d, second) == "gone"
    assert mx1.subjects() == ["after 421"]
    assert len(mx1.connections) == 2, [c.verbs for c in mx1.connections]
    dropped = mx1.connections[0]
    assert dropped.rcpts == rcpts
    after = dropped.verbs[len(dropped.verbs) - dropped.verbs[::-1].index("RCPT") :]
    assert set(after) <= {"RSET", "QUIT"}, f"commands after the 421: {after}"
    wait_until(lambda: dropped.closed is not None, 5, "the connection that saw 421 to be closed")
    d.stop()
    status = read_status(d, first)
    expected = {
        "busy@example.net": ("pending", 450, "4.2.1"),
        "gone@example.net": ("failed", 550, "5.1.1"),
        "shut@example.net": ("pending", 421, "4.3.2"),
    }
    for address, (state, code, enhanced) in expected.items():
        r = recipient(status, address)
        assert r.state == state, address
        assert r.last is not None and (r.last.code, r.last.enhanced) == (code, enhanced), address
    # accepted, but the transaction never reached DATA
    assert recipient(status, "ok@example.net").state == "pending"


# ---- connections: pooling and concurrency ------------------------------------------------------------


@pytest.mark.parametrize(("per_connection", "expected"), [(100, [3]), (2, [2, 1])])
def test_connections_are_reused_up_to_the_limit(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    per_connection: int,
    expected: list[int],
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams, max_messages_per_connection=per_connection)
    for i in range(3):  # one after the other: each finds the previous one's connection idle
        assert settle(d, send(d, ["ann@example.net"], f"reuse {i}")) == "gone"
    assert [len(c.transactions) for c in mx1.connections] == expected
    assert mx1.subjects() == ["reuse 0", "reuse 1", "reuse 2"]


def test_idle_connections_are_closed(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams, idle_timeout="1s")
    assert settle(d, send(d, ["ann@example.net"], "then idle")) == "gone"
    [conn] = mx1.connections
    wait_until(lambda: conn.closed is not None, 5, "the idle connection to be closed")
    assert settle(d, send(d, ["ann@example.net"], "new connection")) == "gone"
    assert len(mx1.connections) == 2


@pytest.mark.parametrize("limit", [1, 3])
def test_connections_per_host_are_bounded(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    limit: int,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net", data_delay=0.3)
    d = run(tmp_path, config, daemon_factory, dns, upstreams, max_connections_per_host=limit)
    ids = send_many(d, [(["ann@example.net"], f"parallel {i}", None) for i in range(6)])
    assert set(settle_all(d, ids).values()) == {"gone"}
    assert len(mx1.transactions) == 6
    assert mx1.max_concurrent <= limit
    if limit > 1:  # messages queued while a delivery is under way go out in parallel
        assert mx1.max_concurrent >= 2


def test_recipients_are_grouped_per_domain(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    publish(dns, "example.com", (10, "mx1.example.net", MX1))  # same MX host, another domain
    publish(dns, "example.org", (10, "mx2.example.net", MX2))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    mx2 = upstreams.add(MX2, name="mx2.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    rcpts = [
        "a1@example.net",
        "a3@EXAMPLE.net",  # domains are case-insensitive: same group
        "c1@example.com",
        "b1@example.org",
        "a2@example.net",
        "c2@example.com",
        "b2@example.org",
        "b3@example.org",
    ]
    assert settle(d, send(d, rcpts, "grouped")) == "gone"
    # (compared in lower case: the daemon may normalise the domain it sends)
    assert sorted(sorted(r.lower() for r in t.rcpt_tos) for t in mx1.transactions) == [
        ["a1@example.net", "a2@example.net", "a3@example.net"],
        ["c1@example.com", "c2@example.com"],
    ]
    assert [sorted(t.rcpt_tos) for t in mx2.transactions] == [
        ["b1@example.org", "b2@example.org", "b3@example.org"]
    ]
    assert mx1.count("MAIL") == 2 and mx2.count("MAIL") == 1
    for txn in mx1.transactions + mx2.transactions:
        assert txn.subject == "grouped" and txn.mail_from == SENDER


def test_groups_are_delivered_concurrently(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    publish(dns, "example.org", (10, "mx2.example.net", MX2))
    mx1 = upstreams.add(MX1, name="mx1.example.net", data_delay=1.0)
    mx2 = upstreams.add(MX2, name="mx2.example.net", data_delay=1.0)
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    assert settle(d, send(d, ["a@example.net", "b@example.org"], "both at once")) == "gone"
    [t1], [t2] = mx1.transactions, mx2.transactions
    assert max(t1.started, t2.started) < min(t1.ended, t2.ended), "the two transactions did not overlap"
