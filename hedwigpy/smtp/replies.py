"""SMTP replies as data: `Reply(code, enhanced, text)`, their wire form, and an incremental parser.

A reply travels unchanged from an upstream server to the original sender (DESIGN rule 3), so the same
type is produced by the server side and parsed by the client side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import RemoteProtocolError

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply. `text` may hold several lines separated by "\\n"; `enhanced` may be ""."""

    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def to_bytes(self) -> bytes:
        """The wire form: continuation lines `250-...`, last line `250 ...`, every line CRLF-ended."""
        lines = self.text.split("\n")
        enhanced = f"{self.enhanced} " if self.enhanced else ""
        wire = [f"{self.code}-{enhanced}{line}\r\n" for line in lines[:-1]]
        wire.append(f"{self.code} {enhanced}{lines[-1]}\r\n")
        return "".join(wire).encode("utf-8", "surrogateescape")

    def __str__(self) -> str:
        head = f"{self.code} {self.enhanced}".rstrip()
        return f"{head} {' / '.join(self.text.split(chr(10)))}"


MAX_REPLY_LINE = 4096  # RFC 5321 allows 512; real servers send longer, but a bound keeps memory bounded
MAX_REPLY_LINES = 256


class ReplyParser:
    """Turns bytes from a server into `Reply` objects, tolerating any split of the input."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[tuple[int, str, str]] = []

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_REPLY_LINE and self._buf.find(b"\n") < 0:
            raise RemoteProtocolError("reply line too long")

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None until more bytes arrive."""
        buf = self._buf
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                del buf[:start]
                return None
            raw = bytes(buf[start:end]).rstrip(b"\r")
            start = end + 1
            code, more, rest = _split_reply_line(raw)
            enhanced = ""
            if self._lines and code != self._lines[0][0]:
                raise RemoteProtocolError(f"reply code changed inside a reply: {raw!r}")
            parts = rest.split(" ", 1)
            if _ENHANCED.match(parts[0]) and parts[0][0] == str(code)[0]:
                enhanced = parts[0]
                rest = parts[1] if len(parts) > 1 else ""
            self._lines.append((code, enhanced, rest))
            if len(self._lines) > MAX_REPLY_LINES:
                raise RemoteProtocolError("reply has too many lines")
            if not more:
                lines, self._lines = self._lines, []
                del buf[:start]
                return Reply(code, lines[-1][1], "\n".join(text for _, _, text in lines))


def _split_reply_line(raw: bytes) -> tuple[int, bool, str]:
    if len(raw) < 3 or not raw[:3].isdigit() or raw[0] not in b"2345":
        raise RemoteProtocolError(f"malformed reply line: {raw[:80]!r}")
    sep = raw[3:4]
    if sep not in (b"", b" ", b"-"):
        raise RemoteProtocolError(f"malformed reply line: {raw[:80]!r}")
    return int(raw[:3]), sep == b"-", raw[4:].decode("utf-8", "replace")
