"""SIGTERM drains (issue 8): listeners close, /readyz and POST /v1/messages answer 503, open transactions
finish with their real reply and then get 421, idle sessions get 421 at once, and the daemon exits 0
within `[server].drain_timeout` — cancelling what is still open then, without keeping half a message.
No message that got a 250 is lost."""

from __future__ import annotations

import signal
import smtplib
import socket
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.dns_server import DnsServer

from .daemon import Daemon, read_message
from .outbound import MX1, SENDER, content, publish, run
from .upstream import UpstreamPool, subject_of, wait_until
from .wire import Wire

pytestmark = pytest.mark.timeout(90)


def refused(port: int) -> bool:
    """True when a new connection to `port` is refused; a connection still accepted is closed again."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def open_transaction(port: int, subject: str) -> Wire:
    """A session that has sent MAIL, RCPT, DATA and the first part of a message."""
    w = Wire(port)
    w.cmd("EHLO client.example")
    assert w.cmd(f"MAIL FROM:<{SENDER}>").startswith("250")
    assert w.cmd("RCPT TO:<rcpt@dest.example>").startswith("250")
    assert w.cmd("DATA").startswith("354")
    w.send(f"Subject: {subject}\r\n\r\nthe first half\r\n".encode())
    return w


def spooled_subjects(daemon: Daemon, *states: str) -> list[str]:
    return [subject_of(read_message(p)[1]) for s in states for p in daemon.spooled(s)]


def test_open_transaction_finishes_and_is_spooled_then_421(
    config: dict[str, Any], daemon_factory: type[Daemon], tmp_path: Path
) -> None:
    config["server"]["drain_timeout"] = "30s"  # the test takes its time; the drain must not cut it short
    d = daemon_factory(tmp_path, config)
    d.start()
    base = f"http://{config['http']['addr']}"
    assert httpx.get(f"{base}/readyz", trust_env=False).status_code == 200
    busy = open_transaction(d.port(), "in flight")
    idle = Wire(d.port())
    assert idle.cmd("EHLO idle.example").startswith("250")
    offset = d.log_size()
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    d.wait_log("draining", offset)

    # A session between transactions is told at once, as Postfix does.
    assert idle.reply().startswith("421 4.3.2 mx.test.example Service shutting down")
    assert idle.closed()
    # New connections are refused by the kernel; the API stays up to say it is not ready.
    wait_until(lambda: refused(d.port()), 5, "the listener to close")
    ready = httpx.get(f"{base}/readyz", trust_env=False)
    assert ready.status_code == 503 and "draining" in ready.json()["detail"]
    post = httpx.post(f"{base}/v1/messages", json={"from": SENDER, "to": ["x@dest.example"]}, trust_env=False)
    assert post.status_code == 503 and post.headers["content-type"].startswith("application/problem+json")
    assert d.proc is not None and d.proc.poll() is None  # still waiting for the open transaction

    busy.send(b"the second half\r\n.\r\n")
    reply = busy.reply()
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    assert busy.reply().startswith("421 4.3.2")  # and nothing more on this connection
    assert busy.closed()
    assert d.wait_exit(10) == 0
    assert time.monotonic() - started < 10  # it did not wait for the grace period
    (path,) = d.spooled("queued")  # durable, waiting for the next start
    assert path.stem == reply.rsplit(" ", 1)[1]
    assert read_message(path)[1].endswith(b"the first half\r\nthe second half\r\n")
    assert d.spooled("tmp") == []


def test_a_transaction_open_past_the_grace_period_is_cancelled_and_not_kept(daemon: Daemon) -> None:
    # base_config's drain_timeout is 2s
    busy = open_transaction(daemon.port(), "never finished")
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(15) == 0
    took = time.monotonic() - started
    assert 1.8 <= took < 7, took  # the grace period, then the cancellation (plus start-up jitter)
    assert busy.closed()
    with pytest.raises(ConnectionError):
        busy.reply()  # never a 250
    assert daemon.all_spooled() == {s: [] for s in daemon.all_spooled()}  # half a message is not kept
    events = [e["event"] for e in daemon.log_events()]
    assert "drain timeout: unfinished work was cancelled" in events


def test_a_second_sigterm_stops_at_once(
    config: dict[str, Any], daemon_factory: type[Daemon], tmp_path: Path
) -> None:
    config["server"]["drain_timeout"] = "60s"
    d = daemon_factory(tmp_path, config)
    d.start()
    busy = open_transaction(d.port(), "never finished")
    offset = d.log_size()
    d.signal(signal.SIGTERM)
    d.wait_log("draining", offset)
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait_exit(10) == 0
    assert time.monotonic() - started < 5
    assert busy.closed()
    assert d.spooled("queued") == []


async def test_event_streams_are_closed_going_away_and_do_not_hold_up_the_exit(
    config: dict[str, Any], daemon_factory: type[Daemon], tmp_path: Path
) -> None:
    config["server"]["drain_timeout"] = "30s"
    d = daemon_factory(tmp_path, config)
    d.start()
    async with open_websocket_url(f"ws://{config['http']['addr']}/v1/events") as ws:
        started = time.monotonic()
        d.signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
            await ws.get_message()
    reason = closed.value.reason
    assert reason is not None and reason.code == 1001
    assert await trio.to_thread.run_sync(d.wait_exit, 10) == 0
    assert time.monotonic() - started < 5


# ---- SIGTERM under load -----------------------------------------------------------------------------

WORKERS = 4
PER_WORKER = 50  # 200 messages in all: bounded, the machine is shared


class Load:
    """Senders over smtplib, each on one connection at a time, reconnecting until its messages are all
    tried or the daemon refuses connections. Every message ends in one outcome."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # token -> queued id or the upstream's reply
        self.outcomes: Counter[str] = Counter()
        self.other: list[str] = []  # anything a drain must never answer

    def record(self, token: str, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            if outcome == "acked":
                self.acked[token] = detail
            elif outcome == "other":
                self.other.append(f"{token}: {detail}")

    def run(self, worker: int) -> None:
        tokens = [f"load-w{worker}-m{i}" for i in range(PER_WORKER)]
        while tokens:
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
                    client.ehlo("load.example")
                    while tokens:
                        outcome, detail = self._one(client, tokens[0])
                        self.record(tokens.pop(0), outcome, detail)
                        if outcome != "acked":
                            break
            except ConnectionRefusedError:
                for token in tokens:  # the listener is closed: nothing more gets in
                    self.record(token, "refused")
                return
            except (smtplib.SMTPServerDisconnected, ConnectionError):
                # Closed under us (a connection accepted as the listener closed): the message was
                # never acknowledged.
                self.record(tokens.pop(0), "disconnected")

    def _one(self, client: smtplib.SMTP, token: str) -> tuple[str, str]:
        for command in (partial(client.mail, SENDER), partial(client.rcpt, "rcpt@example.net")):
            code, text = command()
            if code != 250:
                return ("421" if code == 421 else "other"), f"{code} {text.decode()}"
        try:
            code, text = client.data(content(token))
        except smtplib.SMTPDataError as exc:
            return ("421" if exc.smtp_code == 421 else "other"), str(exc)
        if code == 250:
            return "acked", text.decode()
        return ("421" if code == 421 else "other"), f"{code} {text.decode()}"


@pytest.mark.parametrize("cut_through", [True, False], ids=["cut-through", "queue-worker"])
def test_sigterm_during_a_load_run_loses_nothing(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    cut_through: bool,
) -> None:
    # Without cut-through a slow upstream keeps the queue worker's attempts in flight at the SIGTERM.
    mx = upstreams.add(MX1, name="mx1.example.net", data_delay=0 if cut_through else 0.3)
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    config["server"]["drain_timeout"] = "15s"
    d = run(tmp_path, config, daemon_factory, dns, upstreams, cut_through=cut_through)
    load = Load(d.port())
    threads = [threading.Thread(target=load.run, args=(i,), daemon=True) for i in range(WORKERS)]
    for t in threads:
        t.start()
    wait_until(lambda: len(load.acked) >= 40, 30, "40 messages acknowledged before the SIGTERM")
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.wait_exit(25)
    took = time.monotonic() - started
    for t in threads:
        t.join(30)
    assert rc == 0
    assert took < 15, f"the drain took {took:.1f}s, longer than drain_timeout"
    assert not load.other, load.other
    assert sum(load.outcomes.values()) == WORKERS * PER_WORKER
    assert load.outcomes["acked"] < WORKERS * PER_WORKER, "the SIGTERM came too late to prove anything"

    delivered = Counter(mx.subjects())
    spooled = spooled_subjects(d, "queued", "deferred")
    lost = [t for t in load.acked if not delivered[t] and t not in spooled]
    assert not lost, f"acknowledged but neither delivered nor spooled: {lost}"
    assert d.spooled("corrupt") == []
    (draining,) = [e for e in d.log_events() if e["event"] == "scheduler draining"]
    if not cut_through:  # the case this variant is for: the drain waited for attempts in flight
        assert draining["in_flight"] > 0
    print(  # the numbers behind the report (pytest -s)
        f"drain {took:.2f}s, attempts in flight {draining['in_flight']}; outcomes {dict(load.outcomes)}; "
        f"acked {len(load.acked)} = delivered {sum(1 for t in load.acked if delivered[t])}"
        f" + spooled {sum(1 for t in load.acked if t in spooled and not delivered[t])}"
    )

    # The next start delivers what the drain left in the spool, and the drain let every attempt in
    # flight finish and be filed: nothing is delivered twice.
    d.start()
    wait_until(
        lambda: all(t in mx.subjects() for t in load.acked), 30, "every acknowledged message delivered"
    )
    twice = [t for t, n in Counter(mx.subjects()).items() if n > 1]
    assert not twice, twice


def test_an_http_request_in_flight_gets_its_answer(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    mx = upstreams.add(MX1, name="mx1.example.net", data_delay=1.5)  # the POST waits on cut-through
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    config["server"]["drain_timeout"] = "20s"
    d = run(tmp_path, config, daemon_factory, dns, upstreams, cut_through=True, cut_through_timeout="10s")
    answers: list[httpx.Response] = []
    body = {"from": SENDER, "to": ["ann@example.net"], "subject": "posted", "text": "hi"}

    def submit() -> None:
        url = f"http://{config['http']['addr']}/v1/messages"
        answers.append(httpx.post(url, json=body, timeout=30, trust_env=False))

    poster = threading.Thread(target=submit)
    poster.start()
    wait_until(lambda: any("DATA" in c.verbs for c in mx.connections), 10, "the cut-through's DATA")
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    poster.join(20)
    assert d.wait_exit(20) == 0
    assert time.monotonic() - started < 10
    (answer,) = answers
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "delivered"
    assert mx.subjects() == ["posted"]
