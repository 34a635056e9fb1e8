"""Routes (issue 3): which mail goes to which smarthost, AUTH to it after verified TLS, and the strategies
that order its hosts — failover, round_robin, random and an operator's own `module:function`.

The set-up is test_delivery.py's: the real daemon, a loopback DNS server, aiosmtpd upstreams on 127.0.0.N
sharing one port. Smarthosts sit on 127.0.0.5 and up; example.net's MX (for the "mx" transport) on .2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trustme

from hedwigpy.auth import hash_password
from tests.dns_server import DnsServer

from .daemon import Daemon, free_port
from .outbound import (
    MX1,
    SENDER,
    Host,
    configure,
    events,
    launch,
    publish,
    read_status,
    recipient,
    run,
    send,
    send_many,
    settle,
    settle_all,
    start,
)
from .upstream import Upstream, UpstreamPool

pytestmark = pytest.mark.timeout(60)

R1, R2, R3, R4, R5 = "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8", "127.0.0.9"
SMARTHOST = "smarthost.example"
CREDENTIALS = ("apikey", "s3cret")


def relay(*hosts: str, **options: Any) -> dict[str, Any]:
    return {"transport": "relay", "hosts": list(hosts), **options}


# ---- AUTH and TLS to a smarthost -----------------------------------------------------------------------


def smarthost_setup(
    tmp_path: Path, dns: DnsServer, upstreams: UpstreamPool, ca: trustme.CA, **upstream: Any
) -> tuple[Upstream, dict[str, str]]:
    """The smarthost by name (A record → R1) and the environment making the daemon trust `ca`."""
    dns.add_a(SMARTHOST, R1)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    options: dict[str, Any] = {"starttls": "offered", "cert": ca.issue_cert(SMARTHOST), **upstream}
    host = upstreams.add(R1, name=SMARTHOST, credentials=CREDENTIALS, **options)
    return host, {"SSL_CERT_FILE": str(ca_file)}


def test_relay_authenticates_after_verified_tls(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    ca: trustme.CA,
) -> None:
    smarthost, env = smarthost_setup(tmp_path, dns, upstreams, ca)
    upstreams.start()
    route = relay(
        upstreams.address(SMARTHOST), username=CREDENTIALS[0], password=CREDENTIALS[1], tls="required"
    )
    d = run(tmp_path, config, daemon_factory, dns, upstreams, routes=[route], env=env)
    rcpts = ["ann@example.net", "bob@example.org", "cid@example.com"]
    msg_id = send(d, rcpts, "via smarthost")
    assert settle(d, msg_id) == "gone"

    [conn] = smarthost.connections
    [auth] = conn.auths
    assert auth.mechanism in ("PLAIN", "LOGIN")
    assert (auth.login, auth.password) == CREDENTIALS and auth.ok
    assert auth.tls, "credentials sent before TLS"
    assert conn.verbs.index("STARTTLS") < conn.verbs.index("AUTH") < conn.verbs.index("MAIL")
    [txn] = conn.transactions  # a relay takes every domain in one transaction
    assert txn.tls
    assert sorted(txn.rcpt_tos) == sorted(rcpts)
    assert txn.mail_from == SENDER
    for e in events(d, "delivered", msg_id):
        assert e["host"] == Host(SMARTHOST, R1)


@pytest.mark.parametrize("problem", ["certificate for another name", "unknown CA", "STARTTLS not offered"])
def test_relay_with_tls_required_never_sends_credentials_unprotected(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    ca: trustme.CA,
    problem: str,
) -> None:
    options: dict[str, Any] = {}
    if problem == "certificate for another name":
        options["cert"] = ca.issue_cert("other.example")
    elif problem == "STARTTLS not offered":
        # and AUTH offered in plaintext: a downgrade the daemon must not fall for
        options.update(starttls="none", cert=None, auth_require_tls=False)
    smarthost, env = smarthost_setup(tmp_path, dns, upstreams, ca, **options)
    if problem == "unknown CA":
        env = {}
    upstreams.start()
    route = relay(
        upstreams.address(SMARTHOST), username=CREDENTIALS[0], password=CREDENTIALS[1], tls="required"
    )
    d = run(tmp_path, config, daemon_factory, dns, upstreams, routes=[route], env=env)
    msg_id = send(d, ["ann@example.net"], problem)
    assert settle(d, msg_id) == "deferred"
    assert smarthost.connections, "the smarthost was never tried"
    assert smarthost.count("AUTH") == 0 and all(not c.auths for c in smarthost.connections)
    assert smarthost.count("MAIL") == 0
    assert b"s3cret" not in b"".join(bytes(c.raw) for c in smarthost.connections)
    d.stop()
    r = recipient(read_status(d, msg_id), "ann@example.net")
    assert r.state == "pending"
    assert r.last is not None and r.last.host == Host(SMARTHOST, R1)
    if problem == "STARTTLS not offered":
        assert (r.last.code, r.last.enhanced) == (451, "4.7.4")


# ---- which route -------------------------------------------------------------------------------------


def test_first_matching_route_wins(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    publish(dns, "partner.example", (10, "mx1.example.net", MX1))  # what the partner route bypasses
    mx = upstreams.add(MX1, name="mx1.example.net")
    by_rcpt = upstreams.add(R1, name="by-recipient")
    by_sender = upstreams.add(R2, name="by-sender")
    by_listener = upstreams.add(R3, name="by-listener")
    by_user = upstreams.add(R4, name="by-user")
    unreachable = upstreams.add(R5, name="after-catch-all")
    upstreams.start()
    config["listeners"].append(
        {
            "name": "second",
            "addr": f"127.0.0.1:{free_port()}",
            "role": "submission",
            "tls": "none",
            "trusted_networks": ["127.0.0.0/8"],
        }
    )
    config["users"] = [{"name": "app", "password_hash": hash_password("app-password", ln=10)}]
    routes = [
        relay(by_rcpt.address, recipient_domains=["partner.example"], tls="none"),
        relay(by_sender.address, sender_domains=["billing.example"], tls="none"),
        relay(by_listener.address, listeners=["second"], tls="none"),
        relay(by_user.address, users=["app"], tls="none"),
        {"transport": "mx"},  # matches everything
        relay(unreachable.address, tls="none"),
    ]
    configure(config, dns, upstreams, routes=routes)
    d = start(daemon_factory, tmp_path, config)
    ids = [
        send(d, ["x@Partner.EXAMPLE"], "recipient domain"),  # domains match case-insensitively
        send(d, ["y@example.net"], "sender domain", sender="invoices@billing.example"),
        send(d, ["z@partner.example"], "recipient route first", sender="invoices@billing.example"),
        send(d, ["w@example.net"], "listener", listener="second"),
        send(d, ["v@example.net"], "user", login=("app", "app-password")),
        send(d, ["u@example.net"], "no route matches: mx"),
        send(d, ["s@partner.example", "t@example.net"], "split"),
    ]
    assert set(settle_all(d, ids).values()) == {"gone"}
    assert sorted(by_rcpt.subjects()) == ["recipient domain", "recipient route first", "split"]
    assert by_sender.subjects() == ["sender domain"]
    assert by_listener.subjects() == ["listener"]
    assert by_user.subjects() == ["user"]
    assert sorted(mx.subjects()) == ["no route matches: mx", "split"]
    assert unreachable.connections == []
    [split] = [t for t in by_rcpt.transactions if t.subject == "split"]
    assert split.rcpt_tos == ["s@partner.example"]
    [split] = [t for t in mx.transactions if t.subject == "split"]
    assert split.rcpt_tos == ["t@example.net"]


def test_relay_takes_every_domain_in_one_transaction(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx = upstreams.add(MX1, name="mx1.example.net")
    smarthost = upstreams.add(R1, name="smarthost")
    upstreams.start()
    route = relay(smarthost.address, recipient_domains=["a.example", "b.example", "c.example"], tls="none")
    configure(config, dns, upstreams, routes=[route])
    d = start(daemon_factory, tmp_path, config)
    rcpts = [
        "a1@a.example",
        "n1@example.net",
        "b1@b.example",
        "a2@a.example",
        "c1@c.example",
        "n2@example.net",
    ]
    assert settle(d, send(d, rcpts, "mixed domains")) == "gone"
    [txn] = smarthost.transactions
    assert sorted(txn.rcpt_tos) == ["a1@a.example", "a2@a.example", "b1@b.example", "c1@c.example"]
    [txn] = mx.transactions
    assert sorted(txn.rcpt_tos) == ["n1@example.net", "n2@example.net"]
    assert smarthost.count("MAIL") == 1 and mx.count("MAIL") == 1


# ---- strategies ----------------------------------------------------------------------------------------


def two_smarthosts(
    tmp_path: Path,
    config: dict[str, Any],
    factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    strategy: str,
    env: dict[str, str] | None = None,
) -> tuple[Daemon, Upstream, Upstream]:
    first = upstreams.add(R1, name="first")
    second = upstreams.add(R2, name="second")
    upstreams.start()
    route = relay(first.address, second.address, strategy=strategy, tls="none")
    configure(config, dns, upstreams, routes=[route])
    return start(factory, tmp_path, config, env), first, second


def one_by_one(d: Daemon, subjects: list[str]) -> None:
    for subject in subjects:
        assert settle(d, send(d, ["ann@example.net"], subject)) == "gone", subject


def test_failover_uses_the_first_host_while_it_is_up(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    d, first, second = two_smarthosts(tmp_path, config, daemon_factory, dns, upstreams, "failover")
    one_by_one(d, ["f0", "f1", "f2"])
    assert first.subjects() == ["f0", "f1", "f2"] and second.connections == []
    first.stop()  # its pooled connection dies with it; new ones are refused
    one_by_one(d, ["f3"])
    assert second.subjects() == ["f3"]
    first.start()
    one_by_one(d, ["f4"])
    assert first.subjects() == ["f0", "f1", "f2", "f4"]  # back up: first again
    second.stop()
    first.stop()
    msg_id = send(d, ["ann@example.net"], "f5")
    assert settle(d, msg_id) == "deferred"
    d.stop()
    r = recipient(read_status(d, msg_id), "ann@example.net")
    assert r.state == "pending" and r.last is not None


def test_round_robin_alternates_hosts(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    d, first, second = two_smarthosts(tmp_path, config, daemon_factory, dns, upstreams, "round_robin")
    subjects = [f"rr{i}" for i in range(4)]
    one_by_one(d, subjects)
    used = ["first" if s in first.subjects() else "second" for s in subjects]
    assert all(s in first.subjects() + second.subjects() for s in subjects)
    assert used[0] != used[1] and used[1] != used[2] and used[2] != used[3], used


def test_random_uses_both_hosts(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    d, first, second = two_smarthosts(tmp_path, config, daemon_factory, dns, upstreams, "random")
    ids = send_many(d, [(["ann@example.net"], f"rand{i}", None) for i in range(30)])
    assert set(settle_all(d, ids).values()) == {"gone"}
    # all 30 on one host: probability 2 * 2**-30
    assert len(first.transactions) >= 1 and len(second.transactions) >= 1
    assert len(first.transactions) + len(second.transactions) == 30


STRATEGY_MODULE = '''
"""A custom strategy for hedwigpy's tests: the hosts in reverse, each call logged."""

