"""`SmtpSession` against a scripted trio upstream on loopback: banner, EHLO/HELO, STARTTLS per TLS mode,
AUTH, pipelined and plain transactions, and every way a session fails (each a `SessionFailure`)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import pytest
import trio
import trio.testing
import trustme

from hedwigpy.config import ClientTls
from hedwigpy.net.smtp_client import Outgoing, SessionFailure, SessionOptions, SmtpSession, host_label
from hedwigpy.net.tls import client_context
from hedwigpy.smtp import ClientState, Reply
from tests.scripted_upstream import (
    BODY,
    PASSWORD,
    SENDER,
    USER,
    Script,
    Upstream,
    outgoing,
    start_upstream,
)

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = client_context(verify=True)
    ca.configure_trust(ctx)
    return ctx


def options(
    tls_context: ssl.SSLContext | None = None,
    *,
    tls: ClientTls = "opportunistic",
    auth: tuple[str, str] | None = None,
    reply_timeout: float = 5.0,
    connect_timeout: float = 5.0,
) -> SessionOptions:
    return SessionOptions(
        helo="client.test",
        tls=tls,
        tls_context=tls_context,
        server_name="mx.test",
        auth=auth,
        connect_timeout=connect_timeout,
        reply_timeout=reply_timeout,
    )


async def open_session(upstream: Upstream, opts: SessionOptions | None = None) -> SmtpSession:
    return await SmtpSession.open("mx.test", upstream.host, upstream.port, opts or options(tls="none"))


async def open_failure(upstream: Upstream, opts: SessionOptions | None = None) -> SessionFailure:
    with pytest.raises(SessionFailure) as info:
        await open_session(upstream, opts)
    return info.value


async def send_failure(session: SmtpSession, message: Outgoing) -> SessionFailure:
    with pytest.raises(SessionFailure) as info:
        await session.send(message)
    return info.value


async def settle() -> None:
    """Let the upstream's handler run until it has processed what was sent."""
    await trio.testing.wait_all_tasks_blocked()


# --- banner and hello --------------------------------------------------------------------------------


def test_host_label() -> None:
    assert host_label("mx.example.net", "192.0.2.1", 25) == "mx.example.net[192.0.2.1]"
    assert host_label("mx.example.net", "192.0.2.1", 587) == "mx.example.net[192.0.2.1]:587"


@pytest.mark.parametrize("banner", ["554 5.7.1 go away", "421 4.3.2 try later"])
async def test_refusing_banner_is_a_failure_with_that_reply(nursery: trio.Nursery, banner: str) -> None:
    upstream = await start_upstream(nursery, Script(greeting=banner))
    failure = await open_failure(upstream)
    code, enhanced, text = banner.split(" ", 2)
    assert failure.reply == Reply(int(code), enhanced, text)
    assert failure.host == f"mx.test[127.0.0.1]:{upstream.port}"
    assert not failure.after_data and not failure.stale
    await settle()
    assert upstream.connections[0].commands == []  # no EHLO after a refusal


async def test_silent_banner_times_out(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(greeting=None))
    failure = await open_failure(upstream, options(tls="none", reply_timeout=0.1))
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.4.2")
    assert "timeout" in failure.reply.text


async def test_ehlo_refused_falls_back_to_helo(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(refuse_ehlo=True))
    session = await open_session(upstream)
    replies = await session.send(outgoing())
    assert replies.data is not None and replies.data.code == 250
    await session.aclose()
    conn = upstream.connections[0]
    assert conn.commands[:3] == ["EHLO client.test", "HELO client.test", f"MAIL FROM:<{SENDER}>"]
    assert "BODY=" not in conn.commands[2]  # after HELO no extension is assumed


async def test_hello_refused_entirely_is_a_failure(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(refuse_ehlo=True, replies={"HELO": "550 5.7.1 no"}))
    failure = await open_failure(upstream)
    assert failure.reply == Reply(550, "5.7.1", "no")


async def test_421_to_ehlo_is_not_answered_with_helo(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(replies={"EHLO": "421 4.7.0 too many connections"}))
    failure = await open_failure(upstream)
    assert failure.reply == Reply(421, "4.7.0", "too many connections")
    await settle()
    assert upstream.connections[0].verbs == ["EHLO"]


