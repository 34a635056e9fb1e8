"""`ClientConnection`: the client side of an SMTP session as a sans-IO state machine.

Each command is a method that returns the bytes to write. Bytes from the server go in with `receive_data`,
and `next_event` pairs each complete reply with the command it answers (`Response`), applying the state
change the reply implies. The connection keeps a FIFO of commands awaiting replies, so with PIPELINING
several commands (MAIL, RCPTs, DATA) may be written before anything is read.

The connection decides only what is *legal*: a call out of sequence raises `LocalProtocolError`; a server
that breaks the protocol raises `RemoteProtocolError` and the connection must be closed. What a reply means
for delivery (every recipient refused, retry later) is the caller's policy, as on the server side.
"""

from __future__ import annotations

import base64
import enum
import re
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass

from .addresses import AddressError, parse_path
from .errors import LocalProtocolError, RemoteProtocolError
from .framing import BodyEncoder, LineEndingNormalizer
from .replies import Reply, ReplyParser

MAX_HOSTNAME = 255
_SIZE = re.compile(r"\d{1,20}", re.ASCII)


class ClientState(enum.Enum):
    GREETING = "greeting"  # connected, waiting for the banner
    HELLO = "hello"  # EHLO or HELO needed (after the banner, or after the TLS handshake)
    READY = "ready"  # no transaction
    MAIL = "mail"  # MAIL sent, no RCPT yet
    RCPT = "rcpt"  # at least one RCPT sent: DATA or BDAT may follow
    DATA = "data"  # DATA sent, waiting for the 354
    BODY = "body"  # 354 received: send_body() and end_body()
    CHUNKING = "chunking"  # BDAT chunks sent, the LAST one not yet
    AUTH = "auth"  # inside a SASL exchange
    TLS_PENDING = "tls_pending"  # 220 to STARTTLS: the caller does the handshake, then tls_established()
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ServerExtensions:
    """What the server offered in its EHLO reply; all false after HELO.

    `size` is None when SIZE was not offered and 0 when it was offered without a limit (RFC 1870);
    `auth` holds the upper-cased SASL mechanism names.
    """

    pipelining: bool = False
    size: int | None = None
    eightbitmime: bool = False
    smtputf8: bool = False
    starttls: bool = False
    auth: frozenset[str] = frozenset()
    chunking: bool = False
    enhancedstatuscodes: bool = False

    @classmethod
    def parse(cls, reply: Reply) -> ServerExtensions:
        """Read a 250 EHLO reply. The first line is the server's greeting; unknown keywords are ignored."""
        keywords: set[str] = set()
        size: int | None = None
        auth: set[str] = set()
        for line in reply.text.split("\n")[1:]:
            words = line.split()
            if not words:
                continue
            keyword, params = words[0].upper(), words[1:]
            if keyword.startswith("AUTH="):  # the pre-RFC 4954 form some servers still send
                keyword, params = "AUTH", [keyword[5:], *params]
            if keyword == "SIZE":
                size = int(params[0]) if params and _SIZE.fullmatch(params[0]) else 0
            elif keyword == "AUTH":
                auth.update(p.upper() for p in params if p)
            keywords.add(keyword)
        return cls(
            pipelining="PIPELINING" in keywords,
            size=size,
            eightbitmime="8BITMIME" in keywords,
            smtputf8="SMTPUTF8" in keywords,
            starttls="STARTTLS" in keywords,
            auth=frozenset(auth),
            chunking="CHUNKING" in keywords,
            enhancedstatuscodes="ENHANCEDSTATUSCODES" in keywords,
        )


@dataclass(frozen=True, slots=True)
class Response:
    """One reply paired with the command it answers.

    `command` is the verb ("EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "RSET",
    "NOOP", "QUIT"), or "GREETING" for the banner, "DATA_END" for the reply after the message content, and
    "UNSOLICITED" for a 421 sent while no command was waiting. `argument` says what the command was about:
    the address for MAIL and RCPT, the host name for EHLO and HELO, the mechanism for AUTH, "n" or
    "n LAST" for BDAT; "" otherwise.
    """

    command: str
    argument: str
    reply: Reply


