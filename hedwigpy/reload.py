"""What a SIGHUP may change, as pure functions over two `Config`s.

Most of hedwig.toml applies to the running daemon: certificates, users, API keys, routes, filters,
limits, rate limits, the delivery and queue settings, and each listener's policy (role, trusted
networks, local domains, AUTH requirement). What is bound to a socket, a directory or an object built once
at start cannot change without a restart: those keys keep their old values, and the reload names them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .config import Config, ListenerConfig

# Keys read once at start: (key path, how to read it from a Config).
_RESTART_ONLY: tuple[tuple[str, Callable[[Config], Any]], ...] = (
    ("server.spool_dir", lambda c: c.server.spool_dir),
    ("log", lambda c: c.log),
    ("http.addr", lambda c: c.http.addr),
    ("dns.nameservers", lambda c: c.dns.nameservers),
    ("delivery.max_connections_per_host", lambda c: c.delivery.max_connections_per_host),
    ("delivery.max_messages_per_connection", lambda c: c.delivery.max_messages_per_connection),
    ("delivery.idle_timeout", lambda c: c.delivery.idle_timeout),
    ("webhooks", lambda c: c.webhooks),
)
# A listener's socket: where it listens and how the connection starts.
_LISTENER_SOCKET = ("addr", "tls", "proxy_protocol")


def restart_needed(old: Config, new: Config) -> list[str]:
    """The key paths whose change needs a restart, in a stable order (empty: everything applies)."""
    changed = [key for key, read in _RESTART_ONLY if read(old) != read(new)]
    if _names(old.listeners) != _names(new.listeners):
        return [*changed, "listeners"]
    for before, after in zip(old.listeners, new.listeners, strict=True):
        changed += [
            f"listeners[{before.name}].{key}"
            for key in _LISTENER_SOCKET
            if getattr(before, key) != getattr(after, key)
        ]
    return changed


def effective(old: Config, new: Config) -> Config:
    """`new`, except that every restart-only key keeps its value from `old` (see `restart_needed`)."""
    listeners = old.listeners
    if _names(old.listeners) == _names(new.listeners):
        listeners = tuple(_keep_socket(b, a) for b, a in zip(old.listeners, new.listeners, strict=True))
    return replace(
        new,
        server=replace(new.server, spool_dir=old.server.spool_dir),
        log=old.log,
        http=replace(new.http, addr=old.http.addr),
        dns=old.dns,
        delivery=replace(
            new.delivery,
            max_connections_per_host=old.delivery.max_connections_per_host,
            max_messages_per_connection=old.delivery.max_messages_per_connection,
            idle_timeout=old.delivery.idle_timeout,
        ),
        webhooks=old.webhooks,
        listeners=listeners,
    )


def _names(listeners: tuple[ListenerConfig, ...]) -> list[str]:
    return [lst.name for lst in listeners]


def _keep_socket(old: ListenerConfig, new: ListenerConfig) -> ListenerConfig:
    kept = replace(new, addr=old.addr, tls=old.tls, proxy_protocol=old.proxy_protocol)
    if old.tls != new.tls:  # the certificate belongs to the TLS mode still in force
        kept = replace(kept, cert=old.cert, key=old.key)
    return kept
