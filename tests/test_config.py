"""hedwig.toml loading: defaults, conversions, every validation error with its key path, the example."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from hedwigpy.config import (
    ApiKeyConfig,
    Config,
    ConfigError,
    DeliveryConfig,
    DkimKeyConfig,
    DnsConfig,
    FilterConfig,
    HostPort,
    HttpConfig,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    QueueConfig,
    RateLimitsConfig,
    RouteConfig,
    ServerConfig,
    UserConfig,
    load_config,
    parse_config,
)

REPO = Path(__file__).resolve().parents[1]
BASE = Path("/etc/hedwig")
LISTENER = {"name": "smtp", "addr": "127.0.0.1:2525"}


def parse(data: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return parse_config(data, BASE, env or {})


def errors_of(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data, env)
    return info.value.errors


def only_error(data: dict[str, Any], env: dict[str, str] | None = None) -> str:
    errors = errors_of(data, env)
    assert len(errors) == 1, errors
    return errors[0]


# --- defaults ------------------------------------------------------------------------------------------


def test_empty_document_gives_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "mx1.example.net")
    c = parse({})
    assert c.server == ServerConfig(hostname="mx1.example.net", spool_dir=BASE / "var/spool")
    assert c.log == LogConfig(level="info", format="text")
    assert c.listeners == (
        ListenerConfig(
            name="smtp",
            addr=HostPort("127.0.0.1", 2525),
            role="submission",
            tls="none",
            cert=None,
            key=None,
            require_auth=False,
            trusted_networks=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")),
            local_domains=(),
            proxy_protocol=False,
            greet_pause=0.0,
        ),
    )
    assert c.users == () and c.api_keys == () and c.routes == () and c.filters == ()
    assert c.limits == LimitsConfig(
        max_message_size=25 * 1024 * 1024,
        max_recipients=1000,
        max_connections=1000,
        max_connections_per_ip=50,
        command_timeout=300.0,
        data_timeout=600.0,
        max_errors=10,
        max_hops=50,
        queue_minfree=0,
        auth_failure_delay=1.0,
    )
    assert c.http == HttpConfig(addr=HostPort("127.0.0.1", 8025))
    assert c.delivery == DeliveryConfig(
        port=25,
        helo_hostname="",
        tls="opportunistic",
        connect_timeout=30.0,
        cut_through=True,
        cut_through_timeout=20.0,
        max_connections_per_host=10,
        max_messages_per_connection=100,
        idle_timeout=60.0,
    )
    assert c.dns == DnsConfig(nameservers=())
    assert c.queue == QueueConfig(
        retry_initial=60.0,
        retry_factor=2.0,
        retry_max=4 * 3600.0,
        retry_jitter=0.2,
        max_lifetime=5 * 86400.0,
        bounced_retention=7 * 86400.0,
    )
    assert c.dkim.keys == ()
    assert c.rate_limits.per_domain == 0 and c.rate_limits.per_client == 0
    assert dict(c.rate_limits.domains) == {}
    assert c.source_path is None
    assert c.effective_helo == "mx1.example.net"


def test_dataclass_defaults_match_parsed_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code that builds a Config by hand (tests, embedding) gets the same defaults as an empty file."""
    monkeypatch.setattr(socket, "getfqdn", lambda: "mx1.example.net")
    c = parse({})
    assert Config(server=c.server) == c
    assert ServerConfig().hostname == "mx1.example.net"


def test_unusable_fqdn_falls_back_to_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "not a hostname")
    assert parse({}).server.hostname == "localhost"


def test_explicit_empty_listeners_means_no_smtp() -> None:
    assert parse({"listeners": []}).listeners == ()


def test_effective_helo_prefers_delivery_helo_hostname() -> None:
    c = parse({"server": {"hostname": "mx.example.com"}, "delivery": {"helo_hostname": "out.example.com"}})
    assert c.effective_helo == "out.example.com"
    assert parse({"server": {"hostname": "mx.example.com"}}).effective_helo == "mx.example.com"


