"""`ClientConnection` driven against the real `ServerConnection` in memory, and the sending-side framing."""

from __future__ import annotations

import base64
import itertools
import re
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hedwigpy.smtp import (
    BodyEncoder,
    ClientConnection,
    ClientState,
    DotReader,
    LineEndingNormalizer,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    Response,
    ServerConnection,
    ServerExtensions,
    State,
    normalize_line_endings,
)
from hedwigpy.smtp import events as ev

ALL_EXTENSIONS = (
    "PIPELINING",
    "SIZE 10485760",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
    "STARTTLS",
    "AUTH PLAIN LOGIN",
    "CHUNKING",
)
USER, PASSWORD = "ann", "s3cret pässword"
BANNER = Reply(220, "", "mx.test ESMTP")
LOGIN_USERNAME, LOGIN_PASSWORD = "VXNlcm5hbWU6", "UGFzc3dvcmQ6"  # "Username:", "Password:"


class Harness:
    """A client and a server joined in memory. The server's events are answered by a simple policy:
    250 to MAIL and RCPT (550 for recipients named `nobody*`), 354 to DATA, 250 at the end of a message,
    a PLAIN/LOGIN check against `USER`/`PASSWORD`; `overrides` replaces the answer for an event type."""

    def __init__(
        self,
        extensions: Iterable[str] = ALL_EXTENSIONS,
        *,
        overrides: dict[type[ev.Event], Reply] | None = None,
        greeting: Reply = BANNER,
    ) -> None:
        self.client = ClientConnection()
        self.server = ServerConnection()
        self.extensions = list(extensions)
        self.overrides = overrides or {}
        self.events: list[ev.Event] = []
        self.messages: list[bytes] = []
        self._content = bytearray()
        self._sasl: str | None = None  # the mechanism of the exchange in progress
        self._login_user: str | None = None
        self.client.receive_data(self.server.greet(greeting))

    def read(self) -> list[Response]:
        responses = []
        while (response := self.client.next_event()) is not None:
            responses.append(response)
        return responses

    def send(self, data: bytes) -> list[Response]:
        """Client bytes into the server; every server event answered; the replies back into the client."""
        self.server.receive_data(data)
        out = bytearray()
        while (event := self.server.next_event()) is not ev.NEED_DATA:
            assert isinstance(event, ev.Event)
            self.events.append(event)
            if isinstance(event, ev.MessageData):
                self._content += event.data
            if event.needs_reply:
                reply = self.overrides.get(type(event)) or self.answer(event)
                if isinstance(event, ev.MessageEnd) or (isinstance(event, ev.ChunkEnd) and event.last):
                    if reply.code == 250:
                        self.messages.append(bytes(self._content))
                    self._content.clear()
                elif isinstance(event, ev.Reset) or (isinstance(event, ev.ChunkEnd) and reply.code != 250):
                    self._content.clear()
                out += self.server.send(reply)
        self.client.receive_data(bytes(out))
        return self.read()

    def answer(self, event: ev.Event) -> Reply:
        if isinstance(event, ev.Hello):
            if not event.extended:
                return Reply(250, "", "mx.test")
            lines = [x for x in self.extensions if not (x == "STARTTLS" and self.server.tls_active)]
            return Reply(250, "", "\n".join([f"mx.test greets {event.name}", *lines]))
        if isinstance(event, ev.MailFrom):
            return Reply(250, "2.1.0", "Sender ok")
        if isinstance(event, ev.RcptTo):
            if event.recipient.local_part.startswith("nobody"):
                return Reply(550, "5.1.1", "No such user")
            return Reply(250, "2.1.5", "Recipient ok")
        if isinstance(event, ev.DataCommand):
            return Reply(354, "", "End data with <CR><LF>.<CR><LF>")
        if isinstance(event, ev.MessageEnd | ev.ChunkEnd):
            return Reply(250, "2.0.0", "Ok")
        if isinstance(event, ev.StartTls):
            return Reply(220, "2.0.0", "Ready to start TLS")
        if isinstance(event, ev.AuthStart | ev.AuthResponse):
            return self._sasl_step(event)
        if isinstance(event, ev.Quit):
            return Reply(221, "2.0.0", "Bye")
        if isinstance(event, ev.CommandError):
            return event.reply
        return Reply(250, "2.0.0", "Ok")

    def _sasl_step(self, event: ev.AuthStart | ev.AuthResponse) -> Reply:
        if isinstance(event, ev.AuthStart):
            self._sasl, self._login_user = event.mechanism, None
            data = event.initial
            if data is None:
                return Reply(334, "", LOGIN_USERNAME if event.mechanism == "LOGIN" else "")
        elif event.cancelled:
            return Reply(501, "5.7.0", "Authentication cancelled")
        else:
            data = event.data
        text = base64.b64decode(data).decode()
        if self._sasl == "PLAIN":
            _, user, password = text.split("\0")
        elif self._login_user is None:
            self._login_user = text
            return Reply(334, "", LOGIN_PASSWORD)
        else:
            user, password = self._login_user, text
        if (user, password) == (USER, PASSWORD):
            return Reply(235, "2.7.0", "Authentication successful")
        return Reply(535, "5.7.8", "Authentication credentials invalid")


