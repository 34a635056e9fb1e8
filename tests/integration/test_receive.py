"""The daemon receives mail from stdlib smtplib over plain TCP, STARTTLS, implicit TLS, with AUTH."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme

from hedwigpy.auth import hash_password

from .daemon import Daemon, read_message


def make_message(to: str = "rcpt@dest.example", body: str = "hello\n") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@src.example"
    msg["To"] = to
    msg["Subject"] = "test"
    msg.set_content(body)
    return msg


def test_plain_smtp_message_is_spooled_with_trace_and_message_id(daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port(), timeout=10) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        for ext in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes", "chunking"):
            assert client.has_extn(ext), ext
        assert not client.has_extn("auth")  # no [[users]] configured
        refused = client.send_message(make_message())
        assert refused == {}
    [path] = daemon.spooled()
    envelope, content = read_message(path)
    assert envelope["sender"] == "sender@src.example"
    assert envelope["recipients"] == ["rcpt@dest.example"]
    assert content.startswith(
        b"Received: from client.example ([127.0.0.1])\r\n\tby mx.test.example (hedwigpy)"
    )
    assert b"\r\nMessage-ID: <" in content
    assert content.endswith(b"hello\r\n")
    assert daemon.spooled("tmp") == []


def test_queued_reply_names_the_id(daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.port(), timeout=10) as client:
        client.ehlo()
        client.mail("a@src.example")
        client.rcpt("b@dest.example")
        code, text = client.data(b"Subject: x\r\nMessage-ID: <given@src.example>\r\n\r\nbody\r\n")
    assert code == 250
    [path] = daemon.spooled()
    assert text.decode() == f"2.0.0 Ok: queued as {path.stem}"
    _, content = read_message(path)
    assert content.count(b"Message-ID:") == 1


def tls_config(config: dict[str, Any], certfiles: tuple[Path, Path], tls: str) -> None:
    cert, key = certfiles
    config["listeners"][0].update({"tls": tls, "cert": str(cert), "key": str(key)})


@pytest.mark.parametrize("implicit", [False, True])
def test_tls_listeners(
    tmp_path: Path,
    config: dict[str, Any],
    certfiles: tuple[Path, Path],
    ca: trustme.CA,
    daemon_factory: type[Daemon],
    implicit: bool,
) -> None:
    tls_config(config, certfiles, "implicit" if implicit else "starttls")
    d = daemon_factory(tmp_path, config)
    d.start()
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    client: smtplib.SMTP
    if implicit:
        client = smtplib.SMTP_SSL("localhost", d.port(), timeout=10, context=ctx)
        client.ehlo()
        assert not client.has_extn("starttls")
    else:
        client = smtplib.SMTP("localhost", d.port(), timeout=10)
        client.ehlo()
        assert client.has_extn("starttls")
        client.starttls(context=ctx)
        client.ehlo()
        assert not client.has_extn("starttls")
    with client:
        assert client.send_message(make_message()) == {}
    [path] = d.spooled()
    _, content = read_message(path)
    assert b" with ESMTPS id " in content


def test_auth_plain_and_login(tmp_path: Path, config: dict[str, Any], daemon_factory: type[Daemon]) -> None:
    config["users"] = [{"name": "app", "password_hash": hash_password("s3cret", ln=10)}]
    config["listeners"][0].update({"require_auth": True, "trusted_networks": []})
    d = daemon_factory(tmp_path, config)
    d.start()
    for mechanism in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", d.port(), timeout=10) as client:
            client.ehlo()
            assert client.has_extn("auth")  # loopback: offered without TLS
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("a@src.example", ["b@far.example"], b"Subject: x\r\n\r\nx\r\n")
            assert refused.value.smtp_code == 530
            with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
                client.user, client.password = "app", "wrong"
                client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            assert bad.value.smtp_code == 535
            client.user, client.password = "app", "s3cret"
            code, _ = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            assert code == 235
            client.sendmail("a@src.example", ["b@far.example"], b"Subject: x\r\n\r\nx\r\n")
    paths = d.spooled()
    assert len(paths) == 2
    for path in paths:
        envelope, content = read_message(path)
        assert envelope["auth_user"] == "app"
        assert b" with ESMTPA id " in content
