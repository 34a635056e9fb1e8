"""The spool's vocabulary: message ids, envelopes, states, and the `Storage` protocol.

Backends (filesystem for the daemon, memory for unit tests) implement `Storage`. Everything here is
plain data so the SMTP session, the REST API and the worker share one description of a message.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol

DueTimes = list[tuple[str, float]]  # (message id, unix time); an alias because Storage has a list()


class State(enum.StrEnum):
    """Where a message is in its life; each is a directory of the filesystem spool."""

    QUEUED = "queued"
    DEFERRED = "deferred"
    HELD = "held"
    BOUNCED = "bounced"
    CORRUPT = "corrupt"


def new_message_id(now_ns: int | None = None) -> str:
    """A 24-character id that sorts by creation time: 16 hex digits of nanoseconds + 8 random hex.

    Sortable ids let `queue list` and the scheduler rebuild order from file names alone.
    """
    ns = time.time_ns() if now_ns is None else now_ns
    return f"{ns:016x}{os.urandom(4).hex()}"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the SMTP transaction (or the REST call) said about a message, besides its bytes."""

    sender: str  # "" is the null sender <>
    recipients: tuple[str, ...]
    body_type: str = "7BIT"  # 7BIT | 8BITMIME | BINARYMIME, from MAIL BODY=
    smtputf8: bool = False
    received_at: float = field(default_factory=time.time)
    client_addr: str = ""  # "ip:port" of the peer, "" for REST/local
    helo: str = ""
    listener: str = ""  # listener name, or "http"
    auth_user: str | None = None


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A spooled message's metadata; the body is read separately (it can be large)."""

    id: str
    state: State
    envelope: Envelope
    size: int  # bytes of message content (headers + body)


RecipientState = Literal["pending", "delivered", "failed"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """The last answer a recipient got from a delivery attempt."""

    at: float  # unix time
    code: int  # SMTP reply code; 0 when there was no reply (connection, DNS or TLS failure)
    enhanced: str
    text: str
    host: str  # the MX or smarthost the answer came from, "" if none


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """Where one recipient of a message stands; "failed" is permanent. `bounced` says the sender has been
    told (a DSN is spooled, or none may be sent: the null sender), so a crash never loses a bounce and a
    failure recorded before the worker saw the message (cut-through) still gets one."""

    address: str
    state: RecipientState
    attempts: int = 0
    last: Attempt | None = None
    bounced: bool = False


@dataclass(frozen=True, slots=True)
class DeliveryStatus:
    """A message's delivery progress, kept apart from its data file (which is never modified).

    The spool replaces it atomically after each attempt, so a recipient recorded as delivered is never
    tried again, even after a crash.
    """

    recipients: tuple[RecipientStatus, ...]
    attempts: int = 0  # delivery attempts of the whole message
    next_attempt: float | None = None  # unix time of the next try (the scheduler uses it)
    bounce_sent: bool = False

    @classmethod
    def initial(cls, envelope: Envelope) -> DeliveryStatus:
        """Every recipient of the envelope pending (duplicates collapsed, order kept)."""
        addresses = dict.fromkeys(envelope.recipients)
        return cls(tuple(RecipientStatus(address, "pending") for address in addresses))

    def pending(self) -> tuple[str, ...]:
        """The addresses still to try."""
        return tuple(r.address for r in self.recipients if r.state == "pending")


class StorageError(Exception):
    """Any failure to store or read; the SMTP layer turns it into 451 4.3.0 / 452 4.3.1."""


class InsufficientSpace(StorageError):
    """The spool's filesystem lacks room for another message (452 4.3.1 at MAIL FROM)."""


class MessageWriter(Protocol):
    """Streams one message into the spool; invisible to readers until `commit` returns."""

    message_id: str
    envelope: Envelope

    async def write(self, data: bytes) -> None:
        """Append content bytes; may buffer, may hit the disk. Raises StorageError."""

    async def prepend(self, data: bytes) -> None:
        """Put `data` before everything written so far (DKIM signing adds header fields at the very top
        of a complete message). Cheap while the content is still in memory; otherwise the data file is
        rewritten at commit. Raises StorageError."""

    def content(self) -> AsyncGenerator[bytes, None]:
        """What was written so far, read back before any commit (cut-through delivers from it)."""

    async def commit(self, status: DeliveryStatus | None = None) -> StoredMessage:
        """Make the message durable (file and directory entry fsynced) in `queued/`. A `status` is made
        durable first, so the message never appears without it (recipients a cut-through already
        delivered are never sent again, even after a crash)."""

    async def abort(self) -> None:
        """Discard everything written; safe to call after a failed write or twice."""


class Storage(Protocol):
    """A durable spool of messages, one data file each, moved between `State` directories."""

    async def open(self) -> None:
        """Create directories, sweep `tmp/` of torn writes, quarantine unreadable files."""

    def check_space(self, needed: int) -> None:
        """Raise InsufficientSpace unless `needed` bytes (plus the reserve) are free. Cheap, sync."""

    def writer(self, envelope: Envelope, message_id: str | None = None) -> MessageWriter:
        """Start a new message; nothing touches the disk until data arrives or commit."""

    async def get(self, message_id: str) -> StoredMessage | None: ...

    def read_content(self, message_id: str) -> AsyncGenerator[bytes, None]:
        """The message content in chunks (headers + body, exactly as committed)."""

    async def list(self, state: State) -> list[StoredMessage]: ...

    async def move(self, message_id: str, to: State) -> None:
        """Atomically change a message's state (a rename, then a directory fsync)."""

    async def delete(self, message_id: str) -> None:
        """Remove the data file, then the status file; an unknown id is not an error."""

    async def load_status(self, message_id: str) -> DeliveryStatus:
        """The last saved status, or `DeliveryStatus.initial(envelope)` if none was saved yet.

        Raises StorageError if the message does not exist or its status cannot be read (an unreadable
        status quarantines the message: it must never be resent to a recipient already delivered).
        """

    async def save_status(self, message_id: str, status: DeliveryStatus) -> None:
        """Replace the message's status atomically; durable before returning. Raises StorageError."""

    async def set_due(self, message_id: str, when: float) -> None:
        """Remember when the message is next due (unix time), cheaply and without fsync: a lost update
        only makes a retry come early. The filesystem keeps it as the data file's mtime, as Postfix
        does for its deferred queue, so a restart schedules 100,000 messages without opening one."""

    async def due_times(self, state: State) -> DueTimes:
        """(id, due time) of every message in `state`; a message never given one reports the time it
        entered the spool."""

    def statistics(self) -> dict[str, int]:
        """Messages per state (every State value as a key)."""

    async def close(self) -> None: ...
