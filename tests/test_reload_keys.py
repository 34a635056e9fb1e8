"""What a SIGHUP applies and what needs a restart (`hedwigpy.reload`), over parsed configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hedwigpy.config import Config, HostPort, parse_config
from hedwigpy.reload import effective, restart_needed

BASE = Path("/etc/hedwig")


def cfg(**sections: Any) -> Config:
    data: dict[str, Any] = {
        "server": {"hostname": "mx.example.com", "spool_dir": "/var/spool/hedwig"},
        "listeners": [
            {"name": "smtp", "addr": "127.0.0.1:2525"},
            {"name": "mx", "addr": "127.0.0.1:2526", "role": "ingress", "local_domains": ["example.com"]},
        ],
    }
    data.update(sections)
    return parse_config(data, BASE, {})


def test_the_same_file_needs_nothing_and_changes_nothing() -> None:
    assert restart_needed(cfg(), cfg()) == []
    assert effective(cfg(), cfg()) == cfg()


def test_reloadable_keys_apply_without_a_restart() -> None:
    old = cfg()
    new = cfg(
        server={"hostname": "mx2.example.com", "spool_dir": "/var/spool/hedwig", "drain_timeout": "5s"},
        limits={"max_connections": 7, "command_timeout": "1m"},
        routes=[{"recipient_domains": ["example.org"], "transport": "relay", "hosts": ["10.0.0.1"]}],
        filters=[{"type": "recipient_domain", "domains": ["bad.example"], "action": "deny"}],
        rate_limits={"per_client": 5},
        delivery={"cut_through": False, "port": 2500},
        queue={"retry_initial": "1m"},
    )
    assert restart_needed(old, new) == []
    assert effective(old, new) == new


def test_listener_policy_reloads_but_its_socket_does_not() -> None:
    old = cfg()
    new = cfg(
        listeners=[
            {"name": "smtp", "addr": "127.0.0.1:2600", "require_auth": True, "proxy_protocol": True},
            {"name": "mx", "addr": "127.0.0.1:2526", "role": "ingress", "local_domains": ["example.net"]},
        ]
    )
    assert restart_needed(old, new) == ["listeners[smtp].addr", "listeners[smtp].proxy_protocol"]
    kept = effective(old, new)
    smtp, mx = kept.listeners
    assert smtp.addr == HostPort("127.0.0.1", 2525) and not smtp.proxy_protocol  # the old socket
    assert smtp.require_auth  # the new policy
    assert mx.local_domains == ("example.net",)


def test_a_tls_mode_change_keeps_the_old_mode_and_its_certificate() -> None:
    old = cfg(
        listeners=[
            {"name": "smtp", "addr": "127.0.0.1:2525", "tls": "starttls", "cert": "a.pem", "key": "a.key"}
        ]
    )
    new = cfg(listeners=[{"name": "smtp", "addr": "127.0.0.1:2525"}])
    assert restart_needed(old, new) == ["listeners[smtp].tls"]
    (kept,) = effective(old, new).listeners
    assert (kept.tls, kept.cert, kept.key) == ("starttls", BASE / "a.pem", BASE / "a.key")


def test_a_new_certificate_for_the_same_mode_is_taken() -> None:
    old = cfg(
        listeners=[
            {"name": "smtp", "addr": "127.0.0.1:2525", "tls": "implicit", "cert": "a.pem", "key": "a.key"}
        ]
    )
    new = cfg(
        listeners=[
            {"name": "smtp", "addr": "127.0.0.1:2525", "tls": "implicit", "cert": "b.pem", "key": "b.key"}
        ]
    )
    assert restart_needed(old, new) == []
    assert effective(old, new).listeners[0].cert == BASE / "b.pem"


def test_adding_or_removing_a_listener_keeps_the_old_listeners() -> None:
    old = cfg()
    new = cfg(listeners=[{"name": "smtp", "addr": "127.0.0.1:2525", "require_auth": True}])
    assert restart_needed(old, new) == ["listeners"]
    assert effective(old, new).listeners == old.listeners


def test_restart_only_keys_are_named_and_keep_their_values() -> None:
    old = cfg()
    new = cfg(
        server={"hostname": "mx2.example.com", "spool_dir": "/srv/spool"},
        log={"level": "debug"},
        http={"addr": "127.0.0.1:9000"},
        dns={"nameservers": ["127.0.0.1:5353"]},
        delivery={"max_connections_per_host": 3, "idle_timeout": "5s", "max_messages_per_connection": 2},
        webhooks=[{"url": "https://hooks.example.com/", "secret": "s"}],
    )
    assert restart_needed(old, new) == [
        "server.spool_dir",
        "log",
        "http.addr",
        "dns.nameservers",
        "delivery.max_connections_per_host",
        "delivery.max_messages_per_connection",
        "delivery.idle_timeout",
        "webhooks",
    ]
    kept = effective(old, new)
    assert kept.server.spool_dir == old.server.spool_dir
    assert kept.server.hostname == "mx2.example.com"  # the rest of [server] applies
    assert (kept.log, kept.http, kept.dns, kept.webhooks) == (old.log, old.http, old.dns, old.webhooks)
    assert kept.delivery == old.delivery
    assert restart_needed(old, kept) == []
