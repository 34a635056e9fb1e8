"""Byte framing shared by server and client: command lines, dot-terminated DATA, BDAT chunks, and
dot-stuffing for sending.

Everything works on whole buffers with `bytes.find`/`split` (DESIGN rule 6): no per-byte Python loops.
Only `\\r\\n.\\r\\n` ends DATA; bare CR or LF around a dot is message content (the SMTP smuggling defence).
"""

from __future__ import annotations

import re

MAX_TEXT_LINE = 1000  # RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including CRLF


class LineBuffer:
    """Splits incoming bytes into command lines of bounded length.

    A line longer than `max_length` is reported once as `TOO_LONG` and the rest of it is discarded up to
    its line ending, so a client streaming an endless line costs bounded memory.
    """

    TOO_LONG = object()

    def __init__(self) -> None:
        self.buf = bytearray()
        self._discarding = False

    def feed(self, data: bytes | bytearray) -> None:
        self.buf += data

    def clear(self) -> None:
        self.buf.clear()
        self._discarding = False

    def next_line(self, max_length: int) -> bytes | object | None:
        """A line without its line ending, `TOO_LONG`, or None when no full line is buffered.

        `max_length` counts the CRLF, as RFC 5321 does. A bare LF also ends a command line (Postfix does
        the same); a CR before it is dropped.
        """
        buf = self.buf
        if self._discarding:
            nl = buf.find(b"\n")
            if nl < 0:
                buf.clear()
                return None
            del buf[: nl + 1]
            self._discarding = False
        end = buf.find(b"\n", 0, max_length)
        if end < 0:
            if len(buf) < max_length:
                return None
            # No line end within the limit: report once, then drop bytes up to the next LF.
            nl = buf.find(b"\n")
            if nl < 0:
                buf.clear()
                self._discarding = True
            else:
                del buf[: nl + 1]
            return LineBuffer.TOO_LONG
        line = bytes(buf[:end])
        del buf[: end + 1]
        return line[:-1] if line.endswith(b"\r") else line


class LineLengthTracker:
    """Remembers whether any text line in a stream of chunks exceeded `MAX_TEXT_LINE` octets."""

    def __init__(self, limit: int = MAX_TEXT_LINE) -> None:
        self._limit = limit - 2  # content octets allowed before the CRLF
        self._current = 0  # octets of the line still open at the end of the last chunk
        self.exceeded = False

    def update(self, chunk: bytes) -> None:
        if self.exceeded:
            return
        # Pieces between LFs keep their CR, so a piece may be one octet longer than the content limit.
        limit = self._limit + 1
        last_lf = chunk.rfind(b"\n")
        if last_lf < 0:
            self._current += len(chunk)
            self.exceeded = self._current > limit
            return
        if self._current + len(chunk) > limit:
            first_lf = chunk.find(b"\n")
            inner = chunk[first_lf + 1 : last_lf].split(b"\n")
            self.exceeded = max(self._current + first_lf, *map(len, inner)) > limit
        self._current = len(chunk) - last_lf - 1


class DotReader:
    """Reads a DATA section: removes the stuffed leading dots and finds the `CRLF.CRLF` terminator.

    The section is scanned as if it were preceded by CRLF (DATA content starts at a line start), so a
    first line of "." ends an empty message and a first line of ".x" is unstuffed like any other.
    """

    def __init__(self) -> None:
        self._buf = bytearray(b"\r\n")
        self._skip = 2  # the two sentinel octets, dropped from the first output
        self.finished = False

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def read(self) -> bytes:
        """Content decoded so far (possibly empty); sets `finished` once the terminator is consumed.

        After `finished`, `leftover()` holds the bytes that followed the terminator (pipelined commands).
        """
        if self.finished:
            return b""
        buf = self._buf
        out: list[bytes] = []
        start = 0
        while True:
            i = buf.find(b"\r\n.", start)
            if i < 0:
                keep = max(start, len(buf) - 2)  # a trailing CR or CRLF may begin "\r\n."
                break
            if len(buf) < i + 5:
                keep = i  # cannot tell yet whether this is the terminator
                break
            out.append(bytes(buf[start : i + 2]))
            if buf[i + 3 : i + 5] == b"\r\n":
                self.finished = True
                keep = i + 5
                break
            start = i + 3  # drop the stuffed dot
        if not self.finished:
            out.append(bytes(buf[start:keep]))
        del buf[:keep]
        data = b"".join(out)
        if self._skip:
            dropped = min(self._skip, len(data))
            data = data[dropped:]
            self._skip -= dropped
        return data

    def leftover(self) -> bytes:
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


_BARE_LF = re.compile(rb"(?<!\r)\n")
_BARE_CR = re.compile(rb"\r(?!\n)")


def normalize_line_endings(data: bytes) -> bytes:
    """Turn every bare LF and bare CR into CRLF, so no bare line ending ever reaches the wire."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") == crlf and data.count(b"\r") == crlf:
        return data  # the usual case (mail is CRLF already), found by three C scans instead of a regex
    if b"\r" in data:
        data = _BARE_CR.sub(b"\r\n", data)
    return _BARE_LF.sub(b"\r\n", data)


def dot_stuff(data: bytes, *, at_line_start: bool = True) -> bytes:
    """Double every dot that starts a line (RFC 5321 4.5.2). `data` must already be CRLF-normalised."""
    data = data.replace(b"\r\n.", b"\r\n..")
    if at_line_start and data.startswith(b"."):
        data = b"." + data
    return data


class LineEndingNormalizer:
    """`normalize_line_endings` for a stream of chunks: a CR that ends one chunk and the LF that starts
    the next are one CRLF, so a trailing CR is held back until the next chunk (or `flush`) decides."""

    def __init__(self) -> None:
        self._held_cr = False

    def encode(self, chunk: bytes) -> bytes:
        if self._held_cr and chunk:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        return normalize_line_endings(chunk)

    def flush(self) -> bytes:
        """The held-back CR, now known to be bare, as CRLF (or nothing)."""
        held, self._held_cr = self._held_cr, False
        return b"\r\n" if held else b""


class BodyEncoder:
    """Turns message content, chunk by chunk, into the wire form of a DATA section: line endings
    normalised to CRLF and leading dots doubled across chunk boundaries, then the `CRLF.CRLF` terminator.

    The output never holds a bare CR or LF, and `\\r\\n.\\r\\n` appears only as the terminator: the
    content can neither end the message early nor smuggle commands (DESIGN rule 1, the server's
    `DotReader` is the inverse).
    """

    def __init__(self) -> None:
        self._lines = LineEndingNormalizer()
        self._at_line_start = True

    def encode(self, chunk: bytes) -> bytes:
        data = self._lines.encode(chunk)
        if not data:
            return b""
        data = dot_stuff(data, at_line_start=self._at_line_start)
        self._at_line_start = data.endswith(b"\n")
        return data

    def finish(self) -> bytes:
        """The end of the section: a CRLF if the content did not end with one, then `.\\r\\n`."""
        tail = self._lines.flush()
        if not tail and not self._at_line_start:
            tail = b"\r\n"
        self._at_line_start = True
        return tail + b".\r\n"
