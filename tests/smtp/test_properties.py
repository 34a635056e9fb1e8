"""Property tests (hypothesis) for the address parser, DATA framing and the session state machine."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hedwigpy.smtp import AddressError, DotReader, Reply, ServerConnection, State, dot_stuff, parse_path
from hedwigpy.smtp import events as ev
from hedwigpy.smtp.framing import normalize_line_endings

atom = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~",
    min_size=1,
    max_size=10,
)
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(st.lists(atom, min_size=1, max_size=4), st.lists(label, min_size=1, max_size=4))
def test_valid_mailboxes_parse_back(local_atoms: list[str], labels: list[str]) -> None:
    local, domain = ".".join(local_atoms), ".".join(labels)
    mailbox = parse_path(f"<{local}@{domain}>", allow_null=False)
    assert mailbox.local_part == local and mailbox.domain == domain.lower()


@given(st.text(max_size=300))
def test_parser_never_crashes(text: str) -> None:
    try:
        mailbox = parse_path(text, allow_null=True, allow_postmaster=True)
    except AddressError:
        return
    assert "@" in str(mailbox) or str(mailbox) in ("", "postmaster")


@given(st.binary(max_size=2000), st.lists(st.integers(min_value=0, max_value=2100), max_size=6))
def test_dot_stuffing_round_trips_under_any_split(content: bytes, cuts: list[int]) -> None:
    body = normalize_line_endings(content)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    wire = dot_stuff(body) + b".\r\nQUIT\r\n"
    reader = DotReader()
    out = b""
    last = 0
    for cut in sorted({min(c, len(wire)) for c in cuts} | {len(wire)}):
        reader.feed(wire[last:cut])
        last = cut
        out += reader.read()
    assert reader.finished
    assert out == body
    assert reader.leftover() == b"QUIT\r\n"


def closed(conn: ServerConnection) -> bool:
    return conn.state is State.CLOSED


COMMANDS = [
    b"EHLO client.example",
    b"HELO client.example",
    b"MAIL FROM:<a@b.example>",
    b"MAIL FROM:<>",
    b"RCPT TO:<c@d.example>",
    b"DATA",
    b"RSET",
    b"NOOP",
    b"VRFY x",
    b"HELP",
    b"BDAT 3",
    b"BDAT 0 LAST",
    b"STARTTLS",
    b"AUTH PLAIN",
    b"garbage \xff\x00",
    b"x" * 700,
    b"MAIL FROM:<a@b@c>",
]


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from(COMMANDS), max_size=25),
    st.lists(st.sampled_from([250, 354, 451, 550, 220, 334, 235]), min_size=1, max_size=8),
    st.integers(min_value=1, max_value=64),
)
def test_state_machine_never_crashes_and_answers_in_order(
    commands: list[bytes], codes: list[int], chunk: int
) -> None:
    conn = ServerConnection()
    conn.greet(Reply(220, "", "hi"))
    wire = b"".join(c + b"\r\n" for c in commands) + b"QUIT\r\n"
    # A model of what is legal, updated from the replies we give: the machine must never produce an
    # event the model says is out of sequence.
    helo = in_txn = has_rcpt = False
    i = 0
    pos = 0
    while pos < len(wire) and not closed(conn):
        conn.receive_data(wire[pos : pos + chunk])
        pos += chunk
        while not closed(conn):
            event = conn.next_event()
            if event is ev.NEED_DATA:
                break
            assert event is not ev.PAUSED  # every event is answered below before asking again
            assert isinstance(event, ev.Event)
            if isinstance(event, ev.MailFrom):
                assert helo and not in_txn
            if isinstance(event, ev.RcptTo):
                assert in_txn
            if isinstance(event, ev.DataCommand):
                assert has_rcpt
            if isinstance(event, ev.BdatCommand):
                assert has_rcpt
            if not event.needs_reply:
                continue
            code = event.reply.code if isinstance(event, ev.CommandError) else codes[i % len(codes)]
            i += 1
            assert conn.send(Reply(code, "", "x")).endswith(b"\r\n")
            ok = 200 <= code < 400
            if isinstance(event, ev.Hello) and ok:
                helo, in_txn, has_rcpt = True, False, False
            elif isinstance(event, ev.MailFrom) and ok:
                in_txn = True
            elif isinstance(event, ev.RcptTo) and ok:
                has_rcpt = True
            elif isinstance(event, (ev.Reset, ev.MessageEnd)) or (
                isinstance(event, ev.DataCommand) and code != 354
            ):
                if not isinstance(event, ev.DataCommand):
                    in_txn = has_rcpt = False
            elif (isinstance(event, ev.ChunkEnd) and (event.last or not ok)) or (
                isinstance(event, ev.CommandError) and "BDAT without" in event.reply.text
            ):
                in_txn = has_rcpt = False
            if conn.state is State.TLS:
                conn.tls_established()
                helo = in_txn = has_rcpt = False
    assert pos >= len(wire) or conn.state.value == "closed"
