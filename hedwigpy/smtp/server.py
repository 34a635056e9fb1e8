"""`ServerConnection`: the server side of an SMTP session as a sans-IO state machine.

Bytes go in with `receive_data`, events come out of `next_event`, and each event that needs an answer
is answered with `send(reply)`, which returns the bytes to write. The connection decides only what is
*legal* (sequence, syntax, line lengths); whether a sender or recipient is *acceptable* is the caller's
policy, expressed through the reply it sends. State changes that depend on the answer (a 250 to MAIL
starts a transaction, a 354 to DATA starts the message) are applied in `send`.
"""

from __future__ import annotations

import enum

from . import events as ev
from .commands import (
    CommandSyntaxError,
    check_mail_params,
    check_rcpt_params,
    parse_bdat,
    parse_path_argument,
    split_verb,
)
from .errors import LocalProtocolError
from .framing import DotReader, LineBuffer, LineLengthTracker
from .replies import Reply

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, including CRLF
MAX_AUTH_LINE = 12288  # RFC 4954 4


class State(enum.Enum):
    GREETING = "greeting"  # connected, banner not sent yet
    HELO = "helo"  # waiting for EHLO/HELO
    READY = "ready"  # no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading the dot-terminated message
    BDAT = "bdat"  # reading a BDAT chunk
    CHUNKING = "chunking"  # between BDAT chunks of one transaction
    AUTH = "auth"  # inside a SASL exchange
    TLS = "tls"  # 220 sent to STARTTLS, handshake pending
    CLOSED = "closed"


_NOT_IMPLEMENTED = frozenset({"EXPN", "TURN", "ETRN", "SEND", "SOML", "SAML", "ATRN"})
_IN_TRANSACTION = frozenset({State.MAIL, State.RCPT, State.CHUNKING})


def _error(code: int, enhanced: str, text: str) -> ev.CommandError:
    return ev.CommandError(Reply(code, enhanced, text))