# --- a full document -----------------------------------------------------------------------------------

FULL: dict[str, Any] = {
    "server": {"hostname": "mail.example.com", "spool_dir": "/var/spool/hedwig"},
    "log": {"level": "warning", "format": "json"},
    "listeners": [
        {
            "name": "relay",
            "addr": "[::1]:2525",
            "role": "ingress",
            "tls": "starttls",
            "cert": "tls/cert.pem",
            "key": "/abs/key.pem",
            "require_auth": True,
            "trusted_networks": ["10.1.2.3/8", "192.0.2.1"],
            "local_domains": ["Example.COM."],
            "proxy_protocol": True,
            "greet_pause": "2s",
        }
    ],
    "users": [{"name": "app", "password_hash": "h1"}],
    "limits": {
        "max_message_size": "10MB",
        "max_recipients": 5,
        "max_connections": 6,
        "max_connections_per_ip": 7,
        "command_timeout": "1m",
        "data_timeout": "2m",
        "max_errors": 3,
        "max_hops": 30,
        "queue_minfree": "1GiB",
        "auth_failure_delay": "500ms",
    },
    "http": {"addr": "0.0.0.0:8080"},
    "api_keys": [{"name": "billing", "key_hash": "h2"}],
    "delivery": {
        "port": 2526,
        "helo_hostname": "out.example.com",
        "tls": "required",
        "connect_timeout": "10s",
        "cut_through": False,
        "cut_through_timeout": "5s",
        "max_connections_per_host": 2,
        "max_messages_per_connection": 3,
        "idle_timeout": "0s",
    },
    "dns": {"nameservers": ["127.0.0.1:5353", "[::1]", "192.0.2.53"]},
    "queue": {
        "retry_initial": "30s",
        "retry_factor": 1.5,
        "retry_max": "1h",
        "retry_jitter": 0,
        "max_lifetime": "2d",
        "bounced_retention": "1d",
    },
    "dkim": {"keys": [{"domain": "Example.com", "selector": "s2026", "private_key": "keys/ex.pem"}]},
    "routes": [
        {
            "recipient_domains": ["Example.ORG"],
            "sender_domains": ["example.com"],
            "users": ["app", "billing"],
            "listeners": ["relay"],
            "transport": "relay",
            "hosts": ["smtp.provider1.com:587", "smtp.provider2.com"],
            "strategy": "mypkg.routing:pick",
            "username": "apikey",
            "password": "secret",
            "tls": "required",
        },
        {"recipient_domains": ["bank.example"], "tls": "required"},
    ],
    "filters": [{"type": "recipient_domain", "domains": ["Blocked.example"], "action": "deny"}],
    "rate_limits": {"per_domain": 100, "domains": {"GMail.com": 600}, "per_client": 20},
}