@dataclass(frozen=True, slots=True)
class _Pending:
    command: str
    argument: str
    txn: int  # the transaction the command belongs to, so late replies never touch a newer one


# RFC 2920 3.1 (and RFC 3207, RFC 4954): nothing may be pipelined behind these; the reply changes state.
_GROUP_ENDING = frozenset({"GREETING", "EHLO", "HELO", "STARTTLS", "AUTH", "DATA", "NOOP", "QUIT"})
# Where RSET, NOOP and QUIT are commands (in BODY they would be content, in AUTH a SASL line).
_ANYTIME = frozenset(
    {ClientState.HELLO, ClientState.READY, ClientState.MAIL, ClientState.RCPT, ClientState.CHUNKING}
)
# Where the server closing the connection without a reply is a protocol failure, not just an idle close.
_FRAGILE = frozenset(
    {
        ClientState.MAIL,
        ClientState.RCPT,
        ClientState.DATA,
        ClientState.BODY,
        ClientState.CHUNKING,
        ClientState.AUTH,
    }
)


class ClientConnection:
    """One SMTP client session. Not thread-safe; one per connection.

    A typical pipelined transaction (when `extensions.pipelining`)::

        out = conn.mail("a@example.org") + conn.rcpt("b@example.net") + conn.rcpt("c@example.net")
        out += conn.data()                      # write `out`, then read until pending_replies == 0
        ...                                     # if the DATA Response is 354 (state BODY):
        out = conn.send_body(content) + conn.end_body()   # write, then read the "DATA_END" Response

    Replies to MAIL and RCPT do not abort the transaction by themselves: the caller looks at them and
    decides (RSET, or DATA anyway, which the server then refuses). A 421 at any point closes the session.
    """

    def __init__(self) -> None:
        self.state = ClientState.GREETING
        self.extensions: ServerExtensions | None = None
        self.tls_active = False
        self.authenticated = False
        self._parser = ReplyParser()
        self._pending: deque[_Pending] = deque([_Pending("GREETING", "", 0)])
        self._eof = False
        self._txn = 0
        self._mail_refused = False
        self._smtputf8 = False
        self._body: BodyEncoder | None = None
        self._chunks = LineEndingNormalizer()
        self._auth_mechanism = ""
        self._auth_lines: list[str] = []
        self._challenged = False

    @property
    def pending_replies(self) -> int:
        """How many replies are still owed (the greeting counts): read events until this is 0."""
        return len(self._pending)

    # -- input ---------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the server; b"" means the server closed its side.

        Ignored once CLOSED, and while TLS_PENDING: plaintext behind the 220 to STARTTLS is never read
        (it could only be injected replies).
        """
        if not data:
            self._eof = True
            return
        if self.state is ClientState.CLOSED or self.state is ClientState.TLS_PENDING:
            return
        try:
            self._parser.feed(bytes(data))
        except RemoteProtocolError:
            self._close()
            raise

    def next_event(self) -> Response | None:
        """The next reply paired with its command, or None until more bytes arrive."""
        if self.state is ClientState.CLOSED or self.state is ClientState.TLS_PENDING:
            return None
        try:
            reply = self._parser.next_reply()
        except RemoteProtocolError:
            self._close()
            raise
        if reply is None:
            if self._eof:
                owed = bool(self._pending) or self.state in _FRAGILE
                self._close()
                if owed:
                    raise RemoteProtocolError("the server closed the connection in mid-session")
            return None
        if self._pending:
            entry = self._pending.popleft()
        elif reply.code == 421:
            entry = _Pending("UNSOLICITED", "", self._txn)
        else:
            self._close()
            raise RemoteProtocolError(f"reply while no command was waiting for one: {reply}")
        self._apply(entry, reply)
        return Response(entry.command, entry.argument, reply)

    def _apply(self, entry: _Pending, reply: Reply) -> None:
        command, code = entry.command, reply.code
        if code == 421 or command == "QUIT":
            self._close()
        elif command == "GREETING":
            if code == 220:
                self.state = ClientState.HELLO
            else:
                self._close()  # 554: the server will not talk to us
        elif command in ("EHLO", "HELO"):
            if code // 100 == 2:
                self.extensions = ServerExtensions.parse(reply) if command == "EHLO" else ServerExtensions()
                self.state = ClientState.READY
        elif command == "STARTTLS":
            if code == 220:
                self.state = ClientState.TLS_PENDING
        elif command == "AUTH":
            if code == 334:
                self._challenged = True
            else:
                self.authenticated = code == 235
                self._end_auth()
        elif command == "MAIL":
            if not reply.is_positive and entry.txn == self._txn:
                self._mail_refused = True
                if self.state is ClientState.MAIL:
                    self.state = ClientState.READY
        elif command == "DATA":
            if code == 354:
                self.state = ClientState.BODY
                self._body = BodyEncoder()
            else:
                # RFC 5321 leaves the transaction open after a refused DATA (our ServerConnection and
                # Postfix keep it): the caller sends RSET before the next MAIL, unless MAIL was refused.
                self.state = ClientState.READY if self._mail_refused else ClientState.RCPT
        elif command == "BDAT" and not reply.is_positive and entry.txn == self._txn:
            # RFC 3030 2: a refused chunk ends the transaction (unless LAST or RSET already ended it).
            self.state = ClientState.READY if self.state is ClientState.CHUNKING else self.state

    def _close(self) -> None:
        self.state = ClientState.CLOSED
        self._pending.clear()
        self._body = None
        self._auth_lines = []

    # -- session commands ----------------------------------------------------------------------------

    def ehlo(self, hostname: str) -> bytes:
        """EHLO; a 250 sets `extensions` and the state READY. After a 5xx, try `helo()`."""
        self._check("EHLO", {ClientState.HELLO, ClientState.READY})
        return self._queue("EHLO", _hostname(hostname), f"EHLO {hostname}")

    def helo(self, hostname: str) -> bytes:
        """HELO, the fallback for servers that refuse EHLO; a 250 leaves `extensions` all false."""
        self._check("HELO", {ClientState.HELLO, ClientState.READY})
        return self._queue("HELO", _hostname(hostname), f"HELO {hostname}")

    def starttls(self) -> bytes:
        """STARTTLS. After its 220 (state TLS_PENDING) the caller wraps the stream in TLS and calls
        `tls_established()`; any other reply leaves the session as it was."""
        self._check("STARTTLS", {ClientState.READY})
        if self.tls_active:
            raise LocalProtocolError("TLS is already active")
        if not self._offered().starttls:
            raise LocalProtocolError("the server did not offer STARTTLS")
        return self._queue("STARTTLS", "", "STARTTLS")

    def tls_established(self) -> None:
        """The handshake finished: everything learnt before it is forgotten and EHLO is needed again
        (RFC 3207 4.2)."""
        if self.state is not ClientState.TLS_PENDING:
            raise LocalProtocolError("no STARTTLS was accepted")
        self.tls_active = True
        self.authenticated = False
        self.extensions = None
        self._parser = ReplyParser()
        self.state = ClientState.HELLO

    def auth_plain(self, username: str, password: str) -> bytes:
        """AUTH PLAIN with the initial response (RFC 4616). A 235 sets `authenticated`."""
        token = _b64(f"\0{username}\0{password}")
        return self._auth("PLAIN", f"AUTH PLAIN {token}", [])

    def auth_login(self, username: str, password: str) -> bytes:
        """AUTH LOGIN. Each 334 Response that follows is answered with `auth_continue()`, which sends
        the user name, then the password; a 235 sets `authenticated`."""
        return self._auth("LOGIN", "AUTH LOGIN", [_b64(username), _b64(password)])

    def auth_continue(self) -> bytes:
        """The answer to the 334 just received: the mechanism's next line, or "*" (cancel) when it has
        nothing more to say, which makes the server end the exchange with an error."""
        if self.state is not ClientState.AUTH or not self._challenged or self._pending:
            raise LocalProtocolError("no 334 challenge is waiting for an answer")
        self._challenged = False
        line = self._auth_lines.pop(0) if self._auth_lines else "*"
        return self._queue("AUTH", self._auth_mechanism, line)

    def _auth(self, mechanism: str, line: str, lines: list[str]) -> bytes:
        self._check("AUTH", {ClientState.READY})
        if self.authenticated:
            raise LocalProtocolError("already authenticated")
        if mechanism not in self._offered().auth:
            raise LocalProtocolError(f"the server did not offer AUTH {mechanism}")
        self._auth_mechanism, self._auth_lines = mechanism, lines
        self.state = ClientState.AUTH
        return self._queue("AUTH", mechanism, line)

    def _end_auth(self) -> None:
        self._auth_mechanism, self._auth_lines, self._challenged = "", [], False
        self.state = ClientState.READY

    def rset(self) -> bytes:
        """RSET: the transaction is gone whatever the reply."""
        self._check("RSET", _ANYTIME)
        if self.state is not ClientState.HELLO:
            self.state = ClientState.READY
        return self._queue("RSET", "", "RSET")

    def noop(self) -> bytes:
        self._check("NOOP", _ANYTIME)
        return self._queue("NOOP", "", "NOOP")

    def quit(self) -> bytes:
        """QUIT; the state is CLOSED once its reply arrives."""
        self._check("QUIT", _ANYTIME)
        return self._queue("QUIT", "", "QUIT")

    # -- the mail transaction ------------------------------------------------------------------------

    def mail(
        self, sender: str, *, size: int | None = None, body: str | None = None, smtputf8: bool = False
    ) -> bytes:
        """MAIL FROM ("" is the null sender). SIZE= and BODY= are added only when the server offered
        SIZE and 8BITMIME; `smtputf8` is required for a non-ASCII address in the transaction and raises
        `LocalProtocolError` when the server did not offer SMTPUTF8 (a delivery failure for the caller)."""
        self._check("MAIL", {ClientState.READY})
        offered = self._offered()
        path = _path(sender, sender=True)
        if smtputf8 and not offered.smtputf8:
            raise LocalProtocolError("the message needs SMTPUTF8, which the server did not offer")
        if not smtputf8 and not path.isascii():
            raise LocalProtocolError("a non-ASCII sender needs smtputf8=True")
        params = ""
        if size is not None:
            if size < 0:
                raise LocalProtocolError("SIZE must not be negative")
            if offered.size is not None:
                params += f" SIZE={size}"
        if body is not None:
            if body.upper() not in ("7BIT", "8BITMIME"):
                raise LocalProtocolError(f"unknown BODY type {body!r}")
            if offered.eightbitmime:
                params += f" BODY={body.upper()}"
        if smtputf8:
            params += " SMTPUTF8"
        self._txn += 1
        self._mail_refused = False
        self._smtputf8 = smtputf8
        self._chunks = LineEndingNormalizer()
        self.state = ClientState.MAIL
        return self._queue("MAIL", path[1:-1], f"MAIL FROM:{path}{params}")

    def rcpt(self, recipient: str) -> bytes:
        self._check("RCPT", {ClientState.MAIL, ClientState.RCPT})
        path = _path(recipient, sender=False)
        if not self._smtputf8 and not path.isascii():
            raise LocalProtocolError("a non-ASCII recipient needs MAIL with smtputf8=True")
        self.state = ClientState.RCPT
        return self._queue("RCPT", path[1:-1], f"RCPT TO:{path}")

    def data(self) -> bytes:
        """DATA. Only a 354 (state BODY) allows `send_body`. Any other reply ends DATA in state RCPT, since
        the server may still hold the transaction (RSET before the next MAIL), or READY if MAIL was refused.
        """
        self._check("DATA", {ClientState.RCPT})
        self.state = ClientState.DATA
        return self._queue("DATA", "", "DATA")

    def send_body(self, chunk: bytes) -> bytes:
        """Message content in any number of chunks, CRLF-normalised and dot-stuffed across chunk
        boundaries; may return b"" (a trailing CR waits for the next chunk)."""
        if self.state is not ClientState.BODY or self._body is None:
            raise LocalProtocolError(f"no message content allowed in state {self.state.name}")
        return self._body.encode(chunk)

    def end_body(self) -> bytes:
        """The end of the content (a CRLF if it lacked one, then ".\\r\\n"). The transaction is over;
        its result arrives as the "DATA_END" Response, and a next MAIL may be pipelined behind it."""
        if self.state is not ClientState.BODY or self._body is None:
            raise LocalProtocolError(f"no message content to end in state {self.state.name}")
        tail = self._body.finish()
        self._body = None
        self.state = ClientState.READY
        self._pending.append(_Pending("DATA_END", "", self._txn))
        return tail

    def bdat(self, chunk: bytes, *, last: bool) -> bytes:
        """One BDAT chunk (RFC 3030), CRLF-normalised across chunks but not dot-stuffed: the command line
        followed by the payload. After `last=True` the transaction is over (state READY)."""
        self._check("BDAT", {ClientState.RCPT, ClientState.CHUNKING})
        if not self._offered().chunking:
            raise LocalProtocolError("the server did not offer CHUNKING")
        if self.state is ClientState.RCPT:
            self._chunks = LineEndingNormalizer()
        payload = self._chunks.encode(chunk)
        if last:
            payload += self._chunks.flush()
        argument = f"{len(payload)} LAST" if last else str(len(payload))
        self.state = ClientState.READY if last else ClientState.CHUNKING
        return self._queue("BDAT", argument, f"BDAT {argument}") + payload

    # -- helpers -------------------------------------------------------------------------------------

    def _offered(self) -> ServerExtensions:
        return self.extensions if self.extensions is not None else ServerExtensions()

    def _check(self, command: str, states: Collection[ClientState]) -> None:
        if self.state not in states:
            raise LocalProtocolError(f"{command} is not allowed in state {self.state.name}")
        if self._pending:
            last = self._pending[-1].command
            if last in _GROUP_ENDING:
                raise LocalProtocolError(f"{command} cannot be sent before the reply to {last}")
            if not self._offered().pipelining:
                raise LocalProtocolError(
                    f"{command} cannot be sent before the reply to {last}: no PIPELINING offered"
                )

    def _queue(self, command: str, argument: str, line: str) -> bytes:
        if "\r" in line or "\n" in line or "\0" in line:
            raise LocalProtocolError(f"CR, LF or NUL in the {command} command")
        self._pending.append(_Pending(command, argument, self._txn))
        return line.encode("utf-8") + b"\r\n"


def _hostname(hostname: str) -> str:
    if not hostname or len(hostname) > MAX_HOSTNAME or not hostname.isprintable() or " " in hostname:
        raise LocalProtocolError(f"bad host name for EHLO/HELO: {hostname[:80]!r}")
    return hostname


def _path(address: str, *, sender: bool) -> str:
    """`<address>`, validated with the parser the server uses, so nothing can be injected."""
    path = address if address.startswith("<") and address.endswith(">") else f"<{address}>"
    try:
        parse_path(path, allow_null=sender, allow_postmaster=not sender)
    except AddressError as exc:
        raise LocalProtocolError(f"bad address {address[:80]!r}: {exc}") from None
    return path


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
