"""Helpers for outbound delivery tests: point a daemon's config at a loopback DNS server and test upstreams,
send mail into it with smtplib, and read back what happened in its spool and log."""

from __future__ import annotations

import os
import re
import smtplib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from hedwigpy.storage import DeliveryStatus, FilesystemStorage, RecipientStatus
from hedwigpy.storage._status import decode_status
from tests.dns_server import DnsServer

from .daemon import Daemon
from .upstream import UpstreamPool, wait_until

SENDER = "sender@src.example"
_QUEUED = re.compile(r"queued as ([0-9a-f]+)")


def configure(
    config: dict[str, Any],
    dns: DnsServer,
    pool: UpstreamPool,
    *,
    routes: Sequence[Mapping[str, Any]] = (),
    **delivery: Any,
) -> dict[str, Any]:
    """Deliver through `dns` to upstreams on `pool.port`, store-and-forward;
    `routes` replace the base config's."""
    config["dns"] = {"nameservers": [dns.address]}
    config["delivery"] = {
        "port": pool.port,
        "cut_through": False,
        "connect_timeout": "5s",
        **delivery,
    }
    config["routes"] = [dict(r) for r in routes]
    return config


def start(
    factory: type[Daemon], tmp: Path, config: dict[str, Any], env: Mapping[str, str] | None = None
) -> Daemon:
    """Start a daemon with `env` added to its environment."""
    daemon = factory(tmp, config)
    launch(daemon, env)
    return daemon


def launch(daemon: Daemon, env: Mapping[str, str] | None = None) -> None:
    """`daemon.start()` with `env` added to the daemon's environment (Daemon.start copies os.environ)."""
    with mock.patch.dict(os.environ, dict(env or {})):
        daemon.start()


def content(
    subject: str, to: Iterable[str] = ("rcpt@example.net",), *, headers: str = "", body: str = ""
) -> bytes:
    """A small RFC 5322 message whose Subject (the test's token for it) is `subject`."""
    lines = [
        f"From: {SENDER}",
        f"To: {', '.join(to)}",
        f"Subject: {subject}",
        f"Message-ID: <{subject.replace(' ', '.')}@src.example>",
    ]
    head = "\r\n".join(lines) + "\r\n" + headers
    return (head + "\r\n" + (body or f"This is {subject}.\r\n")).encode()


def queued_id(text: bytes | str) -> str:
    reply = text.decode() if isinstance(text, bytes) else text
    match = _QUEUED.search(reply)
    assert match, f"no id in {reply!r}"
    return match.group(1)


def send(
    daemon: Daemon,
    recipients: Sequence[str],
    subject: str,
    *,
    sender: str = SENDER,
    data: bytes | None = None,
    mail_options: Sequence[str] = (),
    listener: str | None = None,
    login: tuple[str, str] | None = None,
) -> str:
    """One message into the daemon over SMTP; the spool id it was queued as."""
    messages = [(recipients, subject, data)]
    return send_many(
        daemon, messages, sender=sender, mail_options=mail_options, listener=listener, login=login
    )[0]


def send_many(
    daemon: Daemon,
    messages: Sequence[tuple[Sequence[str], str, bytes | None]],
    *,
    sender: str = SENDER,
    mail_options: Sequence[str] = (),
    listener: str | None = None,
    login: tuple[str, str] | None = None,
) -> list[str]:
    """Several messages over one SMTP connection, as fast as the daemon accepts them; their ids.

    `listener` names the daemon's listener to use (default: the first); `login` authenticates first.
    """
    ids: list[str] = []
    with smtplib.SMTP("127.0.0.1", daemon.port(listener), timeout=10) as client:
        client.ehlo("client.example")
        if login is not None:
            client.login(*login)
        for recipients, subject, data in messages:
            code, text = client.mail(sender, list(mail_options))
            assert code == 250, text
            for rcpt in recipients:
                code, text = client.rcpt(rcpt)
                assert code == 250, (rcpt, text)
            code, text = client.data(data if data is not None else content(subject, recipients))
            assert code == 250, text
            ids.append(queued_id(text))
    return ids


