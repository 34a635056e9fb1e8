"""`hedwigpy queue ...` and `hedwigpy send` as an operator runs them: subprocesses pointed at a running
daemon with `-c` its config file, checked by what they print, their exit codes, and what they do to the
spool and to delivery (the upstreams' records). Hold and release are in test_queue.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import SENDER, events, run, send, settle, status_path, where
from .queueing import hedwig, logged, short_backoff, topology
from .upstream import UpstreamPool, wait_until

pytestmark = pytest.mark.timeout(60)

BUSY = "450 4.2.1 Mailbox busy, try later"


def ok(daemon: Daemon, *args: str) -> str:
    """Run `hedwigpy ARGS`; it must succeed; its stdout."""
    done = hedwig(daemon, *args)
    assert done.returncode == 0, (args, done.returncode, done.stderr)
    return done.stdout


def ok_json(daemon: Daemon, *args: str) -> Any:
    return json.loads(ok(daemon, *args, "--json"))


def test_list_show_stats_and_refusals(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    topology(
        dns,
        upstreams,
        rcpt_replies={
            "busy@example.net": BUSY,
            "busy2@example.net": BUSY,
            "gone@example.net": "550 5.1.1 No such user",
        },
    )
    short_backoff(config, "1h")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    deferred = send(d, ["busy@example.net"], "stays deferred")
    held = send(d, ["busy2@example.net"], "to be held")
    bounced = send(d, ["gone@example.net"], "bounces")
    assert settle(d, deferred) == "deferred" and settle(d, held) == "deferred"
    assert settle(d, bounced) == "bounced"
    wait_until(lambda: events(d, "bounce queued", bounced) and not d.spooled("queued"), 10, "the DSN to go")
    assert ok(d, "queue", "hold", held).strip() == f"{held}: held"
    assert where(d, held) == "held"

    listing = ok_json(d, "queue", "list")
    states = {m["id"]: m["state"] for m in listing["messages"]}
    assert states == {deferred: "deferred", held: "held", bounced: "bounced"}
    [entry] = [m for m in listing["messages"] if m["id"] == deferred]
    assert (entry["from"], entry["recipients"]) == (SENDER, ["busy@example.net"])
    assert entry["status"]["recipients"][0]["last"]["code"] == 450
    only = ok_json(d, "queue", "list", "--state", "deferred")
    assert [m["id"] for m in only["messages"]] == [deferred]

    text = ok(d, "queue", "list")
    assert text.startswith("-Queue ID-")
    assert re.search(rf"^{deferred} +\d+ .+  {re.escape(SENDER)}$", text, re.MULTILINE), text
    assert f"{held}!" in text and f"{bounced}#" in text
    assert "said: 450 4.2.1 Mailbox busy, try later)" in text and "busy@example.net" in text
    assert "in 3 Requests." in text

    shown = ok_json(d, "queue", "show", deferred)
    assert (shown["id"], shown["state"], shown["from"]) == (deferred, "deferred", SENDER)
    assert shown["status"]["attempts"] == 1 and shown["status"]["next_attempt"]
    [rcpt] = shown["status"]["recipients"]
    assert (rcpt["address"], rcpt["state"], rcpt["attempts"]) == ("busy@example.net", "pending", 1)
    assert (rcpt["last"]["code"], rcpt["last"]["enhanced"]) == (450, "4.2.1")
    text = ok(d, "queue", "show", bounced)
    assert re.search(r"^state: +bounced$", text, re.MULTILINE), text
    assert "gone@example.net  failed, 1 attempt" in text and "550 5.1.1 No such user" in text

    stats = ok_json(d, "queue", "stats")
    assert stats == {
        "queued": 0,
        "deferred": 1,
        "held": 1,
        "bounced": 1,
        "corrupt": 0,
        "scheduled": 1,
        "in_flight": 0,
    }
    assert re.search(r"^held +1$", ok(d, "queue", "stats"), re.MULTILINE)

    # Refusals: exit 1 with the daemon's reason.
    unknown = "0" * 24
    for args, reason in [
        (("queue", "show", unknown), f"no message {unknown} in the queue (HTTP 404)"),
        (("queue", "delete", unknown), "(HTTP 404)"),
        (("queue", "release", deferred), f"message {deferred} is deferred; release needs a held message"),
        (("queue", "retry", bounced), "(HTTP 409)"),
        (("queue", "hold", bounced), "(HTTP 409)"),
    ]:
        done = hedwig(d, *args)
        assert (done.returncode, done.stdout) == (1, ""), (args, done)
        assert done.stderr.startswith("hedwigpy: ") and reason in done.stderr, (args, done.stderr)
    assert where(d, deferred) == "deferred" and where(d, bounced) == "bounced"

    # No daemon: exit 2, saying so.
    assert d.stop() == 0
    url = f"http://{config['http']['addr']}"
    for command in [["queue", "list"], ["queue", "flush"], ["queue", "hold", held], ["queue", "stats"]]:
        done = hedwig(d, *command)
        assert done.returncode == 2, (command, done)
        assert done.stderr.strip() == f"hedwigpy: no hedwigpy daemon answers at {url} (is it running?)"
    done = hedwig(d, "send", "--to", "ann@example.net")
    assert done.returncode == 2 and "no hedwigpy daemon answers at smtp://127.0.0.1:" in done.stderr


def test_retry_delete_and_flush_act_on_deferred_mail(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    rcpts = ["a1@example.net", "a2@example.net", "a3@example.net", "a4@example.net"]
    mx1, _ = topology(dns, upstreams, rcpt_replies=dict.fromkeys(rcpts, BUSY))
    short_backoff(config, "1h")  # nothing comes back by itself during the test
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    ids = [send(d, [rcpt], f"deferred {rcpt}") for rcpt in rcpts]
    for message_id in ids:
        assert settle(d, message_id) == "deferred"
    for rcpt in rcpts:
        mx1.script(rcpt, None)  # the upstream would take them all now
    retried, deleted, flushed, flushed_too = ids

    assert ok(d, "queue", "retry", retried).strip() == f"{retried}: due now"
    wait_until(lambda: where(d, retried) == "gone", 5, "the retried message to be delivered")
    assert mx1.subjects() == ["deferred a1@example.net"]

    assert ok(d, "queue", "delete", deleted).strip() == f"{deleted}: deleted"
    assert where(d, deleted) == "gone" and not status_path(d, deleted).exists()
    [event] = logged(d, "deleted", deleted)
    assert event["level"] == "info"

    assert ok(d, "queue", "flush").strip() == "flushed: 2 messages due now"
    wait_until(
        lambda: {where(d, flushed), where(d, flushed_too)} == {"gone"}, 5, "the flushed messages to go"
    )
    assert sorted(mx1.subjects()) == [
        f"deferred {r}" for r in ("a1@example.net", "a3@example.net", "a4@example.net")
    ]
    assert mx1.rcpt_count("a2@example.net") == 1  # only the first attempt, before the delete
    assert ok(d, "queue", "list").strip() == "Mail queue is empty"
    assert ok(d, "queue", "flush").strip() == "flushed: 0 messages due now"


def test_send_delivers_a_test_message_through_the_daemon(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    mx1, _ = topology(dns, upstreams)
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    out = ok(d, "send", "--to", "ann@example.net", "--to", "bob@example.net", "--subject", "cli says hi")
    match = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9a-f]+)\n", out)
    assert match, out
    assert settle(d, match.group(1)) == "gone"
    [txn] = mx1.transactions
    assert txn.mail_from == "hedwigpy@mx.test.example"  # default: hedwigpy@[server].hostname
    assert sorted(txn.rcpt_tos) == ["ann@example.net", "bob@example.net"]
    assert txn.subject == "cli says hi"
    assert b"\r\nX-Mailer: hedwigpy send\r\n" in txn.content
    assert b"A test message sent by `hedwigpy send`" in txn.content
    ok(d, "send", "--to", "carol@example.net", "--from", SENDER, "--body", "custom body")
    wait_until(lambda: len(mx1.transactions) == 2, 5, "the second test message")
    assert mx1.transactions[1].mail_from == SENDER and b"custom body" in mx1.transactions[1].content