def state_of(conn: ClientConnection) -> ClientState:
    """The state, read through a call so that mypy does not narrow it across a state change."""
    return conn.state


def summary(responses: list[Response]) -> list[tuple[str, str, int]]:
    return [(r.command, r.argument, r.reply.code) for r in responses]


def ready(
    extensions: Iterable[str] = ALL_EXTENSIONS, *, overrides: dict[type[ev.Event], Reply] | None = None
) -> Harness:
    """Greeted and EHLO answered."""
    h = Harness(extensions, overrides=overrides)
    assert summary(h.read()) == [("GREETING", "", 220)]
    assert summary(h.send(h.client.ehlo("client.test"))) == [("EHLO", "client.test", 250)]
    assert state_of(h.client) is ClientState.READY
    return h


# -- session ---------------------------------------------------------------------------------------


def test_greeting_and_ehlo_extensions() -> None:
    h = Harness()
    assert state_of(h.client) is ClientState.GREETING and h.client.pending_replies == 1
    [greeting] = h.read()
    assert greeting == Response("GREETING", "", Reply(220, "", "mx.test ESMTP"))
    assert state_of(h.client) is ClientState.HELLO and h.client.pending_replies == 0
    h.send(h.client.ehlo("client.test"))
    assert h.client.extensions == ServerExtensions(
        pipelining=True,
        size=10485760,
        eightbitmime=True,
        smtputf8=True,
        starttls=True,
        auth=frozenset({"PLAIN", "LOGIN"}),
        chunking=True,
        enhancedstatuscodes=True,
    )
    assert summary(h.send(h.client.noop())) == [("NOOP", "", 250)]
    assert summary(h.send(h.client.quit())) == [("QUIT", "", 221)]
    assert state_of(h.client) is ClientState.CLOSED and h.server.state is State.CLOSED


def test_extension_parsing_variants() -> None:
    reply = Reply(250, "", "host hi\nsize\nAUTH=LOGIN\nauth plain cram-md5\nX-FOO bar\n8bitmime\n\nSIZE ²")
    ext = ServerExtensions.parse(reply)
    assert ext.size == 0 and ext.eightbitmime and not ext.pipelining
    assert ext.auth == frozenset({"LOGIN", "PLAIN", "CRAM-MD5"})
    assert ServerExtensions.parse(Reply(250, "", "just a greeting")) == ServerExtensions()