def where(daemon: Daemon, message_id: str) -> str:
    """The spool directory holding the message, or "gone" (every recipient delivered)."""
    for state in ("tmp", "queued", "deferred", "held", "bounced", "corrupt"):
        if (daemon.spool / state / f"{message_id}.msg").exists():
            return state
    return "gone"


def settle(daemon: Daemon, message_id: str, timeout: float = 15.0) -> str:
    """Wait for the delivery attempt of a message to end; where it ended up (see `where`).

    A delivered message's status file goes after its data file, so "gone" also waits for that.
    """
    wait_until(
        lambda: where(daemon, message_id) not in ("tmp", "queued"),
        timeout,
        f"message {message_id} to leave queued/ (daemon log:\n{daemon.log_text()[-3000:]})",
    )
    state = where(daemon, message_id)
    if state == "gone":
        status = status_path(daemon, message_id)
        wait_until(lambda: not status.exists(), 5.0, f"{status} to be removed")
    return state


def settle_all(daemon: Daemon, ids: Iterable[str], timeout: float = 20.0) -> dict[str, str]:
    return {i: settle(daemon, i, timeout) for i in ids}


def status_path(daemon: Daemon, message_id: str) -> Path:
    return FilesystemStorage(daemon.spool).status_path(message_id)


def read_status(daemon: Daemon, message_id: str) -> DeliveryStatus:
    """The message's status file (read it after `daemon.stop()`: the attempt is then surely saved)."""
    return decode_status(status_path(daemon, message_id).read_bytes())


def recipient(status: DeliveryStatus, address: str) -> RecipientStatus:
    for r in status.recipients:
        if r.address == address:
            return r
    raise AssertionError(f"{address} not in {status}")


def events(daemon: Daemon, kind: str, message_id: str | None = None) -> list[dict[str, Any]]:
    """The daemon's log events named `kind` (delivered, deferred, failed...), of one message if given."""
    return [
        e
        for e in daemon.log_events()
        if e.get("event") == kind and (message_id is None or e.get("id") == message_id)
    ]


class Host:
    """Equal to the daemon's name for a host in status files and logs: `name[ip]`, or `name[ip]:port`
    (Postfix's form, which the daemon uses whenever the port is not 25, as it never is in these tests)."""

    def __init__(self, name: str, ip: str) -> None:
        self.name, self.ip = name, ip
        self._pattern = re.compile(rf"{re.escape(name)}\[{re.escape(ip)}\](?::[0-9]+)?")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str | Host) and (
            self._pattern.fullmatch(other) is not None if isinstance(other, str) else str(other) == str(self)
        )

    def __hash__(self) -> int:
        return hash(str(self))

    def __str__(self) -> str:
        return f"{self.name}[{self.ip}]"

    __repr__ = __str__


# ---- the usual test topology: example.net's MX hosts on 127.0.0.2, .3, ... -----------------------------

MX1, MX2, MX3 = "127.0.0.2", "127.0.0.3", "127.0.0.4"
HOST1 = Host("mx1.example.net", MX1)
HOST2 = Host("mx2.example.net", MX2)


def publish(dns: DnsServer, domain: str, *mxs: tuple[int, str, str]) -> None:
    """MX records of `domain` as (preference, host name, IPv4), with the hosts' A records."""
    dns.add_mx(domain, [(pref, name) for pref, name, _ in mxs])
    for _, name, ip in mxs:
        dns.add_a(name, ip)


def two_mx(dns: DnsServer, pref1: int = 10, pref2: int = 20) -> None:
    publish(dns, "example.net", (pref1, "mx1.example.net", MX1), (pref2, "mx2.example.net", MX2))


def run(
    tmp_path: Path,
    config: dict[str, Any],
    factory: type[Daemon],
    dns: DnsServer,
    pool: UpstreamPool,
    *,
    routes: Sequence[Mapping[str, Any]] = (),
    env: Mapping[str, str] | None = None,
    **delivery: Any,
) -> Daemon:
    """Start the pool's upstreams, then a daemon delivering through them."""
    pool.start()
    configure(config, dns, pool, routes=routes, **delivery)
    return start(factory, tmp_path, config, env)
