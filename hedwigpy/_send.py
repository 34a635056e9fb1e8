"""`hedwigpy send`: one test message through the local daemon over SMTP (stdlib smtplib), to the first
`[[listeners]]` entry (or the one named), printing the daemon's final reply.

TLS follows the listener: STARTTLS or implicit TLS. On loopback the certificate is not verified (the
daemon is this machine; test set-ups use self-signed certificates); elsewhere it is.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import os
import smtplib
import ssl
import sys
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from email.utils import formatdate, make_msgid
from typing import Any

from .cli_queue import EXIT_REFUSED, EXIT_UNREACHABLE, CliError, connect_addr, load_target_config

ENV_PASSWORD = "HEDWIG_PASSWORD"
TIMEOUT = 60.0


def _tls_context(host: str) -> ssl.SSLContext:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        return ssl.create_default_context()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _listener(config: Any, name: str | None) -> tuple[str, int, str]:
    """(host, port, tls) of the listener to use."""
    from .config import DEFAULT_LISTENER_ADDR

    if config is None:
        if name is not None:
            raise CliError(f"no config file, so no listener named {name!r}", EXIT_UNREACHABLE)
        addr, tls = DEFAULT_LISTENER_ADDR, "none"
    else:
        chosen = [lst for lst in config.listeners if name is None or lst.name == name]
        if not chosen:
            raise CliError(f"no [[listeners]] entry named {name!r}", EXIT_UNREACHABLE)
        addr, tls = chosen[0].addr, chosen[0].tls
    target = connect_addr(addr)
    if target.port == 0:
        raise CliError(
            "the listener's port is 0 (chosen at start-up): cannot find the daemon", EXIT_UNREACHABLE
        )
    return target.host, target.port, tls


def build_message(
    sender: str, recipients: list[str], subject: str, body: str | None, domain: str
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("hedwigpy", domain=domain)
    msg["X-Mailer"] = "hedwigpy send"
    msg.set_content(
        body if body is not None else f"A test message sent by `hedwigpy send` on {msg['Date']}.\n"
    )
    return msg


def _reply(code: int, text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return f"{code} {text}".replace("\n", f"\n{code} ")


def cmd_send(args: argparse.Namespace) -> None:
    config = load_target_config(args.config)
    host, port, tls = _listener(config, args.listener)
    domain = "localhost" if config is None else config.server.hostname
    sender = args.sender if args.sender is not None else f"hedwigpy@{domain}"
    message = build_message(sender, args.to, args.subject, args.body, domain)
    where = f"smtp://{host}:{port}" if ":" not in host else f"smtp://[{host}]:{port}"
    try:
        smtp: smtplib.SMTP
        if tls == "implicit":
            smtp = smtplib.SMTP_SSL(host, port, "localhost", timeout=TIMEOUT, context=_tls_context(host))
        else:
            smtp = smtplib.SMTP(host, port, "localhost", timeout=TIMEOUT)
    except smtplib.SMTPConnectError as exc:  # a daemon answered, with a refusal
        raise CliError(_reply(exc.smtp_code, exc.smtp_error), EXIT_REFUSED) from None
    except ssl.SSLError as exc:
        raise CliError(f"{where}: TLS failed: {exc}", EXIT_REFUSED) from None
    except OSError:
        raise CliError(f"no hedwigpy daemon answers at {where} (is it running?)", EXIT_UNREACHABLE) from None
    try:
        with smtp:
            _transaction(
                smtp, _tls_context(host) if tls == "starttls" else None, sender, args.to, message, args.user
            )
    except smtplib.SMTPResponseException as exc:
        raise CliError(_reply(exc.smtp_code, exc.smtp_error), EXIT_REFUSED) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise CliError(f"{where}: {exc or type(exc).__name__}", EXIT_REFUSED) from None


def _transaction(
    smtp: smtplib.SMTP,
    starttls: ssl.SSLContext | None,
    sender: str,
    recipients: list[str],
    message: EmailMessage,
    user: str | None,
) -> None:
    smtp.ehlo()
    if starttls is not None:
        smtp.starttls(context=starttls)
        smtp.ehlo()
    if user:
        password = os.environ.get(ENV_PASSWORD) or getpass.getpass(f"Password for {user}: ")
        smtp.login(user, password)
    code, text = smtp.mail(sender)
    if code != 250:
        raise smtplib.SMTPResponseException(code, text)
    accepted = 0
    for rcpt in recipients:
        code, text = smtp.rcpt(rcpt)
        if code in (250, 251):
            accepted += 1
        else:
            print(f"<{rcpt}>: {_reply(code, text)}", file=sys.stderr)
    if not accepted:
        smtp.rset()
        raise CliError("no recipient was accepted", EXIT_REFUSED)
    code, text = smtp.data(message.as_bytes(policy=SMTP_POLICY))  # CRLF line ends, as on the wire
    print(_reply(code, text))
    if not 200 <= code < 300:
        raise CliError("the message was not accepted", EXIT_REFUSED)