def test_full_document_converts_every_value() -> None:
    c = parse(FULL)
    assert c.server == ServerConfig("mail.example.com", Path("/var/spool/hedwig"))
    assert c.log == LogConfig("warning", "json")
    (lst,) = c.listeners
    assert lst == ListenerConfig(
        name="relay",
        addr=HostPort("::1", 2525),
        role="ingress",
        tls="starttls",
        cert=BASE / "tls/cert.pem",
        key=Path("/abs/key.pem"),
        require_auth=True,
        trusted_networks=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1/32")),
        local_domains=("example.com",),
        proxy_protocol=True,
        greet_pause=2.0,
    )
    assert c.users == (UserConfig("app", "h1"),)
    assert c.limits == LimitsConfig(10_000_000, 5, 6, 7, 60.0, 120.0, 3, 30, 1024**3, 0.5)
    assert c.http == HttpConfig(HostPort("0.0.0.0", 8080))
    assert c.api_keys == (ApiKeyConfig("billing", "h2"),)
    assert c.delivery == DeliveryConfig(2526, "out.example.com", "required", 10.0, False, 5.0, 2, 3, 0.0)
    assert c.effective_helo == "out.example.com"
    assert c.dns == DnsConfig(
        (HostPort("127.0.0.1", 5353), HostPort("::1", 53), HostPort("192.0.2.53", 53)),
    )
    assert c.queue == QueueConfig(30.0, 1.5, 3600.0, 0.0, 172800.0, 86400.0)
    assert c.dkim.keys == (DkimKeyConfig("example.com", "s2026", BASE / "keys/ex.pem"),)
    assert c.routes == (
        RouteConfig(
            recipient_domains=("example.org",),
            sender_domains=("example.com",),
            users=("app", "billing"),
            listeners=("relay",),
            transport="relay",
            hosts=(HostPort("smtp.provider1.com", 587), HostPort("smtp.provider2.com", 25)),
            strategy="mypkg.routing:pick",
            username="apikey",
            password="secret",
            tls="required",
        ),
        RouteConfig(recipient_domains=("bank.example",), tls="required"),
    )
    assert c.routes[1].transport == "mx" and c.routes[1].strategy == "failover"
    assert c.filters == (FilterConfig("recipient_domain", ("blocked.example",), "deny"),)
    assert c.rate_limits == RateLimitsConfig(100, {"gmail.com": 600}, 20)


def test_config_is_immutable() -> None:
    c = parse(FULL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.limits.max_recipients = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.rate_limits.domains["x.com"] = 1  # type: ignore[index]


@pytest.mark.parametrize("strategy", ["failover", "round_robin", "random", "mod:fn", "a.b_c.d:Pick_2"])
def test_route_strategies(strategy: str) -> None:
    route = {"transport": "relay", "hosts": ["h:25"], "strategy": strategy}
    assert parse({"routes": [route]}).routes[0].strategy == strategy


def test_listen_port_zero_lets_the_os_choose_and_may_repeat() -> None:
    data = {"listeners": [{"name": "a", "addr": "127.0.0.1:0"}, {"name": "b", "addr": "127.0.0.1:0"}]}
    assert [lst.addr.port for lst in parse(data).listeners] == [0, 0]


def test_relay_strategy_with_api_key_user() -> None:
    data = {"api_keys": [{"name": "k", "key_hash": "h"}], "routes": [{"users": ["k"]}]}
    assert parse(data).routes[0].users == ("k",)


# --- paths ---------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_base_dir() -> None:
    c = parse(
        {
            "server": {"spool_dir": "spool"},
            "listeners": [{**LISTENER, "tls": "implicit", "cert": "../tls/c.pem", "key": "k.pem"}],
            "dkim": {"keys": [{"domain": "a.com", "selector": "s", "private_key": "keys/a.pem"}]},
        }
    )
    assert c.server.spool_dir == BASE / "spool"
    assert c.listeners[0].cert == Path("/etc/tls/c.pem")
    assert c.listeners[0].key == BASE / "k.pem"
    assert c.dkim.keys[0].private_key == BASE / "keys/a.pem"


def test_home_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/ann")
    assert parse({"server": {"spool_dir": "~/spool"}}).server.spool_dir == Path("/home/ann/spool")


def test_load_config_resolves_against_the_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "hedwig.toml").write_text('[server]\nhostname = "mx.example.com"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = load_config("../conf/hedwig.toml", environ={})
    assert c.server.spool_dir == conf_dir / "var/spool"
    assert c.source_path == conf_dir / "hedwig.toml"
    assert c.server.hostname == "mx.example.com"


# --- environment ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "level"), [("debug", "debug"), ("ERROR", "error"), (" warning ", "warning")]
)
def test_env_overrides_log_level(value: str, level: str) -> None:
    c = parse({"log": {"level": "info"}}, {"HEDWIG_LOG_LEVEL": value})
    assert c.log.level == level