async def test_aclose_says_quit(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    session = await open_session(upstream)
    await session.aclose()
    await settle()
    assert upstream.connections[0].commands[-1] == "QUIT"
    assert upstream.connections[0].closed


# --- STARTTLS per TLS mode ---------------------------------------------------------------------------

TLS_CASES = [
    # (mode, what the server does, expected: "tls", "plain" or the failure's enhanced code)
    ("none", "offered", "plain"),
    ("none", "not offered", "plain"),
    ("none", "broken", "plain"),
    ("opportunistic", "offered", "tls"),
    ("opportunistic", "not offered", "plain"),
    ("opportunistic", "broken", "4.7.5"),
    ("required", "offered", "tls"),
    ("required", "not offered", "4.7.4"),
    ("required", "broken", "4.7.5"),
]


@pytest.mark.parametrize(("mode", "server", "expected"), TLS_CASES)
async def test_tls_modes(
    nursery: trio.Nursery,
    ca: trustme.CA,
    tls_context: ssl.SSLContext,
    mode: ClientTls,
    server: str,
    expected: str,
) -> None:
    extensions = ("PIPELINING", "8BITMIME") + (() if server == "not offered" else ("STARTTLS",))
    script = Script(extensions=extensions, starttls="broken" if server == "broken" else "ok")
    upstream = await start_upstream(nursery, script, ca=ca)
    opts = options(tls_context, tls=mode)
    if expected in ("tls", "plain"):
        session = await open_session(upstream, opts)
        assert session.tls_active == (expected == "tls")
        replies = await session.send(outgoing())
        assert replies.data is not None and replies.data.code == 250
        await session.aclose()
        await settle()
        conn = upstream.connections[0]
        assert conn.tls == (expected == "tls")
        if expected == "tls":
            # EHLO again after the handshake (RFC 3207 4.2), and nothing but EHLO+STARTTLS in plaintext
            assert conn.verbs[:4] == ["EHLO", "STARTTLS", "EHLO", "MAIL"]
        else:
            assert "STARTTLS" not in conn.verbs
        assert conn.messages == [BODY]
        return
    failure = await open_failure(upstream, opts)
    assert (failure.reply.code, failure.reply.enhanced) == (451, expected)
    await settle()
    conn = upstream.connections[0]
    assert "MAIL" not in conn.verbs  # never continues in plaintext
    assert conn.closed
    assert b"MAIL" not in conn.raw


async def test_starttls_refused_is_a_failure(nursery: trio.Nursery, tls_context: ssl.SSLContext) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("STARTTLS",), starttls="refused"))
    failure = await open_failure(upstream, options(tls_context, tls="opportunistic"))
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.7.5")
    assert "454" in failure.reply.text
    await settle()
    assert "MAIL" not in upstream.connections[0].verbs


async def test_untrusted_certificate_fails_the_handshake(nursery: trio.Nursery, ca: trustme.CA) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("STARTTLS",)), ca=ca)
    failure = await open_failure(upstream, options(client_context(verify=True), tls="required"))
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.7.5")
    assert "handshake" in failure.reply.text


async def test_unverified_context_encrypts_anyway(nursery: trio.Nursery, ca: trustme.CA) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("STARTTLS",)), ca=ca)
    session = await open_session(upstream, options(client_context(verify=False), tls="required"))
    assert session.tls_active
    await session.aclose()


# --- AUTH ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanisms", ["PLAIN LOGIN", "LOGIN"])
async def test_auth_after_starttls(
    nursery: trio.Nursery, ca: trustme.CA, tls_context: ssl.SSLContext, mechanisms: str
) -> None:
    upstream = await start_upstream(
        nursery, Script(extensions=("STARTTLS", f"AUTH {mechanisms}", "PIPELINING")), ca=ca
    )
    session = await open_session(upstream, options(tls_context, tls="required", auth=(USER, PASSWORD)))
    await session.send(outgoing())
    await session.aclose()
    conn = upstream.connections[0]
    expected = "PLAIN" if mechanisms.startswith("PLAIN") else "LOGIN"
    assert conn.auth == [(expected, USER, PASSWORD)]
    assert conn.verbs[:5] == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL"]
    assert conn.tls
    assert b"AUTH" not in conn.reads[0] + conn.reads[1]  # nothing secret before the handshake


