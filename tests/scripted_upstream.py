"""A scripted SMTP upstream for fast in-process tests of the delivery side: a trio server on loopback.

    upstream = await start_upstream(nursery, Script(extensions=("PIPELINING", "SIZE 1000")))
    ... SmtpSession.open("mx.test", upstream.host, upstream.port, options) ...
    assert upstream.connections[0].commands[:2] == ["EHLO client.test", "MAIL FROM:<a@example.org>"]

Everything it answers comes from a `Script`: the banner (or none at all), the EHLO keywords (or a 502 so
the client falls back to HELO), STARTTLS that works (with a trustme certificate), is refused, or is
"broken" (220, then bytes that are not a TLS handshake, then close), AUTH PLAIN/LOGIN checked against
fixed credentials, replies per verb and per recipient, a connection dropped after the final dot, an idle
close (optionally with a 421 first), a silent close after N messages. Any reply starting with 421 closes
the connection after it is sent.

Each TCP connection is recorded (`Connection`): every read as it arrived (plaintext, or decrypted after
STARTTLS), each command line, each message's content exactly as it was on the wire (still dot-stuffed,
without the final ".\\r\\n"), AUTH credentials, whether TLS became active. `open_now` / `max_open` count
concurrent connections.
"""

from __future__ import annotations

import base64
import errno
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import trio
import trustme

from hedwigpy.net.smtp_client import Outgoing

__all__ = [
    "BODY",
    "NOT_TLS",
    "PASSWORD",
    "SENDER",
    "USER",
    "Connection",
    "Script",
    "Upstream",
    "outgoing",
    "start_upstream",
    "start_upstreams",
    "wait_for",
]

NOT_TLS = b"this is not a TLS handshake\r\n"
USER, PASSWORD = "relay-user", "s3cret pass"
BODY = b"Subject: test\r\n\r\nHello.\r\n"
SENDER = "alice@example.org"
StartTls = Literal["ok", "broken", "refused"]


@dataclass
class Script:
    """How the upstream answers. Reply strings are one line without CRLF ("250 2.1.0 Ok")."""

    greeting: str | None = "220 mx.test ESMTP scripted"  # None: accept, then never say anything
    extensions: Sequence[str] = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES")
    refuse_ehlo: bool = False  # 502 to EHLO, so the client says HELO
    starttls: StartTls = "ok"  # what happens on STARTTLS (offered only if "STARTTLS" is in extensions)
    auth_reply: str | None = None  # None: 235 for USER/PASSWORD, else 535
    replies: Mapping[str, str] = field(default_factory=dict)  # verb ("MAIL", "RSET", "DATA"...) -> reply
    rcpt_replies: Mapping[str, str] = field(default_factory=dict)  # address -> reply (default 250)
    final_reply: str = "250 2.0.0 Ok: queued"
    drop_after_dot: bool = False  # close without answering the end of the content
    close_after_messages: int | None = None  # close silently once this many messages were answered
    idle_close: float | None = None  # close when no command arrives for this long
    idle_close_reply: str | None = None  # said before an idle close (e.g. "421 4.4.2 timeout")
    quit_delay: float = 0.0  # seconds before the reply to QUIT
    hold: trio.Event | None = None  # awaited before the reply to the end of the content


@dataclass
class Connection:
    """One TCP connection as the upstream saw it."""

    reads: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    auth: list[tuple[str, str, str]] = field(default_factory=list)  # (mechanism, username, password)
    tls: bool = False
    closed: bool = False
    gone: trio.Event = field(default_factory=trio.Event)  # set once the connection is closed

    @property
    def raw(self) -> bytes:
        return b"".join(self.reads)

    @property
    def verbs(self) -> list[str]:
        return [c.split(" ", 1)[0].split(":", 1)[0].upper() for c in self.commands]


class Upstream:
    """One listening scripted server; the `Script` may be changed between connections."""

    def __init__(self, host: str, script: Script, tls: ssl.SSLContext | None) -> None:
        self.host = host
        self.port = 0
        self.script = script
        self.connections: list[Connection] = []
        self.open_now = 0
        self.max_open = 0
        self._tls = tls

    @property
    def messages(self) -> list[bytes]:
        return [m for c in self.connections for m in c.messages]

    async def handle(self, stream: trio.SocketStream) -> None:
        conn = Connection()
        self.connections.append(conn)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        counted = True

        def uncount() -> None:  # at QUIT or close, whichever comes first
            nonlocal counted
            if counted:
                counted = False
                self.open_now -= 1

        session = _Session(self.script, conn, stream, self._tls, uncount)
        try:
            await session.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            uncount()
            conn.closed = True
            await trio.aclose_forcefully(session.stream)
            conn.gone.set()


