"""The test upstreams themselves (upstream.py), checked with stdlib smtplib: the delivery tests trust what
they record, so each scripted behaviour and each record is exercised here without the daemon."""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Iterator

import pytest
import trustme

from .upstream import Upstream, UpstreamPool, wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pool() -> Iterator[UpstreamPool]:
    p = UpstreamPool()
    yield p
    p.stop()


def closed(upstream: Upstream, index: int = 0) -> None:
    wait_until(lambda: len(upstream.connections) > index and upstream.connections[index].closed, 5)


def test_records_transactions_scripted_replies_and_raw_bytes(pool: UpstreamPool) -> None:
    up = pool.add(
        "127.0.0.2",
        name="mx1.example.net",
        rcpt_replies={"busy@x.example": "450 4.2.1 busy", "shut@x.example": "421 4.3.2 bye"},
    )
    other = pool.add("127.0.0.3", name="mx2.example.net")
    pool.start()
    assert up.port == other.port == pool.port
    with smtplib.SMTP(up.ip, pool.port, timeout=5) as client:
        client.ehlo("client.example")
        refused = client.sendmail(
            "a@b.example", ["ok@x.example", "busy@x.example"], b"Subject: t1\r\n\r\n.x\r\n"
        )
        assert refused == {"busy@x.example": (450, b"4.2.1 busy")}
        client.sendmail("a@b.example", ["ok2@x.example"], b"Subject: t2\r\n\r\nhi\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("a@b.example", ["shut@x.example"], b"Subject: t3\r\n\r\nhi\r\n")
    closed(up)  # a 421 closes the connection
    [conn] = up.connections
    assert conn.ehlo == ["client.example"]
    assert conn.rcpts == ["ok@x.example", "busy@x.example", "ok2@x.example", "shut@x.example"]
    assert [(t.subject, t.rcpt_tos, t.mail_from) for t in conn.transactions] == [
        ("t1", ["ok@x.example"], "a@b.example"),
        ("t2", ["ok2@x.example"], "a@b.example"),
    ]
    assert conn.transactions[0].content == b"Subject: t1\r\n\r\n.x\r\n"  # un-stuffed
    assert b"\r\n..x\r\n.\r\n" in conn.raw  # as sent
    assert other.connections == []


def test_starttls_auth_and_smtputf8(pool: UpstreamPool, ca: trustme.CA) -> None:
    up = pool.add(
        "127.0.0.2",
        name="mx.example",
        starttls="offered",
        cert=ca.issue_cert("mx.example"),
        credentials=("u", "p"),
    )
    pool.start()
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with smtplib.SMTP(up.ip, pool.port, timeout=5) as client:
        client._host = "mx.example"  # type: ignore[attr-defined]  # the name starttls() verifies
        client.ehlo("c")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=ctx)
        client.ehlo("c")
        assert client.has_extn("auth")
        client.login("u", "p")
        client.sendmail(
            "a@b.example", ["jürgen@x.example"], b"Subject: u\r\n\r\nhi\r\n", mail_options=["SMTPUTF8"]
        )
    closed(up)
    [conn] = up.connections
    assert conn.tls and conn.verbs[:4] == ["EHLO", "STARTTLS", "EHLO", "AUTH"]
    [auth] = conn.auths
    assert (auth.login, auth.password, auth.tls, auth.ok) == ("u", "p", True, True)
    [txn] = conn.transactions
    assert txn.tls and txn.rcpt_tos == ["jürgen@x.example"] and "SMTPUTF8" in txn.mail_options


def test_greetings_broken_starttls_and_stopping(pool: UpstreamPool, ca: trustme.CA) -> None:
    g421 = pool.add("127.0.0.2", greeting="421 4.3.2 go away")
    g554 = pool.add("127.0.0.3", greeting="554 5.3.2 no mail here")
    broken = pool.add("127.0.0.4", starttls="broken", cert=ca.issue_cert("x.example"))
    no_utf8 = pool.add("127.0.0.5", smtputf8=False)
    pool.start()
    for up, code in ((g421, 421), (g554, 554)):
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP(up.ip, pool.port, timeout=5)
        assert refused.value.smtp_code == code
        closed(up)
        assert up.count("EHLO") == 0
    with smtplib.SMTP(broken.ip, pool.port, timeout=5) as client:
        client.ehlo("c")
        assert client.has_extn("starttls")
        with pytest.raises((ssl.SSLError, OSError)):
            client.starttls(context=ssl.create_default_context())
    closed(broken)
    assert broken.connections[0].verbs == ["EHLO", "STARTTLS"] and not broken.connections[0].tls
    with smtplib.SMTP(no_utf8.ip, pool.port, timeout=5) as client:
        client.ehlo("c")
        assert not client.has_extn("smtputf8")
    no_utf8.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((no_utf8.ip, pool.port), timeout=5)
    no_utf8.start()  # same port again; records kept
    with smtplib.SMTP(no_utf8.ip, pool.port, timeout=5) as client:
        client.noop()
    closed(no_utf8, 1)
    assert len(no_utf8.connections) == 2 and no_utf8.max_concurrent == 1


def test_reply_sequences_and_rescripting(pool: UpstreamPool) -> None:
    up = pool.add("127.0.0.2", rcpt_replies={"twice@x.example": ["450 4.2.1 one", "451 4.3.0 two"]})
    pool.start()
    answers = []
    with smtplib.SMTP(up.ip, pool.port, timeout=5) as client:
        client.ehlo("c")
        for _ in range(3):
            client.mail("a@b.example")
            answers.append(client.rcpt("Twice@x.example")[0])
            client.rset()
        up.script("later@x.example", "550 5.1.1 no")
        client.mail("a@b.example")
        answers.append(client.rcpt("later@x.example")[0])
        up.script("later@x.example", None)
        answers.append(client.rcpt("later@x.example")[0])
    assert answers == [450, 451, 250, 550, 250]
    assert up.rcpt_count("Twice@x.example") == 3 and up.rcpt_count("later@x.example") == 2
