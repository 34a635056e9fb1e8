"""DKIM signing (RFC 6376; Ed25519 by RFC 8463) of every message whose From domain has keys.

`[[dkim.keys]]` entries are loaded and checked once (`Signer.from_config`, also what a reload calls); a
bad key is a startup error naming its config key and file. A message is signed with every key of the
From domain, or of its closest parent domain that has keys (an RSA and an Ed25519 key: two signatures),
once, by the submit step, before cut-through or the spool — so retries send the stored, signed bytes.

Signatures are relaxed/relaxed, sha256, over From, To, Cc, Subject, Date, Message-ID, Reply-To,
MIME-Version and Content-Type, each listed once more than it occurs ("oversigned"): adding another copy
of any of them, or one that was absent, breaks the signature.

dkimpy does the DKIM part: header parsing and canonicalization, header selection and hashing, folding.
The private-key operation is done with `cryptography` (OpenSSL) instead of dkimpy's own: dkimpy's RSA is
pure Python, 13 ms per RSA-2048 signature on the project's machine against 0.8 ms, and it holds the GIL,
so it would serialise everything else. Two body steps are ours, for speed, with dkimpy's results: the
body is not split into lines and joined again (`split_message`), and whitespace is only rewritten where
there is some to rewrite (`relaxed_body`). The output is byte-for-byte what `dkim.sign` gives for the same
options and time (tests/test_dkim.py checks it); both RSASSA-PKCS1-v1_5 and Ed25519 are deterministic.
A message up to INLINE_LIMIT is signed on the event loop, a larger one in a worker thread: see
`Signer._sign_async` for why (measured: a thread costs more than it saves for a small message).

dkimpy hashes the body from one bytes object, so the whole message is read into memory to sign it: free
for the usual message (the spool writer still holds it, up to 256 KiB), and up to `max_message_size`
for a large one (read back from tmp/).
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import hashlib
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dkim
import structlog
import trio
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import CanonicalizationPolicy, correct_empty_body, strip_trailing_lines

from .config import DkimConfig, DkimKeyConfig
from .smtp.framing import normalize_line_endings
from .storage import MessageWriter

log = structlog.get_logger("hedwigpy.dkim")

SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"reply-to",
    b"mime-version",
    b"content-type",
)
MAX_DOMAIN = 253  # RFC 1035: the longest domain name, in ASCII
MIN_RSA_BITS = 1024  # RFC 8301: verifiers must not accept less
MAX_HEADER_SECTION = 1024 * 1024  # as inbound.py: the From field is looked for in at most this much
INLINE_LIMIT = 32 * 1024  # messages up to this size are signed on the event loop (0 = always in a thread)

_CANON = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_NAME = b"DKIM-Signature"
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
_WSP_TO_REWRITE = re.compile(rb"[\t ]{2,}|\t")  # a lone space is relaxed already
_FROM_FIELD = re.compile(rb"^from[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)", re.IGNORECASE | re.MULTILINE)

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class DkimKeyError(Exception):
    """One or more `[[dkim.keys]]` entries cannot be used; each problem names its key path and file."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True, slots=True)