class _Session:
    def __init__(
        self,
        script: Script,
        conn: Connection,
        stream: trio.SocketStream,
        tls: ssl.SSLContext | None,
        on_quit: Callable[[], None],
    ) -> None:
        self.on_quit = on_quit
        self.script = script
        self.conn = conn
        self.stream: trio.abc.Stream = stream
        self.tls = tls
        self.buf = bytearray()
        self.mail_ok = False
        self.accepted = 0
        self.answered = 0

    async def send(self, line: str) -> None:
        await self.stream.send_all(line.encode() + b"\r\n")

    async def receive(self) -> bool:
        """Read more into the buffer; False on EOF or idle close."""
        timeout = self.script.idle_close if self.script.idle_close is not None else float("inf")
        with trio.move_on_after(timeout):
            data = await self.stream.receive_some(65536)
            if not data:
                return False
            self.conn.reads.append(bytes(data))
            self.buf += data
            return True
        if self.script.idle_close_reply is not None:
            await self.send(self.script.idle_close_reply)
        return False

    async def line(self) -> str | None:
        while (end := self.buf.find(b"\r\n")) < 0:
            if not await self.receive():
                return None
        text = self.buf[:end].decode("utf-8", "replace")
        del self.buf[: end + 2]
        return text

    async def reply(self, line: str) -> bool:
        """Send `line`; False when it ends the session (a 421)."""
        await self.send(line)
        return not line.startswith("421")

    async def run(self) -> None:
        script = self.script
        if script.greeting is None:
            await trio.sleep_forever()
        if not await self.reply(script.greeting) or not script.greeting.startswith("220"):
            return
        while True:
            line = await self.line()
            if line is None:
                return
            self.conn.commands.append(line)
            verb = line.split(" ", 1)[0].split(":", 1)[0].upper()
            override = script.replies.get(verb)
            if override is not None and verb not in ("DATA",):
                if not await self.reply(override):
                    return
                continue
            if not await self.command(verb, line):
                return

    async def command(self, verb: str, line: str) -> bool:
        script = self.script
        if verb == "EHLO":
            if script.refuse_ehlo:
                return await self.reply("502 5.5.2 Error: command not recognized")
            keywords = [k for k in script.extensions if not (self.conn.tls and k == "STARTTLS")]
            await self.stream.send_all(_multiline(250, ["mx.test", *keywords]))
            return True
        if verb == "HELO":
            return await self.reply("250 mx.test")
        if verb == "STARTTLS":
            return await self.starttls()
        if verb == "AUTH":
            return await self.auth(line.split(" ")[1:])
        if verb == "MAIL":
            self.mail_ok, self.accepted = True, 0
            return await self.reply("250 2.1.0 Ok")
        if verb == "RCPT":
            address = line.partition(":")[2].strip().strip("<>")
            answer = script.rcpt_replies.get(address, "250 2.1.5 Ok")
            if answer.startswith("2"):
                self.accepted += 1
            return await self.reply(answer)
        if verb == "DATA":
            return await self.data()
        if verb == "RSET":
            self.mail_ok, self.accepted = False, 0
            return await self.reply("250 2.0.0 Ok")
        if verb == "NOOP":
            return await self.reply("250 2.0.0 Ok")
        if verb == "QUIT":
            await trio.sleep(script.quit_delay)
            self.on_quit()  # the client may open its next connection as soon as it reads the reply
            await self.reply("221 2.0.0 Bye")
            return False
        return await self.reply("502 5.5.2 Error: command not recognized")

    async def starttls(self) -> bool:
        mode = self.script.starttls
        if mode == "refused":
            return await self.reply("454 4.7.0 TLS not available due to local problem")
        if mode == "broken":
            await self.stream.send_all(b"220 2.0.0 Ready to start TLS\r\n" + NOT_TLS)
            return False
        await self.reply("220 2.0.0 Ready to start TLS")
        assert self.tls is not None, "start the upstream with tls=True to offer STARTTLS"
        tls_stream = trio.SSLStream(self.stream, self.tls, server_side=True)
        await tls_stream.do_handshake()
        self.stream = tls_stream
        self.buf.clear()
        self.conn.tls = True
        return True

    async def auth(self, words: list[str]) -> bool:
        mechanism = words[0].upper() if words else ""
        if mechanism == "PLAIN" and len(words) > 1:
            _, user, password = base64.b64decode(words[1]).decode().split("\0")
        elif mechanism == "LOGIN":
            await self.reply("334 VXNlcm5hbWU6")
            user_line = await self.line()
            await self.reply("334 UGFzc3dvcmQ6")
            password_line = await self.line()
            if user_line is None or password_line is None:
                return False
            user = base64.b64decode(user_line).decode()
            password = base64.b64decode(password_line).decode()
        else:
            return await self.reply("504 5.5.4 Unrecognized authentication type")
        self.conn.auth.append((mechanism, user, password))
        if self.script.auth_reply is not None:
            return await self.reply(self.script.auth_reply)
        ok = (user, password) == (USER, PASSWORD)
        return await self.reply("235 2.7.0 Authentication successful" if ok else "535 5.7.8 Bad credentials")

    async def data(self) -> bool:
        script = self.script
        answer = script.replies.get("DATA")
        if answer is None:
            answer = (
                "354 End data with <CR><LF>.<CR><LF>" if self.accepted else "554 5.5.1 No valid recipients"
            )
        if not await self.reply(answer):
            return False
        if not answer.startswith("354"):
            return True
        while True:
            if self.buf.startswith(b".\r\n"):
                content, end = b"", 3
                break
            found = self.buf.find(b"\r\n.\r\n")
            if found >= 0:
                content, end = bytes(self.buf[: found + 2]), found + 5
                break
            if not await self.receive():
                return False
        del self.buf[:end]
        self.conn.messages.append(content)
        if script.drop_after_dot:
            return False
        self.answered += 1
        self.mail_ok, self.accepted = False, 0
        if script.hold is not None:
            await script.hold.wait()
        if not await self.reply(script.final_reply):
            return False
        return script.close_after_messages is None or self.answered < script.close_after_messages


