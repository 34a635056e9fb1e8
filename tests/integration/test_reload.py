"""SIGHUP reloads hedwig.toml (issue 8): a new route changes where the next message goes while a
connection opened before the reload stays usable; users, API keys and TLS certificates change for new
sessions and requests; a file that does not load is refused with a log line naming the error, and the
daemon keeps serving with the old config."""

from __future__ import annotations

import signal
import smtplib
import ssl
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import trustme

from hedwigpy.auth import hash_password
from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import SENDER, content, queued_id, run, settle
from .upstream import Upstream, UpstreamPool, wait_until

pytestmark = pytest.mark.timeout(60)

A, B = "127.0.0.5", "127.0.0.6"


VERDICTS = ("reloaded", "reload refused; keeping the running config")


def reload(d: Daemon) -> dict[str, Any]:
    """Write `d.config`, SIGHUP, and return the daemon's verdict: its `reloaded` or refusal log event."""
    d.write_config()
    offset = d.log_size()
    d.signal(signal.SIGHUP)
    found: list[dict[str, Any]] = []

    def verdict() -> bool:
        found[:] = [e for e in d.log_events(offset) if e.get("event") in VERDICTS]
        return bool(found)

    wait_until(verdict, 10, "the reload's verdict in the log")
    return found[0]


def session(d: Daemon, host: str = "127.0.0.1") -> smtplib.SMTP:
    """A new SMTP session with the daemon, past EHLO."""
    client = smtplib.SMTP(host, d.port(), timeout=10)
    client.ehlo("client.example")
    return client


def send_on(client: smtplib.SMTP, subject: str) -> str:
    assert client.mail(SENDER)[0] == 250
    assert client.rcpt("ann@example.net")[0] == 250
    code, text = client.data(content(subject))
    assert code == 250, text
    return queued_id(text)


def relay_to(upstream: Upstream) -> list[dict[str, Any]]:
    return [{"transport": "relay", "hosts": [upstream.address], "tls": "none"}]