def test_helo_fallback_and_no_pipelining() -> None:
    h = Harness(overrides={ev.Hello: Reply(502, "5.5.1", "EHLO not implemented")})
    h.read()
    assert summary(h.send(h.client.ehlo("client.test"))) == [("EHLO", "client.test", 502)]
    assert state_of(h.client) is ClientState.HELLO and h.client.extensions is None
    with pytest.raises(LocalProtocolError):
        h.client.mail("a@b.example")
    h.overrides.clear()
    assert summary(h.send(h.client.helo("client.test"))) == [("HELO", "client.test", 250)]
    assert h.client.extensions == ServerExtensions()
    # No SIZE/BODY offered: the parameters are left out; no PIPELINING: one command at a time.
    mail = h.client.mail("a@b.example", size=100, body="8bitmime")
    assert mail == b"MAIL FROM:<a@b.example>\r\n"
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        h.client.rcpt("c@d.example")
    h.send(mail)
    h.send(h.client.rcpt("c@d.example"))
    assert summary(h.send(h.client.data())) == [("DATA", "", 354)]
    assert summary(h.send(h.client.send_body(b"hi") + h.client.end_body())) == [("DATA_END", "", 250)]
    assert h.messages == [b"hi\r\n"]


def test_pipelined_transaction_with_per_recipient_replies() -> None:
    h = ready()
    c = h.client
    out = c.mail("a@b.example", size=42, body="8BITMIME")
    assert out == b"MAIL FROM:<a@b.example> SIZE=42 BODY=8BITMIME\r\n"
    out += c.rcpt("c@d.example") + c.rcpt("nobody@d.example") + c.rcpt("<e@f.example>") + c.data()
    assert c.pending_replies == 5 and state_of(c) is ClientState.DATA
    responses = h.send(out)
    assert summary(responses) == [
        ("MAIL", "a@b.example", 250),
        ("RCPT", "c@d.example", 250),
        ("RCPT", "nobody@d.example", 550),
        ("RCPT", "e@f.example", 250),
        ("DATA", "", 354),
    ]
    assert responses[2].reply == Reply(550, "5.1.1", "No such user")
    assert state_of(c) is ClientState.BODY
    wire = c.send_body(b"Subject: x\n\n.hidden\r") + c.send_body(b"\n.\r\n") + c.send_body(b"tail")
    assert wire == b"Subject: x\r\n\r\n..hidden\r\n..\r\ntail"
    assert summary(h.send(wire + c.end_body())) == [("DATA_END", "", 250)]
    assert h.messages == [b"Subject: x\r\n\r\n.hidden\r\n.\r\ntail\r\n"]
    assert state_of(c) is ClientState.READY and c.pending_replies == 0


def test_two_transactions_on_one_connection() -> None:
    h = ready()
    c = h.client
    # Every recipient refused, DATA pipelined anyway: the server refuses DATA but keeps the transaction.
    responses = h.send(c.mail("a@b.example") + c.rcpt("nobody@d.example") + c.data())
    assert summary(responses)[1:] == [("RCPT", "nobody@d.example", 550), ("DATA", "", 554)]
    assert state_of(c) is ClientState.RCPT
    with pytest.raises(LocalProtocolError):
        c.mail("a@b.example")  # the server would answer 503 nested MAIL
    # RSET, then a whole second transaction in one write.
    out = c.rset() + c.mail("x@b.example") + c.rcpt("y@d.example") + c.data()
    assert summary(h.send(out)) == [
        ("RSET", "", 250),
        ("MAIL", "x@b.example", 250),
        ("RCPT", "y@d.example", 250),
        ("DATA", "", 354),
    ]
    # A third MAIL may be pipelined right behind the end of the second message.
    out = c.send_body(b"two\r\n") + c.end_body() + c.mail("z@b.example") + c.rcpt("w@d.example")
    assert summary(h.send(out)) == [
        ("DATA_END", "", 250),
        ("MAIL", "z@b.example", 250),
        ("RCPT", "w@d.example", 250),
    ]
    h.send(c.data())
    h.send(c.send_body(b"three") + c.end_body())
    assert h.messages == [b"two\r\n", b"three\r\n"]
    assert summary(h.send(c.quit())) == [("QUIT", "", 221)]


def test_refused_mail_ends_the_transaction() -> None:
    h = ready(overrides={ev.MailFrom: Reply(550, "5.7.1", "Sender refused")})
    assert summary(h.send(h.client.mail("a@b.example"))) == [("MAIL", "a@b.example", 550)]
    assert state_of(h.client) is ClientState.READY  # a new MAIL needs no RSET
    # Pipelined behind a refused MAIL, the DATA refusal also leaves the client READY.
    out = h.client.mail("a@b.example") + h.client.rcpt("c@d.example") + h.client.data()
    assert [code for *_, code in summary(h.send(out))] == [550, 503, 503]
    assert state_of(h.client) is ClientState.READY
    h.overrides.clear()
    h.send(h.client.mail("a@b.example"))
    assert h.server.state is State.MAIL