def test_empty_env_is_ignored() -> None:
    assert parse({"log": {"level": "error"}}, {"HEDWIG_LOG_LEVEL": ""}).log.level == "error"


def test_bad_env_log_level_is_an_error() -> None:
    assert only_error({}, {"HEDWIG_LOG_LEVEL": "loud"}) == (
        "HEDWIG_LOG_LEVEL: must be one of debug, info, warning, error (got 'loud')"
    )


def test_environ_defaults_to_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEDWIG_LOG_LEVEL", "debug")
    assert parse_config({}, tmp_path).log.level == "debug"
    path = tmp_path / "hedwig.toml"
    path.write_text("")
    assert load_config(path).log.level == "debug"


# --- errors --------------------------------------------------------------------------------------------

ERROR_CASES: list[tuple[dict[str, Any], str]] = [
    # the forms named in the brief
    (
        {"listeners": [LISTENER, {"name": "b", "addr": "127.0.0.1:2", "role": "foo"}]},
        "listeners[1].role: must be one of submission, ingress (got 'foo')",
    ),
    ({"limits": {"max_recipients": "5"}}, "limits.max_recipients: expected an integer (got str)"),
    (
        {"dkim": {"keys": [{"domain": "example.com", "private_key": "k.pem"}]}},
        "dkim.keys[0].selector: missing required key",
    ),
    ({"server": {"bogus": 1}}, "server.bogus: unknown key"),
    # shapes
    ({"bogus": {}}, "bogus: unknown key"),
    ({"server": "mx"}, "server: expected a table (got str)"),
    ({"listeners": {"name": "x"}}, "listeners: expected an array of tables (got table)"),
    ({"listeners": [5]}, "listeners[0]: expected a table (got int)"),
    ({"dkim": {"keys": [], "bogus": 1}}, "dkim.bogus: unknown key"),
    # types and ranges
    ({"limits": {"max_errors": True}}, "limits.max_errors: expected an integer (got bool)"),
    ({"limits": {"max_errors": 1.0}}, "limits.max_errors: expected an integer (got float)"),
    ({"limits": {"max_errors": 0}}, "limits.max_errors: must be at least 1 (got 0)"),
    ({"limits": {"max_hops": -1}}, "limits.max_hops: must be at least 1 (got -1)"),
    ({"limits": {"command_timeout": "0s"}}, "limits.command_timeout: must be greater than 0 (got '0s')"),
    (
        {"limits": {"data_timeout": "ten minutes"}},
        "limits.data_timeout: invalid duration 'ten minutes' "
        '(use e.g. "250ms", "30s", "5m", "4h", "5d", "1h30m")',
    ),
    (
        {"limits": {"command_timeout": ["5m"]}},
        'limits.command_timeout: expected a duration string like "30s" (got array)',
    ),
    (
        {"limits": {"max_message_size": "25XB"}},
        "limits.max_message_size: invalid size '25XB' "
        '(use bytes or e.g. "512KiB", "25MiB", "1GiB", "10MB")',
    ),
    (
        {"limits": {"max_message_size": 1.5}},
        'limits.max_message_size: expected a size in bytes or a string like "25MiB" (got float)',
    ),
    ({"limits": {"max_message_size": 0}}, "limits.max_message_size: must be at least 1 (got 0)"),
    ({"limits": {"queue_minfree": -5}}, "limits.queue_minfree: size must not be negative (got -5)"),
    (
        {"limits": {"auth_failure_delay": "-1s"}},
        "limits.auth_failure_delay: duration must not be negative (got '-1s')",
    ),
    ({"log": {"level": "verbose"}}, "log.level: must be one of debug, info, warning, error (got 'verbose')"),
    ({"log": {"format": 1}}, "log.format: expected a string (got int)"),
    ({"log": {"format": "xml"}}, "log.format: must be one of text, json (got 'xml')"),
    ({"server": {"hostname": "bad host"}}, "server.hostname: not a valid host name (got 'bad host')"),
    ({"server": {"spool_dir": ""}}, "server.spool_dir: must not be empty"),
    ({"server": {"spool_dir": 5}}, "server.spool_dir: expected a string (got int)"),
    ({"http": {"addr": "8025"}}, "http.addr: missing port in '8025' (expected host:port)"),
    ({"http": {"port": 8025}}, "http.port: unknown key"),
    ({"delivery": {"port": 70000}}, "delivery.port: must be at most 65535 (got 70000)"),
    ({"delivery": {"port": 0}}, "delivery.port: must be at least 1 (got 0)"),
    ({"delivery": {"cut_through": "yes"}}, "delivery.cut_through: expected a boolean (got str)"),
    (
        {"delivery": {"tls": "always"}},
        "delivery.tls: must be one of none, opportunistic, required (got 'always')",
    ),
    ({"delivery": {"helo_hostname": "a b"}}, "delivery.helo_hostname: not a valid host name (got 'a b')"),
    ({"dns": {"nameservers": "1.1.1.1"}}, "dns.nameservers: expected an array (got str)"),
    (
        {"dns": {"nameservers": ["dns.google"]}},
        "dns.nameservers[0]: a nameserver must be an IP address (got 'dns.google')",
    ),
    ({"queue": {"retry_factor": "2"}}, "queue.retry_factor: expected a number (got str)"),
    ({"queue": {"retry_factor": 0.5}}, "queue.retry_factor: must be at least 1 (got 0.5)"),
    ({"queue": {"retry_jitter": 1.5}}, "queue.retry_jitter: must be at most 1 (got 1.5)"),
    ({"queue": {"retry_jitter": float("nan")}}, "queue.retry_jitter: expected a finite number (got nan)"),
    ({"queue": {"retry_initial": "5h"}}, "queue.retry_max: must not be less than queue.retry_initial"),
    # listeners
    ({"listeners": [{"addr": "127.0.0.1:25"}]}, "listeners[0].name: missing required key"),
    ({"listeners": [{"name": "", "addr": "127.0.0.1:25"}]}, "listeners[0].name: must not be empty"),
    ({"listeners": [{"name": "a"}]}, "listeners[0].addr: missing required key"),
    (
        {"listeners": [{"name": "a", "addr": "::1:25"}]},
        "listeners[0].addr: IPv6 addresses need brackets, e.g. \"[::1]:25\" (got '::1:25')",
    ),
    (
        {"listeners": [{**LISTENER, "tls": "tls"}]},
        "listeners[0].tls: must be one of none, starttls, implicit (got 'tls')",
    ),
    (
        {"listeners": [{**LISTENER, "tls": "implicit", "cert": "c.pem"}]},
        "listeners[0].key: required when tls = 'implicit'",
    ),
    (
        {"listeners": [{**LISTENER, "require_auth": 1}]},
        "listeners[0].require_auth: expected a boolean (got int)",
    ),
    (
        {"listeners": [{**LISTENER, "trusted_networks": ["127.0.0.0/8", "10.0.0.0/33"]}]},
        "listeners[0].trusted_networks[1]: "
        'not an IP network like "10.0.0.0/8" or "::1/128" (got \'10.0.0.0/33\')',
    ),
    (
        {"listeners": [{**LISTENER, "trusted_networks": "127.0.0.0/8"}]},
        "listeners[0].trusted_networks: expected an array (got str)",
    ),
    (
        {"listeners": [{**LISTENER, "local_domains": [".example.com"]}]},
        "listeners[0].local_domains[0]: write the domain without a leading dot; subdomains match too "
        "(got '.example.com')",
    ),
    (
        {"listeners": [{**LISTENER, "greet_pause": "-1s"}]},
        "listeners[0].greet_pause: duration must not be negative (got '-1s')",
    ),
    ({"listeners": [{**LISTENER, "port": 25}]}, "listeners[0].port: unknown key"),
    (
        {"listeners": [LISTENER, {**LISTENER, "addr": "127.0.0.1:2"}]},
        "listeners[1].name: duplicate 'smtp' (also listeners[0])",
    ),
    (
        {"listeners": [LISTENER, {**LISTENER, "name": "b"}]},
        "listeners[1].addr: duplicate '127.0.0.1:2525' (also listeners[0])",
    ),
    # users and api keys
    ({"users": [{"name": "app"}]}, "users[0].password_hash: missing required key"),
    ({"users": [{"name": "app", "password_hash": ""}]}, "users[0].password_hash: must not be empty"),
    ({"users": [{"name": "app", "password": "x", "password_hash": "h"}]}, "users[0].password: unknown key"),
    (
        {"users": [{"name": "app", "password_hash": "h"}, {"name": "app", "password_hash": "h"}]},
        "users[1].name: duplicate 'app' (also users[0])",
    ),
    ({"api_keys": [{"name": "k"}]}, "api_keys[0].key_hash: missing required key"),
    (
        {"api_keys": [{"name": "k", "key_hash": "h"}, {"name": "k", "key_hash": "h"}]},
        "api_keys[1].name: duplicate 'k' (also api_keys[0])",
    ),
    # dkim
    (
        {"dkim": {"keys": [{"domain": "a.com", "selector": "s"}]}},
        "dkim.keys[0].private_key: missing required key",
    ),
    (
        {"dkim": {"keys": [{"domain": "a.com", "selector": "s 1", "private_key": "k"}]}},
        "dkim.keys[0].selector: not a valid DKIM selector (got 's 1')",
    ),
    (
        {"dkim": {"keys": [{"domain": "a.com", "selector": "s", "private_key": "k", "type": "rsa"}]}},
        "dkim.keys[0].type: unknown key",
    ),
    (
        {
            "dkim": {
                "keys": [
                    {"domain": "a.com", "selector": "s", "private_key": "k1"},
                    {"domain": "A.com", "selector": "s", "private_key": "k2"},
                ]
            }
        },
        "dkim.keys[1].selector: duplicate 's._domainkey.a.com' (also dkim.keys[0])",
    ),
    ({"dkim": {"keys": {"domain": "a.com"}}}, "dkim.keys: expected an array of tables (got table)"),
    # routes
    ({"routes": [{"transport": "smtp"}]}, "routes[0].transport: must be one of mx, relay (got 'smtp')"),
    ({"routes": [{"transport": "relay"}]}, "routes[0].hosts: missing required key (transport = 'relay')"),
    (
        {"routes": [{"transport": "relay", "hosts": []}]},
        "routes[0].hosts: must not be empty when transport = 'relay'",
    ),
    (
        {"routes": [{"hosts": ["smtp.example.com"]}]},
        "routes[0].hosts: only used with transport = 'relay' (this route has transport = 'mx')",
    ),
    (
        {"routes": [{"transport": "relay", "hosts": ["a:587", "b:99999"]}]},
        "routes[0].hosts[1]: port must be 1-65535 (got 99999 in 'b:99999')",
    ),
    (
        {"routes": [{"transport": "relay", "hosts": ["a"], "strategy": "fastest"}]},
        "routes[0].strategy: "
        "must be one of failover, round_robin, random or \"module:function\" (got 'fastest')",
    ),
    (
        {"routes": [{"transport": "relay", "hosts": ["a"], "strategy": "mod:"}]},
        "routes[0].strategy: "
        "must be one of failover, round_robin, random or \"module:function\" (got 'mod:')",
    ),
    (
        {"routes": [{"transport": "relay", "hosts": ["a"], "username": "u"}]},
        "routes[0].password: missing required key (username and password go together)",
    ),
    (
        {"routes": [{"transport": "relay", "hosts": ["a"], "password": "p"}]},
        "routes[0].username: missing required key (username and password go together)",
    ),
    ({"routes": [{"tls": "yes"}]}, "routes[0].tls: must be one of none, opportunistic, required (got 'yes')"),
    ({"routes": [{"listeners": ["nope"]}]}, "routes[0].listeners[0]: no [[listeners]] named 'nope'"),
    ({"routes": [{"users": ["ghost"]}]}, "routes[0].users[0]: no [[users]] or [[api_keys]] named 'ghost'"),
    (
        {"routes": [{"recipient_domains": ["a b"]}]},
        "routes[0].recipient_domains[0]: not a domain name (got 'a b')",
    ),
    ({"routes": [{"sender_domain": ["a.com"]}]}, "routes[0].sender_domain: unknown key"),
    # filters
    ({"filters": [{"domains": ["a.com"], "action": "deny"}]}, "filters[0].type: missing required key"),
    ({"filters": [{"type": "sender_domain", "action": "deny"}]}, "filters[0].domains: missing required key"),
    (
        {"filters": [{"type": "sender_domain", "domains": ["a.com"]}]},
        "filters[0].action: missing required key",
    ),
    (
        {"filters": [{"type": "sender_domain", "domains": [], "action": "deny"}]},
        "filters[0].domains: must not be empty",
    ),
    (
        {"filters": [{"type": "sender", "domains": ["a.com"], "action": "deny"}]},
        "filters[0].type: must be one of sender_domain, recipient_domain (got 'sender')",
    ),
    (
        {"filters": [{"type": "sender_domain", "domains": ["a.com"], "action": "reject"}]},
        "filters[0].action: must be one of allow, deny (got 'reject')",
    ),
    # rate limits
    ({"rate_limits": {"per_domain": -1}}, "rate_limits.per_domain: must be at least 0 (got -1)"),
    ({"rate_limits": {"per_client": "10"}}, "rate_limits.per_client: expected an integer (got str)"),
    ({"rate_limits": {"domains": []}}, "rate_limits.domains: expected a table (got array)"),
    (
        {"rate_limits": {"domains": {"gmail.com": -1}}},
        'rate_limits.domains."gmail.com": must be at least 0 (got -1)',
    ),
    (
        {"rate_limits": {"domains": {"gmail.com": "600"}}},
        'rate_limits.domains."gmail.com": expected an integer (got str)',
    ),
    ({"rate_limits": {"domains": {"a b": 1}}}, "rate_limits.domains.\"a b\": not a domain name (got 'a b')"),
]