class ServerConnection:
    """One SMTP server session. Not thread-safe; one per connection."""

    def __init__(self) -> None:
        self.state = State.GREETING
        self.authenticated = False
        self.tls_active = False
        self._lines = LineBuffer()
        self._dot: DotReader | None = None
        self._tracker = LineLengthTracker()
        self._bdat_left = 0
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_refused = False
        self._smtputf8 = False
        self._pending: ev.Event | None = None
        self._early = False
        self._eof = False
        self._helo_seen = False

    # -- input ---------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def receive_data(self, data: bytes | bytearray) -> None:
        """Feed bytes from the peer; b"" means the peer closed its sending side."""
        if not data:
            self._eof = True
            return
        if self.state is State.CLOSED or self.state is State.TLS:
            return  # after STARTTLS's 220 only the handshake may come; plaintext is never interpreted
        if self.state is State.GREETING:
            self._early = True
            return  # bytes sent before the banner are never interpreted
        if self.state is State.DATA:
            assert self._dot is not None
            self._dot.feed(data)
        else:
            self._lines.feed(data)

    @property
    def talked_early(self) -> bool:
        """The client sent bytes before the greeting (an SMTP synchronisation error; the caller
        normally greets such a client with 554 instead of 220)."""
        return self._early

    def greet(self, reply: Reply) -> bytes:
        """Send the banner (220, or 421/554 to refuse the connection)."""
        if self.state is not State.GREETING:
            raise LocalProtocolError("greeting already sent")
        self.state = State.HELO if reply.code == 220 else State.CLOSED
        return reply.to_bytes()

    def tls_established(self) -> None:
        """The TLS handshake after STARTTLS finished: the session starts over (RFC 3207 4.2)."""
        if self.state is not State.TLS:
            raise LocalProtocolError("no STARTTLS in progress")
        self.tls_active = True
        self._helo_seen = False
        self._lines.clear()
        self.state = State.HELO

    # -- events --------------------------------------------------------------------------------------

    def next_event(self) -> ev.Event | object:
        """The next event, `NEED_DATA`, or `PAUSED` while an event still awaits its reply."""
        if self._pending is not None:
            return ev.PAUSED
        state = self.state
        if state is State.CLOSED or state is State.TLS:
            return ev.NEED_DATA
        if state is State.GREETING:
            return ev.ConnectionClosed() if self._eof else ev.NEED_DATA
        if state is State.DATA:
            return self._next_data_event()
        if state is State.BDAT:
            return self._next_chunk_event()
        max_len = MAX_AUTH_LINE if state is State.AUTH else MAX_COMMAND_LINE
        line = self._lines.next_line(max_len)
        if line is None:
            return ev.ConnectionClosed() if self._eof else ev.NEED_DATA
        if line is LineBuffer.TOO_LONG:
            return self._expect(_error(500, "5.5.2", "Line too long"))
        assert isinstance(line, bytes)
        if b"\0" in line:
            return self._expect(_error(500, "5.5.2", "NUL character not allowed"))
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return self._expect(_error(500, "5.5.2", "Invalid UTF-8 in command"))
        if state is State.AUTH:
            return self._expect(ev.AuthResponse(text.strip(), cancelled=text.strip() == "*"))
        event = self._command(text)
        if event is None:  # a refused BDAT: its chunk is swallowed before the error is reported
            return self._next_chunk_event()
        return self._expect(event)

    def _next_data_event(self) -> ev.Event | object:
        dot = self._dot
        assert dot is not None
        data = dot.read()
        if data:
            self._tracker.update(data)
            return ev.MessageData(data)
        if dot.finished:
            self._lines.feed(dot.leftover())
            self._dot = None
            return self._expect(ev.MessageEnd(self._tracker.exceeded))
        return ev.ConnectionClosed() if self._eof else ev.NEED_DATA

    def _next_chunk_event(self) -> ev.Event | object:
        if self._bdat_left:
            buf = self._lines.buf
            if not buf:
                return ev.ConnectionClosed() if self._eof else ev.NEED_DATA
            take = min(self._bdat_left, len(buf))
            data = bytes(buf[:take])
            del buf[:take]
            self._bdat_left -= take
            if not self._bdat_refused:
                self._tracker.update(data)
                return ev.MessageData(data)
            if self._bdat_left:
                return self._next_chunk_event()
        if self._bdat_refused:
            self._bdat_refused = False
            self.state = State.READY if self._helo_seen else State.HELO
            return self._expect(_error(503, "5.5.1", "BDAT without valid MAIL and RCPT; chunk discarded"))
        return self._expect(ev.ChunkEnd(self._bdat_size, self._bdat_last, self._tracker.exceeded))

    def _command(self, text: str) -> ev.Event | None:
        verb, rest = split_verb(text)
        state = self.state
        try:
            if verb in ("EHLO", "HELO"):
                if not rest:
                    return _error(501, "5.5.4", f"Syntax: {verb} hostname")
                return ev.Hello(rest.split()[0], extended=verb == "EHLO")
            if verb == "QUIT":
                return ev.Quit()
            if verb == "NOOP":
                return ev.Noop()
            if verb == "RSET":
                return ev.Reset() if not rest else _error(501, "5.5.4", "Syntax: RSET")
            if verb == "HELP":
                return ev.Help(rest)
            if verb == "VRFY":
                return ev.Verify(rest) if rest else _error(501, "5.5.4", "Syntax: VRFY address")
            if verb in _NOT_IMPLEMENTED:
                return _error(502, "5.5.1", f"{verb} not implemented")
            if verb == "STARTTLS":
                if rest:
                    return _error(501, "5.5.4", "Syntax: STARTTLS")
                if state in _IN_TRANSACTION:
                    return _error(503, "5.5.1", "STARTTLS not allowed during a mail transaction")
                return ev.StartTls()
            if verb == "BDAT":
                return self._bdat(rest)
            if not self._helo_seen:
                if verb in ("MAIL", "RCPT", "DATA", "AUTH"):
                    return _error(503, "5.5.1", "Send EHLO or HELO first")
                return _error(500, "5.5.2", "Command unrecognized")
            if verb == "MAIL":
                return self._mail(rest)
            if verb == "RCPT":
                return self._rcpt(rest)
            if verb == "DATA":
                return self._data(rest)
            if verb == "AUTH":
                return self._auth(rest)
        except CommandSyntaxError as exc:
            return ev.CommandError(exc.reply)
        return _error(500, "5.5.2", "Command unrecognized")

    def _mail(self, rest: str) -> ev.Event:
        if self.state in _IN_TRANSACTION:
            return _error(503, "5.5.1", "Nested MAIL command")
        sender, params = parse_path_argument(
            rest, "FROM", allow_null=True, allow_postmaster=False, enhanced="5.1.7"
        )
        size, body, smtputf8 = check_mail_params(params)
        if not smtputf8 and not str(sender).isascii():
            return _error(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        return ev.MailFrom(sender, size=size, body=body, smtputf8=smtputf8, params=params)

    def _rcpt(self, rest: str) -> ev.Event:
        if self.state not in (State.MAIL, State.RCPT):
            return _error(503, "5.5.1", "Need MAIL command first")
        recipient, params = parse_path_argument(
            rest, "TO", allow_null=False, allow_postmaster=True, enhanced="5.1.3"
        )
        check_rcpt_params(params)
        if not self._smtputf8 and not str(recipient).isascii():
            return _error(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        return ev.RcptTo(recipient, params)

    def _data(self, rest: str) -> ev.Event:
        if rest:
            return _error(501, "5.5.4", "Syntax: DATA")
        if self.state is State.MAIL:
            return _error(554, "5.5.1", "No valid recipients")
        if self.state is State.CHUNKING:
            return _error(503, "5.5.1", "DATA not allowed after BDAT")
        if self.state is not State.RCPT:
            return _error(503, "5.5.1", "Need MAIL and RCPT commands first")
        return ev.DataCommand()

    def _bdat(self, rest: str) -> ev.Event | None:
        size, last = parse_bdat(rest)
        self._bdat_left = self._bdat_size = size
        self._bdat_last = last
        self._bdat_refused = self.state not in (State.RCPT, State.CHUNKING)
        if self.state is not State.CHUNKING:
            self._tracker = LineLengthTracker()
        self.state = State.BDAT
        return None if self._bdat_refused else ev.BdatCommand(size, last)

    def _auth(self, rest: str) -> ev.Event:
        if self.authenticated:
            return _error(503, "5.5.1", "Already authenticated")
        if self.state in _IN_TRANSACTION:
            return _error(503, "5.5.1", "AUTH not allowed during a mail transaction")
        parts = rest.split()
        if not 1 <= len(parts) <= 2:
            return _error(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        return ev.AuthStart(parts[0].upper(), parts[1] if len(parts) == 2 else None)

    def _expect(self, event: ev.Event) -> ev.Event:
        if event.needs_reply:
            self._pending = event
        return event

    # -- output --------------------------------------------------------------------------------------

    def send(self, reply: Reply) -> bytes:
        """Answer the pending event; returns the bytes to write. A 421 always closes the session."""
        event = self._pending
        if event is None:
            raise LocalProtocolError("no event is waiting for a reply")
        self._pending = None
        if reply.code == 421:
            self.state = State.CLOSED
        else:
            self._transition(event, reply)
        return reply.to_bytes()

    def close_with(self, reply: Reply) -> bytes:
        """An unsolicited final reply (e.g. `421 timeout`): the session is over."""
        self._pending = None
        self.state = State.CLOSED
        return reply.to_bytes()

    def _transition(self, event: ev.Event, reply: Reply) -> None:
        ok = reply.is_positive
        if isinstance(event, ev.Hello):
            if ok:
                self._helo_seen = True
                self._reset_transaction()
        elif isinstance(event, ev.MailFrom):
            if ok:
                self.state = State.MAIL
                self._smtputf8 = event.smtputf8
        elif isinstance(event, ev.RcptTo):
            if ok:
                self.state = State.RCPT
        elif isinstance(event, ev.DataCommand):
            if reply.code == 354:
                self.state = State.DATA
                self._dot = DotReader()
                self._tracker = LineLengthTracker()
                self._dot.feed(bytes(self._lines.buf))
                self._lines.clear()
        elif isinstance(event, ev.MessageEnd):
            self._reset_transaction()
        elif isinstance(event, ev.ChunkEnd):
            if event.last or not ok:
                self._reset_transaction()
            else:
                self.state = State.CHUNKING
        elif isinstance(event, ev.Reset):
            self._reset_transaction()
        elif isinstance(event, ev.StartTls):
            if reply.code == 220:
                self.state = State.TLS
                self._lines.clear()  # plaintext pipelined after STARTTLS is never interpreted
        elif isinstance(event, (ev.AuthStart, ev.AuthResponse)):
            if reply.code == 334:
                self.state = State.AUTH
            else:
                self.authenticated = reply.code == 235
                self.state = State.READY
        elif isinstance(event, ev.Quit):
            self.state = State.CLOSED
        elif self.state is State.AUTH:  # a CommandError inside SASL ends the exchange
            self.state = State.READY

    def _reset_transaction(self) -> None:
        self._smtputf8 = False
        self._dot = None
        self.state = State.READY if self._helo_seen else State.HELO