def test_smtputf8_transaction() -> None:
    h = ready()
    out = h.client.mail("élise@exämple.org", smtputf8=True, body="8BITMIME") + h.client.rcpt("søren@b.dk")
    assert out.startswith("MAIL FROM:<élise@exämple.org> BODY=8BITMIME SMTPUTF8\r\n".encode())
    assert [code for *_, code in summary(h.send(out))] == [250, 250]
    mail = next(e for e in h.events if isinstance(e, ev.MailFrom))
    assert mail.smtputf8 and mail.body == "8BITMIME"


def test_starttls_forgets_the_session() -> None:
    h = ready()
    c = h.client
    assert summary(h.send(c.starttls())) == [("STARTTLS", "", 220)]
    assert state_of(c) is ClientState.TLS_PENDING and h.server.state is State.TLS
    c.receive_data(b"250 injected before the handshake\r\n")
    assert c.next_event() is None
    h.server.tls_established()
    c.tls_established()
    assert state_of(c) is ClientState.HELLO and c.extensions is None and c.tls_active
    with pytest.raises(LocalProtocolError):
        c.mail("a@b.example")
    h.send(c.ehlo("client.test"))
    assert c.extensions is not None and not c.extensions.starttls
    with pytest.raises(LocalProtocolError, match="already active"):
        c.starttls()


def test_starttls_discards_replies_injected_behind_the_220() -> None:
    h = ready()
    c = h.client
    c.starttls()
    c.receive_data(b"220 go ahead\r\n250 fake reply to a command never sent\r\n")
    assert summary([r for r in [c.next_event()] if r]) == [("STARTTLS", "", 220)]
    assert c.next_event() is None
    c.tls_established()
    assert c.next_event() is None and state_of(c) is ClientState.HELLO


def test_starttls_refused_keeps_the_session() -> None:
    h = ready(overrides={ev.StartTls: Reply(454, "4.7.0", "TLS not available")})
    assert summary(h.send(h.client.starttls())) == [("STARTTLS", "", 454)]
    assert state_of(h.client) is ClientState.READY and h.client.extensions is not None
    with pytest.raises(LocalProtocolError):
        h.client.tls_established()


def test_auth_plain() -> None:
    h = ready()
    c = h.client
    wrong = c.auth_plain(USER, "nope")
    assert wrong.startswith(b"AUTH PLAIN ") and state_of(c) is ClientState.AUTH
    assert summary(h.send(wrong)) == [("AUTH", "PLAIN", 535)]
    assert state_of(c) is ClientState.READY and not c.authenticated
    assert summary(h.send(c.auth_plain(USER, PASSWORD))) == [("AUTH", "PLAIN", 235)]
    assert c.authenticated and h.server.authenticated
    with pytest.raises(LocalProtocolError, match="already authenticated"):
        c.auth_login(USER, PASSWORD)


def test_auth_login_exchange() -> None:
    h = ready()
    c = h.client
    out = c.auth_login(USER, PASSWORD)
    assert out == b"AUTH LOGIN\r\n"
    with pytest.raises(LocalProtocolError):
        c.auth_continue()  # no 334 yet
    [challenge] = h.send(out)
    assert challenge.reply.code == 334 and state_of(c) is ClientState.AUTH
    with pytest.raises(LocalProtocolError):
        c.rset()  # inside SASL it would be read as a SASL line
    [challenge] = h.send(c.auth_continue())
    assert challenge.reply == Reply(334, "", LOGIN_PASSWORD)
    assert summary(h.send(c.auth_continue())) == [("AUTH", "LOGIN", 235)]
    assert c.authenticated and state_of(c) is ClientState.READY and h.server.authenticated