class SigningKey:
    domain: str  # as configured (lower case); the d= tag is its ASCII (IDNA) form
    selector: str
    path: Path
    key: PrivateKey

    @property
    def algorithm(self) -> bytes:
        return b"ed25519-sha256" if isinstance(self.key, ed25519.Ed25519PrivateKey) else b"rsa-sha256"

    def sign_digest(self, digest: bytes) -> bytes:
        """The signature of a SHA-256 header hash (RFC 8463 signs the hash with Ed25519, too)."""
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(digest)
        return self.key.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def load_key(entry: DkimKeyConfig, where: str) -> SigningKey:
    """Read and check one key file; raises DkimKeyError naming `where` (the config key) and the file."""
    path = entry.private_key

    def fail(why: str) -> DkimKeyError:
        return DkimKeyError([f"{where}: {path}: {why}"])

    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            pem = f.read()
    except FileNotFoundError:
        raise fail("no such file (create one with `hedwigpy dkim generate`)") from None
    except OSError as exc:
        raise fail(f"cannot read: {exc.strerror or exc}") from None
    if mode & 0o077:
        # As OpenDKIM and ssh: a private key others may read is not private.
        raise fail(f"group or others have access (mode {mode & 0o777:04o}); `chmod 600` it")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise fail("the key is encrypted; store it without a passphrase (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise fail(f"not a PEM private key ({exc})") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise fail(f"RSA key of {key.key_size} bits; DKIM needs at least {MIN_RSA_BITS} (RFC 8301)")
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise fail(f"a {type(key).__name__.lstrip('_')}; DKIM signs with RSA or Ed25519 keys only")
    return SigningKey(entry.domain, entry.selector, path, key)


def check_keys(config: DkimConfig) -> list[str]:
    """Every problem with the configured keys (`config check`); empty when all load."""
    problems: list[str] = []
    for i, entry in enumerate(config.keys):
        try:
            load_key(entry, f"dkim.keys[{i}].private_key")
        except DkimKeyError as exc:
            problems.extend(exc.problems)
    return problems


def ascii_domain(domain: str) -> str:
    """A domain's ASCII form, lower case: IDNA for internationalised names (so U- and A-labels match)."""
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def from_domain(header_section: bytes) -> tuple[str | None, str]:
    """The domain of the From field's address(es), or None and why not (no From, several From fields,
    mailboxes of different domains, no address)."""
    fields = _FROM_FIELD.findall(header_section)
    if not fields:
        return None, "no From field"
    if len(fields) > 1:
        return None, f"{len(fields)} From fields"
    value = re.sub(rb"\r?\n", b"", fields[0]).decode("utf-8", "replace")
    addresses = [address for _, address in email.utils.getaddresses([value])]
    if not addresses or not all("@" in a for a in addresses):
        return None, "no address in the From field"
    domains = {ascii_domain(a.rpartition("@")[2]) for a in addresses}
    if len(domains) > 1:
        return None, "From names mailboxes of different domains"
    return domains.pop(), ""


def oversigned(headers: Sequence[Sequence[bytes]]) -> tuple[bytes, ...]:
    """The h= list: each signed field name once more than it occurs, so no copy can be added."""
    names = [name.lower() for name, _ in headers]
    return tuple(n for n in SIGNED_HEADERS for _ in range(names.count(n) + 1))


def split_message(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """What `dkim.rfc822_parse` returns — header fields, and the body with every line ending CRLF — with
    only the header section going through it (it splits the whole message into lines)."""
    if message.startswith((b"\r\n", b"\n")):
        head, rest = b"", message[message.index(b"\n") + 1 :]
    elif found := _HEADER_END.search(message):
        head, rest = message[: found.start()], message[found.end() :]
    else:
        head, rest = message, b""
    headers, _ = dkim.rfc822_parse(head)
    if rest.count(b"\n") != rest.count(b"\r\n"):
        rest = _LINE_END.sub(b"\r\n", rest)  # bare LF: a line end, as dkimpy reads it
    return headers, rest


def relaxed_body(body: bytes) -> bytes:
    """dkimpy's relaxed body canonicalization (RFC 6376 3.4.4), skipping the passes with nothing to do."""
    if b" \r\n" in body or b"\t\r\n" in body:
        # WSP before each CRLF goes (dkimpy's `[\t ]+\r\n` → CRLF); per line, several times faster than
        # the regex, which tries a match at every space. An unterminated last line keeps its WSP.
        lines = body.split(b"\r\n")
        body = b"\r\n".join([*(line.rstrip(b" \t") for line in lines[:-1]), lines[-1]])
    if b"  " in body or b"\t" in body:
        body = _WSP_TO_REWRITE.sub(b" ", body)
    result: bytes = correct_empty_body(strip_trailing_lines(body))
    return result


class Signer:
    """The loaded keys, by domain; signs messages. Built once at start (and again on a reload)."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        self.keys = tuple(keys)
        # Threads for large messages: as many as CPUs, more would only contend for the GIL with the loop.
        self._threads = trio.CapacityLimiter(os.cpu_count() or 1)
        self._by_domain: dict[str, tuple[SigningKey, ...]] = {}
        for key in self.keys:
            d = ascii_domain(key.domain)
            self._by_domain[d] = (*self._by_domain.get(d, ()), key)

    @classmethod
    def from_config(cls, config: DkimConfig) -> Signer:
        """Load every `[[dkim.keys]]` entry; raises DkimKeyError listing every key that cannot be used."""
        keys: list[SigningKey] = []
        problems: list[str] = []
        for i, entry in enumerate(config.keys):
            try:
                keys.append(load_key(entry, f"dkim.keys[{i}].private_key"))
            except DkimKeyError as exc:
                problems.extend(exc.problems)
        if problems:
            raise DkimKeyError(problems)
        return cls(keys)

    def keys_for(self, domain: str) -> tuple[SigningKey, ...]:
        """The keys of `domain`, else of its closest parent domain that has any."""
        if len(domain) > MAX_DOMAIN:  # no such domain exists, and a huge one costs time per label
            return ()
        name = ascii_domain(domain)
        while True:
            keys = self._by_domain.get(name)
            if keys:
                return keys
            dot = name.find(".")
            if dot < 0:
                return ()
            name = name[dot + 1 :]

    def prepare(
        self, message: bytes, keys: Sequence[SigningKey], now: float | None = None
    ) -> list[_Unsigned]:
        """Everything but the private-key operations: parse, canonicalize, hash. Raises
        dkim.DKIMException for a message dkimpy cannot parse."""
        # Signed as it will be sent: delivery turns every bare CR or LF into CRLF (BodyEncoder), so a
        # signature over the stored bytes would fail at the receiver for a message that has one.
        headers, body = split_message(normalize_line_endings(message))
        body_hash = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        include = oversigned(headers)
        canonical = _CANON.canonicalize_headers(headers)
        timestamp = str(int(time.time() if now is None else now)).encode()
        return [_unsigned(key, canonical, include, body_hash, timestamp) for key in keys]

    def sign(self, message: bytes, keys: Sequence[SigningKey], now: float | None = None) -> bytes:
        """DKIM-Signature fields (CRLF-terminated, in `keys` order) for `message`, all at once. Blocking.
        Raises dkim.DKIMException for a message dkimpy cannot parse."""
        return b"".join(u.field(u.key.sign_digest(u.digest)) for u in self.prepare(message, keys, now))

    async def _sign_async(self, message: bytes, keys: Sequence[SigningKey]) -> bytes:
        """`sign`, keeping the event loop responsive. A small message (the usual case) is signed on the
        loop: ~0.15 ms for a 4 KiB message with Ed25519, ~0.4 ms with RSA-2048. Measured in bench.relay,
        that costs far less than a worker thread, whose GIL hand-overs with the loop (every thread hop,
        every Python step beside it) cost more CPU than the signing itself on this 2-core machine:
        RSA-2048 in a thread added 0.9-1.2 ms of CPU per message, Ed25519 0.5-1.2 ms. A large message
        (over INLINE_LIMIT, where canonicalizing the body takes milliseconds) goes to a thread."""
        if len(message) > INLINE_LIMIT:
            return await trio.to_thread.run_sync(self.sign, message, keys, limiter=self._threads)
        return self.sign(message, keys)

    async def sign_writer(self, writer: MessageWriter) -> int:
        """Sign the complete message in `writer` when its From domain has keys: the signatures are
        prepended to it. Returns how many bytes were added (0: not signed, and why is logged)."""
        if not self._by_domain:
            return 0
        data = bytearray()
        keys: tuple[SigningKey, ...] | None = None
        async with contextlib.aclosing(writer.content()) as chunks:
            async for chunk in chunks:
                data += chunk
                if keys is None and (_HEADER_END.search(data) or len(data) > MAX_HEADER_SECTION):
                    keys = self._keys_of(writer.message_id, data)
                    if not keys:
                        return 0  # not ours to sign: the rest of a large message is never read
        if keys is None:  # a message of headers only
            keys = self._keys_of(writer.message_id, data)
            if not keys:
                return 0
        try:
            fields = await self._sign_async(bytes(data), keys)
        except (dkim.DKIMException, IndexError, ValueError) as exc:
            # dkimpy refuses (or, on some odd header sections, trips over) the message: it goes out
            # unsigned, as it came, rather than not at all.
            log.warning("not signed", id=writer.message_id, reason=f"dkimpy: {exc!r}")
            return 0
        await writer.prepend(fields)
        log.debug("signed", id=writer.message_id, d=keys[0].domain, s=[k.selector for k in keys])
        return len(fields)

    def _keys_of(self, message_id: str, data: bytearray) -> tuple[SigningKey, ...]:
        found = _HEADER_END.search(data)
        section = bytes(data[: found.start() + 1 if found else MAX_HEADER_SECTION])
        if section.startswith((b"\r\n", b"\n")):
            section = b""  # no header section at all
        domain, why = from_domain(section)
        if domain is None:
            log.info("not signed", id=message_id, reason=why)
            return ()
        return self.keys_for(domain)


@dataclass(frozen=True, slots=True)
class _Unsigned:
    """A DKIM-Signature field waiting for its b= value, and the header hash to sign for it."""

    key: SigningKey
    fields: tuple[tuple[bytes, bytes], ...]
    digest: bytes

    def field(self, signature: bytes) -> bytes:
        """The complete field, folded as dkimpy folds it."""
        fields = (*self.fields[:-1], (b"b", base64.b64encode(signature)))
        joined = b"; ".join(b"=".join(f) for f in fields) + b"\r\n"
        result: bytes = _NAME + b": " + dkim.fold(joined, namelen=len(_NAME), linesep=b"\r\n")
        return result


def _unsigned(
    key: SigningKey,
    canonical: Sequence[tuple[bytes, bytes]],
    include: tuple[bytes, ...],
    body_hash: bytes,
    timestamp: bytes,
) -> _Unsigned:
    """One DKIM-Signature field as dkimpy's DKIM.sign/gen_header build it (same tags, same order, same
    folding), and the hash its private-key operation signs."""
    domain = ascii_domain(key.domain).encode("ascii")
    fields = (
        (b"v", b"1"),
        (b"a", key.algorithm),
        (b"c", _CANON.to_c_value()),
        (b"d", domain),
        (b"i", b"@" + domain),
        (b"q", b"dns/txt"),
        (b"s", key.selector.encode("ascii")),
        (b"t", timestamp),
        (b"h", b" : ".join(include)),
        (b"bh", body_hash),
        (b"b", b"0" * 60),  # a placeholder that makes b= fold onto its own line, as dkimpy does
    )
    value = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(_NAME), linesep=b"\r\n")
    value = dkim.RE_BTAG.sub(b"\\1", value)  # b= empty while hashing (RFC 6376 3.7)
    hasher = hashlib.sha256()
    dkim.hash_headers(hasher, _CANON, canonical, include, (_NAME, b" " + value), dict(fields))
    return _Unsigned(key, fields, hasher.digest())
