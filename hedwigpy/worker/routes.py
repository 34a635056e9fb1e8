"""Which way mail leaves: `[[routes]]` matched in order, first match wins (the SMTP-router idea).

A route matches when every criterion it names matches (recipient domain, sender domain, authenticated
user, listener); a route naming none matches everything. With no match the transport is "mx".
Relay routes order their smarthosts by a strategy: failover (as written), round_robin, random, or an
operator's callable `"package.module:function"`, imported at start so a typo stops the daemon instead of
the mail.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from .._units import HostPort, parse_hostport
from ..config import RouteConfig
from ..policy import domain_matches
from ..storage import Envelope

Strategy = Callable[[Envelope, list[str]], Iterable[str]]


class RouteError(Exception):
    """A route cannot be used as configured (a strategy callable that does not load)."""


class StrategyFailed(Exception):
    """A custom strategy raised or returned something that is not a host list."""


@dataclass(frozen=True, slots=True)
class Route:
    """A `[[routes]]` entry and its position (`index` -1 is the implicit mx route)."""

    index: int
    config: RouteConfig

    @property
    def name(self) -> str:
        return f"routes[{self.index}]" if self.index >= 0 else "mx"

    def matches(self, envelope: Envelope, recipient: str) -> bool:
        cfg = self.config
        if cfg.recipient_domains and not domain_matches(domain_of(recipient), cfg.recipient_domains):
            return False
        if cfg.sender_domains and not (
            envelope.sender and domain_matches(domain_of(envelope.sender), cfg.sender_domains)
        ):
            return False
        if cfg.users and envelope.auth_user not in cfg.users:
            return False
        return not cfg.listeners or envelope.listener in cfg.listeners


DEFAULT_ROUTE = Route(-1, RouteConfig())


def domain_of(address: str) -> str:
    """The domain of `local@domain`, lower-cased ("" for an address without one)."""
    return address.rpartition("@")[2].lower() if "@" in address else ""


class Router:
    """The configured routes with their strategies loaded."""

    def __init__(self, routes: Sequence[RouteConfig], *, rng: random.Random | None = None) -> None:
        self.routes = tuple(Route(i, cfg) for i, cfg in enumerate(routes))
        self._rng = rng if rng is not None else random.Random()
        self._turns = [0] * len(self.routes)  # round_robin position per route
        self._custom: dict[int, Strategy] = {}
        for route in self.routes:
            strategy = route.config.strategy
            if route.config.transport == "relay" and ":" in strategy:
                self._custom[route.index] = load_strategy(strategy, where=f"{route.name}.strategy")

    def route(self, envelope: Envelope, recipient: str) -> Route:
        return next((r for r in self.routes if r.matches(envelope, recipient)), DEFAULT_ROUTE)

    def relay_hosts(self, route: Route, envelope: Envelope) -> list[HostPort]:
        """The smarthosts of a relay route in the order to try them this time."""
        hosts = list(route.config.hosts)
        strategy = route.config.strategy
        if route.index in self._custom:
            return self._call_custom(route, envelope, hosts)
        if strategy == "round_robin" and hosts:
            turn = self._turns[route.index] % len(hosts)
            self._turns[route.index] += 1
            return hosts[turn:] + hosts[:turn]
        if strategy == "random":
            self._rng.shuffle(hosts)
        return hosts

    def _call_custom(self, route: Route, envelope: Envelope, hosts: list[HostPort]) -> list[HostPort]:
        try:
            returned = self._custom[route.index](envelope, [str(h) for h in hosts])
            if isinstance(returned, str):  # one host name, which list() would split into characters
                raise TypeError("expected a list of hosts, got a single string")
            chosen = list(returned)
            if not all(isinstance(h, str) for h in chosen):
                raise TypeError("the hosts must be strings")
            return [parse_hostport(h, 25) for h in chosen]
        except Exception as exc:  # operator code: any failure is a (transient) routing failure
            raise StrategyFailed(f"{route.name} strategy {route.config.strategy!r} failed: {exc}") from exc


def load_strategy(spec: str, *, where: str) -> Strategy:
    """Import `"package.module:function"`; RouteError names the config key when that fails."""
    module_name, _, attr = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # ImportError, AttributeError, or the module's own import-time errors
        raise RouteError(f"{where}: cannot load {spec!r}: {type(exc).__name__}: {exc}") from exc
    if not callable(function):
        raise RouteError(f"{where}: {spec!r} is not callable")
    strategy: Strategy = function
    return strategy
