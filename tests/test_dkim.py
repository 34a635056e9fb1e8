"""DKIM signing (issue 7) below the daemon: keys loaded and checked, the From domain and its parents, the
signature byte-for-byte equal to dkimpy's own signer, verified by dkimpy's verifier, broken by any added
copy of a signed field; and the submit step signing once, before cut-through and the spool."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from hedwigpy.config import DkimConfig, DkimKeyConfig
from hedwigpy.dkim import (
    DkimKeyError,
    Signer,
    SigningKey,
    check_keys,
    from_domain,
    load_key,
    oversigned,
)
from hedwigpy.smtp.framing import normalize_line_endings
from hedwigpy.storage import Envelope, MemoryStorage

NOW = 1_800_000_000
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
MESSAGE = (
    b"Received: from client.example ([192.0.2.7])\r\n\tby mx.example.org (hedwigpy); Thu, 1 Jan 2026\r\n"
    b"From: Ann <ann@mail.example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <1@mail.example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe  aus   K\xc3\xb6ln \r\n\r\n\r\n"
)


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def txt_record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """The DNS TXT record publishing `key` (what `hedwigpy dkim generate` prints, joined)."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dns_of(*keys: SigningKey) -> Callable[..., bytes | None]:
    records = {f"{k.selector}._domainkey.{k.domain}.".encode(): txt_record(k.key) for k in keys}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return records.get(name)

    return lookup


def verify_all(message: bytes, dnsfunc: Callable[..., bytes | None]) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature of `message`, top first."""
    d = dkim.DKIM(message)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    results = []
    for i in range(count):
        try:
            results.append(bool(dkim.DKIM(message).verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            results.append(False)
    return results


RSA = SigningKey("example.com", "rsa2026", Path("rsa.pem"), RSA_KEY)
ED = SigningKey("example.com", "ed2026", Path("ed.pem"), ED_KEY)


# ---- the signature ----------------------------------------------------------------------------------


def test_signature_is_what_dkimpy_itself_signs() -> None:
    """Same tags, folding and bytes as `dkim.sign` (dkimpy's own RSA and Ed25519 code) at the same time."""
    signer = Signer([RSA, ED])
    ours = signer.sign(MESSAGE, [RSA, ED], now=NOW)
    rsa_pem = RSA_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    seed = ED_KEY.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    options = {
        "canonicalize": (b"relaxed", b"relaxed"),
        "include_headers": list(oversigned(dkim.rfc822_parse(MESSAGE)[0])),
    }
    with mock.patch("time.time", return_value=NOW):
        theirs = dkim.sign(MESSAGE, b"rsa2026", b"example.com", rsa_pem, **options)
        theirs += dkim.sign(
            MESSAGE,
            b"ed2026",
            b"example.com",
            base64.b64encode(seed),
            signature_algorithm=b"ed25519-sha256",
            **options,
        )
    assert ours == theirs


def test_oversigning_lists_each_field_once_more_than_it_occurs() -> None:
    headers = [(b"From", b" a"), (b"To", b" b"), (b"to", b" c"), (b"X-Other", b" d")]
    assert oversigned(headers) == (
        b"from",
        b"from",
        b"to",
        b"to",
        b"to",
        b"cc",
        b"subject",
        b"date",
        b"message-id",
        b"reply-to",
        b"mime-version",
        b"content-type",
    )


@pytest.mark.parametrize("keys", [[RSA], [ED], [RSA, ED]], ids=["rsa", "ed25519", "both"])
def test_dkimpy_verifies_and_an_added_field_breaks_it(keys: list[SigningKey]) -> None:
    signed = Signer(keys).sign(MESSAGE, keys) + MESSAGE
    lookup = dns_of(*keys)
    assert verify_all(signed, lookup) == [True] * len(keys)
    tampered = [
        b"Subject: changed\r\n" + signed,  # a second Subject, on top (where a verifier looks first)
        b"Cc: eve@example.org\r\n" + signed,  # a field that was absent
        signed.replace(b"From: Ann <ann@", b"From: Eve <eve@"),
        signed + b"one more line\r\n",
    ]
    for message in tampered:
        assert verify_all(message, lookup) == [False] * len(keys)
    # Fields not signed may come and go (Received: relays add theirs).
    assert verify_all(b"Received: from relay.example\r\n" + signed, lookup) == [True] * len(keys)


def test_relaxed_canonicalization_survives_rewrapping() -> None:
    signed = Signer([RSA]).sign(MESSAGE, [RSA]) + MESSAGE
    rewrapped = signed.replace(b"To: bob@example.net", b"To:   bob@example.net  ").replace(
        b"aus   K", b"aus K"
    )
    assert verify_all(rewrapped, dns_of(RSA)) == [True]


# ---- which domain, which keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (b"From: Ann <ann@Example.COM>\r\nTo: x@y\r\n", ("example.com", "")),
        (b"from:ann@example.com\r\n", ("example.com", "")),
        (b'From: "Doe, Ann"\r\n <ann@example.com>\r\n', ("example.com", "")),
        (b"From: a@example.com, b@example.com\r\n", ("example.com", "")),
        ("From: Zoë <zoe@bücher.example>\r\n".encode(), ("xn--bcher-kva.example", "")),
        (b"To: x@y\r\n", (None, "no From field")),
        (b"From: a@example.com\r\nFrom: b@example.com\r\n", (None, "2 From fields")),
        (b"From: a@example.com, b@example.org\r\n", (None, "From names mailboxes of different domains")),
        (b"From: undisclosed\r\n", (None, "no address in the From field")),
    ],
)
def test_from_domain(section: bytes, expected: tuple[str | None, str]) -> None:
    assert from_domain(section) == expected