import json
import os


def reverse(envelope, hosts):
    with open(os.environ["HEDWIG_TEST_STRATEGY_LOG"], "a", encoding="utf-8") as f:
        call = {"sender": envelope.sender, "recipients": list(envelope.recipients), "hosts": list(hosts)}
        f.write(json.dumps(call) + "\\n")
    return list(reversed(hosts))
'''


def strategy_env(tmp_path: Path) -> dict[str, str]:
    modules = tmp_path / "strategies"
    modules.mkdir()
    (modules / "hedwig_test_strategy.py").write_text(textwrap.dedent(STRATEGY_MODULE))
    return {"PYTHONPATH": str(modules), "HEDWIG_TEST_STRATEGY_LOG": str(tmp_path / "strategy-calls.jsonl")}


def test_custom_strategy_orders_the_hosts(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    env = strategy_env(tmp_path)
    d, first, second = two_smarthosts(
        tmp_path, config, daemon_factory, dns, upstreams, "hedwig_test_strategy:reverse", env
    )
    one_by_one(d, ["custom 0", "custom 1"])
    assert second.subjects() == ["custom 0", "custom 1"]
    assert first.connections == []
    calls = [json.loads(line) for line in Path(env["HEDWIG_TEST_STRATEGY_LOG"]).read_text().splitlines()]
    assert calls, "the strategy was never called"
    for call in calls:
        assert call == {
            "sender": SENDER,
            "recipients": ["ann@example.net"],
            "hosts": [first.address, second.address],  # as written in the config
        }


@pytest.mark.parametrize("strategy", ["no_such_module_hedwig:pick", "hedwig_test_strategy:no_such_function"])
def test_a_strategy_that_does_not_import_is_a_config_error(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    strategy: str,
) -> None:
    env = strategy_env(tmp_path)
    upstreams.start()
    routes = [
        relay(upstreams.address(R1), recipient_domains=["fine.example"], tls="none"),
        relay(upstreams.address(R1), upstreams.address(R2), strategy=strategy, tls="none"),
    ]
    configure(config, dns, upstreams, routes=routes)
    d = daemon_factory(tmp_path, config)
    d.config_path.write_text(tomli_w.dumps(config))
    check = subprocess.run(
        [sys.executable, "-m", "hedwigpy", "config", "check", "-c", str(d.config_path)],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 1, check
    assert "routes[1].strategy" in check.stdout + check.stderr, check

    with pytest.raises(RuntimeError, match="daemon exited"):
        launch(d, env)
    assert d.proc is not None and d.proc.returncode not in (0, None)
    log = d.log_text()
    assert "routes[1].strategy" in log, log
    assert strategy.split(":")[0] in log, log
