"""hedwig.toml: the daemon's whole configuration as frozen, fully validated dataclasses.

Field names are the TOML keys. Values arrive converted: durations in float seconds, sizes in int bytes,
addresses as `HostPort`, networks as `ipaddress` networks, domains lower-cased, relative paths resolved
against the config file's directory. Every problem in a file is reported at once, each prefixed with
its key path (`listeners[1].role: must be one of submission, ingress (got 'foo')`), so an operator fixes a
file in one round. Defaults follow Postfix and RFC 5321 where the interface names none.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ._schema import Reader, as_int, as_str, check_unique, ranged
from ._units import HostPort as HostPort
from ._units import parse_domain, parse_hostname, parse_hostport, parse_network

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
ListenerRole = Literal["submission", "ingress"]
ListenerTls = Literal["none", "starttls", "implicit"]
ClientTls = Literal["none", "opportunistic", "required"]
Transport = Literal["mx", "relay"]
FilterType = Literal["sender_domain", "recipient_domain"]
FilterAction = Literal["allow", "deny"]

LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warning", "error")
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
LISTENER_ROLES: tuple[ListenerRole, ...] = ("submission", "ingress")
LISTENER_TLS: tuple[ListenerTls, ...] = ("none", "starttls", "implicit")
CLIENT_TLS: tuple[ClientTls, ...] = ("none", "opportunistic", "required")
TRANSPORTS: tuple[Transport, ...] = ("mx", "relay")
FILTER_TYPES: tuple[FilterType, ...] = ("sender_domain", "recipient_domain")
FILTER_ACTIONS: tuple[FilterAction, ...] = ("allow", "deny")
STRATEGIES = ("failover", "round_robin", "random")
WEBHOOK_EVENTS = ("received", "delivered", "deferred", "bounced", "held", "released", "deleted")
LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
ENV_LOG_LEVEL = "HEDWIG_LOG_LEVEL"
DEFAULT_LISTENER_ADDR = HostPort("127.0.0.1", 2525)
DEFAULT_HTTP_ADDR = HostPort("127.0.0.1", 8025)


class ConfigError(Exception):
    """The configuration cannot be used; `errors` lists every problem, each starting with its key path."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _default_hostname() -> str:
    name = socket.getfqdn()
    try:
        return parse_hostname(name)
    except ValueError:
        return "localhost"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: who we are and where the queue lives."""

    hostname: str = field(default_factory=_default_hostname)  # 220 greeting, Received, EHLO outbound
    spool_dir: Path = Path("var/spool")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """[log]; HEDWIG_LOG_LEVEL overrides `level`."""

    level: LogLevel = "info"
    format: LogFormat = "text"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """One [[listeners]] entry: an SMTP socket and the policy of mail arriving on it."""

    name: str
    addr: HostPort
    role: ListenerRole = "submission"
    tls: ListenerTls = "none"
    cert: Path | None = None
    key: Path | None = None
    require_auth: bool = False
    trusted_networks: tuple[IPNetwork, ...] = LOOPBACK  # may relay without AUTH
    local_domains: tuple[str, ...] = ()  # ingress: accepted without relaying rights
    proxy_protocol: bool = False
    greet_pause: float = 0.0  # seconds before the banner; clients that talk first are rejected


@dataclass(frozen=True, slots=True)
class UserConfig:
    """One [[users]] entry: an SMTP AUTH login."""

    name: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """[limits]: the bounds on every inbound resource (sizes in bytes, durations in seconds)."""

    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    max_connections: int = 1000
    max_connections_per_ip: int = 50
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_errors: int = 10
    max_hops: int = 50
    queue_minfree: int = 0  # bytes kept free on the spool filesystem beyond 1.5 x max_message_size
    auth_failure_delay: float = 1.0  # pause after a failed AUTH


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """[http]: where the REST API, metrics and events are served."""

    addr: HostPort = DEFAULT_HTTP_ADDR


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    """One [[api_keys]] entry: a bearer key for the REST API."""

    name: str
    key_hash: str


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    """[delivery]: how we talk to the servers we deliver to."""

    port: int = 25
    helo_hostname: str = ""  # "" = server.hostname; see Config.effective_helo
    tls: ClientTls = "opportunistic"
    connect_timeout: float = 30.0
    cut_through: bool = True
    cut_through_timeout: float = 20.0
    max_connections_per_host: int = 10
    max_messages_per_connection: int = 100
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """[dns]: which resolvers MX, A/AAAA and TXT lookups use."""

    nameservers: tuple[HostPort, ...] = ()  # empty = system resolver


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """[queue]: retry backoff and how long messages are kept (seconds)."""

    retry_initial: float = 60.0
    retry_factor: float = 2.0
    retry_max: float = 4 * 3600.0
    retry_jitter: float = 0.2
    max_lifetime: float = 5 * 86400.0
    bounced_retention: float = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class DkimKeyConfig:
    """One [[dkim.keys]] entry; the key type (RSA or Ed25519) is detected from the file."""

    domain: str
    selector: str
    private_key: Path


@dataclass(frozen=True, slots=True)
class DkimConfig:
    """[dkim]: the signing keys."""

    keys: tuple[DkimKeyConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """First matching route wins; an empty match list matches everything."""

    recipient_domains: tuple[str, ...] = ()
    sender_domains: tuple[str, ...] = ()
    users: tuple[str, ...] = ()  # names of [[users]] or [[api_keys]]
    listeners: tuple[str, ...] = ()
    transport: Transport = "mx"
    hosts: tuple[HostPort, ...] = ()  # relay only; port defaults to 25
    strategy: str = "failover"  # failover|round_robin|random|"module:function"
    username: str | None = None
    password: str | None = None
    tls: ClientTls | None = None  # None: as [delivery].tls


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """One [[filters]] entry: domains to allow or deny as sender or recipient."""

    type: FilterType
    domains: tuple[str, ...]
    action: FilterAction


@dataclass(frozen=True, slots=True)
class RateLimitsConfig:
    """[rate_limits]: messages per minute; 0 means no limit."""

    per_domain: int = 0  # messages per minute to one recipient domain, 0 = none
    domains: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    per_client: int = 0  # inbound messages per minute per client IP or user


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """One [[webhooks]] entry: where delivery events are POSTed, signed with `secret` (hedwigpy.webhooks)."""

    url: str  # http or https
    secret: str
    events: tuple[str, ...] = WEBHOOK_EVENTS  # default: every event type
    timeout: float = 10.0  # per attempt


def _default_listeners() -> tuple[ListenerConfig, ...]:
    return (ListenerConfig(name="smtp", addr=DEFAULT_LISTENER_ADDR),)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole of hedwig.toml. Build it with load_config() or parse_config()."""

    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    listeners: tuple[ListenerConfig, ...] = field(default_factory=_default_listeners)
    users: tuple[UserConfig, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    api_keys: tuple[ApiKeyConfig, ...] = ()
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    routes: tuple[RouteConfig, ...] = ()
    filters: tuple[FilterConfig, ...] = ()
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    webhooks: tuple[WebhookConfig, ...] = ()
    source_path: Path | None = None  # the file this was loaded from, if any

    @property
    def effective_helo(self) -> str:
        """The name to send in EHLO when delivering: `delivery.helo_hostname`, else `server.hostname`."""
        return self.delivery.helo_hostname or self.server.hostname


# --- loading -------------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at `path`; raise ConfigError listing every problem."""
    source = Path(os.path.abspath(path))
    try:
        text = source.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file is not UTF-8 text: {exc}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax error: {exc}"]) from None
    return parse_config(data, source.parent, environ, source_path=source)


def parse_config(
    data: Mapping[str, Any],
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
    *,
    source_path: Path | None = None,
) -> Config:
    """Validate an already-parsed TOML document. Relative paths are taken relative to `base_dir`;
    `environ` (default os.environ) may override `log.level` through HEDWIG_LOG_LEVEL."""
    errors: list[str] = []
    top = Reader(data, "", errors)
    env = os.environ if environ is None else environ

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
    hostname = r.get("hostname", parse_hostname, "") or _default_hostname()
    spool_dir = r.path("spool_dir", base_dir, "var/spool")
    assert spool_dir is not None
    r.finish()
    return ServerConfig(hostname=hostname, spool_dir=spool_dir)


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
        return _default_listeners()
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
