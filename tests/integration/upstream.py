"""Upstream SMTP servers for delivery tests: aiosmtpd on 127.0.0.N, all on one shared port, each recording
everything the daemon sends it.

    pool = UpstreamPool()
    mx1 = pool.add("127.0.0.2", name="mx1.example.net")
    mx2 = pool.add("127.0.0.3", name="mx2.example.net", starttls="offered", cert=ca.issue_cert("mx2"))
    pool.start()                    # one port free on every address (retrying on conflicts); starts all
    ... config["delivery"]["port"] = pool.port ...
    wait_until(lambda: mx1.transactions)

Each server records, per TCP connection: the peer, every command (verb and argument) in order, whether TLS
became active, AUTH attempts with their credentials, each completed transaction (MAIL FROM and its
parameters, accepted RCPTs, content as aiosmtpd un-stuffed it) and the raw bytes it read in plaintext
(before STARTTLS, and decrypted after), so a test can check the exact wire form of DATA.

Replies are scripted: per recipient (`rcpt_replies`: one reply given every time, or a list given in
turn, one per RCPT of that address, after which the recipient is accepted; `script()` changes it later),
the greeting (`greeting="421 ..."`; a server that should refuse connections is simply not started),
STARTTLS (`starttls`: not offered, offered, required before MAIL, or "broken": 220 to STARTTLS then bytes
that are not a TLS handshake, and the socket closed). A reply starting with 421 closes the connection
after it is sent, unless `close_on_421=False`.

aiosmtpd runs each server in a thread with its own asyncio loop; records are appended there and read from
the test thread (list appends are atomic under the GIL; counters are guarded by a lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = [
    "Auth",
    "Connection",
    "StartTls",
    "Transaction",
    "Unresponsive",
    "Upstream",
    "UpstreamPool",
    "subject_of",
    "wait_until",
]

StartTls = Literal["none", "offered", "required", "broken"]
NOT_TLS = b"this is not a TLS handshake\r\n"
_SUBJECT = re.compile(rb"^Subject: ?(.*?)\r?$", re.MULTILINE | re.IGNORECASE)


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def subject_of(content: bytes) -> str:
    """The Subject header of a message (tests use it as a token naming the message)."""
    match = _SUBJECT.search(content.partition(b"\r\n\r\n")[0])
    return match.group(1).decode("utf-8", "replace") if match else ""


@dataclass
class Auth:
    """One AUTH exchange the upstream saw."""

    mechanism: str
    login: str
    password: str
    tls: bool  # was TLS active when the credentials were sent
    ok: bool  # did they match the upstream's `credentials`


@dataclass
class Transaction:
    """A mail transaction the upstream accepted (250 after DATA)."""

    upstream: str  # the upstream's name
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]  # accepted recipients only
    content: bytes  # as aiosmtpd un-stuffed it (CRLF line ends)
    tls: bool
    started: float  # monotonic time of MAIL
    ended: float  # monotonic time of the end of DATA

    @property
    def subject(self) -> str:
        return subject_of(self.content)


@dataclass
class Connection:
    """One TCP connection to an upstream and everything seen on it."""

    peer: tuple[str, int]
    opened: float
    commands: list[tuple[str, str]] = field(default_factory=list)  # (VERB, argument) in order
    replies: list[str] = field(default_factory=list)  # what the upstream answered, in order
    rcpts: list[str] = field(default_factory=list)  # every RCPT address, accepted or not
    tls: bool = False  # did TLS become active
    auths: list[Auth] = field(default_factory=list)
    transactions: list[Transaction] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)  # plaintext bytes read, decrypted after STARTTLS
    closed: float | None = None  # monotonic time the connection ended

    @property
    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.commands]

    @property
    def ehlo(self) -> list[str]:
        return [arg for verb, arg in self.commands if verb in ("EHLO", "HELO")]


class Upstream:
    """One aiosmtpd server on `ip` (the port is chosen by its `UpstreamPool`)."""

    def __init__(
        self,
        ip: str,
        *,
        name: str = "",
        starttls: StartTls = "none",
        cert: trustme.LeafCert | None = None,
        smtputf8: bool = True,
        greeting: str | None = None,
        rcpt_replies: Mapping[str, str | Sequence[str]] | None = None,
        data_delay: float = 0.0,
        credentials: tuple[str, str] | None = None,
        auth_require_tls: bool = True,
        close_on_421: bool = True,
    ) -> None:
        if starttls != "none" and cert is None:
            raise ValueError(f"starttls={starttls!r} needs a cert")
        self.ip = ip
        self.name = name or ip
        self.starttls = starttls
        self.cert = cert
        self.smtputf8 = smtputf8
        self.greeting = greeting
        self._lock = threading.Lock()
        self.rcpt_replies: dict[str, str | list[str]] = {}
        for address, replies in (rcpt_replies or {}).items():
            self.script(address, replies)
        self.data_delay = data_delay
        self.credentials = credentials
        self.auth_require_tls = auth_require_tls
        self.close_on_421 = close_on_421
        self.port = 0
        self.connections: list[Connection] = []
        self.max_concurrent = 0
        self._open = 0
        self._controller: _Controller | None = None
        self._recording = False

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {self.ip}:{self.port}>"

    # ---- lifecycle ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._controller is not None

    @property
    def address(self) -> str:
        """ "IP:PORT" ("[IPv6]:PORT"), the form relay `hosts` take."""
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    def start(self, port: int | None = None) -> None:
        """Listen on `ip:port` (default: the port it had before). Raises OSError if the port is taken."""
        if self._controller is not None:
            raise RuntimeError(f"{self!r} already running")
        if port is not None:
            self.port = port
        if not self.port:
            raise RuntimeError("no port: start the pool, or pass one")
        self._recording = False
        controller = _Controller(self)
        controller.start()  # connects once to make aiosmtpd build its protocol; that one is not recorded
        self._controller = controller
        self._recording = True

    def stop(self) -> None:
        """Stop listening and drop every connection (a later connection attempt is refused)."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def script(self, address: str, replies: str | Sequence[str] | None) -> None:
        """Change what RCPT TO:<address> is answered from now on: one reply every time, a list of replies
        in turn (then accepted), or None to accept it."""
        with self._lock:
            if replies is None:
                self.rcpt_replies.pop(address.lower(), None)
            else:
                self.rcpt_replies[address.lower()] = replies if isinstance(replies, str) else list(replies)

    def _rcpt_reply(self, address: str) -> str | None:
        """The scripted reply to this RCPT (None: accept it), consuming one of a list."""
        with self._lock:
            replies = self.rcpt_replies.get(address.lower())
            if isinstance(replies, list):
                return replies.pop(0) if replies else None
            return replies

    def rcpt_count(self, address: str) -> int:
        """How many times RCPT TO:<address> was sent to this upstream (accepted or not)."""
        return sum(c.rcpts.count(address) for c in list(self.connections))

    # ---- what it saw ----------------------------------------------------------------------------------

    @property
    def transactions(self) -> list[Transaction]:
        return [t for c in list(self.connections) for t in list(c.transactions)]

    @property
    def recipients(self) -> list[str]:
        """Every accepted recipient, over all transactions."""
        return [r for t in self.transactions for r in t.rcpt_tos]

    def count(self, verb: str) -> int:
        """How many times `verb` (e.g. "MAIL") was sent to this upstream, over all connections."""
        return sum(c.verbs.count(verb) for c in list(self.connections))

    def subjects(self) -> list[str]:
        return [t.subject for t in self.transactions]

    # ---- called from the server thread ----------------------------------------------------------------

    def _opened(self, peer: tuple[str, int]) -> Connection | None:
        if not self._recording:
            return None
        conn = Connection(peer=peer, opened=time.monotonic())
        with self._lock:
            self.connections.append(conn)
            self._open += 1
            self.max_concurrent = max(self.max_concurrent, self._open)
        return conn

    def _closed(self, conn: Connection) -> None:
        with self._lock:
            if conn.closed is None:
                conn.closed = time.monotonic()
                self._open -= 1

    def _server_tls_context(self) -> ssl.SSLContext | None:
        if self.cert is None or self.starttls == "none":
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        return ctx