def outgoing(
    recipients: Sequence[str] = ("bob@example.net",),
    chunks: Sequence[bytes] = (BODY,),
    *,
    smtputf8: bool = False,
    size: int | None = None,
    sender: str = SENDER,
) -> Outgoing:
    async def content() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return Outgoing(
        sender=sender,
        recipients=tuple(recipients),
        size=sum(map(len, chunks)) if size is None else size,
        body_type="8BITMIME",
        smtputf8=smtputf8,
        content=content,
    )


async def wait_for(predicate: Callable[[], bool]) -> None:
    """Poll until `predicate()` holds, failing after 5 s (for state other tasks change)."""
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.005)


def _multiline(code: int, lines: list[str]) -> bytes:
    wire = [f"{code}-{line}\r\n" for line in lines[:-1]] + [f"{code} {lines[-1]}\r\n"]
    return "".join(wire).encode()


def server_tls_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mx.test", "secure.relay.test", "127.0.0.1").configure_cert(ctx)
    return ctx


async def start_upstream(
    nursery: trio.Nursery,
    script: Script | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ca: trustme.CA | None = None,
) -> Upstream:
    """Listen on `host`:`port` (0: any free port) until `nursery` is cancelled."""
    upstream = Upstream(host, script or Script(), server_tls_context(ca) if ca is not None else None)
    listeners = await trio.open_tcp_listeners(port, host=host)
    upstream.port = listeners[0].socket.getsockname()[1]
    nursery.start_soon(trio.serve_listeners, upstream.handle, listeners)
    return upstream


async def start_upstreams(
    nursery: trio.Nursery,
    hosts: Sequence[str],
    scripts: Sequence[Script] | None = None,
    *,
    ca: trustme.CA | None = None,
) -> list[Upstream]:
    """One upstream on each of `hosts` (127.0.0.N), all on the same free port (retried on conflicts)."""
    for _ in range(20):
        probe = trio.socket.socket()
        await probe.bind((hosts[0], 0))
        port = probe.getsockname()[1]
        probe.close()
        started: list[trio.SocketListener] = []
        try:
            for host in hosts:
                started += await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            for listener in started:
                await listener.aclose()
            continue
        upstreams = []
        for i, (host, listener) in enumerate(zip(hosts, started, strict=True)):
            tls = server_tls_context(ca) if ca is not None else None
            upstream = Upstream(host, scripts[i] if scripts else Script(), tls)
            upstream.port = port
            nursery.start_soon(trio.serve_listeners, upstream.handle, [listener])
            upstreams.append(upstream)
        return upstreams
    raise RuntimeError("no port free on every address")