async def test_auth_refused_is_a_soft_failure(
    nursery: trio.Nursery, ca: trustme.CA, tls_context: ssl.SSLContext
) -> None:
    script = Script(extensions=("STARTTLS", "AUTH PLAIN"), auth_reply="535 5.7.8 Bad credentials")
    upstream = await start_upstream(nursery, script, ca=ca)
    failure = await open_failure(upstream, options(tls_context, tls="required", auth=(USER, "wrong")))
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.7.8")
    assert "535" in failure.reply.text
    await settle()
    assert "MAIL" not in upstream.connections[0].verbs


async def test_no_credentials_without_tls(nursery: trio.Nursery, tls_context: ssl.SSLContext) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("AUTH PLAIN LOGIN",)))
    failure = await open_failure(upstream, options(tls_context, tls="opportunistic", auth=(USER, PASSWORD)))
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.7.4")
    await settle()
    assert "AUTH" not in upstream.connections[0].verbs
    assert PASSWORD.encode() not in upstream.connections[0].raw


async def test_credentials_in_plaintext_when_tls_is_none(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("AUTH PLAIN LOGIN", "STARTTLS")))
    session = await open_session(upstream, options(tls="none", auth=(USER, PASSWORD)))
    await session.aclose()
    assert upstream.connections[0].auth == [("PLAIN", USER, PASSWORD)]
    assert not upstream.connections[0].tls


async def test_no_supported_mechanism(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("AUTH CRAM-MD5",)))
    failure = await open_failure(upstream, options(tls="none", auth=(USER, PASSWORD)))
    assert (failure.reply.code, failure.reply.enhanced) == (451, "4.7.0")


# --- the transaction -----------------------------------------------------------------------------------


async def test_pipelined_transaction_is_one_write(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("PIPELINING", "SIZE 100000", "8BITMIME")))
    session = await open_session(upstream)
    rcpts = ["bob@example.net", "carol@example.net"]
    replies = await session.send(outgoing(rcpts))
    assert replies.mail.code == 250 and [r.code for r in replies.rcpt] == [250, 250]
    assert replies.data is not None and replies.data.code == 250
    await session.aclose()
    conn = upstream.connections[0]
    expected = (
        f"MAIL FROM:<{SENDER}> SIZE={len(BODY)} BODY=8BITMIME\r\n"
        "RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n"
    ).encode()
    assert expected in conn.reads  # MAIL, both RCPTs and DATA arrived in one read
    assert conn.messages == [BODY]


async def test_unpipelined_transaction_waits_for_each_reply(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("8BITMIME",)))
    session = await open_session(upstream)
    replies = await session.send(outgoing(["bob@example.net", "carol@example.net"]))
    assert replies.data is not None and replies.data.code == 250
    await session.aclose()
    conn = upstream.connections[0]
    commands = [r for r in conn.reads if not r.startswith(b"Subject")]
    assert all(r.count(b"\r\n") == 1 for r in commands), commands  # one command per read
    assert conn.verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert "SIZE=" not in conn.commands[1]  # SIZE not offered: not sent


@pytest.mark.parametrize("pipelining", [True, False])
async def test_per_recipient_replies(nursery: trio.Nursery, pipelining: bool) -> None:
    rcpt_replies = {"nobody@example.net": "550 5.1.1 no such user", "later@example.net": "452 4.2.2 full"}
    extensions = ("PIPELINING",) if pipelining else ()
    upstream = await start_upstream(nursery, Script(extensions=extensions, rcpt_replies=rcpt_replies))
    session = await open_session(upstream)
    replies = await session.send(outgoing(["bob@example.net", "nobody@example.net", "later@example.net"]))
    assert [(r.code, r.enhanced) for r in replies.rcpt] == [(250, "2.1.5"), (550, "5.1.1"), (452, "4.2.2")]
    assert replies.data == Reply(250, "2.0.0", "Ok: queued")
    assert session.usable
    await session.aclose()
    assert upstream.connections[0].messages == [BODY]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_all_recipients_refused_sends_no_content(nursery: trio.Nursery, pipelining: bool) -> None:
    rcpt_replies = {"x@example.net": "550 5.1.1 no", "y@example.net": "450 4.2.0 busy"}
    extensions = ("PIPELINING",) if pipelining else ()
    upstream = await start_upstream(nursery, Script(extensions=extensions, rcpt_replies=rcpt_replies))
    session = await open_session(upstream)
    replies = await session.send(outgoing(["x@example.net", "y@example.net"]))
    assert [r.code for r in replies.rcpt] == [550, 450]
    assert replies.data is None
    assert session.usable
    # the session carries on: the next transaction starts with RSET
    again = await session.send(outgoing(["bob@example.net"]))
    assert again.data is not None and again.data.code == 250
    await session.aclose()
    conn = upstream.connections[0]
    assert conn.messages == [BODY]
    assert conn.raw.count(b"Subject: test") == 1
    assert conn.verbs.count("DATA") == (2 if pipelining else 1)
    assert "RSET" in conn.verbs


