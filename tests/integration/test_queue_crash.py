"""Crash recovery of the queue: SIGKILL the real daemon while it delivers, restart it, and check that every
spooled message is found again, that torn or garbage files never reach an upstream, and that a recipient
the spool records as delivered is never sent again.

The SIGKILL storm counts, per message (an `X-Token` header), how many times the upstream accepted it:
every message at least once, and a duplicate only where the upstream had accepted a transaction the
spool had not yet recorded — a window of a few milliseconds per in-flight transaction at each kill.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hedwigpy.storage import Attempt, DeliveryStatus, RecipientStatus
from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import (
    HOST1,
    content,
    events,
    launch,
    read_status,
    recipient,
    run,
    send,
    send_many,
    settle,
    where,
)
from .queueing import api, bounces, logged, parse_dsn, plant, short_backoff, topology, when
from .upstream import UpstreamPool, wait_until

pytestmark = pytest.mark.timeout(120)

_TOKEN = re.compile(rb"^X-Token: (\S+)\r$", re.MULTILINE)


# ---- torn and garbage files ------------------------------------------------------------------------------


def test_restart_sweeps_tmp_quarantines_garbage_and_delivers_the_rest(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    spool = Path(config["server"]["spool_dir"])
    rcpt = ["ann@example.net"]
    # What a crash can leave: a message half written in tmp/ (never acknowledged) ...
    torn = plant(spool, "tmp", rcpt, content("torn")[:40])
    # ... and, for good measure, files no crash of ours can produce: garbage, and an envelope line cut short.
    garbage = plant(spool, "deferred", rcpt, b"")
    garbage_path = spool / "deferred" / f"{garbage}.msg"
    garbage_path.write_bytes(b"\x00\x01 not a spool file\nSubject: garbage\r\n")
    os.utime(garbage_path, (time.time() - 60,) * 2)  # due
    cut = plant(spool, "queued", rcpt, b"")
    (spool / "queued" / f"{cut}.msg").write_bytes(b'{"v":1,"sender":"sender@src.exa')
    # A whole message whose status cannot be read: which recipients got it is unknown, so nobody does.
    unsure = plant(spool, "deferred", rcpt, content("status unknown"), due=time.time() - 60)
    (spool / "status" / f"{unsure}.json").write_bytes(b'{"v":1,"attempts":1,"recipients":[{"addr')
    quarantined = sorted([garbage, cut, unsure])
    # ... and whole messages, queued and deferred (due in the past), which must go out.
    good = [
        plant(spool, "queued", rcpt, content("good queued")),
        plant(spool, "deferred", rcpt, content("good deferred"), due=time.time() - 60),
    ]
    mx1, _ = topology(dns, upstreams)
    short_backoff(config)
    d = run(tmp_path, config, daemon_factory, dns, upstreams)

    assert list((spool / "tmp").iterdir()) == []
    # queued/ is checked at start; deferred/ (a deep queue) when each message is first loaded, when due.
    wait_until(
        lambda: sorted(p.stem for p in d.spooled("corrupt")) == quarantined, 5, "the quarantine of 3 files"
    )
    assert torn not in {p.stem for paths in d.all_spooled().values() for p in paths}
    wait_until(lambda: {where(d, i) for i in good} == {"gone"}, 10, "the good messages to be delivered")
    # The rest keep flowing.
    fresh = send(d, rcpt, "after the crash")
    assert settle(d, fresh) == "gone"
    assert sorted(mx1.subjects()) == ["after the crash", "good deferred", "good queued"]
    assert sorted(p.stem for p in d.spooled("corrupt")) == quarantined  # kept there, never retried

    [swept] = [e for e in d.log_events() if e["event"] == "removed torn writes from tmp/"]
    assert swept["count"] == 1
    corrupt = {Path(e["path"]).stem for e in d.log_events() if e["event"] == "corrupt spool file"}
    assert corrupt == {garbage, cut}
    [unreadable] = [e for e in d.log_events() if "status file" in e["event"]]
    assert unreadable["id"] == unsure and unreadable["level"] == "error"
    with api(d) as client:
        stats = client.get("/v1/queue/stats").json()
    assert (stats["corrupt"], stats["queued"], stats["deferred"]) == (3, 0, 0)


# ---- a recipient recorded as delivered is never sent again ---------------------------------------------


def test_planted_status_only_pending_recipients_are_sent(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    spool = Path(config["server"]["spool_dir"])
    rcpts = ["a@example.net", "b@example.net", "c@example.net"]
    then = time.time() - 120
    status = DeliveryStatus(
        recipients=(
            RecipientStatus("a@example.net", "delivered", 1, Attempt(then, 250, "2.0.0", "OK", "mx1")),
            RecipientStatus("b@example.net", "pending", 1, Attempt(then, 450, "4.2.1", "busy", "mx1")),
            RecipientStatus("c@example.net", "pending", 1, Attempt(then, 0, "4.4.1", "refused", "")),
        ),
        attempts=1,
    )
    msg_id = plant(spool, "deferred", rcpts, content("half done", rcpts), status=status, due=then)
    mx1, _ = topology(dns, upstreams)
    short_backoff(config)
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    wait_until(lambda: where(d, msg_id) == "gone", 10, "the pending recipients to be delivered")
    logged(d, "delivered", msg_id, 2)
    [txn] = mx1.transactions
    assert (txn.subject, sorted(txn.rcpt_tos)) == ("half done", ["b@example.net", "c@example.net"])
    assert mx1.rcpt_count("a@example.net") == 0
    assert sorted(e["recipient"] for e in events(d, "delivered", msg_id)) == [
        "b@example.net",
        "c@example.net",
    ]


def test_sigkill_after_a_partial_attempt_sends_only_the_pending_recipient(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    mx1, _ = topology(dns, upstreams, rcpt_replies={"b@example.net": "450 4.2.1 busy"})
    short_backoff(config, "2s")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    msg_id = send(d, ["a@example.net", "b@example.net"], "250 then 450")
    wait_until(lambda: events(d, "deferred message", msg_id), 10, "the first attempt to be filed")
    d.kill()  # well before the retry is due
    status = read_status(d, msg_id)
    assert recipient(status, "a@example.net").state == "delivered"
    assert recipient(status, "b@example.net").state == "pending"
    mx1.script("b@example.net", None)
    launch(d)
    wait_until(lambda: where(d, msg_id) == "gone", 10, "the retry after the restart")
    logged(d, "delivered", msg_id, 2)
    assert [t.rcpt_tos for t in mx1.transactions] == [["a@example.net"], ["b@example.net"]]
    assert mx1.rcpt_count("a@example.net") == 1
    # The restart kept the deferred message's due time (its file's mtime): no attempt before it.
    [scheduled] = events(d, "deferred message", msg_id)
    [delivered_b] = [e for e in events(d, "delivered", msg_id) if e["recipient"] == "b@example.net"]
    assert delivered_b["host"] == HOST1
    assert when(delivered_b) >= scheduled["next_attempt"] - 0.01


def test_a_status_with_nothing_pending_sends_nothing_but_a_missing_bounce(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    """A crash after the status was saved but before the message was filed: no recipient is tried again;
    only a failure whose bounce is not recorded as sent gets one, once."""
    spool = Path(config["server"]["spool_dir"])
    then = time.time() - 60
    ok = Attempt(then, 250, "2.0.0", "OK", "mx1")
    no = Attempt(then, 550, "5.1.1", "No such user", "mx1")
    done = DeliveryStatus((RecipientStatus("a@example.net", "delivered", 1, ok),), attempts=1)
    delivered = plant(spool, "queued", ["a@example.net"], content("all done"), status=done)
    told = DeliveryStatus(
        (RecipientStatus("b@example.net", "failed", 1, no, bounced=True),), attempts=1, bounce_sent=True
    )
    announced = plant(spool, "deferred", ["b@example.net"], content("bounce sent"), status=told, due=then)
    untold = DeliveryStatus(
        (
            RecipientStatus("c@example.net", "delivered", 1, ok),
            RecipientStatus("e@example.net", "failed", 1, no),
        ),
        attempts=1,
    )
    unannounced = plant(
        spool, "queued", ["c@example.net", "e@example.net"], content("bounce missing"), status=untold
    )
    mx1, sender_mx = topology(dns, upstreams)
    short_backoff(config)
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    wait_until(lambda: where(d, delivered) == "gone", 10, "the finished message to be removed")
    wait_until(
        lambda: where(d, announced) == where(d, unannounced) == "bounced", 10, "the failed ones to be filed"
    )
    wait_until(lambda: bounces(sender_mx), 10, "the missing bounce")
    d.stop()
    d.start()  # bounced/ is not delivered again
    time.sleep(0.5)
    assert mx1.connections == []  # no RCPT to anybody recorded as delivered or failed
    [dsn_txn] = bounces(sender_mx)
    dsn = parse_dsn(dsn_txn.content)
    assert [str(g["Final-Recipient"]).strip() for g in dsn.per_recipient] == ["rfc822; e@example.net"]
    assert "Subject: bounce missing" in dsn.returned
    [queued] = events(d, "bounce queued")
    assert queued["id"] == unannounced


# ---- SIGKILL while delivering ----------------------------------------------------------------------------


def _token(content_: bytes) -> str:
    match = _TOKEN.search(content_)
    assert match, content_[:300]
    return match.group(1).decode()


def _storm(
    tmp_path: Path,
    config: dict[str, Any],
    factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    *,
    messages: int,
    kills: int,
    per_host: int,
    data_delay: float,
) -> None:
    mx1, _ = topology(dns, upstreams, data_delay=data_delay)
    short_backoff(config)
    d = run(tmp_path, config, factory, dns, upstreams, max_connections_per_host=per_host)
    batch = []
    for i in range(messages):
        token = f"m{i:04d}-{random.randrange(1 << 30):08x}"
        body = "".join(f"line {n} of {token}\r\n" for n in range(random.randint(1, 300))) + f"END {token}\r\n"
        data = content(f"storm {i}", headers=f"X-Token: {token}\r\n", body=body)
        batch.append((["rcpt@example.net"], f"storm {i}", data))
    started = time.monotonic()
    ids = send_many(d, batch)  # every one acknowledged (send_many asserts the 250s)
    sent = time.monotonic() - started
    tokens = [_token(data) for _, _, data in batch if data is not None]
    assert len(set(ids)) == messages

    def received() -> Counter[str]:
        return Counter(_token(t.content) for t in mx1.transactions)

    def remaining() -> int:
        return sum(len(d.spooled(s)) for s in ("queued", "deferred"))

    kill_times: list[float] = []
    at_kill: list[int] = []
    for _ in range(kills):
        time.sleep(random.uniform(0.15, 0.45))
        if not remaining():
            break
        d.kill()
        kill_times.append(time.monotonic())
        at_kill.append(remaining())
        launch(d)  # the restart rebuilds the schedule from the spool; delivery goes on
    wait_until(lambda: remaining() == 0, 60, "the queue to drain")
    wait_until(lambda: len(received()) == messages, 10, "every message to arrive")
    d.stop()

    seen = received()
    assert set(seen) == set(tokens)  # every acknowledged message arrived
    for t in mx1.transactions:  # and whole: no torn file was ever sent
        assert t.content.endswith(f"END {_token(t.content)}\r\n".encode())
    assert d.all_spooled() == {s: [] for s in ("tmp", "queued", "deferred", "held", "bounced", "corrupt")}
    duplicates = {token: n for token, n in seen.items() if n > 1}
    extra = sum(n - 1 for n in duplicates.values())
    # How long before the kill that followed it was each duplicate's first copy accepted?
    windows = {}
    for token in duplicates:
        first = min(t.ended for t in mx1.transactions if _token(t.content) == token)
        windows[token] = min((k - first for k in kill_times if k >= first), default=float("inf"))
    print(
        f"\nSIGKILL storm: {messages} messages, {len(kill_times)} kills (messages left at each: {at_kill}), "
        f"max_connections_per_host={per_host}, upstream DATA takes {data_delay}s: "
        f"{len(duplicates)} messages duplicated, {extra} extra deliveries "
        f"({extra / messages:.2%} of messages, {extra / max(len(kill_times), 1):.2f} per kill); "
        "first copies accepted "
        f"{sorted(round(w * 1000) for w in windows.values())} ms before a kill; "
        f"sending took {sent:.2f}s, the storm {time.monotonic() - started:.2f}s"
    )
    assert len(kill_times) >= min(kills, 2), "the queue drained before the daemon could be killed"
    # Only a transaction in flight at a kill can be repeated: at most one per connection per kill ...
    assert extra <= len(kill_times) * per_host, duplicates
    # ... and the first copy of each was accepted just before a kill (the daemon died before recording it).
    assert all(w < 2.0 for w in windows.values()), windows


def test_sigkill_during_delivery_delivers_everything_with_few_duplicates(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    _storm(
        tmp_path,
        config,
        daemon_factory,
        dns,
        upstreams,
        messages=150,
        kills=3,
        per_host=3,
        data_delay=0.05,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_storm_during_delivery_of_hundreds(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    _storm(
        tmp_path,
        config,
        daemon_factory,
        dns,
        upstreams,
        messages=800,
        kills=20,
        per_host=8,
        data_delay=0.1,
    )
