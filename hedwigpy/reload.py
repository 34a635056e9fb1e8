"""What a SIGHUP may change, as pure functions over two `Config`s.

Most of hedwig.toml applies to the running daemon: certificates, users, API keys, routes, filters,
limits, rate limits, the delivery and queue settings, and each listener's policy (role, trusted
networks, local domains, AUTH requirement). What is bound to a socket, a directory or an object built once
at start cannot change without a restart: those keys keep their old values, and the reload names them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .config import Config, ListenerConfig

# Keys read once at start, as (section, field); a field of None is the whole section. One table for both
# `restart_needed` (what to name) and `effective` (what to keep).
_RESTART_ONLY: tuple[tuple[str, str | None], ...] = (
    ("server", "spool_dir"),
    ("log", None),
    ("http", "addr"),
    ("dns", "nameservers"),
    ("delivery", "max_connections_per_host"),
    ("delivery", "max_messages_per_connection"),
    ("delivery", "idle_timeout"),
    ("webhooks", None),
)
# A listener's socket: where it listens and how the connection starts.
_LISTENER_SOCKET = ("addr", "tls", "proxy_protocol")


def restart_needed(old: Config, new: Config) -> list[str]:
    """The key paths whose change needs a restart, in a stable order (empty: everything applies)."""
    changed = [
        section if field is None else f"{section}.{field}"
        for section, field in _RESTART_ONLY
        if _read(old, section, field) != _read(new, section, field)
    ]
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
    kept: dict[str, Any] = {}
    for section, field in _RESTART_ONLY:
        if field is None:
            kept[section] = getattr(old, section)
        else:
            current = kept.get(section, getattr(new, section))
            kept[section] = replace(current, **{field: _read(old, section, field)})
    return replace(new, **kept, listeners=listeners)


def _read(config: Config, section: str, field: str | None) -> Any:
    value = getattr(config, section)
    return value if field is None else getattr(value, field)


def _names(listeners: tuple[ListenerConfig, ...]) -> list[str]:
    return [lst.name for lst in listeners]


def _keep_socket(old: ListenerConfig, new: ListenerConfig) -> ListenerConfig:
    kept = replace(new, addr=old.addr, tls=old.tls, proxy_protocol=old.proxy_protocol)
    if old.tls != new.tls:  # the certificate belongs to the TLS mode still in force
        kept = replace(kept, cert=old.cert, key=old.key)
    return kept