class _Handler:
    """aiosmtpd hooks; `server` is the `_RecordingSMTP` of the connection."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    async def handle_MAIL(
        self, server: _RecordingSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        server.mail_started = time.monotonic()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: _RecordingSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if server.record is not None:
            server.record.rcpts.append(address)
        reply = self.upstream._rcpt_reply(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _RecordingSMTP, session: Session, envelope: Envelope) -> str:
        if self.upstream.data_delay:
            await asyncio.sleep(self.upstream.data_delay)
        content = envelope.original_content or b""
        assert isinstance(content, bytes)
        if server.record is not None:
            server.record.transactions.append(
                Transaction(
                    upstream=self.upstream.name,
                    mail_from=envelope.mail_from or "",
                    mail_options=list(envelope.mail_options),
                    rcpt_tos=list(envelope.rcpt_tos),
                    content=content,
                    tls=server.tls_active,
                    started=server.mail_started,
                    ended=time.monotonic(),
                )
            )
        return "250 2.0.0 OK: accepted"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(server, _RecordingSMTP) and isinstance(auth_data, LoginPassword)
        login = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = self.upstream.credentials == (login, password)
        if server.record is not None:
            server.record.auths.append(Auth(mechanism, login, password, server.tls_active, ok))
        return AuthResult(success=ok, auth_data=auth_data)


class _RecordingSMTP(SMTP):
    """aiosmtpd's SMTP protocol, recording the connection and playing the upstream's script."""

    def __init__(self, upstream: Upstream, handler: _Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.upstream = upstream
        self.record: Connection | None = None
        self.mail_started = 0.0
        for verb, method in list(self._smtp_methods.items()):
            self._smtp_methods[verb] = self._recorded(verb, method)

    def _recorded(self, verb: str, method: Callable[[str | None], Any]) -> Callable[[str | None], Any]:
        async def run(arg: str | None) -> None:
            if self.record is not None:
                self.record.commands.append((verb, arg or ""))
            await method(arg)

        return run

    @property
    def tls_active(self) -> bool:
        return self._tls_protocol is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self._original_transport is None
        if first:
            self.record = self.upstream._opened(transport.get_extra_info("peername"))
        elif self.record is not None:
            self.record.tls = True
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.record is not None:
            self.record.raw += data
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        if self.record is not None:
            self.upstream._closed(self.record)
        super().connection_lost(error)

    async def push(self, status: str | bytes) -> None:
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        if self.record is not None:
            self.record.replies.append(text)
        await super().push(text)
        if text.startswith("421") and self.upstream.close_on_421 and self.transport is not None:
            self.transport.close()

    async def _handle_client(self) -> None:
        greeting = self.upstream.greeting
        if greeting is None:
            await super()._handle_client()
            return
        try:
            await self.push(greeting)  # a 421 greeting closes here
            # Any other refusal (554): answer 503 to everything but QUIT, as RFC 5321 section 3.1 asks.
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                while self.transport is not None and not self.transport.is_closing():
                    line = await self._reader.readuntil(b"\n")
                    verb = line.strip().split(b" ", 1)[0].upper().decode("ascii", "replace")
                    if self.record is not None:
                        self.record.commands.append((verb, line.strip().decode("utf-8", "replace")))
                    if verb == "QUIT":
                        await self.push("221 2.0.0 Bye")
                        break
                    await self.push("503 5.5.1 No service")
        finally:  # also when cancelled at EOF: the transport stays half-open unless closed here
            if self.transport is not None:
                self.transport.close()

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.upstream.starttls != "broken":
            await super().smtp_STARTTLS(arg)
            return
        await self.push("220 2.0.0 Ready to start TLS")
        assert self.transport is not None and isinstance(self.transport, asyncio.WriteTransport)
        self.transport.write(NOT_TLS)
        self.transport.close()


class _Controller(Controller):
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        handler = _Handler(upstream)
        super().__init__(
            handler,
            hostname=upstream.ip,
            port=upstream.port,
            ready_timeout=5.0,
            server_hostname=upstream.name,
            ident="test upstream",
            enable_SMTPUTF8=upstream.smtputf8,
            tls_context=upstream._server_tls_context(),
            require_starttls=upstream.starttls == "required",
            authenticator=handler.authenticate,
            auth_require_tls=upstream.auth_require_tls,
        )

    def factory(self) -> _RecordingSMTP:
        return _RecordingSMTP(self.upstream, self.handler, loop=self.loop, **self.SMTP_kwargs)


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _port_free(ips: list[str], port: int) -> bool:
    """Whether a listener could bind `port` on every one of `ips` (asyncio sets SO_REUSEADDR too)."""
    for ip in ips:
        with socket.socket(_family(ip)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
            except OSError:
                return False
    return True


class Unresponsive:
    """A host whose TCP connects time out, without leaving loopback: it listens with a backlog of 0 that
    is kept full by connections it never accepts, so the kernel drops every further SYN."""

    def __init__(self, ip: str) -> None:
        self.ip = ip
        self.port = 0
        self._sockets: list[socket.socket] = []

    def __repr__(self) -> str:
        return f"<Unresponsive {self.ip}:{self.port}>"

    @property
    def running(self) -> bool:
        return bool(self._sockets)

    def start(self, port: int | None = None) -> None:
        if self._sockets:
            raise RuntimeError(f"{self!r} already running")
        if port is not None:
            self.port = port
        listener = socket.socket(_family(self.ip))
        self._sockets.append(listener)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.ip, self.port))
            listener.listen(0)
            for _ in range(4):
                filler = socket.socket(_family(self.ip))
                self._sockets.append(filler)
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect((self.ip, self.port))
        except OSError:
            self.stop()
            raise
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until a fresh connect really hangs
            with socket.socket(_family(self.ip)) as probe:
                probe.settimeout(0.2)
                try:
                    probe.connect((self.ip, self.port))
                except TimeoutError:
                    return
        self.stop()
        raise RuntimeError(f"{self!r}: connects do not time out")

    def stop(self) -> None:
        for s in self._sockets:
            s.close()
        self._sockets.clear()


class UpstreamPool:
    """Upstreams that share one TCP port on different loopback addresses ([delivery].port is per daemon)."""

    def __init__(self) -> None:
        self.upstreams: list[Upstream] = []
        self.unresponsive: list[Unresponsive] = []
        self.port = 0

    def add(self, ip: str, **kwargs: Any) -> Upstream:
        if any(u.ip == ip for u in self._all()):
            raise ValueError(f"an upstream already uses {ip}")
        upstream = Upstream(ip, **kwargs)
        upstream.port = self.port
        self.upstreams.append(upstream)
        if self.port:
            upstream.start()
        return upstream

    def add_unresponsive(self, ip: str) -> Unresponsive:
        """A host on `ip` whose connects time out (see `Unresponsive`)."""
        if any(u.ip == ip for u in self._all()):
            raise ValueError(f"an upstream already uses {ip}")
        host = Unresponsive(ip)
        host.port = self.port
        self.unresponsive.append(host)
        if self.port:
            host.start()
        return host

    def _all(self) -> list[Upstream | Unresponsive]:
        return [*self.upstreams, *self.unresponsive]

    def start(self, attempts: int = 20) -> None:
        """Pick a port free on every upstream's address and start them all there (once: later calls
        change nothing, and upstreams added after the first call start on the pool's port at once)."""
        if self.port:
            return
        ips = [u.ip for u in self._all()]
        last: OSError | None = None
        for _ in range(attempts):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port: int = probe.getsockname()[1]
            if not _port_free(ips, port):
                continue
            started: list[Upstream | Unresponsive] = []
            try:
                for upstream in self._all():
                    upstream.start(port)
                    started.append(upstream)
            except OSError as exc:
                last = exc
                for upstream in started:
                    upstream.stop()
                continue
            self.port = port
            return
        raise RuntimeError(f"no port free on all of {ips}: {last}")

    def stop(self) -> None:
        for upstream in self._all():
            upstream.stop()

    def address(self, host: str) -> str:
        """ "host:PORT" for a relay `hosts` entry (a name the DNS server resolves, or an IP)."""
        return f"{host}:{self.port}"

    @property
    def transactions(self) -> list[Transaction]:
        return [t for u in self.upstreams for t in u.transactions]

    def delivered(self, subject: str) -> list[Transaction]:
        """The transactions, on any upstream, of the message with this Subject."""
        return [t for t in self.transactions if t.subject == subject]