def test_keys_of_the_domain_or_its_closest_parent() -> None:
    sub = SigningKey("news.example.com", "n1", Path("n.pem"), ED_KEY)
    signer = Signer([RSA, ED, sub])
    assert signer.keys_for("example.com") == (RSA, ED)
    assert signer.keys_for("mail.example.com") == (RSA, ED)
    assert signer.keys_for("a.news.example.com") == (sub,)
    assert signer.keys_for("example.org") == ()
    assert signer.keys_for("com") == ()
    assert signer.keys_for("a." * 100 + "example.com") == (RSA, ED)  # 211 characters: a real name
    assert signer.keys_for("a." * 50_000 + "example.com") == ()  # no such name: refused at once


# ---- keys ----------------------------------------------------------------------------------------------


def write_key(path: Path, data: bytes, mode: int = 0o600) -> DkimKeyConfig:
    path.write_bytes(data)
    path.chmod(mode)
    return DkimKeyConfig("example.com", "s1", path)


def test_load_rsa_and_ed25519(tmp_path: Path) -> None:
    r = load_key(write_key(tmp_path / "r.pem", pem(RSA_KEY)), "k")
    e = load_key(write_key(tmp_path / "e.pem", pem(ED_KEY)), "k")
    assert (r.algorithm, e.algorithm) == (b"rsa-sha256", b"ed25519-sha256")
    traditional = RSA_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert load_key(write_key(tmp_path / "t.pem", traditional), "k").algorithm == b"rsa-sha256"


def _small_rsa_pem() -> bytes:
    """A 512-bit RSA key (cryptography refuses to generate one; it still loads one)."""

    def prime(bits: int) -> int:
        while True:
            n = secrets.randbits(bits) | (3 << (bits - 2)) | 1  # top two bits: p*q has 2*bits bits
            if all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)):
                return n

    e = 65537
    while True:
        p, q = prime(256), prime(256)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    return pem(numbers.private_key(unsafe_skip_rsa_key_validation=True))