@pytest.mark.parametrize(("data", "expected"), ERROR_CASES, ids=[e for _, e in ERROR_CASES])
def test_error_names_the_key_path(data: dict[str, Any], expected: str) -> None:
    assert expected in errors_of(data)


def test_tls_listener_without_cert_or_key() -> None:
    assert errors_of({"listeners": [{**LISTENER, "tls": "starttls"}]}) == [
        "listeners[0].cert: required when tls = 'starttls'",
        "listeners[0].key: required when tls = 'starttls'",
    ]


def test_a_bad_value_is_not_also_reported_as_a_duplicate() -> None:
    data = {"listeners": [{"name": "a", "addr": "x"}, {"name": "b", "addr": "y"}]}
    assert not [e for e in errors_of(data) if "duplicate" in e]


def test_every_error_is_collected_at_once() -> None:
    data: dict[str, Any] = {
        "server": {"bogus": 1, "hostname": "bad host"},
        "log": {"level": "loud"},
        "listeners": [{"name": "a", "addr": "127.0.0.1:1", "role": "foo"}, {"name": "a", "addr": "::1:2"}],
        "limits": {"max_recipients": "5", "max_message_size": "lots"},
        "dkim": {"keys": [{"domain": "example.com", "private_key": "k.pem"}]},
        "routes": [{"transport": "relay"}],
        "filters": [{"type": "x", "domains": ["a.com"], "action": "deny"}],
        "rate_limits": {"domains": {"gmail.com": -1}},
        "extra": True,
    }
    errors = errors_of(data, {"HEDWIG_LOG_LEVEL": "nope"})
    for prefix in [
        "server.bogus: unknown key",
        "server.hostname: ",
        "log.level: ",
        "HEDWIG_LOG_LEVEL: ",
        "listeners[0].role: ",
        "listeners[1].addr: ",
        "listeners[1].name: duplicate",
        "limits.max_recipients: ",
        "limits.max_message_size: ",
        "dkim.keys[0].selector: missing required key",
        "routes[0].hosts: ",
        "filters[0].type: ",
        'rate_limits.domains."gmail.com": ',
        "extra: unknown key",
    ]:
        assert any(e.startswith(prefix) for e in errors), (prefix, errors)
    assert len(errors) == 14, errors


