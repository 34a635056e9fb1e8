"""hedwig.toml: the daemon's whole configuration as frozen, fully validated dataclasses.

Field names are the TOML keys. Values arrive converted: durations in float seconds, sizes in int bytes,
addresses as `HostPort`, networks as `ipaddress` networks, domains lower-cased, relative paths resolved
against the config file's directory. Every problem in a file is reported at once, each prefixed with
its key path (`listeners[1].role: must be one of submission, ingress (got 'foo')`), so an operator fixes a
file in one round. Defaults follow Postfix and RFC 5321 where the interface names none. This module holds
the model and the entry points; the section readers are in `_config_parse`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from ._units import HostPort as HostPort
from ._units import parse_hostname

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


def default_hostname() -> str:
    name = socket.getfqdn()
    try:
        return parse_hostname(name)
    except ValueError:
        return "localhost"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """[server]: who we are and where the queue lives."""

    hostname: str = field(default_factory=default_hostname)  # 220 greeting, Received, EHLO outbound
    spool_dir: Path = Path("var/spool")
    # SIGTERM: how long in-flight SMTP transactions, HTTP requests and delivery attempts get to finish
    # before they are cancelled (keep systemd's TimeoutStopSec above it).
    drain_timeout: float = 30.0


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


def default_listeners() -> tuple[ListenerConfig, ...]:
    return (ListenerConfig(name="smtp", addr=DEFAULT_LISTENER_ADDR),)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole of hedwig.toml. Build it with load_config() or parse_config()."""

    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    listeners: tuple[ListenerConfig, ...] = field(default_factory=default_listeners)
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
    from ._config_parse import build  # the section readers need the classes above: imported late

    return build(data, base_dir, os.environ if environ is None else environ, source_path)
