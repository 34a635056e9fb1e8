"""A raw-socket SMTP peer for hostile-input tests: sends exactly the bytes given, reads replies line
by line with plain stdlib code (independent of the daemon's own reply parser)."""

from __future__ import annotations

import socket
import ssl
import time


class Wire:
    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        *,
        timeout: float = 10.0,
        greet: bool = True,
        source: str | None = None,
    ):
        source_address = None if source is None else (source, 0)
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout, source_address=source_address
        )
        self.buf = b""
        if greet:
            self.banner = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by server; unread: {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> str:
        """One whole reply as text; continuation lines joined with newlines."""
        lines = []
        while True:
            line = self._line().decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    def cmd(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection (EOF or reset) within `timeout`."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return False

    def starttls(self, context: ssl.SSLContext, hostname: str = "localhost") -> None:
        assert isinstance(self.sock, socket.socket)
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
