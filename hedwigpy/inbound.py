"""The content side of an inbound message: Received header, loop detection, a missing Message-ID,
Bcc removal, size limits — applied while the bytes stream into the spool.

The header section is buffered (bounded) until the blank line that ends it, inspected once, then the
whole message streams to the storage writer; a 20 MB body is never held in memory.
"""

from __future__ import annotations

import email.utils
import functools
import re
import time

from .smtp import Reply
from .storage import InsufficientSpace, MessageWriter, StorageError

MAX_HEADER_SECTION = 1024 * 1024  # inspect at most this much; beyond it the rest streams unparsed

_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:", re.IGNORECASE | re.MULTILINE)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
# A Bcc field with its folded continuation lines. Removed on the way in, like Postfix's cleanup(8), so
# the spool never holds it: no delivery, DKIM signature or bounce can leak the blind recipients.
_BCC_FIELD = re.compile(rb"^bcc[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z)", re.IGNORECASE | re.MULTILINE)


@functools.lru_cache(maxsize=2)
def _date_at(second: int) -> str:
    return email.utils.formatdate(second, localtime=True)


def _date_now() -> str:
    """RFC 5322 date of this second; formatting it once per second, not once per message."""
    return _date_at(int(time.time()))


def received_header(
    *, helo: str, client_ip: str, hostname: str, protocol: str, message_id: str, recipients: list[str]
) -> bytes:
    """Our trace header (RFC 5321 4.4). `for` names the recipient only when there is just one. With no
    `helo` (REST) the client is named by its address alone: `from [ip]`."""
    for_clause = f"\r\n\tfor <{recipients[0]}>" if len(recipients) == 1 else ""
    date = _date_now()
    helo = helo.replace("\r", "").replace("\n", "")[:255]
    client = f"{helo} ([{client_ip}])" if helo else f"[{client_ip}]"
    return (
        f"Received: from {client}\r\n\tby {hostname} (hedwigpy) with {protocol}"
        f" id {message_id}{for_clause};\r\n\t{date}\r\n"
    ).encode("utf-8", "surrogateescape")


class IncomingMessage:
    """Streams one message's content into a `MessageWriter`, applying the content policy."""

    def __init__(
        self, writer: MessageWriter, *, trace: bytes, max_size: int, max_hops: int, hostname: str
    ) -> None:
        self._writer = writer
        self._trace = trace
        self._max_size = max_size
        self._max_hops = max_hops
        self._hostname = hostname
        self._head: bytearray | None = bytearray()
        self.size = 0  # octets received
        self.stored_size = 0  # octets written to the spool (with our headers, without Bcc)
        self.hops = 0
        self.too_big = False
        self.failure: Reply | None = None

    @property
    def message_id(self) -> str:
        return self._writer.message_id

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.too_big or self.failure is not None:
            return
        if self.size > self._max_size:
            self.too_big = True  # keep reading (the client is still sending) but store nothing more
            return
        if self._head is None:
            await self._store(data)
            return
        self._head += data
        found = _HEADER_END.search(self._head)
        if found is not None or len(self._head) > MAX_HEADER_SECTION:
            await self._flush_head(found, complete=found is not None)

    async def _flush_head(self, found: re.Match[bytes] | None, *, complete: bool) -> None:
        """Write trace + header section (+ Message-ID) + whatever body bytes came with it.

        `complete` says the whole header section is known; only then can a missing Message-ID be told
        from one further down an overlong section.
        """
        assert self._head is not None
        head = bytes(self._head)
        self._head = None
        if head.startswith((b"\r\n", b"\n")):
            split = 0  # no header section at all
        elif found is not None:
            split = found.start() + (2 if head[found.start()] == 0x0D else 1)
        else:
            split = len(head)
        section = _BCC_FIELD.sub(b"", head[:split])
        self.hops = len(_RECEIVED.findall(section))
        extra = b""
        if (complete or split == 0) and not _MESSAGE_ID.search(section):
            extra = f"Message-ID: <{self.message_id}@{self._hostname}>\r\n".encode()
            if section and not section.endswith(b"\n"):
                extra = b"\r\n" + extra
        await self._store(self._trace + section + extra + head[split:])

    async def _store(self, data: bytes) -> None:
        self.stored_size += len(data)
        try:
            await self._writer.write(data)
        except InsufficientSpace:
            self.failure = Reply(452, "4.3.1", "Insufficient system storage")
        except StorageError:
            self.failure = Reply(451, "4.3.0", "Error: queue file write error")

    def verdict(self, line_too_long: bool) -> Reply | None:
        """The rejection for this message, or None when it may be committed."""
        if self.too_big:
            return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        if line_too_long:
            return Reply(554, "5.6.0", "Message rejected: a line is longer than 998 octets (RFC 5322)")
        if self.hops > self._max_hops:
            return Reply(554, "5.4.6", f"Too many hops ({self.hops} Received headers): mail loop?")
        return self.failure

    async def finish(self) -> None:
        """Flush a header section that never met its blank line (a message of headers only)."""
        if self._head is not None and self.failure is None and not self.too_big:
            await self._flush_head(None, complete=True)

    @property
    def writer(self) -> MessageWriter:
        return self._writer

    async def abort(self) -> None:
        await self._writer.abort()