@pytest.fixture
def two_upstreams(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> tuple[Daemon, Upstream, Upstream]:
    a = upstreams.add(A, name="a.example")
    b = upstreams.add(B, name="b.example")
    upstreams.start()
    d = run(tmp_path, config, daemon_factory, dns, upstreams, routes=relay_to(a))
    return d, a, b


def test_a_new_route_applies_to_the_next_message_on_a_connection_opened_before(
    two_upstreams: tuple[Daemon, Upstream, Upstream],
) -> None:
    d, a, b = two_upstreams
    with session(d) as client:
        assert settle(d, send_on(client, "before")) == "gone"
        assert a.subjects() == ["before"]

        d.config["routes"] = relay_to(b)
        assert reload(d)["event"] == "reloaded"

        assert settle(d, send_on(client, "after, same connection")) == "gone"
        assert client.noop()[0] == 250
    with session(d) as client:
        assert settle(d, send_on(client, "after, new connection")) == "gone"
    assert a.subjects() == ["before"]
    assert b.subjects() == ["after, same connection", "after, new connection"]
    assert d.stop() == 0


def test_a_broken_file_is_refused_and_the_old_config_keeps_serving(
    two_upstreams: tuple[Daemon, Upstream, Upstream],
) -> None:
    d, a, b = two_upstreams
    with session(d) as client:
        d.config_path.write_text("[server\nhostname = ")  # a TOML syntax error
        offset = d.log_size()
        d.signal(signal.SIGHUP)
        refusal = d.wait_log(VERDICTS[1], offset)
        assert refusal["errors"][0].startswith("TOML syntax error")
        assert settle(d, send_on(client, "after a syntax error")) == "gone"

        # Valid TOML, wrong meaning: each error is named with its key path.
        d.config["routes"] = [{"transport": "relay", "hosts": [b.address], "strategy": "nowhere.at_all:pick"}]
        d.config["limits"] = {"max_connections": "many"}
        refusal = reload(d)
        assert refusal["event"] == "reload refused; keeping the running config"
        assert any(e.startswith("limits.max_connections:") for e in refusal["errors"]), refusal
        d.config["limits"] = {}
        refusal = reload(d)  # a strategy that does not import, as `config check` finds it
        assert refusal["event"] == "reload refused; keeping the running config"
        assert any("routes[0].strategy" in e for e in refusal["errors"]), refusal

        assert settle(d, send_on(client, "after a bad route")) == "gone"
    assert a.subjects() == ["after a syntax error", "after a bad route"]
    assert b.subjects() == []
    assert d.stop() == 0


def test_users_and_api_keys_change_at_once(
    tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]
) -> None:
    config["users"] = [{"name": "old", "password_hash": hash_password("old-pw", ln=4)}]
    config["api_keys"] = [{"name": "old", "key_hash": hash_password("old-key", ln=4)}]
    d = daemon_factory(tmp_path, config)
    d.start()
    base = f"http://{config['http']['addr']}"

    def stats(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.get(f"{base}/v1/queue/stats", headers=headers, trust_env=False).status_code

    def login(user: str, password: str) -> int:
        with smtplib.SMTP("127.0.0.1", d.port(), timeout=10) as client:
            client.ehlo("client.example")
            try:
                return client.login(user, password)[0]
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code

    assert (stats("old-key"), stats("new-key")) == (200, 401)
    assert (login("old", "old-pw"), login("new", "new-pw")) == (235, 535)
    open_before = smtplib.SMTP("127.0.0.1", d.port(), timeout=10)
    open_before.ehlo("client.example")

    d.config["users"] = [{"name": "new", "password_hash": hash_password("new-pw", ln=4)}]
    d.config["api_keys"] = [{"name": "new", "key_hash": hash_password("new-key", ln=4)}]
    d.config["http"] = {"addr": "127.0.0.1:1"}  # needs a restart: named, and the old address kept
    offset = d.log_size()
    assert reload(d)["event"] == "reloaded"
    assert d.wait_log("reload: these keys need a restart and keep their old values", offset)["keys"] == [
        "http.addr"
    ]

    assert (stats("old-key"), stats("new-key")) == (401, 200)  # a key verified before is forgotten too
    assert (login("old", "old-pw"), login("new", "new-pw")) == (535, 235)
    assert open_before.login("old", "old-pw")[0] == 235  # a session keeps the config it started with
    open_before.close()
    assert d.stop() == 0


def test_a_new_certificate_is_used_by_new_connections(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    certfiles: tuple[Path, Path],
    ca: trustme.CA,
) -> None:
    cert, key = certfiles
    config["listeners"][0].update({"tls": "starttls", "cert": str(cert), "key": str(key)})
    d = daemon_factory(tmp_path, config)
    d.start()
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    def names(client: smtplib.SMTP) -> list[str]:
        client.starttls(context=ctx)
        assert isinstance(client.sock, ssl.SSLSocket)
        peer = client.sock.getpeercert()
        assert peer is not None
        sans = cast(tuple[tuple[str, str], ...], peer["subjectAltName"])
        return [value for kind, value in sans if kind == "DNS"]

    open_before = session(d, "localhost")
    assert "mx.test.example" in names(session(d, "localhost"))

    renewed = ca.issue_cert("localhost", "renewed.test.example")
    renewed.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "renewed.pem"))
    renewed.private_key_pem.write_to_path(str(tmp_path / "renewed.key"))
    d.config["listeners"][0].update(
        {"cert": str(tmp_path / "renewed.pem"), "key": str(tmp_path / "renewed.key")}
    )
    assert reload(d)["event"] == "reloaded"
    assert "renewed.test.example" in names(session(d, "localhost"))
    assert "mx.test.example" in names(open_before)  # a session keeps the context it started with

    d.config["listeners"][0]["cert"] = str(tmp_path / "missing.pem")
    refusal = reload(d)
    assert any(e.startswith("listeners[0].cert") for e in refusal["errors"]), refusal
    assert "renewed.test.example" in names(session(d, "localhost"))
    assert d.stop() == 0


def test_limits_apply_to_new_sessions_and_open_ones_keep_theirs(
    tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]
) -> None:
    config["limits"] = {"max_message_size": 100_000}
    d = daemon_factory(tmp_path, config)
    d.start()

    def size(client: smtplib.SMTP) -> str:
        client.ehlo("client.example")
        return client.esmtp_features["size"]

    open_before = smtplib.SMTP("127.0.0.1", d.port(), timeout=10)
    assert size(open_before) == "100000"
    d.config["limits"] = {"max_message_size": 200_000}
    assert reload(d)["event"] == "reloaded"
    with smtplib.SMTP("127.0.0.1", d.port(), timeout=10) as client:
        assert size(client) == "200000"
    assert size(open_before) == "100000"
    open_before.close()
    assert d.stop() == 0