@pytest.mark.parametrize(
    ("name", "make", "mode", "message"),
    [
        ("missing", None, 0o600, "no such file"),
        ("open.pem", lambda: pem(ED_KEY), 0o644, "group or others have access (mode 0644)"),
        ("group.pem", lambda: pem(ED_KEY), 0o640, "mode 0640"),
        ("garbage.pem", lambda: b"-----BEGIN PRIVATE KEY-----\nnot base64\n", 0o600, "not a PEM private key"),
        ("pub.pem", lambda: txt_record(RSA_KEY), 0o600, "not a PEM private key"),
        (
            "ec.pem",
            lambda: pem(ec.generate_private_key(ec.SECP256R1())),
            0o600,
            "DKIM signs with RSA or Ed25519 keys only",
        ),
        ("small.pem", _small_rsa_pem, 0o600, "RSA key of 512 bits; DKIM needs at least 1024"),
        (
            "encrypted.pem",
            lambda: ED_KEY.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
            0o600,
            "the key is encrypted",
        ),
    ],
)
def test_bad_keys_are_named_errors(
    tmp_path: Path, name: str, make: Callable[[], bytes] | None, mode: int, message: str
) -> None:
    path = tmp_path / name
    entry = DkimKeyConfig("example.com", "s1", path) if make is None else write_key(path, make(), mode)
    with pytest.raises(DkimKeyError) as caught:
        load_key(entry, "dkim.keys[3].private_key")
    assert str(caught.value).startswith(f"dkim.keys[3].private_key: {path}: ")
    assert message in str(caught.value)


def test_every_bad_key_is_reported(tmp_path: Path) -> None:
    good = write_key(tmp_path / "good.pem", pem(ED_KEY))
    config = DkimConfig(
        keys=(
            DkimKeyConfig("example.com", "a", tmp_path / "nope.pem"),
            good,
            write_key(tmp_path / "open.pem", pem(ED_KEY), 0o604),
        )
    )
    problems = check_keys(config)
    assert [p.split(":")[0] for p in problems] == ["dkim.keys[0].private_key", "dkim.keys[2].private_key"]
    with pytest.raises(DkimKeyError) as caught:
        Signer.from_config(config)
    assert caught.value.problems == problems
    assert Signer.from_config(DkimConfig(keys=(good,))).keys_for("example.com")[0].path == good.private_key


# ---- signing a message in a spool writer ---------------------------------------------------------------


def envelope() -> Envelope:
    return Envelope(sender="ann@mail.example.com", recipients=("bob@example.net",))


async def _signed(signer: Signer, content: bytes) -> tuple[int, bytes]:
    writer = MemoryStorage().writer(envelope())
    await writer.write(content)
    added = await signer.sign_writer(writer)
    return added, b"".join([c async for c in writer.content()])


async def test_sign_writer_prepends_the_signatures() -> None:
    added, content = await _signed(Signer([RSA, ED]), MESSAGE)
    assert content.endswith(MESSAGE)
    assert added == len(content) - len(MESSAGE) > 0
    assert content.count(b"DKIM-Signature:") == 2
    assert verify_all(content, dns_of(RSA, ED)) == [True, True]


@pytest.mark.parametrize(
    "content",
    [
        MESSAGE.replace(b"ann@mail.example.com", b"ann@example.org"),  # not our domain
        b"From: ann@example.com\r\n" + MESSAGE,  # two From fields: which one would a reader see?
        MESSAGE.replace(b"From: Ann <ann@mail.example.com>\r\n", b""),
        b"\r\nno header section at all\r\n",
    ],
    ids=["other-domain", "two-from", "no-from", "no-headers"],
)
async def test_sign_writer_leaves_other_mail_alone(content: bytes) -> None:
    assert await _signed(Signer([RSA]), content) == (0, content)


async def test_sign_writer_with_a_header_only_message() -> None:
    added, content = await _signed(Signer([ED]), b"From: a@example.com\r\nSubject: only headers\r\n")
    assert added > 0
    assert verify_all(content, dns_of(ED)) == [True]


@pytest.mark.parametrize(
    "broken",
    [
        b"From: a@example.com\r\nthis line is no header field\r\n\r\nbody\r\n",
        b" From: a@example.com\r\n\r\nbody\r\n",  # dkimpy raises IndexError on a leading fold
    ],
)
async def test_unparsable_header_section_is_sent_unsigned(broken: bytes) -> None:
    assert await _signed(Signer([RSA]), broken) == (0, broken)


async def test_no_keys_reads_nothing() -> None:
    writer = MemoryStorage().writer(envelope())
    await writer.write(MESSAGE)
    with mock.patch.object(type(writer), "content", side_effect=AssertionError("read")):
        assert await Signer([]).sign_writer(writer) == 0


