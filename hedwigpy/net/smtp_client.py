"""One outbound SMTP session: the thin trio shell around the sans-IO `ClientConnection`.

`SmtpSession.open` connects, reads the banner, says EHLO (HELO when EHLO is refused), upgrades with
STARTTLS per the TLS mode and authenticates; `send` runs one mail transaction, pipelined when the server
offers PIPELINING, and returns the server's replies. Everything that goes wrong with the *session* —
refused or timed-out connection, a banner or EHLO refusal, 421, a broken TLS handshake, a lost
connection — is raised as `SessionFailure` with a `Reply` (composed when the server said nothing), which
is where socket, TLS and protocol errors become replies (DESIGN rule 3).

TLS modes follow Postfix's security levels: "opportunistic" is "may" (STARTTLS when offered, plaintext
only when it is not offered; a handshake that fails is a failure, never a silent downgrade), "required"
is "encrypt". Whether the certificate is verified is the caller's choice of `ssl.SSLContext`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import trio

from ..config import ClientTls
from ..smtp import ClientConnection, ClientState, RemoteProtocolError, Reply

# Postfix's defaults: smtp_helo_timeout, smtp_mail_timeout, smtp_rcpt_timeout (300 s), and
# smtp_data_done_timeout (600 s) for the reply after the end of data, which may involve content scanning.
REPLY_TIMEOUT = 300.0
DATA_DONE_TIMEOUT = 600.0
CLOSE_TIMEOUT = 5.0  # QUIT and TLS close_notify on the way out; a silent server must not hold us
RECEIVE_SIZE = 65536
WRITE_SIZE = 65536


class SessionFailure(Exception):
    """The session with `host` cannot carry (more) mail; `reply` says why.

    `after_data` is set when the failure came after the end of the message content was written: the
    server may have accepted the message, so the caller must not hand it to another host at once.
    `stale` is set when a reused connection turned out to be closed before anything of a new
    transaction was accepted: retrying on a fresh connection is safe.
    """

    def __init__(self, reply: Reply, host: str, *, after_data: bool = False, stale: bool = False) -> None:
        super().__init__(f"{host}: {reply}")
        self.reply = reply
        self.host = host
        self.after_data = after_data
        self.stale = stale
        self.refused: dict[str, Reply] = {}  # recipient -> its RCPT refusal, received before the failure


@dataclass(frozen=True, slots=True)
class SessionOptions:
    """How to talk to one host; sessions with equal options (and address) may share a pool."""

    helo: str
    tls: ClientTls = "opportunistic"
    tls_context: ssl.SSLContext | None = None  # required unless tls == "none"
    server_name: str | None = None  # SNI and the name checked when the context verifies certificates
    auth: tuple[str, str] | None = None  # (username, password) for AUTH PLAIN or LOGIN
    connect_timeout: float = 30.0
    reply_timeout: float = REPLY_TIMEOUT


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to send: the envelope part a transaction needs and a way to read the content."""

    sender: str
    recipients: Sequence[str]
    size: int
    body_type: str  # "7BIT" or "8BITMIME"
    smtputf8: bool
    content: Callable[[], AsyncIterator[bytes]]


@dataclass(frozen=True, slots=True)
class TransactionReplies:
    """The server's answers: `mail` always; `rcpt` one per recipient when MAIL was sent; `data` the final
    reply to the content (or to DATA when it was refused), None when no recipient was accepted."""

    mail: Reply
    rcpt: tuple[Reply, ...] = ()
    data: Reply | None = None


@dataclass
class _Replies:
    """The replies of a transaction so far, kept when the session breaks half-way."""

    mail: Reply | None = None
    rcpt: list[Reply] = field(default_factory=list)


def host_label(name: str, address: str, port: int) -> str:
    """Postfix's way of naming a peer in replies and logs: `mx.example.net[192.0.2.1]:587`."""
    label = f"{name}[{address}]"
    return label if port == 25 else f"{label}:{port}"