def test_config_error_message_lists_every_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"server": {"a": 1, "b": 2}})
    assert str(info.value) == "server.a: unknown key\nserver.b: unknown key"


# --- files ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", environ={})
    assert info.value.errors == ["cannot read config file: No such file or directory"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, environ={})
    assert info.value.errors == ["cannot read config file: Is a directory"]


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "hedwig.toml"
    path.write_text("[server]\nhostname = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    (error,) = info.value.errors
    assert error.startswith("TOML syntax error: ") and "line 2" in error


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "hedwig.toml"
    path.write_bytes(b'[server]\nhostname = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors[0].startswith("config file is not UTF-8 text")


def test_validation_errors_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "hedwig.toml"
    path.write_text('[[listeners]]\nname = "x"\naddr = "127.0.0.1:25"\nrole = "foo"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.errors == ["listeners[0].role: must be one of submission, ingress (got 'foo')"]


def test_the_example_config_loads_cleanly() -> None:
    c = load_config(REPO / "hedwig.toml", environ={})
    assert c.server.hostname == "localhost"
    assert c.server.spool_dir == REPO / "var/spool"
    assert c.listeners == (ListenerConfig(name="smtp", addr=HostPort("127.0.0.1", 2525)),)
    assert c.http.addr == HostPort("127.0.0.1", 8025)
    assert c.delivery == DeliveryConfig()
    assert c.limits == LimitsConfig()
    assert c.queue == QueueConfig()
    assert (c.users, c.api_keys, c.routes, c.filters, c.dkim.keys) == ((), (), (), (), ())


_COMMENTED_TOML = re.compile(r"^# (\[\[?[\w.]+\]\]?(?:\s+#.*)?|[a-z_]+ = .*)$")


def test_the_examples_commented_out_in_the_example_config_are_valid(tmp_path: Path) -> None:
    """Uncomment every example section in hedwig.toml: the result must load too."""
    lines = (REPO / "hedwig.toml").read_text().splitlines()
    uncommented = [m.group(1) if (m := _COMMENTED_TOML.match(line)) else line for line in lines]
    assert uncommented != lines
    path = tmp_path / "hedwig.toml"
    path.write_text("\n".join(uncommented) + "\n")
    c = load_config(path, environ={})
    assert [lst.name for lst in c.listeners] == ["smtp", "submission", "mx"]
    assert c.listeners[1].cert == tmp_path / "tls/fullchain.pem"
    assert len(c.users) == len(c.api_keys) == len(c.dkim.keys) == len(c.filters) == 1
    assert [r.transport for r in c.routes] == ["relay", "mx"]


def test_drain_timeout_is_a_duration_defaulting_to_30s() -> None:
    assert parse({}).server.drain_timeout == 30.0
    assert parse({"server": {"drain_timeout": "5s"}}).server.drain_timeout == 5.0
    assert parse({"server": {"drain_timeout": "0s"}}).server.drain_timeout == 0.0  # cancel at once
    assert only_error({"server": {"drain_timeout": "soon"}}).startswith("server.drain_timeout: ")
