"""The sans-IO core: no trio in hedwigpy.smtp, framing edge cases, the session state machine."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hedwigpy.smtp import DotReader, LineBuffer, Reply, ReplyParser, ServerConnection, State, dot_stuff
from hedwigpy.smtp import events as ev
from hedwigpy.smtp.framing import LineLengthTracker, normalize_line_endings

SMTP_DIR = Path(__file__).resolve().parents[2] / "hedwigpy" / "smtp"


def test_smtp_package_imports_no_io_libraries() -> None:
    forbidden = {"trio", "socket", "ssl", "asyncio", "hedwigpy.storage", "hedwigpy.net"}
    for path in SMTP_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden and name not in forbidden, (
                    f"{path.name} imports {name}"
                )


def run(conn: ServerConnection, data: bytes, answers: dict[type, Reply] | None = None) -> list[object]:
    """Feed `data`, answer every event (250 by default, 354 for DATA), return events and reply bytes."""
    answers = answers or {}
    conn.receive_data(data)
    seen: list[object] = []
    while True:
        event = conn.next_event()
        if event is ev.NEED_DATA or event is ev.PAUSED:
            return seen
        assert isinstance(event, ev.Event)
        seen.append(event)
        if isinstance(event, ev.ConnectionClosed):
            return seen
        if event.needs_reply:
            default = Reply(354, "", "go") if isinstance(event, ev.DataCommand) else Reply(250, "2.0.0", "ok")
            if isinstance(event, ev.CommandError):
                default = event.reply
            seen.append(conn.send(answers.get(type(event), default)))


def greeted() -> ServerConnection:
    conn = ServerConnection()
    conn.greet(Reply(220, "", "test ESMTP"))
    return conn


def body_of(seen: list[object]) -> bytes:
    return b"".join(e.data for e in seen if isinstance(e, ev.MessageData))


def test_reply_wire_form_and_parse_back() -> None:
    reply = Reply(250, "", "host greets x\nPIPELINING\nSIZE 10")
    assert reply.to_bytes() == b"250-host greets x\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    assert Reply(550, "5.7.1", "no").to_bytes() == b"550 5.7.1 no\r\n"
    parser = ReplyParser()
    wire = Reply(451, "4.3.0", "a\nb").to_bytes()
    for byte in wire[:-1]:
        parser.feed(bytes([byte]))
        assert parser.next_reply() is None
    parser.feed(wire[-1:])
    assert parser.next_reply() == Reply(451, "4.3.0", "a\nb")


def test_full_transaction_with_pipelining() -> None:
    conn = greeted()
    seen = run(conn, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    assert [type(e) for e in seen if isinstance(e, ev.Event)] == [
        ev.Hello,
        ev.MailFrom,
        ev.RcptTo,
        ev.DataCommand,
    ]
    seen = run(conn, b"Subject: hi\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
    assert body_of(seen) == b"Subject: hi\r\n\r\n.leading dot\r\n"
    assert isinstance(seen[-2], ev.Quit)
    assert conn.state is State.CLOSED


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"],
)
def test_only_crlf_dot_crlf_ends_data(smuggle: bytes) -> None:
    conn = greeted()
    run(conn, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    payload = b"x" + smuggle + b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<v@y.example>\r\nDATA\r\nevil\r\n.\r\n"
    seen = run(conn, payload)
    ends = [e for e in seen if isinstance(e, ev.MessageEnd)]
    assert len(ends) == 1
    assert not any(isinstance(e, ev.MailFrom) for e in seen)  # the smuggled commands stayed content
    assert b"evil@x.example" in body_of(seen)


def test_dot_reader_split_anywhere() -> None:
    wire = b"a\r\n..b\r\n.c\r\n\r\n.\r\nNEXT"
    for cut in range(len(wire)):
        reader = DotReader()
        out = b""
        for part in (wire[:cut], wire[cut:]):
            reader.feed(part)
            out += reader.read()
        assert reader.finished
        assert out == b"a\r\n.b\r\nc\r\n\r\n"
        assert reader.leftover() == b"NEXT"


def test_empty_message() -> None:
    reader = DotReader()
    reader.feed(b".\r\n")
    assert reader.read() == b"" and reader.finished


def test_line_buffer_too_long_is_bounded() -> None:
    buf = LineBuffer()
    buf.feed(b"x" * 600)
    assert buf.next_line(512) is LineBuffer.TOO_LONG
    assert len(buf.buf) == 0
    buf.feed(b"y" * 10_000)
    assert buf.next_line(512) is None and len(buf.buf) == 0  # still discarding, nothing kept
    buf.feed(b"zz\r\nNOOP\r\n")
    assert buf.next_line(512) == b"NOOP"


def test_line_length_tracker() -> None:
    ok = LineLengthTracker()
    ok.update(b"a" * 998 + b"\r\n" + b"b" * 500)
    ok.update(b"b" * 498 + b"\r\n")
    assert not ok.exceeded
    bad = LineLengthTracker()
    bad.update(b"a" * 500)
    bad.update(b"a" * 499 + b"\r\n")
    assert bad.exceeded


def test_normalize_and_stuff() -> None:
    assert normalize_line_endings(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"
    assert dot_stuff(b".a\r\n.\r\nb") == b"..a\r\n..\r\nb"


@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"."]), max_size=40).map(b"".join))
def test_normalize_line_endings_leaves_no_bare_cr_or_lf(data: bytes) -> None:
    """The fast path (already CRLF: returned as is) and the rewriting path agree with the definition."""
    out = normalize_line_endings(data)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", out) is None
    assert out == re.sub(rb"(?<!\r)\n", b"\r\n", re.sub(rb"\r(?!\n)", b"\r\n", data))


def test_sequence_errors() -> None:
    conn = greeted()
    seen = run(conn, b"MAIL FROM:<a@b.example>\r\n")
    assert seen[-1] == b"503 5.5.1 Send EHLO or HELO first\r\n"
    seen = run(conn, b"EHLO c\r\nRCPT TO:<a@b.example>\r\nDATA\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n")
    replies = [s for s in seen if isinstance(s, bytes)]
    assert replies[1].startswith(b"503 5.5.1")
    assert replies[2].startswith(b"503 5.5.1")
    assert replies[4] == b"554 5.5.1 No valid recipients\r\n"


def test_rejected_mail_keeps_no_transaction() -> None:
    conn = greeted()
    run(conn, b"EHLO c\r\n")
    seen = run(
        conn,
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n",
        {ev.MailFrom: Reply(550, "5.7.1", "no")},
    )
    assert isinstance(seen[-1], bytes) and seen[-1].startswith(b"503")


def test_starttls_discards_pipelined_plaintext() -> None:
    conn = greeted()
    run(conn, b"EHLO c\r\n")
    seen = run(conn, b"STARTTLS\r\nMAIL FROM:<evil@x.example>\r\n", {ev.StartTls: Reply(220, "2.0.0", "go")})
    assert conn.state is State.TLS
    assert not any(isinstance(e, ev.MailFrom) for e in seen)
    conn.tls_established()
    seen = run(conn, b"MAIL FROM:<a@b.example>\r\n")
    assert isinstance(seen[-1], bytes) and seen[-1].startswith(b"503 5.5.1 Send EHLO")


def test_plaintext_fed_during_the_handshake_is_dropped() -> None:
    """Bytes that reach the protocol between STARTTLS's 220 and the end of the handshake are not TLS
    application data; none of them may become a command of the encrypted session."""
    conn = greeted()
    run(conn, b"EHLO c\r\n")
    run(conn, b"STARTTLS\r\n", {ev.StartTls: Reply(220, "2.0.0", "go")})
    conn.receive_data(b"RSET\r\nMAIL FROM:<evil@x.example>\r\n")
    conn.tls_established()
    assert conn.next_event() is ev.NEED_DATA
    seen = run(conn, b"EHLO c\r\n")
    assert not any(isinstance(e, ev.MailFrom) for e in seen)


def test_bdat_chunks() -> None:
    conn = greeted()
    run(conn, b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
    seen = run(conn, b"BDAT 5\r\nhel\r\nBDAT 3 LAST\r\nlo\n")
    assert body_of(seen) == b"hel\r\nlo\n"
    ends = [e for e in seen if isinstance(e, ev.ChunkEnd)]
    assert [e.last for e in ends] == [False, True]
    assert conn.state is State.READY


def test_bdat_without_transaction_swallows_chunk() -> None:
    conn = greeted()
    run(conn, b"EHLO c\r\n")
    seen = run(conn, b"BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n")
    assert not any(isinstance(e, (ev.MessageData, ev.Quit)) for e in seen)
    assert seen[1] == b"503 5.5.1 BDAT without valid MAIL and RCPT; chunk discarded\r\n"
    assert isinstance(seen[2], ev.Noop)


def test_early_talker() -> None:
    conn = ServerConnection()
    conn.receive_data(b"EHLO eager\r\n")
    assert conn.talked_early
    conn.greet(Reply(554, "5.5.0", "synchronization error"))
    assert conn.state is State.CLOSED
    assert conn.next_event() is ev.NEED_DATA  # nothing sent early is ever interpreted


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<a\x00b@c.example>", b"500 5.5.2 NUL character not allowed\r\n"),
        (b"MAIL FROM:<\xff@c.example>", b"500 5.5.2 Invalid UTF-8 in command\r\n"),
        (b"MAIL FROM:<\xc3\xa9@c.example>", b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n"),
        (b"MAIL FROM:<a@b@c.example>", b"501 5.1.7 Syntax error in mailbox address\r\n"),
        (b"MAIL FROM:<a@c.example> FOO=1", b"555 5.5.4 Unsupported parameter: FOO\r\n"),
        (b"MAIL FROM:<" + b"a" * 250 + b"@c.example>", b"501 5.1.7 Path too long\r\n"),
        (b"VRFY", b"501 5.5.4 Syntax: VRFY address\r\n"),
        (b"EXPN list", b"502 5.5.1 EXPN not implemented\r\n"),
        (b"WHAT", b"500 5.5.2 Command unrecognized\r\n"),
        (b"X" * 600, b"500 5.5.2 Line too long\r\n"),
    ],
)
def test_command_errors(line: bytes, reply: bytes) -> None:
    conn = greeted()
    run(conn, b"EHLO c\r\n")
    seen = run(conn, line + b"\r\n")
    assert seen[-1] == reply


def test_smtputf8_address_accepted_with_param() -> None:
    conn = greeted()
    run(conn, b"EHLO c\r\n")
    seen = run(conn, "MAIL FROM:<élise@exämple.org> SMTPUTF8\r\n".encode())
    mail = seen[0]
    assert isinstance(mail, ev.MailFrom) and mail.smtputf8 and mail.sender.domain == "exämple.org"


def test_source_route_is_dropped() -> None:
    conn = greeted()
    run(conn, b"EHLO c\r\nMAIL FROM:<>\r\n")
    seen = run(conn, b"RCPT TO:<@local.example,@relay.example:user@ext.example>\r\n")
    rcpt = seen[0]
    assert isinstance(rcpt, ev.RcptTo) and str(rcpt.recipient) == "user@ext.example"
