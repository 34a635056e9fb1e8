"""Cut-through (issue 5) through the real daemon: the sender waits while the daemon delivers, and is
answered with the upstream's own reply — or, when the upstream does not settle it, by the cut-through
table: a `submission` listener keeps what is unfinished and says 250, an `ingress` listener hands the
upstream's 4xx (or 451 at the deadline) back to the sending MTA and keeps nothing.

One daemon per test, `cut_through_timeout = "2s"`, two listeners: "submission" (loopback may relay) and
"ingress" (nobody may relay; the test domains are its local domains). DNS is the loopback server:

    example.net     mx1.example.net   127.0.0.2  aiosmtpd; gone@ → 550 at RCPT, busy@ → 450 at RCPT
    example.org     mx2.example.org   127.0.0.3  aiosmtpd
    src.example     mx.src.example    127.0.0.4  aiosmtpd: the sender's MX, where bounces arrive
    silent.example  mx.silent.example 127.0.0.5  accepts TCP, never greets           (misbehaving.py)
    stall.example   mx.stall.example  127.0.0.6  never answers the end of the data   (misbehaving.py)
    drop.example    mx.drop.example   127.0.0.7  closes mid-DATA, until told to take mail

Each test checks the exact reply smtplib gets on each listener, what the spool holds afterwards (tmp/,
queued/, deferred/, status files) and the daemon's "received" and "submitted" log events.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.dns_server import DnsServer

from .daemon import Daemon, free_port
from .misbehaving import Behaviour, RawUpstream
from .outbound import (
    MX1,
    MX2,
    MX3,
    SENDER,
    configure,
    content,
    events,
    publish,
    queued_id,
    read_status,
    recipient,
    settle,
    start,
    status_path,
    where,
)
from .upstream import Upstream, UpstreamPool, wait_until

pytestmark = pytest.mark.timeout(60)

SUB, ING = "submission", "ingress"
TIMEOUT = 2.0  # [delivery].cut_through_timeout
SILENT, STALL, DROP = "127.0.0.5", "127.0.0.6", "127.0.0.7"
GONE = "<gone@example.net>: Recipient address rejected: User unknown in virtual mailbox table"
BUSY = "<busy@example.net>: Mailbox busy, try again later"
LOCAL_DOMAINS = ["example.net", "example.org", "silent.example", "stall.example", "drop.example"]
STATES = ("tmp", "queued", "deferred", "held", "bounced", "corrupt")


@dataclass
class Net:
    daemon: Daemon
    mx1: Upstream
    mx2: Upstream
    sender_mx: Upstream
    raw: dict[str, RawUpstream]  # by domain: silent.example, stall.example, drop.example
    port: int

    def label(self, upstream: Upstream) -> str:
        return f"{upstream.name}[{upstream.ip}]:{self.port}"


@pytest.fixture
def net(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> Iterator[Net]:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    publish(dns, "example.org", (10, "mx2.example.org", MX2))
    publish(dns, "src.example", (10, "mx.src.example", MX3))
    mx1 = upstreams.add(
        MX1,
        name="mx1.example.net",
        rcpt_replies={"gone@example.net": f"550 5.1.1 {GONE}", "busy@example.net": f"450 4.2.1 {BUSY}"},
    )
    mx2 = upstreams.add(MX2, name="mx2.example.org")
    sender_mx = upstreams.add(MX3, name="mx.src.example")
    upstreams.start()
    behaviours: list[tuple[str, str, Behaviour]] = [
        ("silent.example", SILENT, "silent"),
        ("stall.example", STALL, "no-final-reply"),
        ("drop.example", DROP, "drop-mid-data"),
    ]
    raw: dict[str, RawUpstream] = {}
    try:
        for domain, ip, behaviour in behaviours:
            publish(dns, domain, (10, f"mx.{domain}", ip))
            raw[domain] = RawUpstream(ip, name=f"mx.{domain}", behaviour=behaviour)
            raw[domain].start(upstreams.port)
        config["listeners"] = [
            {
                "name": SUB,
                "addr": f"127.0.0.1:{free_port()}",
                "role": "submission",
                "tls": "none",
                "trusted_networks": ["127.0.0.0/8"],
            },
            {
                "name": ING,
                "addr": f"127.0.0.1:{free_port()}",
                "role": "ingress",
                "tls": "none",
                "trusted_networks": [],
                "local_domains": LOCAL_DOMAINS,
            },
        ]
        configure(config, dns, upstreams, cut_through=True, cut_through_timeout=f"{TIMEOUT:g}s")
        config["queue"] = {"retry_initial": "1s", "retry_jitter": 0.0}
        daemon = start(daemon_factory, tmp_path, config)
        yield Net(daemon, mx1, mx2, sender_mx, raw, upstreams.port)
    finally:
        for r in raw.values():
            r.stop()


@dataclass(frozen=True)
class Answer:
    """The reply smtplib got after the end of the data, split as it comes: code, enhanced, text."""

    code: int
    enhanced: str
    text: str
    seconds: float  # from sending the content to the reply

    @property
    def line(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


def submit(
    net: Net, listener: str, recipients: Sequence[str], subject: str, data: bytes | None = None
) -> Answer:
    """One message over SMTP to `listener`; the reply to its content."""
    with smtplib.SMTP("127.0.0.1", net.daemon.port(listener), timeout=20) as client:
        client.ehlo("client.example")
        code, text = client.mail(SENDER)
        assert code == 250, text
        for rcpt in recipients:
            code, text = client.rcpt(rcpt)
            assert code == 250, (rcpt, text)
        started = time.monotonic()
        code, raw = client.data(data if data is not None else content(subject, recipients))
        seconds = time.monotonic() - started
    enhanced, _, rest = raw.decode().partition(" ")
    return Answer(code, enhanced, rest, seconds)


def both(
    net: Net, recipients: Sequence[str], subject: str, make: Callable[[str], bytes] | None = None
) -> dict[str, Answer]:
    """The same message sent to both listeners at once, its Subject saying which listener it went to;
    `make` builds the content from that Subject (default: `outbound.content`)."""
    with ThreadPoolExecutor(2) as pool:
        futures = {}
        for listener in (SUB, ING):
            name = f"{subject} via {listener}"
            data = make(name) if make is not None else None
            futures[listener] = pool.submit(submit, net, listener, recipients, name, data)
        return {listener: f.result() for listener, f in futures.items()}


def spool_files(d: Daemon) -> dict[str, list[str]]:
    found = {state: [p.stem for p in d.spooled(state)] for state in STATES}
    status_dir = d.spool / "status"
    found["status"] = sorted(p.name for p in status_dir.iterdir()) if status_dir.exists() else []
    return found


def assert_spool_empty(d: Daemon) -> None:
    assert spool_files(d) == {state: [] for state in (*STATES, "status")}


def received(d: Daemon, listener: str) -> list[dict[str, Any]]:
    return [e for e in events(d, "received") if e.get("listener") == listener]


def assert_logged(d: Daemon, listener: str, path: str, answer: Answer) -> str:
    """The "received" event of the one message on `listener`, with its path and reply, and the matching
    "submitted" event; the message id."""
    wait_until(lambda: received(d, listener), 5, f"a received event for {listener}")
    [event] = received(d, listener)
    assert event["path"] == path
    assert event["reply"] == answer.line
    message_id = str(event["id"])
    [submitted] = events(d, "submitted", message_id)
    assert submitted["path"] == path and submitted["reply"] == answer.line
    return message_id


def kept(d: Daemon, message_id: str) -> str:
    """Where a message the daemon kept is, with its status file beside it. The submit step commits it to
    queued/ (due after the first backoff, though its file's mtime says "now"); the worker's first retry
    moves it to deferred/."""
    state = where(d, message_id)
    assert state in ("queued", "deferred"), state
    assert status_path(d, message_id).exists()
    return state


# ---- the upstream settles it -------------------------------------------------------------------------


def test_upstream_250_is_the_answer_on_both_listeners_and_nothing_is_kept(net: Net) -> None:
    d = net.daemon
    rcpts = ["ann@example.net", "bob@example.net"]
    answers = both(net, rcpts, "taken")
    for listener, answer in answers.items():
        assert (answer.code, answer.enhanced) == (250, "2.0.0"), listener
        assert answer.text == f"{net.label(net.mx1)}: OK: accepted", listener
        assert_logged(d, listener, "cut-through", answer)
    assert sorted(t.subject for t in net.mx1.transactions) == ["taken via ingress", "taken via submission"]
    assert all(t.rcpt_tos == rcpts and t.mail_from == SENDER for t in net.mx1.transactions)
    assert all(t.content.startswith(b"Received: ") for t in net.mx1.transactions)
    assert_spool_empty(d)


def test_delivered_to_two_upstreams_with_their_own_replies_is_our_250(net: Net) -> None:
    d = net.daemon
    answer = submit(net, SUB, ["ann@example.net", "carl@example.org"], "two hosts")
    message_id = assert_logged(d, SUB, "cut-through", answer)
    assert answer.line == f"250 2.0.0 Ok: delivered to 2 recipients as {message_id}"
    assert [t.rcpt_tos for t in net.mx1.transactions] == [["ann@example.net"]]
    assert [t.rcpt_tos for t in net.mx2.transactions] == [["carl@example.org"]]
    assert_spool_empty(d)


def test_upstream_550_is_returned_verbatim_on_both_listeners_and_nothing_is_kept(net: Net) -> None:
    d = net.daemon
    answers = both(net, ["gone@example.net"], "refused")
    for listener, answer in answers.items():
        assert (answer.code, answer.enhanced) == (550, "5.1.1"), listener
        assert answer.text == f"{net.label(net.mx1)}: {GONE}", listener
        assert_logged(d, listener, "refused", answer)
    assert net.mx1.transactions == [] and net.mx1.count("RCPT") == 2
    assert_spool_empty(d)  # nothing to retry, nothing to bounce: the sender was told
    assert net.sender_mx.connections == []


def test_upstream_450_is_queued_on_submission_and_returned_on_ingress(net: Net) -> None:
    d = net.daemon
    answers = both(net, ["busy@example.net"], "busy")

    ingress = answers[ING]
    assert (ingress.code, ingress.enhanced) == (450, "4.2.1")
    assert ingress.text == f"{net.label(net.mx1)}: {BUSY}"
    refused_id = assert_logged(d, ING, "refused", ingress)
    assert where(d, refused_id) == "gone" and not status_path(d, refused_id).exists()

    submission = answers[SUB]
    message_id = queued_id(submission.text)
    assert submission.line == f"250 2.0.0 Ok: queued as {message_id}"
    assert assert_logged(d, SUB, "queued", submission) == message_id
    kept(d, message_id)
    first = recipient(read_status(d, message_id), "busy@example.net")
    assert first.state == "pending" and first.attempts >= 1 and first.last is not None
    assert (first.last.code, first.last.enhanced, first.last.text) == (450, "4.2.1", BUSY)
    assert first.last.host == net.label(net.mx1)

    # The queue retries it (retry_initial = 1s): the upstream is asked again and says 450 again.
    wait_until(lambda: net.mx1.count("RCPT") >= 3, 10, "a retry of busy@example.net")
    wait_until(lambda: where(d, message_id) == "deferred", 5, "the kept message to be deferred")
    wait_until(lambda: read_status(d, message_id).attempts >= 2, 5, "the retry to be recorded")
    spool = spool_files(d)
    assert spool["deferred"] == [message_id] and spool["status"] == [f"{message_id}.json"]
    assert spool["tmp"] == spool["queued"] == spool["bounced"] == []
    assert net.mx1.transactions == [] and net.sender_mx.connections == []


# ---- the upstream never answers ----------------------------------------------------------------------


@pytest.mark.parametrize("domain", ["silent.example", "stall.example"], ids=["no-greeting", "no-final-reply"])
def test_an_upstream_that_never_answers_is_queued_on_submission_and_451_on_ingress(
    net: Net, domain: str
) -> None:
    d = net.daemon
    raw = net.raw[domain]
    answers = both(net, [f"someone@{domain}"], "unanswered")

    for answer in answers.values():
        assert TIMEOUT - 0.2 <= answer.seconds <= TIMEOUT + 3, answer
    ingress = answers[ING]
    assert (ingress.code, ingress.enhanced) == (451, "4.4.2")
    refused_id = assert_logged(d, ING, "refused", ingress)
    assert where(d, refused_id) == "gone" and not status_path(d, refused_id).exists()

    submission = answers[SUB]
    message_id = queued_id(submission.text)
    assert submission.line == f"250 2.0.0 Ok: queued as {message_id}"
    assert assert_logged(d, SUB, "queued", submission) == message_id
    kept(d, message_id)  # its retry now hangs too (without a deadline), so it may stay in queued/
    status = read_status(d, message_id)
    [pending] = status.recipients
    assert pending.state == "pending" and pending.attempts == 1 and pending.last is not None
    assert (pending.last.code, pending.last.enhanced) == (451, "4.4.2")
    spool = spool_files(d)
    assert spool["tmp"] == [] and spool["bounced"] == []
    assert spool["queued"] + spool["deferred"] == [message_id]

    first_two = raw.connections[:2]
    assert len(first_two) == 2
    if domain == "stall.example":  # the content went out whole: the upstream "may have it"
        assert all(c.content.endswith(b"\r\n.\r\n") for c in first_two)
    else:
        assert all(c.commands == [] for c in first_two)


def test_the_ingress_timeout_reply_does_not_claim_the_message_is_kept(net: Net) -> None:
    answer = submit(net, ING, ["someone@silent.example"], "not kept")
    assert (answer.code, answer.enhanced) == (451, "4.4.2")
    assert_spool_empty(net.daemon)
    assert "kept" not in answer.text and "retried" not in answer.text, answer.line


# ---- mixed per-recipient results ---------------------------------------------------------------------


def test_mixed_250_550_450_is_queued_the_550_bounced_the_450_retried_the_250_sent_once(net: Net) -> None:
    d = net.daemon
    rcpts = ["ok@example.net", "gone@example.net", "busy@example.net"]
    answers = both(net, rcpts, "mixed")

    ids = {}
    for listener, answer in answers.items():
        message_id = queued_id(answer.text)
        assert answer.line == f"250 2.0.0 Ok: queued as {message_id}", listener
        assert assert_logged(d, listener, "queued", answer) == message_id
        kept(d, message_id)
        ids[listener] = message_id
    # The upstream took the message for ok@ at once, in one transaction with the refusals.
    assert sorted(t.subject for t in net.mx1.transactions) == ["mixed via ingress", "mixed via submission"]
    assert all(t.rcpt_tos == ["ok@example.net"] for t in net.mx1.transactions)

    # A bounce for gone@ reaches the sender's MX, one per message, from <>.
    wait_until(lambda: len(net.sender_mx.transactions) >= 2, 15, "two bounces at the sender's MX")
    for dsn in net.sender_mx.transactions:
        assert dsn.mail_from == "<>" and dsn.rcpt_tos == [SENDER]
        assert dsn.content.count(b"Final-Recipient:") == 1
        assert b"Final-Recipient: rfc822; gone@example.net" in dsn.content
        assert b"Status: 5.1.1" in dsn.content
    # busy@ is asked again, ok@ never again.
    wait_until(lambda: net.mx1.count("RCPT") >= 3 * 2 + 2, 15, "retries of busy@example.net")
    wait_until(lambda: all(where(d, m) == "deferred" for m in ids.values()), 5, "both deferred")
    rcpt_args = [arg for c in net.mx1.connections for verb, arg in c.commands if verb == "RCPT"]
    assert sum("<ok@example.net>" in a for a in rcpt_args) == 2  # one per message: never resent
    assert sum("<gone@example.net>" in a for a in rcpt_args) == 2
    assert sum("<busy@example.net>" in a for a in rcpt_args) >= 2 + 2
    assert len(net.mx1.transactions) == 2

    for message_id in ids.values():
        status = read_status(d, message_id)
        assert recipient(status, "ok@example.net").state == "delivered"
        gone = recipient(status, "gone@example.net")
        assert gone.state == "failed" and gone.bounced
        assert recipient(status, "busy@example.net").state == "pending"
    # The DSNs leave queued/ once the sender's MX has answered them: that may lag the DSN's arrival.
    wait_until(lambda: not spool_files(d)["queued"], 10, "the DSNs to leave queued/")
    spool = spool_files(d)
    assert sorted(spool["deferred"]) == sorted(ids.values())
    assert spool["tmp"] == spool["queued"] == spool["bounced"] == []


def test_the_cut_through_attempt_logs_each_recipients_outcome(net: Net) -> None:
    d = net.daemon
    answer = submit(net, SUB, ["ok@example.net", "gone@example.net", "busy@example.net"], "logged")
    message_id = queued_id(answer.text)
    taken = submit(net, SUB, ["ann@example.net"], "taken")
    assert taken.code == 250
    taken_id = next(str(e["id"]) for e in received(d, SUB) if e["path"] == "cut-through")
    label = net.label(net.mx1)
    expected = [
        ("delivered", message_id, "ok@example.net", 250),
        ("failed", message_id, "gone@example.net", 550),
        ("deferred", message_id, "busy@example.net", 450),
        ("delivered", taken_id, "ann@example.net", 250),
    ]
    for kind, mid, rcpt, code in expected:
        found = [e for e in events(d, kind, mid) if e.get("recipient") == rcpt and e.get("attempt") == 1]
        assert found, f"no {kind} event for {rcpt} ({mid})"
        assert found[0]["host"] == label and found[0]["code"] == code


# ---- the upstream drops the connection mid-DATA ------------------------------------------------------

LARGE = b"".join(b"%06d " % i + b"x" * 90 + b"\r\n" for i in range(3000))  # ~290 KB: streamed via tmp/


def test_a_connection_dropped_mid_data_is_queued_on_submission_and_451_on_ingress(net: Net) -> None:
    d = net.daemon
    drop = net.raw["drop.example"]
    rcpts = ["someone@drop.example"]
    answers = both(net, rcpts, "dropped", lambda subject: content(subject, rcpts, body=LARGE.decode()))

    ingress = answers[ING]
    assert (ingress.code, ingress.enhanced) == (451, "4.4.2")
    assert ingress.text.startswith(f"{drop.label()}: lost connection "), ingress
    refused_id = assert_logged(d, ING, "refused", ingress)
    assert where(d, refused_id) == "gone"

    submission = answers[SUB]
    message_id = queued_id(submission.text)
    assert submission.line == f"250 2.0.0 Ok: queued as {message_id}"
    assert assert_logged(d, SUB, "queued", submission) == message_id
    kept(d, message_id)
    [pending] = read_status(d, message_id).recipients
    assert pending.state == "pending" and pending.last is not None
    assert (pending.last.code, pending.last.enhanced, pending.last.host) == (451, "4.4.2", drop.label())
    assert len(drop.connections) >= 2
    assert all(0 < len(c.content) < len(LARGE) for c in drop.connections[:2])  # some content, not all

    # Once the upstream takes mail, the queue's retry delivers the kept message (and only that one).
    drop.behaviour = "ok"
    wait_until(lambda: drop.messages, 15, "the retry to deliver")
    assert settle(d, message_id) == "gone"  # its status file too (removed after the data file)
    [message] = drop.messages
    assert b"Subject: dropped via submission\r\n" in message
    assert message.endswith(LARGE)
    assert_spool_empty(d)
