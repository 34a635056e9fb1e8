"""The queue of the real daemon (issue "The queue lives"): retries with backoff, mixed outcomes and the one
bounce they produce, hold and release, expiry, and the log line each state change writes.

Mail goes in with smtplib, store-and-forward; upstreams are aiosmtpd servers whose RCPT replies are
scripted per recipient (a list of replies is given in turn, then the recipient is accepted). The sender's
domain src.example has its own MX (mx.src.example), so bounces are delivered and checked there. The
backoff is short and without jitter (`queueing.short_backoff`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import HOST1, SENDER, content, events, read_status, recipient, run, send, settle, where
from .queueing import (
    SENDER_HOST,
    api,
    bounces,
    hedwig,
    logged,
    mail_commands,
    parse_dsn,
    short_backoff,
    state_changes,
    topology,
    when,
)
from .upstream import UpstreamPool, wait_until

pytestmark = pytest.mark.timeout(60)

BUSY = "450 4.2.1 Mailbox busy, try later"


def test_450_twice_then_250_is_delivered_once_on_the_third_attempt(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    mx1, _ = topology(dns, upstreams, rcpt_replies={"ann@example.net": [BUSY, BUSY]})
    short_backoff(config, "500ms", 2.0)
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    msg_id = send(d, ["ann@example.net"], "third time lucky")
    wait_until(lambda: where(d, msg_id) == "gone", 15, "the third attempt to deliver")
    logged(d, "delivered", msg_id)

    assert mx1.rcpt_count("ann@example.net") == 3
    [txn] = mx1.transactions  # DATA once, on the third attempt
    assert (txn.subject, txn.rcpt_tos) == ("third time lucky", ["ann@example.net"])

    deferred = events(d, "deferred", msg_id)
    assert [(e["recipient"], e["code"], e["enhanced"]) for e in deferred] == [
        ("ann@example.net", 450, "4.2.1"),
        ("ann@example.net", 450, "4.2.1"),
    ]
    assert all(e["host"] == HOST1 and "Mailbox busy" in e["text"] for e in deferred)
    scheduled = events(d, "deferred message", msg_id)
    assert [e["attempts"] for e in scheduled] == [1, 2]
    assert [e["attempt"] for e in deferred] == [1, 2]
    assert [e["next_attempt"] for e in deferred] == [e["next_attempt"] for e in scheduled]
    # retry_initial * retry_factor ** (attempts - 1): 0.5 s, then 1 s
    for e, delay in zip(scheduled, (0.5, 1.0), strict=True):
        assert e["next_attempt"] - when(e) == pytest.approx(delay, abs=0.1)
    [delivered] = events(d, "delivered", msg_id)
    assert (delivered["recipient"], delivered["code"], delivered["attempt"]) == ("ann@example.net", 250, 3)
    # each attempt waited for its due time
    assert when(deferred[1]) >= scheduled[0]["next_attempt"] - 0.01
    assert when(delivered) >= scheduled[1]["next_attempt"] - 0.01
    assert events(d, "failed", msg_id) == [] and bounces(mx1) == []


def test_mixed_recipients_end_delivered_retried_and_bounced_with_one_dsn(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    mx1, sender_mx = topology(
        dns,
        upstreams,
        rcpt_replies={"busy@example.net": [BUSY], "gone@example.net": "550 5.1.1 No such user here"},
    )
    short_backoff(config, "500ms")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    rcpts = ["ok@example.net", "busy@example.net", "gone@example.net"]
    original = content("mixed fates", rcpts, headers="X-Trace: mixed-1\r\n", body="SECRET BODY TEXT\r\n")
    msg_id = send(d, rcpts, "mixed fates", data=original)

    # First attempt: ok delivered, busy deferred, gone failed; the bounce goes out at once.
    wait_until(lambda: bounces(sender_mx), 15, "the bounce to reach the sender's MX")
    # Second attempt: busy delivered; the message ends in bounced/ (gone@ failed for good).
    wait_until(lambda: where(d, msg_id) == "bounced", 15, "the message to end in bounced/")
    logged(d, "bounced message", msg_id)
    assert sorted(t.rcpt_tos[0] for t in mx1.transactions) == ["busy@example.net", "ok@example.net"]
    assert [len(t.rcpt_tos) for t in mx1.transactions] == [1, 1]
    assert mx1.rcpt_count("ok@example.net") == 1  # not resent on the retry
    assert mx1.rcpt_count("gone@example.net") == 1  # a 5xx is not retried
    assert mx1.rcpt_count("busy@example.net") == 2

    [dsn_txn] = bounces(sender_mx)  # one DSN, not one per attempt
    assert dsn_txn.rcpt_tos == [SENDER]
    [mail] = mail_commands(sender_mx)
    assert mail.split()[0] == "FROM:<>", mail  # the null sender: a bounce is never bounced
    dsn = parse_dsn(dsn_txn.content)
    assert [a.addr_spec for a in dsn.message["To"].addresses] == [SENDER]
    assert "MAILER-DAEMON@mx.test.example" in str(dsn.message["From"])
    assert dsn.message["Auto-Submitted"] == "auto-replied"
    assert str(dsn.per_message["Reporting-MTA"]).strip() == "dns; mx.test.example"
    assert [str(g["Final-Recipient"]).strip() for g in dsn.per_recipient] == ["rfc822; gone@example.net"]
    gone = dsn.recipient("gone@example.net")
    assert str(gone["Action"]).strip() == "failed"
    assert str(gone["Status"]).strip() == "5.1.1"
    assert str(gone["Diagnostic-Code"]).strip() == "smtp; 550 5.1.1 No such user here"
    assert "mx1.example.net" in str(gone["Remote-MTA"])
    assert "<gone@example.net>: host mx1.example.net[127.0.0.2]" in dsn.text
    assert "said: 550 5.1.1 No such user here" in dsn.text
    assert "ok@example.net" not in dsn.text and "busy@example.net" not in dsn.text
    # The original's header section only, never its body.
    assert dsn.returned_type == "text/rfc822-headers"
    assert "Subject: mixed fates" in dsn.returned and "X-Trace: mixed-1" in dsn.returned
    assert "SECRET BODY TEXT" not in dsn.returned and b"SECRET BODY TEXT" not in dsn_txn.content
    # The DSN itself was delivered and is gone from the spool.
    wait_until(lambda: [e for e in events(d, "delivered") if e["recipient"] == SENDER], 5, "the DSN's log")
    [dsn_delivered] = [e for e in events(d, "delivered") if e["recipient"] == SENDER]
    assert dsn_delivered["host"] == SENDER_HOST
    wait_until(lambda: where(d, dsn_delivered["id"]) == "gone", 5, "the DSN to leave the spool")

    [queued] = events(d, "bounce queued", msg_id)
    assert (queued["to"], queued["recipients"], queued["dsn"]) == (SENDER, 1, dsn_delivered["id"])
    [bounced] = events(d, "bounced message", msg_id)
    assert bounced["dsn"] is None  # the DSN was sent with the first attempt, not again
    [failed] = events(d, "failed", msg_id)
    assert (failed["recipient"], failed["code"], failed["enhanced"]) == ("gone@example.net", 550, "5.1.1")
    d.stop()
    status = read_status(d, msg_id)
    assert status.bounce_sent and status.attempts == 2
    assert [(r.address, r.state, r.attempts) for r in status.recipients] == [
        ("ok@example.net", "delivered", 1),
        ("busy@example.net", "delivered", 2),
        ("gone@example.net", "failed", 1),
    ]
    # One log line per state change, in order (per-recipient lines once the outcome is on disk).
    assert [
        (e["event"], e.get("recipient"), e.get("attempt")) for e in state_changes(d) if e["id"] == msg_id
    ] == [
        ("received", None, None),
        ("bounce queued", None, None),
        ("delivered", "ok@example.net", 1),
        ("deferred", "busy@example.net", 1),
        ("failed", "gone@example.net", 1),
        ("deferred message", None, None),
        ("delivered", "busy@example.net", 2),
        ("bounced message", None, None),
    ]


@pytest.mark.parametrize("via", ["cli", "http"])
def test_held_message_is_not_attempted_until_released(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    via: str,
) -> None:
    mx1, _ = topology(dns, upstreams, rcpt_replies={"ann@example.net": BUSY})
    short_backoff(config, "500ms")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    msg_id = send(d, ["ann@example.net"], f"hold via {via}")
    assert settle(d, msg_id) == "deferred"

    def act(action: str) -> None:
        if via == "cli":
            done = hedwig(d, "queue", action, msg_id)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == f"{msg_id}: {'held' if action == 'hold' else 'released'}"
        else:
            with api(d) as client:
                answer = client.post(f"/v1/queue/{msg_id}/{action}")
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"id": msg_id, "action": action}

    act("hold")
    # An attempt under way when the hold came finishes first (450 again), then the message is held.
    wait_until(lambda: where(d, msg_id) == "held", 5, "the message to be held")
    tries = mx1.rcpt_count("ann@example.net")
    mx1.script("ann@example.net", None)  # the upstream would accept it now
    [held] = logged(d, "held", msg_id)
    # Several retry intervals pass: no attempt.
    wait_until(lambda: when(held) + 2.0 < time.time(), 5)
    assert mx1.rcpt_count("ann@example.net") == tries
    assert mx1.transactions == [] and where(d, msg_id) == "held"

    act("release")  # back to deferred/, due now
    wait_until(lambda: where(d, msg_id) == "gone", 5, "the released message to be delivered")
    logged(d, "delivered", msg_id)
    assert mx1.rcpt_count("ann@example.net") == tries + 1
    assert mx1.subjects() == [f"hold via {via}"]
    [released] = events(d, "released", msg_id)
    [delivered] = events(d, "delivered", msg_id)
    assert when(released) <= when(delivered) < when(released) + 1.0
    changes = [e["event"] for e in state_changes(d) if e["id"] == msg_id]
    assert changes[-3:] == ["held", "released", "delivered"]


def test_expired_recipient_bounces_with_status_447(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    mx1, sender_mx = topology(dns, upstreams, rcpt_replies={"late@example.net": BUSY})
    short_backoff(config, "500ms", max_lifetime="3s")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    msg_id = send(d, ["ok@example.net", "late@example.net"], "too late")
    wait_until(lambda: where(d, msg_id) == "bounced", 15, "the message to expire")
    logged(d, "bounced message", msg_id)
    assert mx1.rcpt_count("ok@example.net") == 1
    tries = mx1.rcpt_count("late@example.net")
    assert tries >= 4, "retried every 0.5 s until 3 s had passed"

    [expired] = events(d, "expired", msg_id)
    assert (expired["recipient"], expired["attempts"]) == ("late@example.net", tries)
    [first_deferral, *_] = events(d, "deferred message", msg_id)
    assert when(expired) - when(first_deferral) >= 2.9
    [queued] = events(d, "bounce queued", msg_id)
    [bounced] = events(d, "bounced message", msg_id)
    assert bounced["dsn"] == queued["dsn"]

    wait_until(lambda: bounces(sender_mx), 10, "the bounce to reach the sender's MX")
    [dsn_txn] = bounces(sender_mx)
    dsn = parse_dsn(dsn_txn.content)
    [late] = dsn.per_recipient
    assert str(late["Final-Recipient"]).strip() == "rfc822; late@example.net"
    assert str(late["Action"]).strip() == "failed"
    assert str(late["Status"]).strip() == "4.4.7"
    assert str(late["Diagnostic-Code"]).strip() == f"smtp; {BUSY}"
    assert "delivery time expired" in dsn.text
    assert "Subject: too late" in dsn.returned
    d.stop()
    status = read_status(d, msg_id)
    assert recipient(status, "ok@example.net").state == "delivered"
    assert recipient(status, "late@example.net").state == "failed"
    changes = [e["event"] for e in state_changes(d) if e["id"] == msg_id]
    assert changes[-6:-4] == ["deferred", "deferred message"]  # the last retry was scheduled
    # then the attempt past max_lifetime: expired, bounce queued, (the recipient's line), bounced message
    assert changes[-4:-2] == ["expired", "bounce queued"] and changes[-1] == "bounced message"


def test_delete_removes_a_deferred_message_for_good(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    mx1, _ = topology(dns, upstreams, rcpt_replies={"ann@example.net": BUSY})
    short_backoff(config, "500ms")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    msg_id = send(d, ["ann@example.net"], "to be deleted")
    assert settle(d, msg_id) == "deferred"
    with api(d) as client:
        answer = client.delete(f"/v1/queue/{msg_id}")
        assert answer.status_code == 200, answer.text
        wait_until(lambda: where(d, msg_id) == "gone", 5, "the message to be deleted")
        tries = mx1.rcpt_count("ann@example.net")
        mx1.script("ann@example.net", None)
        assert client.post("/v1/queue/flush").json() == {"flushed": 0}
        assert client.get(f"/v1/messages/{msg_id}").status_code == 404
    [deleted] = logged(d, "deleted", msg_id)
    assert [e["event"] for e in state_changes(d) if e["id"] == msg_id][-1] == "deleted"
    wait_until(lambda: when(deleted) + 1.5 < time.time(), 5)
    assert mx1.rcpt_count("ann@example.net") == tries and mx1.transactions == []
    assert not (d.spool / "status" / f"{msg_id}.json").exists()