async def test_pipelined_354_without_recipients_ends_an_empty_message(nursery: trio.Nursery) -> None:
    script = Script(rcpt_replies={"x@example.net": "550 5.1.1 no"}, replies={"DATA": "354 go ahead"})
    upstream = await start_upstream(nursery, script)
    session = await open_session(upstream)
    replies = await session.send(outgoing(["x@example.net"]))
    assert replies.data is None
    await session.aclose()
    assert upstream.connections[0].messages == [b""]  # just the dot, no content
    assert b"Subject" not in upstream.connections[0].raw


async def test_mail_refused(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(
        nursery, Script(extensions=(), replies={"MAIL": "553 5.7.1 sender denied"})
    )
    session = await open_session(upstream)
    replies = await session.send(outgoing())
    assert replies.mail.code == 553 and replies.rcpt == () and replies.data is None
    await session.aclose()
    assert "RCPT" not in upstream.connections[0].verbs


async def test_smtputf8_required_but_not_offered(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    session = await open_session(upstream)
    replies = await session.send(outgoing(["bøb@example.net"], smtputf8=True))
    assert (replies.mail.code, replies.mail.enhanced) == (553, "5.6.7")
    assert replies.rcpt == () and replies.data is None
    assert session.usable and session.messages == 0
    await session.aclose()
    assert upstream.connections[0].verbs == ["EHLO", "QUIT"]


async def test_smtputf8_offered(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("PIPELINING", "SMTPUTF8", "8BITMIME")))
    session = await open_session(upstream)
    replies = await session.send(outgoing(["bøb@example.net"], smtputf8=True))
    assert replies.data is not None and replies.data.code == 250
    await session.aclose()
    assert upstream.connections[0].commands[1].endswith(" SMTPUTF8")
    assert "RCPT TO:<bøb@example.net>" in upstream.connections[0].commands


async def test_size_over_the_servers_limit(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(extensions=("SIZE 1000",)))
    session = await open_session(upstream)
    replies = await session.send(outgoing(size=1001))
    assert (replies.mail.code, replies.mail.enhanced) == (552, "5.3.4")
    ok = await session.send(outgoing(size=1000))
    assert ok.data is not None and ok.data.code == 250
    await session.aclose()
    assert upstream.connections[0].verbs.count("MAIL") == 1


@pytest.mark.parametrize("pipelining", [True, False])
async def test_421_to_rcpt_ends_the_session(nursery: trio.Nursery, pipelining: bool) -> None:
    script = Script(
        extensions=("PIPELINING",) if pipelining else (),
        rcpt_replies={"bob@example.net": "421 4.3.2 shutting down"},
    )
    upstream = await start_upstream(nursery, script)
    session = await open_session(upstream)
    failure = await send_failure(session, outgoing())
    assert failure.reply == Reply(421, "4.3.2", "shutting down")
    assert not failure.after_data and not failure.stale
    assert not session.usable
    await session.aclose()
    assert upstream.connections[0].messages == []


async def test_connection_lost_after_the_dot(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(drop_after_dot=True))
    session = await open_session(upstream)
    failure = await send_failure(session, outgoing())
    assert failure.after_data
    assert failure.reply.code == 451
    assert upstream.connections[0].messages == [BODY]  # the upstream may well have it
    await session.aclose()


async def test_421_after_the_dot_is_after_data(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(final_reply="421 4.3.0 out of memory"))
    session = await open_session(upstream)
    failure = await send_failure(session, outgoing())
    assert failure.after_data and failure.reply.code == 421
    await session.aclose()


async def test_final_refusal_is_a_reply(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(final_reply="554 5.7.1 spam"))
    session = await open_session(upstream)
    replies = await session.send(outgoing())
    assert replies.data == Reply(554, "5.7.1", "spam")
    assert session.usable
    await session.aclose()


@pytest.mark.parametrize("goodbye", [None, "421 4.4.2 mx.test Error: timeout exceeded"])
async def test_reused_session_closed_while_idle_is_stale(nursery: trio.Nursery, goodbye: str | None) -> None:
    upstream = await start_upstream(nursery, Script(idle_close=0.05, idle_close_reply=goodbye))
    session = await open_session(upstream)
    first = await session.send(outgoing())
    assert first.data is not None and first.data.code == 250
    with trio.fail_after(2):
        await upstream.connections[0].gone.wait()
    failure = await send_failure(session, outgoing())
    assert failure.stale and not failure.after_data
    if goodbye is not None:
        assert failure.reply.code == 421
    assert upstream.messages == [BODY]
    await session.aclose()


async def test_reused_session_closed_silently_is_stale(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(extensions=(), close_after_messages=1))
    session = await open_session(upstream)
    await session.send(outgoing())
    await settle()
    failure = await send_failure(session, outgoing())
    assert failure.stale
    await session.aclose()


async def test_first_transaction_failure_is_not_stale(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(replies={"MAIL": "421 4.3.2 bye"}))
    session = await open_session(upstream)
    failure = await send_failure(session, outgoing())
    assert failure.reply.code == 421 and not failure.stale
    await session.aclose()


async def test_reuse_sends_rset_first(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    session = await open_session(upstream)
    for _ in range(3):
        replies = await session.send(outgoing())
        assert replies.data is not None and replies.data.code == 250
    assert session.messages == 3
    await session.aclose()
    conn = upstream.connections[0]
    assert conn.verbs == ["EHLO"] + ["MAIL", "RCPT", "DATA"] + ["RSET", "MAIL", "RCPT", "DATA"] * 2 + ["QUIT"]
    assert len(conn.messages) == 3


async def test_body_is_normalised_and_dot_stuffed_on_the_wire(nursery: trio.Nursery) -> None:
    chunks = [
        b"Subject: dots\n\n.leading dot\rbare CR\nbare LF\r",
        b"\n..two dots\r\n.",
        b"\n.\r\n",
        b"x\r\n.\r",
        b"\nlast line without ending",
    ]
    upstream = await start_upstream(nursery)
    session = await open_session(upstream)
    await session.send(outgoing(chunks=chunks))
    await session.aclose()
    wire = (
        b"Subject: dots\r\n\r\n..leading dot\r\nbare CR\r\nbare LF\r\n...two dots\r\n..\r\n..\r\n"
        b"x\r\n..\r\nlast line without ending\r\n"
    )
    assert upstream.connections[0].messages == [wire]
    raw = upstream.connections[0].raw
    assert raw[raw.index(b"Subject: dots") :].startswith(wire + b".\r\n")


# --- connecting ----------------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused() -> None:
    port = _closed_port()
    with pytest.raises(SessionFailure) as info:
        await SmtpSession.open("mx.test", "127.0.0.1", port, options(tls="none"))
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.1")
    assert f"mx.test[127.0.0.1]:{port}" in info.value.reply.text


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A port whose listen queue is full, so a new connection attempt hangs (SYNs are dropped)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                fillers.append(filler)
                filler.settimeout(0.05)
                try:
                    filler.connect(("127.0.0.1", port))
                except TimeoutError:
                    break
            else:
                pytest.skip("the kernel does not drop SYNs to a full listen queue")
            yield port
        finally:
            for filler in fillers:
                filler.close()


async def test_connect_timeout(full_backlog: int) -> None:
    started = trio.current_time()
    with pytest.raises(SessionFailure) as info:
        await SmtpSession.open("mx.test", "127.0.0.1", full_backlog, options(tls="none", connect_timeout=0.1))
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.1")
    assert "timed out" in info.value.reply.text
    assert trio.current_time() - started < 1.0


async def test_states_after_a_transaction(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    session = await open_session(upstream)
    assert session.usable and session.messages == 0
    await session.send(outgoing())
    assert session.usable and session.messages == 1
    await session.aclose()
    assert session._conn.state is ClientState.CLOSED