class SmtpSession:
    """An open, greeted (and maybe encrypted and authenticated) SMTP session with one host."""

    def __init__(self, stream: trio.abc.Stream, label: str, options: SessionOptions) -> None:
        self._stream = stream
        self._conn = ClientConnection()
        self.label = label
        self.options = options
        self.messages = 0  # transactions attempted on this session

    @property
    def usable(self) -> bool:
        """Can another transaction start here? (A refused DATA leaves a transaction to RSET: still usable.)"""
        return self._conn.state in (ClientState.READY, ClientState.RCPT, ClientState.MAIL)

    @property
    def tls_active(self) -> bool:
        return self._conn.tls_active

    @classmethod
    async def open(cls, name: str, address: str, port: int, options: SessionOptions) -> SmtpSession:
        """Connect to `address` (an IP) and get the session ready for MAIL; `name` is only for labels."""
        label = host_label(name, address, port)
        try:
            with trio.fail_after(options.connect_timeout):
                stream: trio.abc.Stream = await trio.open_tcp_stream(address, port)
        except trio.TooSlowError:
            raise SessionFailure(Reply(451, "4.4.1", f"connect to {label}: timed out"), label) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise SessionFailure(Reply(451, "4.4.1", f"connect to {label}: {reason}"), label) from None
        session = cls(stream, label, options)
        try:
            await session._start()
        except BaseException:
            await session.aclose(quit=False)
            raise
        return session

    async def _start(self) -> None:
        greeting = await self._reply("GREETING")
        if greeting.code != 220:
            raise self._failure(greeting)
        await self._hello()
        opts = self.options
        assert self._conn.extensions is not None
        if opts.tls != "none":
            if self._conn.extensions.starttls:
                await self._starttls()
                await self._hello()
            elif opts.tls == "required":
                raise self._failure(
                    Reply(451, "4.7.4", f"TLS is required, but was not offered by host {self.label}")
                )
        if opts.auth is not None:
            await self._authenticate(*opts.auth)

    async def _hello(self) -> None:
        reply = await self._command(self._conn.ehlo(self.options.helo), "EHLO")
        if reply.is_permanent and reply.code != 421:  # an old server that knows only HELO (RFC 5321 3.2)
            reply = await self._command(self._conn.helo(self.options.helo), "HELO")
        if reply.code // 100 != 2:
            raise self._failure(reply)

    async def _starttls(self) -> None:
        reply = await self._command(self._conn.starttls(), "STARTTLS")
        if reply.code != 220:
            raise self._failure(Reply(451, "4.7.5", f"STARTTLS refused by host {self.label}: {reply}"))
        assert self.options.tls_context is not None, "tls != 'none' needs a tls_context"
        tls_stream = trio.SSLStream(
            self._stream, self.options.tls_context, server_hostname=self.options.server_name
        )
        try:
            with trio.fail_after(self.options.reply_timeout):
                await tls_stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError, OSError) as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            reason = getattr(cause, "reason", None) or str(cause) or type(cause).__name__
            raise self._failure(
                Reply(451, "4.7.5", f"TLS handshake with host {self.label} failed: {reason}")
            ) from None
        self._stream = tls_stream
        self._conn.tls_established()

    async def _authenticate(self, username: str, password: str) -> None:
        if not self._conn.tls_active and self.options.tls != "none":
            raise self._failure(
                Reply(451, "4.7.4", f"not sending credentials to host {self.label} without TLS")
            )
        assert self._conn.extensions is not None
        offered = self._conn.extensions.auth
        if "PLAIN" in offered:
            reply = await self._command(self._conn.auth_plain(username, password), "AUTH")
        elif "LOGIN" in offered:
            reply = await self._command(self._conn.auth_login(username, password), "AUTH")
            while reply.code == 334:
                reply = await self._command(self._conn.auth_continue(), "AUTH")
        else:
            raise self._failure(
                Reply(451, "4.7.0", f"host {self.label} offers no AUTH mechanism we support (PLAIN, LOGIN)")
            )
        if reply.code != 235:
            # Like Postfix's smtp_sasl_auth_soft_bounce: a credentials problem is fixed by the operator,
            # so the mail waits instead of bouncing.
            raise self._failure(Reply(451, "4.7.8", f"authentication with host {self.label} failed: {reply}"))

    # -- the mail transaction ------------------------------------------------------------------------

    async def send(self, message: Outgoing) -> TransactionReplies:
        """Run one transaction. Refusals are returned as replies; a broken session raises SessionFailure,
        whose `refused` keeps the RCPT refusals that arrived before it broke."""
        conn = self._conn
        ext = conn.extensions
        assert ext is not None and self.usable
        if message.smtputf8 and not ext.smtputf8:
            return TransactionReplies(
                Reply(553, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {self.label}")
            )
        if ext.size and message.size > ext.size:
            return TransactionReplies(
                Reply(552, "5.3.4", f"message size {message.size} exceeds the limit of host {self.label}")
            )
        reused = self.messages > 0
        self.messages += 1
        replies = _Replies()
        try:
            return await self._transaction(message, ext.pipelining, reused, replies)
        except SessionFailure as exc:
            if replies.mail is not None and replies.mail.is_positive:
                exc.refused = {
                    rcpt: reply
                    for rcpt, reply in zip(message.recipients, replies.rcpt, strict=False)
                    if not reply.is_positive
                }
            raise

    async def _transaction(
        self, message: Outgoing, pipelining: bool, reused: bool, got: _Replies
    ) -> TransactionReplies:
        conn = self._conn
        body_type = message.body_type if message.body_type == "8BITMIME" else None
        out = b""
        if reused or conn.state is not ClientState.READY:
            out = conn.rset()
            if not pipelining:  # without PIPELINING, MAIL may be written only once RSET is answered
                self._check_rset(await self._command(out, "RSET", stale_ok=reused))
                out = b""
        rset_first = bool(out)
        out += conn.mail(message.sender, size=message.size, body=body_type, smtputf8=message.smtputf8)
        if pipelining:
            out += b"".join(conn.rcpt(r) for r in message.recipients) + conn.data()
            await self._write(out, reused=reused)
            if rset_first:
                self._check_rset(await self._reply("RSET", stale_ok=reused))
            got.mail = await self._reply("MAIL")
            for _ in message.recipients:
                got.rcpt.append(await self._reply("RCPT"))
            data = await self._reply("DATA")
        else:
            got.mail = await self._command(out, "MAIL")
            if not got.mail.is_positive:
                return TransactionReplies(got.mail)
            for recipient in message.recipients:
                got.rcpt.append(await self._command(conn.rcpt(recipient), "RCPT"))
            if not any(r.is_positive for r in got.rcpt):
                return TransactionReplies(got.mail, tuple(got.rcpt))
            data = await self._command(conn.data(), "DATA")
        mail, rcpt = got.mail, tuple(got.rcpt)
        accepted = mail.is_positive and any(r.is_positive for r in rcpt)
        if data.code != 354 and data.is_positive:
            # A server that "accepts" DATA without asking for the content has not got the message; taking
            # its 250 as delivery would lose the mail (a broken server, or replies out of step).
            raise SessionFailure(
                Reply(451, "4.5.0", f"unexpected reply to DATA from {self.label}: {data}"), self.label
            )
        if data.code != 354:
            return TransactionReplies(mail, rcpt, data if accepted else None)
        if not accepted:
            # Pipelined DATA got a 354 although nobody was accepted: end an empty message (RFC 2920 3.1).
            await self._write(conn.end_body())
            await self._reply("DATA_END")
            return TransactionReplies(mail, rcpt)
        # Coalesce: a small message goes out in one write with its end, a large one in big writes.
        pending = bytearray()
        async for chunk in message.content():
            pending += conn.send_body(chunk)
            if len(pending) >= WRITE_SIZE:
                await self._write(bytes(pending))
                pending.clear()
        pending += conn.end_body()
        await self._write(bytes(pending))
        # A caller's deadline (cut-through) may still cancel this wait: the mail is then kept and retried,
        # and a duplicate is possible if the upstream accepts late (RFC 5321 4.5.3.2.6 allows it 10 min).
        final = await self._reply("DATA_END", limit=DATA_DONE_TIMEOUT, after_data=True)
        return TransactionReplies(mail, rcpt, final)

    def _check_rset(self, reply: Reply) -> None:
        if reply.code // 100 != 2:
            raise SessionFailure(reply, self.label, stale=True)

    # -- I/O -----------------------------------------------------------------------------------------

    async def _command(self, data: bytes, verb: str, *, stale_ok: bool = False) -> Reply:
        await self._write(data, reused=stale_ok)
        return await self._reply(verb, stale_ok=stale_ok)

    async def _write(self, data: bytes, *, reused: bool = False) -> None:
        if data:
            with self._io_errors("writing to", stale_ok=reused):
                await self._stream.send_all(data)

    async def _reply(
        self, verb: str, *, limit: float | None = None, after_data: bool = False, stale_ok: bool = False
    ) -> Reply:
        """The next reply, which must answer `verb`. A 421 anywhere ends the session (SessionFailure)."""
        # Pipelined replies usually arrive together: take one already parsed without setting up timeouts.
        failed: RemoteProtocolError | None = None
        try:
            event = self._conn.next_event()
        except RemoteProtocolError as exc:
            event, failed = None, exc
        if event is None:
            with self._io_errors("reading from", after_data=after_data, stale_ok=stale_ok):
                if failed is not None:
                    raise failed
                with trio.fail_after(limit if limit is not None else self.options.reply_timeout):
                    while True:
                        if self._conn.state is ClientState.CLOSED:
                            raise trio.BrokenResourceError("the session is closed")
                        self._conn.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
                        event = self._conn.next_event()
                        if event is not None:
                            break
        assert event.command in (verb, "UNSOLICITED"), (event.command, verb)
        if event.reply.code == 421 or event.command == "UNSOLICITED":
            raise SessionFailure(event.reply, self.label, after_data=after_data, stale=stale_ok)
        return event.reply

    @contextmanager
    def _io_errors(self, doing: str, *, after_data: bool = False, stale_ok: bool = False) -> Iterator[None]:
        """Socket, TLS, timeout and protocol errors become a SessionFailure with a composed reply."""
        try:
            yield
        except trio.TooSlowError:
            raise SessionFailure(
                Reply(451, "4.4.2", f"timeout {doing} host {self.label}"), self.label, after_data=after_data
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise SessionFailure(
                Reply(451, "4.4.2", f"lost connection {doing} host {self.label}"),
                self.label,
                after_data=after_data,
                stale=stale_ok,
            ) from exc
        except RemoteProtocolError as exc:
            raise SessionFailure(
                Reply(451, "4.5.0", f"protocol error {doing} host {self.label}: {exc}"),
                self.label,
                after_data=after_data,
                stale=stale_ok,
            ) from None

    def _failure(self, reply: Reply) -> SessionFailure:
        return SessionFailure(reply, self.label)

    async def aclose(self, *, quit: bool = True) -> None:
        """Say QUIT when the session is healthy (politely, bounded in time), then close the socket."""
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            if quit and self.usable:
                try:
                    await self._command(self._conn.quit(), "QUIT")
                except SessionFailure:
                    pass
            try:
                await self._stream.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self._stream)
