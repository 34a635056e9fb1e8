"""Outbound delivery, continued (issue 3): STARTTLS policy towards MX hosts, the exact bytes of DATA on
the wire (CRLF, dot-stuffing: no SMTP smuggling), Bcc stripped, SMTPUTF8, and outbound rate limits.
The set-up is test_delivery.py's: the real daemon, a loopback DNS server, aiosmtpd upstreams."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import (
    HOST1,
    MX1,
    MX2,
    SENDER,
    content,
    events,
    publish,
    queued_id,
    read_status,
    recipient,
    run,
    send,
    settle,
    two_mx,
    where,
)
from .upstream import UpstreamPool
from .wire import Wire

pytestmark = pytest.mark.timeout(60)


# ---- TLS to MX hosts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "offer", "outcome"),
    [
        ("opportunistic", "offered", "tls"),
        ("opportunistic", "required", "tls"),  # the upstream refuses MAIL before STARTTLS
        ("opportunistic", "none", "plain"),
        ("none", "offered", "plain"),
        ("required", "offered", "tls"),
        ("required", "none", "deferred"),
        ("opportunistic", "broken", "deferred"),
        ("required", "broken", "deferred"),
    ],
)
def test_starttls_policy(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    ca: trustme.CA,
    policy: str,
    offer: str,
    outcome: str,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    # MX certificates are not verified: this one names another host and its CA is unknown to the daemon.
    cert = ca.issue_cert("wrong-name.example")
    mx1 = upstreams.add(MX1, name="mx1.example.net", starttls=offer, cert=None if offer == "none" else cert)
    d = run(tmp_path, config, daemon_factory, dns, upstreams, tls=policy)
    msg_id = send(d, ["ann@example.net"], f"tls {policy} {offer}")
    if outcome == "deferred":
        assert settle(d, msg_id) == "deferred"
        assert mx1.connections, "mx1 was never tried"
        assert mx1.count("MAIL") == 0, "mail went out without TLS"
        assert mx1.transactions == []
        d.stop()
        rcpt = recipient(read_status(d, msg_id), "ann@example.net")
        assert rcpt.state == "pending"
        assert rcpt.last is not None and rcpt.last.host == HOST1
        if offer == "none":
            assert (rcpt.last.code, rcpt.last.enhanced) == (451, "4.7.4")
        return
    assert settle(d, msg_id) == "gone"
    [conn] = mx1.connections
    [txn] = conn.transactions
    assert txn.tls is (outcome == "tls")
    if outcome == "tls":
        assert conn.verbs[:3] == ["EHLO", "STARTTLS", "EHLO"]
    else:
        assert "STARTTLS" not in conn.verbs


def test_broken_starttls_moves_on_to_the_next_mx(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    ca: trustme.CA,
) -> None:
    two_mx(dns)
    mx1 = upstreams.add(MX1, name="mx1.example.net", starttls="broken", cert=ca.issue_cert("mx1.example.net"))
    mx2 = upstreams.add(
        MX2, name="mx2.example.net", starttls="offered", cert=ca.issue_cert("mx2.example.net")
    )
    d = run(tmp_path, config, daemon_factory, dns, upstreams, tls="opportunistic")
    msg_id = send(d, ["ann@example.net"], "after broken tls")
    assert settle(d, msg_id) == "gone"
    assert mx1.count("STARTTLS") >= 1
    assert mx1.count("MAIL") == 0, "fell back to plaintext on the host whose handshake failed"
    [txn] = mx2.transactions
    assert txn.tls and txn.subject == "after broken tls"


# ---- what goes on the wire -----------------------------------------------------------------------------


def _stuff(lines: bytes) -> bytes:
    """What an SMTP client sends for CRLF-delimited `lines` in DATA: a leading dot doubled."""
    return re.sub(rb"(?:\A|(?<=\r\n))\.", b"..", lines)


def _outbound_form(stored: bytes) -> bytes:
    """Independently of the daemon: every CRLF, bare CR and bare LF becomes CRLF, then dot-stuffing."""
    normal = re.sub(rb"\r\n|\r|\n", b"\r\n", stored)
    return b"".join(
        b"." + line if line.startswith(b".") else line for line in normal.splitlines(keepends=True)
    )


# Bare LF and bare CR (each also before a dot), lines that start with dots, a lone dot between bare line
# ends: the receive side keeps all of it as content; relaying it must not end DATA early.
STORED_BODY = (
    b"line1\nline2\rline3\r\n.leading dot\r\n..two dots\r\nlf\n.lf-dot\r\ncr\r.cr-dot\r\n\n.\n\r.\r\nend\r\n"
)
WIRE_HEADERS = (
    b"From: sender@src.example\r\nTo: ann@example.net\r\nSubject: wire form\r\n"
    b"Message-ID: <wire@src.example>\r\n\r\n"
)


@pytest.mark.parametrize("command", ["DATA", "BDAT"])
def test_wire_form_is_crlf_and_dot_stuffed(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    command: str,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    message = WIRE_HEADERS + STORED_BODY
    with Wire(d.port()) as w:
        assert w.cmd("EHLO client.example").startswith("250")
        assert w.cmd(f"MAIL FROM:<{SENDER}>").startswith("250")
        assert w.cmd("RCPT TO:<ann@example.net>").startswith("250")
        if command == "DATA":
            assert w.cmd("DATA").startswith("354")
            w.send(_stuff(message) + b".\r\n")
            reply = w.reply()
        else:
            reply = w.cmd(b"BDAT %d LAST\r\n" % len(message) + message)
        assert reply.startswith("250"), reply
        msg_id = queued_id(reply)
        w.cmd("QUIT")
    assert settle(d, msg_id) == "gone"
    [conn] = mx1.connections
    raw = bytes(conn.raw)
    match = re.search(rb"(?i)(?:^|\r\n)DATA\r\n", raw)
    assert match, raw
    payload, end, after = raw[match.end() :].partition(b"\r\n.\r\n")
    assert end, "DATA never ended"
    header_part, _, body = (payload + b"\r\n").partition(b"\r\n\r\n")
    assert body == _outbound_form(STORED_BODY), "body on the wire differs"
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", payload + end) is None, "bare CR or LF on the wire"
    assert b"Subject: wire form\r\n" in header_part + b"\r\n"
    assert not re.match(rb"(?i)(MAIL|RCPT|DATA)", after), f"more sent after the end of DATA: {after!r}"
    [txn] = mx1.transactions
    assert txn.content.endswith(b"\r\n\r\n" + re.sub(rb"\r\n|\r|\n", b"\r\n", STORED_BODY))


def test_bcc_headers_are_not_sent(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    data = content(
        "with bcc",
        ["shown@example.net"],
        headers="Bcc: hidden@example.net,\r\n hidden2@example.net\r\nbcc: hidden3@example.net\r\n",
    )
    rcpts = ["shown@example.net", "hidden@example.net", "hidden2@example.net", "hidden3@example.net"]
    assert settle(d, send(d, rcpts, "with bcc", data=data)) == "gone"
    [txn] = mx1.transactions
    assert sorted(txn.rcpt_tos) == sorted(rcpts)
    header_part = txn.content.partition(b"\r\n\r\n")[0]
    assert not re.search(rb"(?im)^bcc:", header_part), header_part
    assert b"hidden" not in header_part, header_part
    assert b"\r\nTo: shown@example.net\r\n" in header_part


@pytest.mark.parametrize("offers_smtputf8", [True, False])
def test_smtputf8_recipient(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    offers_smtputf8: bool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net", smtputf8=offers_smtputf8)
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    rcpt = "jürgen@example.net"
    msg_id = send(d, [rcpt], "utf8", data=content("utf8", [rcpt]), mail_options=["SMTPUTF8"])
    if offers_smtputf8:
        assert settle(d, msg_id) == "gone"
        [txn] = mx1.transactions
        assert txn.rcpt_tos == [rcpt]
        assert "SMTPUTF8" in txn.mail_options
        return
    assert settle(d, msg_id) == "bounced"
    assert mx1.transactions == []
    assert not any(rcpt in c.rcpts for c in mx1.connections), "sent a UTF-8 address without SMTPUTF8"
    d.stop()
    r = recipient(read_status(d, msg_id), rcpt)
    assert r.state == "failed"
    assert r.last is not None and (r.last.code, r.last.enhanced) == (553, "5.6.7")


# ---- outbound rate limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("limits", [{"per_domain": 2}, {"domains": {"example.net": 2}}])
def test_rate_limited_domain_defers_without_connecting(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    limits: dict[str, Any],
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    publish(dns, "example.org", (10, "mx2.example.net", MX2))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    mx2 = upstreams.add(MX2, name="mx2.example.net")
    config["rate_limits"] = limits
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    first = [send(d, ["ann@example.net"], f"rate {i}") for i in range(2)]
    assert [settle(d, i) for i in first] == ["gone", "gone"]
    connections, mails = len(mx1.connections), mx1.count("MAIL")
    over = send(d, ["ann@example.net"], "rate 2")
    assert settle(d, over) == "deferred"
    other = send(d, ["bob@example.org"], "other domain")
    assert settle(d, other) == "gone"
    assert mx1.subjects() == ["rate 0", "rate 1"]
    assert (len(mx1.connections), mx1.count("MAIL")) == (connections, mails)
    assert mx2.subjects() == ["other domain"]
    [event] = events(d, "deferred", over)
    assert (event["code"], event["enhanced"]) == (451, "4.4.5")
    d.stop()
    r = recipient(read_status(d, over), "ann@example.net")
    assert r.state == "pending"
    assert r.last is not None and (r.last.code, r.last.enhanced) == (451, "4.4.5")
    assert where(d, over) == "deferred"
