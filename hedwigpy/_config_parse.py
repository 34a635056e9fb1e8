"""The readers behind `config.parse_config`: one function per hedwig.toml section, the value converters
they use, and the checks across sections. Every problem is recorded against its key path; nothing here
raises until `build` has seen the whole document."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ._schema import Reader, as_int, as_str, check_unique, ranged
from ._units import HostPort, parse_domain, parse_hostname, parse_hostport, parse_network
from .config import (
    CLIENT_TLS,
    DEFAULT_HTTP_ADDR,
    DEFAULT_LISTENER_ADDR,
    ENV_LOG_LEVEL,
    FILTER_ACTIONS,
    FILTER_TYPES,
    LISTENER_ROLES,
    LISTENER_TLS,
    LOG_FORMATS,
    LOG_LEVELS,
    LOOPBACK,
    STRATEGIES,
    TRANSPORTS,
    WEBHOOK_EVENTS,
    ApiKeyConfig,
    Config,
    ConfigError,
    DeliveryConfig,
    DkimConfig,
    DkimKeyConfig,
    DnsConfig,
    FilterConfig,
    HttpConfig,
    LimitsConfig,
    ListenerConfig,
    LogConfig,
    QueueConfig,
    RateLimitsConfig,
    RouteConfig,
    ServerConfig,
    UserConfig,
    WebhookConfig,
    default_hostname,
    default_listeners,
)


def build(
    data: Mapping[str, Any], base_dir: Path, env: Mapping[str, str], source_path: Path | None
) -> Config:
    errors: list[str] = []
    top = Reader(data, "", errors)

    server = _server(top.table("server"), base_dir)
    log = _log(top.table("log"), env)
    listeners = _listeners(top, base_dir)
    users = tuple(UserConfig(*_credential(r, "password_hash")) for r in top.tables("users") or [])
    limits = _limits(top.table("limits"))
    http = _http(top.table("http"))
    api_keys = tuple(ApiKeyConfig(*_credential(r, "key_hash")) for r in top.tables("api_keys") or [])
    delivery = _delivery(top.table("delivery"))
    dns = _dns(top.table("dns"))
    queue = _queue(top.table("queue"))
    dkim_table = top.table("dkim")
    dkim = DkimConfig(keys=tuple(_dkim_key(r, base_dir) for r in dkim_table.tables("keys") or []))
    dkim_table.finish()
    route_readers = top.tables("routes") or []
    routes = tuple(_route(r) for r in route_readers)
    filters = tuple(_filter(r) for r in top.tables("filters") or [])
    rate_limits = _rate_limits(top.table("rate_limits"))
    webhooks = tuple(_webhook(r) for r in top.tables("webhooks") or [])
    top.finish()

    check_unique(top, "listeners", "name", [lst.name for lst in listeners])
    check_unique(top, "users", "name", [u.name for u in users])
    check_unique(top, "api_keys", "name", [k.name for k in api_keys])
    dkim_names = [f"{k.selector}._domainkey.{k.domain}" if k.selector and k.domain else "" for k in dkim.keys]
    check_unique(top, "dkim.keys", "selector", dkim_names)
    _check_route_refs(route_readers, routes, listeners, users, api_keys)
    if errors:
        raise ConfigError(errors)
    return Config(
        server=server,
        log=log,
        listeners=listeners,
        users=users,
        limits=limits,
        http=http,
        api_keys=api_keys,
        delivery=delivery,
        dns=dns,
        queue=queue,
        dkim=dkim,
        routes=routes,
        filters=filters,
        rate_limits=rate_limits,
        webhooks=webhooks,
        source_path=source_path,
    )


# --- value converters: raise ValueError with a message that follows the key path ------------------------

_listen_addr: Callable[[Any], HostPort] = partial(parse_hostport, allow_port_zero=True)  # 0: OS picks
_relay_host: Callable[[Any], HostPort] = partial(parse_hostport, default_port=25)

_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_STRATEGY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


def _nameserver(v: Any) -> HostPort:
    hp = parse_hostport(as_str(v), 53)
    try:
        ipaddress.ip_address(hp.host)
    except ValueError:
        raise ValueError(f"a nameserver must be an IP address (got {v!r})") from None
    return hp


def _strategy(v: Any) -> str:
    s = as_str(v)
    if s in STRATEGIES or _STRATEGY.fullmatch(s):
        return s
    raise ValueError(f'must be one of {", ".join(STRATEGIES)} or "module:function" (got {s!r})')


def _webhook_url(v: Any) -> str:
    s = as_str(v)
    try:
        parts = urllib.parse.urlsplit(s)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc} (got {s!r})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL with a host (got {s!r})")
    if parts.username is not None or parts.password is not None or port == 0:
        raise ValueError(f"must not carry credentials or port 0 (got {s!r})")
    if any(c in s for c in " \t\r\n\x00"):
        raise ValueError(f"must not contain spaces or control characters (got {s!r})")
    return s


def _webhook_event(v: Any) -> str:
    s = as_str(v)
    if s not in WEBHOOK_EVENTS:
        raise ValueError(f"must be one of {', '.join(WEBHOOK_EVENTS)} (got {s!r})")
    return s


def _selector(v: Any) -> str:
    s = as_str(v)
    if not _SELECTOR.fullmatch(s):
        raise ValueError(f"not a valid DKIM selector (got {s!r})")
    return s


# --- sections ------------------------------------------------------------------------------------------


def _server(r: Reader, base_dir: Path) -> ServerConfig:
    hostname = r.get("hostname", parse_hostname, "") or default_hostname()
    spool_dir = r.path("spool_dir", base_dir, "var/spool")
    assert spool_dir is not None
    drain_timeout = r.duration("drain_timeout", "30s")
    r.finish()
    return ServerConfig(hostname=hostname, spool_dir=spool_dir, drain_timeout=drain_timeout)


def _log(r: Reader, env: Mapping[str, str]) -> LogConfig:
    level = r.choice("level", LOG_LEVELS, "info")
    fmt = r.choice("format", LOG_FORMATS, "text")
    r.finish()
    override = env.get(ENV_LOG_LEVEL, "").strip()
    if override:
        for choice in LOG_LEVELS:
            if override.lower() == choice:
                level = choice
                break
        else:
            r.errors.append(f"{ENV_LOG_LEVEL}: must be one of {', '.join(LOG_LEVELS)} (got {override!r})")
    return LogConfig(level=level, format=fmt)


def _listeners(top: Reader, base_dir: Path) -> tuple[ListenerConfig, ...]:
    readers = top.tables("listeners")
    if readers is None:
        return default_listeners()
    listeners = tuple(_listener(r, base_dir) for r in readers)
    addrs = [
        str(lst.addr) if r.ok("addr") and lst.addr.port else ""
        for r, lst in zip(readers, listeners, strict=True)
    ]
    check_unique(top, "listeners", "addr", addrs)  # port 0 ("any free port") may repeat
    return listeners


def _listener(r: Reader, base_dir: Path) -> ListenerConfig:
    name = r.string("name", required=True, nonempty=True)
    addr = r.get("addr", _listen_addr, DEFAULT_LISTENER_ADDR, required=True)
    tls = r.choice("tls", LISTENER_TLS, "none")
    cert = r.path("cert", base_dir)
    key = r.path("key", base_dir)
    if tls != "none":
        for k in ("cert", "key"):
            if not r.has(k):
                r.error(k, f"required when tls = {tls!r}")
    return r.done(
        ListenerConfig(
            name=name,
            addr=addr,
            role=r.choice("role", LISTENER_ROLES, "submission"),
            tls=tls,
            cert=cert,
            key=key,
            require_auth=r.boolean("require_auth", False),
            trusted_networks=r.list_of("trusted_networks", parse_network, LOOPBACK),
            local_domains=r.list_of("local_domains", parse_domain),
            proxy_protocol=r.boolean("proxy_protocol", False),
            greet_pause=r.duration("greet_pause", 0.0),
        )
    )


def _credential(r: Reader, secret: str) -> tuple[str, str]:
    """The name and secret hash of a [[users]] or [[api_keys]] entry."""
    name = r.string("name", required=True, nonempty=True)
    return r.done((name, r.string(secret, required=True, nonempty=True)))


def _limits(r: Reader) -> LimitsConfig:
    return r.done(
        LimitsConfig(
            max_message_size=r.size("max_message_size", "25MiB", minimum=1),
            max_recipients=r.integer("max_recipients", 1000, minimum=1),
            max_connections=r.integer("max_connections", 1000, minimum=1),
            max_connections_per_ip=r.integer("max_connections_per_ip", 50, minimum=1),
            command_timeout=r.duration("command_timeout", "5m", positive=True),
            data_timeout=r.duration("data_timeout", "10m", positive=True),
            max_errors=r.integer("max_errors", 10, minimum=1),
            max_hops=r.integer("max_hops", 50, minimum=1),
            queue_minfree=r.size("queue_minfree", 0),
            auth_failure_delay=r.duration("auth_failure_delay", "1s"),
        )
    )


def _http(r: Reader) -> HttpConfig:
    return r.done(HttpConfig(addr=r.get("addr", _listen_addr, DEFAULT_HTTP_ADDR)))


def _delivery(r: Reader) -> DeliveryConfig:
    return r.done(
        DeliveryConfig(
            port=r.integer("port", 25, minimum=1, maximum=65535),
            helo_hostname=r.get("helo_hostname", lambda v: as_str(v) and parse_hostname(v), ""),
            tls=r.choice("tls", CLIENT_TLS, "opportunistic"),
            connect_timeout=r.duration("connect_timeout", "30s", positive=True),
            cut_through=r.boolean("cut_through", True),
            cut_through_timeout=r.duration("cut_through_timeout", "20s", positive=True),
            max_connections_per_host=r.integer("max_connections_per_host", 10, minimum=1),
            max_messages_per_connection=r.integer("max_messages_per_connection", 100, minimum=1),
            idle_timeout=r.duration("idle_timeout", "60s"),
        )
    )


def _dns(r: Reader) -> DnsConfig:
    return r.done(DnsConfig(nameservers=r.list_of("nameservers", _nameserver)))


def _queue(r: Reader) -> QueueConfig:
    queue = QueueConfig(
        retry_initial=r.duration("retry_initial", "60s", positive=True),
        retry_factor=r.number("retry_factor", 2.0, minimum=1.0),
        retry_max=r.duration("retry_max", "4h", positive=True),
        retry_jitter=r.number("retry_jitter", 0.2, minimum=0.0, maximum=1.0),
        max_lifetime=r.duration("max_lifetime", "5d", positive=True),
        bounced_retention=r.duration("bounced_retention", "7d"),
    )
    if queue.retry_max < queue.retry_initial:
        r.error("retry_max", "must not be less than queue.retry_initial")
    r.finish()
    return queue


def _dkim_key(r: Reader, base_dir: Path) -> DkimKeyConfig:
    return r.done(
        DkimKeyConfig(
            domain=r.get("domain", parse_domain, "", required=True),
            selector=r.get("selector", _selector, "", required=True),
            private_key=r.path("private_key", base_dir, required=True) or base_dir,
        )
    )


def _route(r: Reader) -> RouteConfig:
    transport = r.choice("transport", TRANSPORTS, "mx")
    route = RouteConfig(
        recipient_domains=r.list_of("recipient_domains", parse_domain),
        sender_domains=r.list_of("sender_domains", parse_domain),
        users=r.list_of("users", as_str),
        listeners=r.list_of("listeners", as_str),
        transport=transport,
        hosts=r.list_of("hosts", _relay_host),
        strategy=r.get("strategy", _strategy, "failover"),
        username=r.get("username", as_str, None),
        password=r.get("password", as_str, None),
        tls=r.choice("tls", CLIENT_TLS, "opportunistic") if r.has("tls") else None,
    )
    if transport == "relay":
        if not r.has("hosts"):
            r.error("hosts", "missing required key (transport = 'relay')")
        elif not route.hosts and r.data["hosts"] == []:
            r.error("hosts", "must not be empty when transport = 'relay'")
    else:
        for k in ("hosts", "strategy", "username", "password"):
            if r.has(k):
                r.error(k, f"only used with transport = 'relay' (this route has transport = {transport!r})")
    if (route.username is None) != (route.password is None):
        missing = "password" if route.password is None else "username"
        r.error(missing, "missing required key (username and password go together)")
    r.finish()
    return route


def _filter(r: Reader) -> FilterConfig:
    return r.done(
        FilterConfig(
            type=r.choice("type", FILTER_TYPES, "recipient_domain", required=True),
            domains=r.list_of("domains", parse_domain, required=True, nonempty=True),
            action=r.choice("action", FILTER_ACTIONS, "deny", required=True),
        )
    )


def _webhook(r: Reader) -> WebhookConfig:
    return r.done(
        WebhookConfig(
            url=r.get("url", _webhook_url, "", required=True),
            secret=r.string("secret", required=True, nonempty=True),
            events=tuple(dict.fromkeys(r.list_of("events", _webhook_event, WEBHOOK_EVENTS, nonempty=True))),
            timeout=r.duration("timeout", "10s", positive=True),
        )
    )


def _rate_limits(r: Reader) -> RateLimitsConfig:
    return r.done(
        RateLimitsConfig(
            per_domain=r.integer("per_domain", 0),
            domains=MappingProxyType(r.mapping("domains", ranged(as_int, 0), parse_domain)),
            per_client=r.integer("per_client", 0),
        )
    )


# --- cross-checks --------------------------------------------------------------------------------------


def _check_route_refs(
    readers: list[Reader],
    routes: tuple[RouteConfig, ...],
    listeners: tuple[ListenerConfig, ...],
    users: tuple[UserConfig, ...],
    api_keys: tuple[ApiKeyConfig, ...],
) -> None:
    listener_names = {lst.name for lst in listeners}
    user_names = {u.name for u in users} | {k.name for k in api_keys}
    for r, route in zip(readers, routes, strict=True):
        for i, name in enumerate(route.listeners):
            if name not in listener_names:
                r.error(f"listeners[{i}]", f"no [[listeners]] named {name!r}")
        for i, name in enumerate(route.users):
            if name not in user_names:
                r.error(f"users[{i}]", f"no [[users]] or [[api_keys]] named {name!r}")
