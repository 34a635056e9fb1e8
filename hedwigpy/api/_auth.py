"""Who may use the admin API.

With no `[[api_keys]]`, only loopback clients are served, and only requests a browser could not have
been tricked into sending: the `Host` must name the loopback interface (against DNS rebinding) and an
`Origin`, if any, must too (against cross-site POSTs). With keys, every request carries
`Authorization: Bearer KEY`, checked against each `key_hash` with `hedwigpy.auth.verify_password`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from .._offload import run_sync
from ..auth import verify_password
from ..config import ApiKeyConfig

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})


@dataclass(frozen=True, slots=True)
class Denied:
    """Why a request is refused: 401 (with a `WWW-Authenticate` challenge) or 403."""

    status: int
    detail: str
    challenge: str | None = None


def is_loopback_ip(text: str | None) -> bool:
    if not text:
        return False
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def is_loopback_host(host: str | None) -> bool:
    """True for a `Host` header (or URL authority) naming this machine's loopback interface."""
    if not host:
        return False
    name = urlsplit(f"//{host}").hostname
    if name is None:
        return False
    return name.lower() in _LOOPBACK_NAMES or is_loopback_ip(name)


class ApiAuth:
    """Checks requests against the configured keys; `check` returns None when the request may go on.

    A key is verified with scrypt (slow on purpose) in a worker thread, at most two at a time so a flood
    of wrong keys cannot take every core. Each key that verified once is remembered by its SHA-256, so
    a client reusing its key pays the scrypt cost once per daemon run, not once per request.
    """

    def __init__(self, keys: Sequence[ApiKeyConfig]) -> None:
        self._keys = tuple(keys)
        self._verified: dict[bytes, str] = {}  # sha256(key) → key name
        self._limiter = trio.CapacityLimiter(2)

    def reconfigure(self, keys: Sequence[ApiKeyConfig]) -> None:
        """A reloaded `[[api_keys]]`: requests from now on are checked against these. The keys verified
        so far are forgotten, so a removed or replaced key stops working at once."""
        self._keys = tuple(keys)
        self._verified = {}

    @property
    def open_to_loopback(self) -> bool:
        """No keys configured: loopback clients are served without authentication."""
        return not self._keys

    async def check(
        self, client_ip: str | None, host: str | None, origin: str | None, authorization: str | None
    ) -> Denied | None:
        if self.open_to_loopback:
            if not is_loopback_ip(client_ip):
                return Denied(403, "with no [[api_keys]] configured, only loopback clients are served")
            if not is_loopback_host(host):
                return Denied(403, "with no [[api_keys]] configured, the Host must be a loopback address")
            if origin is not None and not is_loopback_host(urlsplit(origin).netloc):
                return Denied(403, "cross-origin requests are refused")
            return None
        token = _bearer_token(authorization)
        if token is None:
            return Denied(
                401, "an API key is required (Authorization: Bearer KEY)", 'Bearer realm="hedwigpy"'
            )
        if await self.key_name(token) is None:
            return Denied(401, "the API key is not valid", 'Bearer realm="hedwigpy", error="invalid_token"')
        return None

    async def user(self, authorization: str | None) -> str | None:
        """The name of the key an authorized request used (its envelope's `auth_user`); None when no
        keys are configured."""
        token = _bearer_token(authorization)
        if self.open_to_loopback or token is None:
            return None
        return await self.key_name(token)

    async def key_name(self, token: str) -> str | None:
        """The name of the `[[api_keys]]` entry `token` matches, or None."""
        digest = hashlib.sha256(token.encode()).digest()
        for known, known_name in self._verified.items():
            if hmac.compare_digest(known, digest):
                return known_name
        keys, verified = self._keys, self._verified  # as they are now: a reload may replace both
        async with self._limiter:
            name = await run_sync(_verify, keys, token)
        if name is not None and verified is self._verified:  # a key a reload removed is not remembered
            verified[digest] = name
        return name if keys is self._keys else await self.key_name(token)


def _verify(keys: Sequence[ApiKeyConfig], token: str) -> str | None:
    found: str | None = None
    for key in keys:  # every key, so the time taken does not tell which one matched
        if verify_password(token, key.key_hash) and found is None:
            found = key.name
    return found


def _bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
