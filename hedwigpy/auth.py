"""Password hashes for `[[users]]` and `[[api_keys]]`, and the SASL PLAIN/LOGIN decoders.

Hashes are scrypt (stdlib `hashlib.scrypt`) in a self-describing string,
`$scrypt$ln=14,r=8,p=1$<salt>$<hash>` (base64 without padding), so parameters can be raised later
without breaking stored hashes. Verification compares in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

_DEFAULT_LN = 14  # n = 2**14: ~50 ms on a small core, 16 MiB of memory
_R = 8
_P = 1
_DKLEN = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def hash_password(password: str, *, ln: int = _DEFAULT_LN) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**ln, r=_R, p=_P, dklen=_DKLEN)
    return f"$scrypt$ln={ln},r={_R},p={_P}${_b64(salt)}${_b64(digest)}"


def is_valid_hash(stored: str) -> bool:
    return _parse(stored) is not None


def _parse(stored: str) -> tuple[int, int, int, bytes, bytes] | None:
    parts = stored.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "scrypt":
        return None
    try:
        params = dict(item.split("=", 1) for item in parts[2].split(","))
        ln, r, p = int(params["ln"]), int(params["r"]), int(params["p"])
        salt, digest = _unb64(parts[3]), _unb64(parts[4])
    except (ValueError, KeyError, binascii.Error):
        return None
    if not (1 <= ln <= 20 and 1 <= r <= 32 and 1 <= p <= 16 and digest):
        return None
    return ln, r, p, salt, digest


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches `stored`; a malformed hash never matches. Blocking: ~50 ms."""
    parsed = _parse(stored)
    if parsed is None:
        return False
    ln, r, p, salt, digest = parsed
    candidate = hashlib.scrypt(
        password.encode(), salt=salt, n=2**ln, r=r, p=p, dklen=len(digest), maxmem=2**28
    )
    return hmac.compare_digest(candidate, digest)


class SaslError(ValueError):
    """The client's SASL data is not well formed (bad base64, missing fields)."""


def decode_b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("Invalid base64") from None


def parse_plain(response: str) -> tuple[str, str]:
    """RFC 4616: base64(authzid NUL authcid NUL password) → (authcid, password)."""
    fields = decode_b64(response).split(b"\0")
    if len(fields) != 3 or not fields[1]:
        raise SaslError("Malformed PLAIN response")
    try:
        return fields[1].decode(), fields[2].decode()
    except UnicodeDecodeError:
        raise SaslError("PLAIN response is not UTF-8") from None


def decode_text(response: str) -> str:
    """One base64 line of the LOGIN mechanism, as text."""
    try:
        return decode_b64(response).decode()
    except UnicodeDecodeError:
        raise SaslError("LOGIN response is not UTF-8") from None


LOGIN_USERNAME = base64.b64encode(b"Username:").decode()
LOGIN_PASSWORD = base64.b64encode(b"Password:").decode()