def test_auth_challenge_beyond_the_mechanism_is_cancelled() -> None:
    h = ready(overrides={ev.AuthStart: Reply(334, "", "")})
    [challenge] = h.send(h.client.auth_plain(USER, PASSWORD))
    assert challenge.reply.code == 334
    h.overrides.clear()
    assert h.client.auth_continue() == b"*\r\n"
    assert summary(h.send(b"*\r\n")) == [("AUTH", "PLAIN", 501)]
    assert state_of(h.client) is ClientState.READY and not h.client.authenticated


def test_bdat_pipelined() -> None:
    h = ready()
    c = h.client
    out = c.mail("a@b.example") + c.rcpt("c@d.example")
    chunk1 = c.bdat(b"line one\r", last=False)
    assert chunk1 == b"BDAT 8\r\nline one"  # the CR waits: the next chunk may start with LF
    chunk2 = c.bdat(b"\nline .two\n", last=True)
    assert chunk2 == b"BDAT 13 LAST\r\n\r\nline .two\r\n"
    assert state_of(c) is ClientState.READY
    assert summary(h.send(out + chunk1 + chunk2)) == [
        ("MAIL", "a@b.example", 250),
        ("RCPT", "c@d.example", 250),
        ("BDAT", "8", 250),
        ("BDAT", "13 LAST", 250),
    ]
    assert h.messages == [b"line one\r\nline .two\r\n"]
    assert h.server.state is State.READY


def test_refused_bdat_chunk_ends_the_transaction() -> None:
    h = ready(overrides={ev.ChunkEnd: Reply(552, "5.3.4", "Message too big")})
    c = h.client
    h.send(c.mail("a@b.example") + c.rcpt("c@d.example"))
    assert summary(h.send(c.bdat(b"x" * 10, last=False))) == [("BDAT", "10", 552)]
    assert state_of(c) is ClientState.READY
    with pytest.raises(LocalProtocolError):
        c.bdat(b"more", last=True)
    h.overrides.clear()
    h.send(c.mail("a@b.example"))
    assert h.server.state is State.MAIL


def test_421_mid_session_closes() -> None:
    h = ready(overrides={ev.RcptTo: Reply(421, "4.3.2", "Shutting down")})
    c = h.client
    out = c.mail("a@b.example") + c.rcpt("c@d.example") + c.rcpt("e@d.example") + c.data()
    assert summary(h.send(out)) == [("MAIL", "a@b.example", 250), ("RCPT", "c@d.example", 421)]
    assert state_of(c) is ClientState.CLOSED and c.pending_replies == 0
    assert h.server.state is State.CLOSED
    c.receive_data(b"250 late\r\n")
    assert c.next_event() is None
    with pytest.raises(LocalProtocolError):
        c.quit()


def test_unsolicited_421_and_refused_greetings() -> None:
    h = ready()
    h.client.receive_data(h.server.close_with(Reply(421, "4.4.2", "timeout")))
    assert summary(h.read()) == [("UNSOLICITED", "", 421)]
    assert state_of(h.client) is ClientState.CLOSED
    for code in (421, 554):
        h = Harness(greeting=Reply(code, "", "go away"))
        assert summary(h.read()) == [("GREETING", "", code)]
        assert state_of(h.client) is ClientState.CLOSED


def test_421_while_sending_the_body() -> None:
    h = ready()
    c = h.client
    h.send(c.mail("a@b.example") + c.rcpt("c@d.example") + c.data())
    c.receive_data(b"421 4.4.2 timeout\r\n")
    assert summary(h.read()) == [("UNSOLICITED", "", 421)]
    with pytest.raises(LocalProtocolError):
        c.send_body(b"more")


def _in_body() -> ClientConnection:
    h = ready()
    h.send(h.client.mail("a@b.example") + h.client.rcpt("c@d.example") + h.client.data())
    return h.client


def _no_pipelining() -> ClientConnection:
    c = ready(["SIZE 100"]).client
    c.mail("a@b.example")
    return c


