"""Checks `config check` makes beyond the schema: files that must exist and be readable, hashes that
must parse, route strategies that must import, DKIM keys that must load. `serve` fails on the same
problems when it starts."""

from __future__ import annotations

import ssl

from .auth import is_valid_hash
from .config import Config
from .dkim import check_keys
from .worker.routes import RouteError, load_strategy


def check_files(config: Config) -> list[str]:
    problems: list[str] = []
    for i, listener in enumerate(config.listeners):
        if listener.tls != "none" and listener.cert is not None and listener.key is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    listener.cert, listener.key
                )
            except (OSError, ssl.SSLError) as exc:
                problems.append(f"listeners[{i}].cert: cannot load certificate/key: {exc}")
    for i, user in enumerate(config.users):
        if not is_valid_hash(user.password_hash):
            problems.append(f"users[{i}].password_hash: not a hash from `hedwigpy passwd`")
    for i, key in enumerate(config.api_keys):
        if not is_valid_hash(key.key_hash):
            problems.append(f"api_keys[{i}].key_hash: not a hash from `hedwigpy passwd`")
    for i, route in enumerate(config.routes):
        if route.transport == "relay" and ":" in route.strategy:
            try:
                load_strategy(route.strategy, where=f"routes[{i}].strategy")
            except RouteError as exc:
                problems.append(str(exc))
    problems.extend(check_keys(config.dkim))
    return problems
