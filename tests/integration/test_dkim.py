"""DKIM (issue 7) end to end: keys made by `hedwigpy dkim generate`, their printed TXT records published
on the loopback DNS server, mail sent through the real daemon (smtplib and REST) to an aiosmtpd upstream,
and what the upstream received verified by dkimpy's verifier, which fetches the keys over real DNS.

    example.net   mx1.example.net  127.0.0.2  aiosmtpd; busy@ answers 451 at RCPT once, then 250
    example.com   the signing domain: s-rsa._domainkey / s-ed._domainkey TXT records
"""

from __future__ import annotations

import base64
import re
import smtplib
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dns.resolver
import httpx
import pytest
import tomli_w

from tests.dns_server import DnsServer
from tests.test_dkim import verify_all

from .daemon import Daemon, read_message
from .outbound import MX1, configure, publish, queued_id, settle, start
from .test_reload import reload
from .upstream import Transaction, Upstream, UpstreamPool, wait_until

pytestmark = pytest.mark.timeout(90)

SENDER = "app@example.com"
RECORD = re.compile(r"^(\S+) IN TXT (.+)$")
KEYS = {"rsa": ("s-rsa", "rsa"), "ed25519": ("s-ed", "ed25519")}


def generate(
    tmp: Path, dns: DnsServer, kind: str, *, domain: str = "example.com", config: Path | None = None
) -> dict[str, str]:
    """Run the CLI, publish the record it printed; the `[[dkim.keys]]` entry for the key."""
    selector, key_type = KEYS[kind]
    out = tmp / f"{selector}.pem"
    argv = ["dkim", "generate", "--domain", domain, "--selector", selector, "--type", key_type]
    argv += ["--out", str(out)] + (["--config", str(config)] if config else [])
    done = subprocess.run(
        [sys.executable, "-m", "hedwigpy", *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    match = RECORD.match(done.stdout.strip())
    assert match, done.stdout
    dns.add_record(match.group(1), "TXT", match.group(2))  # as a zone file would read it
    return {"domain": domain, "selector": selector, "private_key": str(out)}


def dns_lookup(server: DnsServer) -> Callable[..., bytes | None]:
    """dkimpy's `dnsfunc`: the TXT record of a name, asked of the loopback server with dnspython."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = server.port

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT", lifetime=timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as exc:
            raise AssertionError(f"no TXT record for {name!r}: {exc}") from None
        return b"".join(answer[0].strings)

    return lookup


def message(subject: str, *, sender: str = SENDER, extra: str = "", body: str = "") -> bytes:
    return (
        f"From: App <{sender}>\r\nTo: Ann <ann@example.net>\r\nSubject: {subject}\r\n"
        f"Bcc: hidden@example.net\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n{extra}\r\n"
        f"{body or f'This is {subject}.'}\r\n"
    ).encode()


def smtp_send(daemon: Daemon, data: bytes, rcpts: Sequence[str], options: Sequence[str] = ()) -> str:
    with smtplib.SMTP("127.0.0.1", daemon.port(), timeout=30) as client:
        client.ehlo("client.example")
        code, text = client.mail(SENDER, list(options))
        assert code == 250, text
        for rcpt in rcpts:
            assert client.rcpt(rcpt)[0] == 250
        code, text = client.data(data)
        assert code == 250, text
        return text.decode()


def received(mx: Upstream, subject: str) -> Transaction:
    wait_until(lambda: any(subject in t.subject for t in mx.transactions), 20, f"{subject!r} upstream")
    (transaction,) = [t for t in mx.transactions if subject in t.subject]
    return transaction


Launch = Callable[..., Daemon]


@pytest.fixture
def launch(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    mx: Upstream,
) -> Launch:
    """`launch(["rsa", "ed25519"], cut_through=True)`: keys of those kinds made with the CLI and
    published, then the daemon started with them, delivering to `mx`."""

    def start_with(kinds: Sequence[str], **delivery: Any) -> Daemon:
        keys = [generate(tmp_path, dns, kind) for kind in kinds]
        upstreams.start()
        configure(config, dns, upstreams, **delivery)
        config["dkim"] = {"keys": keys}
        config["queue"] = {"retry_initial": "1s", "retry_jitter": 0.0}
        return start(daemon_factory, tmp_path, config)

    return start_with


@pytest.fixture
def mx(dns: DnsServer, upstreams: UpstreamPool) -> Upstream:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    return upstreams.add(MX1, name="mx1.example.net", rcpt_replies={"busy@example.net": ["451 4.2.1 busy"]})


@pytest.mark.parametrize("kinds", [["rsa"], ["ed25519"], ["rsa", "ed25519"]], ids=["rsa", "ed25519", "both"])
def test_signed_over_smtp_and_verified(
    launch: Launch, dns: DnsServer, mx: Upstream, kinds: list[str]
) -> None:
    d = launch(kinds, cut_through=True)
    smtp_send(d, message("plain"), ["ann@example.net"])
    content = received(mx, "plain").content
    lookup = dns_lookup(dns)
    assert content.count(b"DKIM-Signature:") == len(kinds)
    assert b"hidden@example.net" not in content  # Bcc was gone before signing
    assert verify_all(content, lookup) == [True] * len(kinds)
    # A copy of a signed field added after signing, where a reader would see it first: every
    # signature fails (they are oversigned).
    for added in (
        b"Subject: not what was signed\r\n",
        b"From: ceo@example.com\r\n",
        b"Cc: x@example.org\r\n",
    ):
        assert verify_all(added + content, lookup) == [False] * len(kinds)


def test_non_ascii_subject_and_8bit_body(launch: Launch, dns: DnsServer, mx: Upstream) -> None:
    d = launch(["rsa", "ed25519"], cut_through=True)
    extra = (
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
    )
    body = "Grüße aus Köln — 8-bit body, façade, ½\r\n\r\n\r\n"
    raw_subject = message("Grüße raw ünïcödé", extra=extra, body=body)
    smtp_send(d, raw_subject, ["ann@example.net"], ["SMTPUTF8", "BODY=8BITMIME"])
    encoded = message("=?utf-8?q?Gr=C3=BC=C3=9Fe_encoded?=", extra=extra, body=body)
    smtp_send(d, encoded, ["ann@example.net"], ["BODY=8BITMIME"])
    lookup = dns_lookup(dns)
    for subject in ("raw ünïcödé", "encoded?="):
        content = received(mx, subject).content
        assert "Köln".encode() in content
        assert verify_all(content, lookup) == [True, True]


def test_rest_structured_and_raw_are_signed(
    launch: Launch, config: dict[str, Any], dns: DnsServer, mx: Upstream
) -> None:
    d = launch(["ed25519"], cut_through=True)
    raw = message("rest raw", body="8-bit: Grüße")
    with httpx.Client(base_url=f"http://{config['http']['addr']}", timeout=30, trust_env=False) as client:
        structured = {
            "from": "Zoë App <app@example.com>",
            "to": ["ann@example.net"],
            "bcc": ["hidden@example.net"],
            "subject": "rest structured — Grüße",
            "text": "Hallo Köln",
        }
        assert client.post("/v1/messages", json=structured).status_code == 200
        payload = {
            "envelope_from": SENDER,
            "recipients": ["ann@example.net"],
            "raw": base64.b64encode(raw).decode(),
        }
        assert client.post("/v1/messages", json=payload).status_code == 200
    lookup = dns_lookup(dns)
    wait_until(lambda: len(mx.transactions) == 2, 20, "both REST messages")
    assert sorted(len(t.rcpt_tos) for t in mx.transactions) == [1, 2]  # structured: ann and the Bcc
    for t in mx.transactions:
        assert t.content.count(b"DKIM-Signature:") == 1
        assert b"hidden@example.net" not in t.content
        assert verify_all(t.content, lookup) == [True]
    assert d.proc is not None and d.proc.poll() is None


def test_cut_through_and_queued_retry_are_each_signed_once(
    launch: Launch, dns: DnsServer, mx: Upstream
) -> None:
    """One message goes out at once; one is refused with 451 first, spooled (signed), and retried from
    the spool: both arrive with exactly one signature per key, and the spool held the signed bytes."""
    d = launch(["rsa", "ed25519"], cut_through=True)
    reply = smtp_send(d, message("at once"), ["ann@example.net"])
    assert "queued as" not in reply  # the upstream's own reply: cut-through
    reply = smtp_send(d, message("later"), ["busy@example.net"])
    message_id = queued_id(reply)
    spooled = [p for s in ("queued", "deferred") for p in d.spooled(s) if p.stem == message_id]
    assert spooled, "the 451 should have kept the message"
    _, stored = read_message(spooled[0])
    assert settle(d, message_id, 30) == "gone"
    lookup = dns_lookup(dns)
    late = received(mx, "later").content
    assert late == stored  # the retry sent the stored, signed bytes: nothing signed twice
    for content in (received(mx, "at once").content, late):
        assert content.count(b"a=rsa-sha256") == 1 and content.count(b"a=ed25519-sha256") == 1
        assert verify_all(content, lookup) == [True, True]
    assert mx.rcpt_count("busy@example.net") == 2


def test_store_and_forward_and_parent_domain_and_other_domains(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
    mx: Upstream,
) -> None:
    """Keys added with `dkim generate --config`: a subdomain's mail is signed with its parent's key (d=
    the parent), mail from a domain without keys goes out unsigned."""
    upstreams.start()
    configure(config, dns, upstreams, cut_through=False)
    config_path = tmp_path / "hedwig.toml"
    config_path.write_text("# written by the test\n" + tomli_w.dumps(config))
    generate(tmp_path, dns, "rsa", config=config_path)
    d = daemon_factory(tmp_path, tomllib.loads(config_path.read_text()))
    d.start()
    smtp_send(d, message("from a subdomain", sender="news@mail.example.com"), ["ann@example.net"])
    smtp_send(d, message("someone else's", sender="x@example.org"), ["ann@example.net"])
    signed = received(mx, "from a subdomain").content
    assert b"d=example.com;" in signed
    assert verify_all(signed, dns_lookup(dns)) == [True]
    assert b"DKIM-Signature" not in received(mx, "someone else's").content


@pytest.mark.parametrize("problem", ["missing", "mode", "garbage"])
def test_bad_key_stops_serve_and_config_check(
    tmp_path: Path, config: dict[str, Any], dns: DnsServer, problem: str
) -> None:
    key = generate(tmp_path, dns, "ed25519")
    path = Path(key["private_key"])
    if problem == "missing":
        path.unlink()
    elif problem == "mode":
        path.chmod(0o644)
    else:
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    config["dkim"] = {"keys": [key]}
    config_path = tmp_path / "hedwig.toml"
    config_path.write_text(tomli_w.dumps(config))
    for command in (["serve"], ["config", "check"]):
        done = subprocess.run(
            [sys.executable, "-m", "hedwigpy", *command, "-c", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert f"{config_path}: dkim.keys[0].private_key: {path}: " in done.stderr


def test_sighup_adds_a_key_and_refuses_a_key_that_no_longer_loads(
    launch: Launch, dns: DnsServer, mx: Upstream, tmp_path: Path
) -> None:
    """Keys are reloaded with the config (issue 7, "reload on SIGHUP"): a key added to the file signs
    the next message; a reload whose key file became readable by others is refused, naming the key,
    and the running signer keeps signing."""
    d = launch([], cut_through=True)
    smtp_send(d, message("before"), ["ann@example.net"])
    assert b"DKIM-Signature:" not in received(mx, "before").content

    entry = generate(tmp_path, dns, "rsa")
    d.config["dkim"] = {"keys": [entry]}
    assert reload(d)["event"] == "reloaded"
    smtp_send(d, message("after"), ["ann@example.net"])
    assert verify_all(received(mx, "after").content, dns_lookup(dns)) == [True]

    Path(entry["private_key"]).chmod(0o644)
    refusal = reload(d)
    assert refusal["event"] == "reload refused; keeping the running config"
    assert any("dkim.keys[0].private_key" in e for e in refusal["errors"]), refusal
    smtp_send(d, message("still"), ["ann@example.net"])
    assert verify_all(received(mx, "still").content, dns_lookup(dns)) == [True]
    assert d.stop() == 0


def test_mail_from_a_client_without_relay_rights_is_not_signed(
    launch: Launch, config: dict[str, Any], dns: DnsServer, mx: Upstream
) -> None:
    """An ingress listener takes mail for its local domains from anyone: a stranger's message claiming
    our From domain must not leave with our signature (that would launder forged mail past DMARC)."""
    config["listeners"][0].update(role="ingress", trusted_networks=[], local_domains=["example.net"])
    d = launch(["rsa"], cut_through=True)
    smtp_send(d, message("from a stranger"), ["ann@example.net"])
    assert b"DKIM-Signature:" not in received(mx, "from a stranger").content
