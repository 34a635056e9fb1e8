"""What `ServerConnection.next_event()` returns. Events marked *needs a reply* must be answered with
exactly one `ServerConnection.send(reply)` before the next event is produced; replies therefore go out
in command order, which is what PIPELINING requires."""

from __future__ import annotations

from dataclasses import dataclass, field

from .addresses import Mailbox
from .replies import Reply


class Event:
    """Base of all server-side events."""

    needs_reply = True


@dataclass(frozen=True, slots=True)
class Hello(Event):
    """EHLO or HELO (needs a reply; a 250 resets the transaction)."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    """MAIL FROM, syntax and parameters already checked (needs a reply; 250 starts a transaction)."""

    sender: Mailbox
    size: int | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    """RCPT TO (needs a reply; a 2xx adds the recipient)."""

    recipient: Mailbox
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DataCommand(Event):
    """DATA (needs a reply: 354 switches to reading the message, anything else does not)."""


@dataclass(frozen=True, slots=True)
class BdatCommand(Event):
    """BDAT: the chunk follows as `MessageData`, then `ChunkEnd` (this event needs no reply)."""

    size: int
    last: bool
    needs_reply = False


@dataclass(frozen=True, slots=True)
class MessageData(Event):
    """Message content bytes, dot-unstuffed (DATA) or raw (BDAT). No reply."""

    data: bytes
    needs_reply = False


@dataclass(frozen=True, slots=True)
class MessageEnd(Event):
    """The end of DATA; `line_too_long` tells if any text line broke RFC 5321's 1000 octets.

    Needs the final reply for the transaction, which ends whatever the reply says.
    """

    line_too_long: bool


@dataclass(frozen=True, slots=True)
class ChunkEnd(Event):
    """The end of a BDAT chunk (needs a reply). After the LAST chunk the transaction ends."""

    size: int
    last: bool
    line_too_long: bool


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    """STARTTLS (needs a reply; after a 220, the caller performs the handshake and then calls
    `ServerConnection.tls_established()`; plaintext pipelined behind the command is discarded)."""


@dataclass(frozen=True, slots=True)
class AuthStart(Event):
    """AUTH mechanism [initial-response] (needs a reply: 334 continues, 235 succeeds)."""

    mechanism: str
    initial: str | None


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """A client line inside a SASL exchange; `cancelled` for "*" (needs a reply)."""

    data: str
    cancelled: bool


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """RSET (needs a reply; the transaction is gone whatever the reply)."""


@dataclass(frozen=True, slots=True)
class Noop(Event):
    """NOOP (needs a reply)."""


@dataclass(frozen=True, slots=True)
class Verify(Event):
    """VRFY (needs a reply; we answer 252 as RFC 5321 suggests)."""

    argument: str


@dataclass(frozen=True, slots=True)
class Help(Event):
    """HELP (needs a reply)."""

    argument: str


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """QUIT (needs a reply; the connection is closed after it)."""


@dataclass(frozen=True, slots=True)
class CommandError(Event):
    """Something the protocol itself refuses (syntax, sequence, length). Needs a reply: normally the
    suggested `reply`, but the caller may send another (e.g. 421 after too many errors)."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed its side (no reply)."""

    needs_reply = False


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")  # feed more bytes with receive_data()
PAUSED = _Sentinel("PAUSED")  # answer the pending event with send() first