@pytest.mark.parametrize(
    ("setup", "call"),
    [
        (lambda: Harness().client, lambda c: c.ehlo("client.test")),  # before the greeting
        (lambda: ready().client, lambda c: c.rcpt("c@d.example")),  # no MAIL
        (lambda: ready().client, lambda c: c.mail("a@b.example") + c.data()),  # no RCPT
        (lambda: ready().client, lambda c: c.send_body(b"x")),  # no 354
        (lambda: ready().client, lambda c: c.end_body()),
        (lambda: ready().client, lambda c: c.mail("a@b.example") + c.mail("a@b.example")),  # nested
        (
            lambda: ready().client,
            lambda c: c.mail("a@b.example") + c.rcpt("c@d.example") + c.data() + c.rset(),
        ),
        (lambda: ready().client, lambda c: c.ehlo("client.test") + c.mail("a@b.example")),  # ends a group
        (lambda: ready().client, lambda c: c.noop() + c.noop()),
        (lambda: ready().client, lambda c: c.mail("a@b.example\r\nRCPT TO:<evil@x.example>")),
        (lambda: ready().client, lambda c: c.mail("a@b@c.example")),
        (lambda: ready().client, lambda c: c.mail("a@b.example", body="BINARYMIME")),
        (lambda: ready().client, lambda c: c.mail("a@b.example", size=-1)),
        (lambda: ready().client, lambda c: c.mail("a@b.example") + c.rcpt("")),
        (lambda: ready().client, lambda c: c.mail("élise@b.example")),  # non-ASCII without SMTPUTF8
        (lambda: ready().client, lambda c: c.mail("a@b.example") + c.rcpt("søren@b.dk")),
        (lambda: ready().client, lambda c: c.ehlo("two words")),
        (lambda: ready().client, lambda c: c.ehlo("")),
        (lambda: ready().client, lambda c: c.auth_login(USER, PASSWORD) + c.quit()),
        (lambda: ready().client, lambda c: c.bdat(b"x", last=True)),  # no transaction
        (lambda: ready().client, lambda c: c.tls_established()),
        (lambda: ready(["PIPELINING"]).client, lambda c: c.starttls()),  # not offered
        (lambda: ready(["PIPELINING"]).client, lambda c: c.auth_plain(USER, PASSWORD)),
        (lambda: ready(["PIPELINING"]).client, lambda c: c.mail("a@b.example", smtputf8=True)),
        (
            lambda: ready(["PIPELINING"]).client,
            lambda c: c.mail("a@b.example") + c.rcpt("c@d.example") + c.bdat(b"x", last=True),
        ),
        (lambda: ready(["PIPELINING", "AUTH CRAM-MD5"]).client, lambda c: c.auth_plain(USER, PASSWORD)),
        (_no_pipelining, lambda c: c.rcpt("c@d.example")),
        (_no_pipelining, lambda c: c.rset()),
        (_in_body, lambda c: c.quit()),
        (_in_body, lambda c: c.rset()),
    ],
)
def test_illegal_calls_raise_local_protocol_error(
    setup: Callable[[], ClientConnection], call: Callable[[ClientConnection], bytes]
) -> None:
    conn = setup()
    with pytest.raises(LocalProtocolError):
        call(conn)


@pytest.mark.parametrize(
    "wire",
    [
        b"hello\r\n",
        b"25\r\n",
        b"2500 ok\r\n",
        b"650 what\r\n",
        b"250-first\r\n251 second\r\n",
        b"250 ok\r\n250 a reply nobody asked for\r\n",
        b"250 " + b"x" * 5000,
    ],
)
def test_malformed_replies_raise_remote_protocol_error(wire: bytes) -> None:
    h = ready()
    h.client.noop()
    with pytest.raises(RemoteProtocolError):
        h.client.receive_data(wire)
        h.read()
    assert state_of(h.client) is ClientState.CLOSED


def test_connection_closed_by_the_server() -> None:
    h = ready()
    h.client.mail("a@b.example")
    h.client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed"):
        h.client.next_event()
    assert state_of(h.client) is ClientState.CLOSED
    idle = ready().client
    idle.receive_data(b"")
    assert idle.next_event() is None and state_of(idle) is ClientState.CLOSED


