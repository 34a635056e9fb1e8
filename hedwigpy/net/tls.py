"""TLS contexts: listeners (server side) and outbound delivery (client side)."""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context with modern defaults (TLS 1.2+), loaded from PEM files."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def client_context(*, verify: bool) -> ssl.SSLContext:
    """A client context. `verify=False` encrypts without checking who answers, as Postfix's "may" and
    "encrypt" levels do for MX hosts (whose certificates rarely match without DANE or MTA-STS);
    `verify=True` checks the chain against the system trust store (which honours SSL_CERT_FILE) and the
    host name, for smarthosts we send credentials to."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
