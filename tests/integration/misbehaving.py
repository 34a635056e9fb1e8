"""Upstreams that misbehave in ways aiosmtpd will not: a hand-written SMTP server on one loopback address
and port (share an `UpstreamPool`'s port, so the daemon's `[delivery].port` reaches it too).

    raw = RawUpstream("127.0.0.5", name="mx.silent.example", behaviour="silent")
    raw.start(pool.port)
    ...
    raw.behaviour = "ok"            # connections from now on take mail
    raw.stop()

What a connection does is the `behaviour` when it was accepted:

- "silent": accepts the TCP connection and never says a word (no greeting), reading whatever comes;
- "no-final-reply": a normal session up to the end of the content, which it never answers;
- "drop-mid-data": a normal session until `drop_after` bytes of content arrived (or all of it, if less),
  then it closes the connection without a reply (unread bytes make the kernel send a reset);
- "ok": a normal session that accepts every message ("250 2.0.0 Ok: accepted").

Each connection is recorded (`RawConnection`): its behaviour, the command lines, the content bytes read
after 354 (still dot-stuffed), and each message it accepted. No PIPELINING is offered, so the client
sends one command at a time. Threads, not trio: the daemon is a subprocess, the tests are synchronous.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Behaviour", "RawConnection", "RawUpstream"]

Behaviour = Literal["silent", "no-final-reply", "drop-mid-data", "ok"]
_END = b"\r\n.\r\n"


@dataclass
class RawConnection:
    behaviour: Behaviour
    commands: list[str] = field(default_factory=list)
    content: bytearray = field(default_factory=bytearray)  # after 354, as on the wire
    messages: list[bytes] = field(default_factory=list)  # accepted, un-stuffed, without the final dot
    closed: bool = False


class RawUpstream:
    def __init__(self, ip: str, *, name: str, behaviour: Behaviour, drop_after: int = 8192) -> None:
        self.ip = ip
        self.name = name
        self.behaviour: Behaviour = behaviour
        self.drop_after = drop_after
        self.port = 0
        self.connections: list[RawConnection] = []
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<RawUpstream {self.name} {self.ip}:{self.port} {self.behaviour}>"

    def label(self) -> str:
        """How the daemon names this host in replies and logs (Postfix's form, the port never being 25)."""
        return f"{self.name}[{self.ip}]:{self.port}"

    @property
    def messages(self) -> list[bytes]:
        return [m for c in list(self.connections) for m in list(c.messages)]

    def start(self, port: int) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.ip, port))
        listener.listen(64)
        self.port = port
        self._listener = listener
        self._spawn(self._accept_loop, listener)

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(5)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            conn = RawConnection(self.behaviour)
            with self._lock:
                if self._listener is None:
                    sock.close()
                    return
                self._sockets.append(sock)
                self.connections.append(conn)
            self._spawn(self._serve, sock, conn)

    def _serve(self, sock: socket.socket, conn: RawConnection) -> None:
        try:
            _Session(self, sock, conn).run()
        except OSError:
            pass
        finally:
            conn.closed = True
            with self._lock:
                if sock in self._sockets:
                    self._sockets.remove(sock)
            sock.close()


class _Session:
    def __init__(self, upstream: RawUpstream, sock: socket.socket, conn: RawConnection) -> None:
        self.upstream = upstream
        self.sock = sock
        self.conn = conn
        self.buffer = b""

    def run(self) -> None:
        if self.conn.behaviour == "silent":
            self._drain()
            return
        self._say(f"220 {self.upstream.name} ESMTP raw")
        while True:
            line = self._line()
            if line is None:
                return
            self.conn.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO":
                self._say(f"250-{self.upstream.name}\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES")
            elif verb == "HELO":
                self._say(f"250 {self.upstream.name}")
            elif verb == "MAIL":
                self._say("250 2.1.0 Ok")
            elif verb == "RCPT":
                self._say("250 2.1.5 Ok")
            elif verb == "DATA":
                self._say("354 End data with <CR><LF>.<CR><LF>")
                if not self._content():
                    return
            elif verb in ("RSET", "NOOP"):
                self._say("250 2.0.0 Ok")
            elif verb == "QUIT":
                self._say("221 2.0.0 Bye")
                return
            else:
                self._say("502 5.5.2 Error: command not recognized")

    def _content(self) -> bool:
        """Read the content; False when the session ends here (dropped, or never answered)."""
        behaviour = self.conn.behaviour
        data = self.buffer
        self.buffer = b""
        while True:
            end = data.find(_END)
            if behaviour == "drop-mid-data" and (len(data) >= self.upstream.drop_after or end >= 0):
                self.conn.content += data
                return False  # closed with unread bytes: a reset, and no reply
            if end >= 0:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                self.conn.content += data
                return False
            data += chunk
        self.conn.content += data[: end + len(_END)]
        self.buffer = data[end + len(_END) :]
        if behaviour == "no-final-reply":
            self._drain()
            return False
        body = data[: end + 2]
        lines = body.split(b"\r\n")
        self.conn.messages.append(b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines))
        self._say("250 2.0.0 Ok: accepted")
        return True

    def _drain(self) -> None:
        while self.sock.recv(65536):
            pass

    def _line(self) -> str | None:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("utf-8", "replace")

    def _say(self, reply: str) -> None:
        self.sock.sendall(reply.encode() + b"\r\n")