async def test_large_message_is_signed_whole(tmp_path: Path) -> None:
    from hedwigpy.storage import FilesystemStorage

    storage = FilesystemStorage(tmp_path / "spool")
    await storage.open()
    body = b"".join(b"%08d " % i + os.urandom(30).hex().encode() + b"\r\n" for i in range(20_000))
    message = MESSAGE + body
    writer = storage.writer(envelope())
    for start in range(0, len(message), 65536):
        await writer.write(message[start : start + 65536])
    added = await Signer([RSA]).sign_writer(writer)
    stored = await writer.commit()
    content = b"".join([c async for c in storage.read_content(stored.id)])
    assert stored.size == len(message) + added
    assert content.endswith(message)
    assert verify_all(content, dns_of(RSA)) == [True]


@pytest.mark.parametrize("cut_through", [True, False])
async def test_submit_signs_once_before_cut_through_and_the_spool(cut_through: bool) -> None:
    """The cut-through attempt gets the signed message, and the spool keeps exactly those bytes (which
    every retry reads), signed once; the size the spool records includes the signature."""
    from tests.test_submit import Harness, config

    h = Harness({"bob@example.net": ["451 4.3.0 try later"]}, cfg=config(cut_through=cut_through))
    h.submitter.signer = Signer([RSA, ED])
    submitted = await h.send("bob@example.net", body=MESSAGE)
    assert submitted.path == "queued"
    stored, content = h.memory.messages[submitted.message_id]
    assert content.count(b"DKIM-Signature:") == 2 and content.endswith(MESSAGE)
    assert stored.size == len(content)
    assert verify_all(content, dns_of(RSA, ED)) == [True, True]
    if cut_through:
        assert [c.content for c in h.delivery.calls] == [content]
    else:
        assert h.delivery.calls == []


EDGE_BODIES = [
    b"",
    b"\r\n",
    b"\r\n\r\n\r\n",
    b"no line end",
    b"a  b\t\tc \t \r\n\t lead\r\n  \r\n\r\n",
    b"bare\nline\nends \n\n",
    b"mixed\r\nbare\n\r\n",
    b"cr\ronly\r\n",
    b"one space only\r\n",
    b"trailing tab\t\r\nx",
]


@pytest.mark.parametrize("body", EDGE_BODIES)
@pytest.mark.parametrize(
    "head",
    [
        b"From: a@example.com\r\nSubject:  x\r\n\t folded \r\n\r\n",
        b"From: a@example.com\nSubject: bare LF\n\n",
        b"From: a@example.com\r\n\n",
        b"\r\n",
        b"\n",
        b"From: a@example.com\r\nSubject: no blank line\r\n",
    ],
)
def test_split_message_and_relaxed_body_are_dkimpys(head: bytes, body: bytes) -> None:
    from dkim.canonicalization import Relaxed

    from hedwigpy.dkim import relaxed_body, split_message

    message = (
        head + body if head.endswith((b"\r\n\r\n", b"\n\n", b"\r\n\n")) or head in (b"\r\n", b"\n") else head
    )
    headers, rest = split_message(message)
    assert (headers, rest) == dkim.rfc822_parse(message)
    assert relaxed_body(rest) == Relaxed.canonicalize_body(rest)
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


@pytest.mark.parametrize(
    "body",
    [
        b"a \r\n\tb\t\r\nc",
        b"a \r\nlast line keeps its space ",
        b" \r\n \r\n",
        b"cr \r \r\n",
        b"x\r\n\r\n \t \r\n",
        b"  lead  and  inner \t\r\n",
    ],
)
def test_relaxed_body_trailing_whitespace(body: bytes) -> None:
    from dkim.canonicalization import Relaxed

    from hedwigpy.dkim import relaxed_body

    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


@pytest.mark.parametrize("bare", [b"\r", b"\n"], ids=["bare CR", "bare LF"])
def test_signed_as_sent_when_the_message_has_bare_line_ends(bare: bytes) -> None:
    """Delivery sends every bare CR or LF as CRLF: the signature must hold for those bytes."""
    stored = MESSAGE.replace(b"\r\n\r\n", b"\r\n\r\nline one" + bare + b"line two\r\n", 1)
    signer = Signer([RSA])
    sent = normalize_line_endings(signer.sign(stored, [RSA]) + stored)
    assert verify_all(sent, dns_of(RSA)) == [True]