# -- framing ---------------------------------------------------------------------------------------


def test_body_encoder_boundaries() -> None:
    enc = BodyEncoder()
    assert enc.encode(b".a\r") == b"..a"
    assert enc.encode(b"") == b""
    assert enc.encode(b"\n") == b"\r\n"
    assert enc.encode(b".") == b".."
    assert enc.encode(b"\r") == b""
    assert enc.finish() == b"\r\n.\r\n"
    assert BodyEncoder().finish() == b".\r\n"
    enc = BodyEncoder()
    assert (
        enc.encode(b"x\n") + enc.encode(b"\r") + enc.encode(b"\r.") + enc.finish()
        == b"x\r\n\r\n\r\n..\r\n.\r\n"
    )


BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# Random bytes rarely hit the interesting cases, so half the examples are built from line-ending pieces.
content_strategy = st.one_of(
    st.binary(max_size=1500),
    st.lists(st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\r\n.", b".\r\n", b"\r\n.\r\n"])).map(
        b"".join
    ),
)
cuts_strategy = st.lists(st.integers(min_value=0, max_value=1600), max_size=8)


def split(content: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted({min(c, len(content)) for c in cuts}), len(content)]
    return [content[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=400)
@given(content_strategy, cuts_strategy)
def test_body_encoder_round_trips_through_dot_reader(content: bytes, cuts: list[int]) -> None:
    enc = BodyEncoder()
    wire = b"".join(enc.encode(chunk) for chunk in split(content, cuts)) + enc.finish()
    assert not BARE.search(wire)
    assert (b"\r\n" + wire).find(b"\r\n.\r\n") == len(wire) - 3  # only the terminator ends the data
    expected = normalize_line_endings(content)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    reader = DotReader()
    reader.feed(wire + b"QUIT\r\n")
    assert reader.read() == expected
    assert reader.finished and reader.leftover() == b"QUIT\r\n"


@settings(max_examples=200)
@given(content_strategy, cuts_strategy)
def test_line_ending_normalizer_matches_the_whole_buffer_version(content: bytes, cuts: list[int]) -> None:
    norm = LineEndingNormalizer()
    out = b"".join(norm.encode(chunk) for chunk in split(content, cuts)) + norm.flush()
    assert out == normalize_line_endings(content)
    assert not BARE.search(out)


@settings(max_examples=60, deadline=None)
@given(
    content_strategy,
    cuts_strategy,
    st.lists(st.booleans(), min_size=1, max_size=6),
    st.booleans(),
)
def test_pipelined_delivery_reaches_the_server_intact(
    content: bytes, cuts: list[int], accepted: list[bool], chunking: bool
) -> None:
    h = ready()
    c = h.client
    recipients = [f"{'user' if ok else 'nobody'}{i}@d.example" for i, ok in enumerate(accepted)]
    out = c.mail("a@b.example") + b"".join(c.rcpt(r) for r in recipients)
    chunks = split(content, cuts)
    if chunking:
        out += b"".join(c.bdat(chunk, last=False) for chunk in chunks) + c.bdat(b"", last=True)
        replies = h.send(out)
        assert [r.reply.code for r in replies if r.command == "RCPT"] == [
            250 if ok else 550 for ok in accepted
        ]
        if any(accepted):
            assert h.messages == [normalize_line_endings(content)]
        else:
            assert h.messages == [] and {r.reply.code for r in replies if r.command == "BDAT"} == {503}
        assert state_of(c) is ClientState.READY and c.pending_replies == 0
        return
    replies = h.send(out + c.data())
    assert [r.reply.code for r in replies if r.command == "RCPT"] == [250 if ok else 550 for ok in accepted]
    if not any(accepted):
        assert replies[-1].reply.code == 554 and state_of(c) is ClientState.RCPT
        return
    assert state_of(c) is ClientState.BODY
    wire = b"".join(c.send_body(chunk) for chunk in chunks) + c.end_body()
    assert summary(h.send(wire)) == [("DATA_END", "", 250)]
    expected = normalize_line_endings(content)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert h.messages == [expected]
