"""Delivery status notifications: `header_section` and `build_dsn` (RFC 3464 / 6522 / 6533), checked by
parsing the result back with the stdlib `email` package and by reading its raw bytes."""

from __future__ import annotations

import binascii
import email
import email.policy
import email.utils
import re
from email.message import EmailMessage, Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hedwigpy.smtp.framing import BodyEncoder, DotReader, LineLengthTracker
from hedwigpy.storage import Attempt, Envelope, RecipientStatus
from hedwigpy.worker.bounce import HEADER_LIMIT, MAX_LINE, build_dsn, header_section

NOW = 1_767_657_700.0
ARRIVED = 1_767_225_600.0
MTA = "mail.example.com"
QUEUE_ID = "18a2b3c4d5e6f7a8deadbeef"
ENVELOPE = Envelope(sender="alice@example.org", recipients=("bob@example.net",), received_at=ARRIVED)
HEADERS = (
    b"Received: from client.example.org ([192.0.2.9])\r\n\tby mail.example.com (hedwigpy); date\r\n"
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: Hello\r\n"
    b"Message-ID: <1@example.org>\r\n"
)
CONTENT = HEADERS + b"\r\nThe secret body.\r\n"


def rcpt(
    address: str, code: int | None = None, enhanced: str = "", text: str = "", host: str = "", at: float = NOW
) -> RecipientStatus:
    """A recipient with its last attempt, or with none when `code` is None."""
    last = None if code is None else Attempt(at, code, enhanced, text, host)
    return RecipientStatus(address, "failed" if code is None or code >= 500 else "pending", 1, last)


BOB = rcpt("bob@example.net", 550, "5.1.1", "no such user", "mx.example.net[192.0.2.1]", at=NOW - 60)


def build(
    failed: list[RecipientStatus],
    *,
    delayed: list[RecipientStatus] | None = None,
    envelope: Envelope = ENVELOPE,
    headers: bytes = CONTENT,
) -> tuple[Envelope, bytes] | None:
    return build_dsn(
        envelope=envelope,
        message_id=QUEUE_ID,
        original_headers=headers,
        failed=failed,
        reporting_mta=MTA,
        now=NOW,
        delayed=delayed or (),
    )


def dsn(
    failed: list[RecipientStatus],
    *,
    delayed: list[RecipientStatus] | None = None,
    envelope: Envelope = ENVELOPE,
    headers: bytes = CONTENT,
) -> tuple[Envelope, bytes]:
    result = build(failed, delayed=delayed, envelope=envelope, headers=headers)
    assert result is not None
    check_wire_form(result[1])
    return result


def check_wire_form(data: bytes) -> None:
    """CRLF only, every line within RFC 5322's 998 octets, and unchanged through our own SMTP framing."""
    assert data.endswith(b"\r\n")
    assert re.search(rb"(?<!\r)\n|\r(?!\n)", data) is None
    assert max(len(line) for line in data.split(b"\r\n")) <= MAX_LINE
    tracker = LineLengthTracker()
    tracker.update(data)
    assert not tracker.exceeded
    encoder = BodyEncoder()
    reader = DotReader()
    reader.feed(encoder.encode(data) + encoder.finish())
    assert reader.read() == data and reader.finished


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def raw_parts(data: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The report's parts as (headers, raw body), split on the boundary by hand."""
    boundary = parse(data).get_boundary()
    assert boundary
    sections = data.split(b"\r\n--" + boundary.encode())
    assert sections[-1] == b"--\r\n"
    parts = []
    for section in sections[1:-1]:
        head, _, body = section.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        parts.append((fields(head), body))
    return parts


def fields(block: bytes) -> dict[str, str]:
    """One field block, unfolded by the email package."""
    message = email.message_from_string(block.decode("utf-8") + "\r\n\r\n", policy=email.policy.default)
    return {name: str(value) for name, value in message.items()}


def status_groups(data: bytes) -> list[dict[str, str]]:
    """The delivery-status part's field groups: blank-line separated, no empty group, no stray lines."""
    [body] = [body for head, body in raw_parts(data) if "delivery-status" in head["Content-Type"]]
    assert body.endswith(b"\r\n") and not body.endswith(b"\r\n\r\n")
    blocks = body.removesuffix(b"\r\n").split(b"\r\n\r\n")
    assert all(blocks)
    return [fields(block) for block in blocks]


def returned_headers(data: bytes) -> tuple[dict[str, str], bytes]:
    """The returned header part's headers and its decoded content."""
    [(head, body)] = [(h, b) for h, b in raw_parts(data) if "Headers" in h["Content-Description"]]
    if head.get("Content-Transfer-Encoding") == "quoted-printable":
        body = binascii.a2b_qp(body)
    return head, body


def test_one_failed_recipient() -> None:
    envelope, data = dsn([BOB])
    assert envelope == Envelope(
        sender="", recipients=("alice@example.org",), received_at=NOW, listener="bounce"
    )
    assert (envelope.body_type, envelope.smtputf8) == ("7BIT", False)
    message = parse(data)
    assert message["From"] == f"Mail Delivery System <MAILER-DAEMON@{MTA}>"
    assert message["From"].addresses[0].display_name == "Mail Delivery System"
    assert message["To"] == "alice@example.org"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert re.fullmatch(rf"<{QUEUE_ID}\.bounce\.\d+@{re.escape(MTA)}>", message["Message-ID"])
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    assert not message.defects

    text, status, headers = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert text.get_content_charset() == "us-ascii"
    explanation = text.get_content()
    assert explanation.startswith(f"This is the mail system at host {MTA}.\r\n\r\nI'm sorry")
    assert "could not\r\nbe delivered to one or more recipients" in explanation
    assert explanation.endswith(
        "<bob@example.net>: host mx.example.net[192.0.2.1] said: 550 5.1.1 no such\r\n    user\r\n"
    )

    # The email package parses message/delivery-status into one sub-message per field group.
    assert status.get_content_type() == "message/delivery-status"
    payload = status.get_payload()
    assert isinstance(payload, list)
    per_message, bob = payload
    assert isinstance(per_message, Message) and isinstance(bob, Message)
    assert dict(per_message.items()) == {
        "Reporting-MTA": f"dns; {MTA}",
        "X-Hedwig-Queue-ID": QUEUE_ID,
        "X-Hedwig-Sender": "rfc822; alice@example.org",
        "Arrival-Date": per_message["Arrival-Date"],
    }
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVED
    assert {k: v for k, v in bob.items() if k != "Last-Attempt-Date"} == {
        "Final-Recipient": "rfc822; bob@example.net",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
    }
    assert email.utils.parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp() == NOW - 60
    assert status_groups(data) == [dict(per_message.items()), dict(bob.items())]

    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_payload(decode=True) == HEADERS
    assert returned_headers(data)[1] == HEADERS
    assert b"secret body" not in data  # headers only, never the body


def test_several_failed_recipients_with_mixed_statuses() -> None:
    multi_line = "Temporary lookup failure\nplease try later"
    expired = rcpt("carol@example.com", 451, "4.3.0", multi_line, "mx.example.com[192.0.2.7]")
    no_enhanced = rcpt("dan@example.com", 554, "", "go away", "mx[192.0.2.8]")
    bad_enhanced = rcpt("erin@example.com", 550, "5.x.1", "no")
    no_reply = rcpt("frank@example.com", 0, "", "connect to mx[192.0.2.9]: refused")
    no_attempt = rcpt("gina@example.com")
    _, data = dsn([BOB, expired, no_enhanced, bad_enhanced, no_reply, no_attempt])
    _, *groups = status_groups(data)
    assert [(g["Final-Recipient"], g["Action"], g["Status"]) for g in groups] == [
        ("rfc822; bob@example.net", "failed", "5.1.1"),
        ("rfc822; carol@example.com", "failed", "4.4.7"),
        ("rfc822; dan@example.com", "failed", "5.0.0"),
        ("rfc822; erin@example.com", "failed", "5.0.0"),
        ("rfc822; frank@example.com", "failed", "4.4.7"),
        ("rfc822; gina@example.com", "failed", "5.0.0"),
    ]
    assert [g.get("Diagnostic-Code") for g in groups] == [
        "smtp; 550 5.1.1 no such user",
        "smtp; 451 4.3.0 Temporary lookup failure please try later",
        "smtp; 554 go away",
        "smtp; 550 no",
        "X-Hedwig; connect to mx[192.0.2.9]: refused",
        None,
    ]
    assert [g.get("Remote-MTA") for g in groups] == [
        "dns; mx.example.net",
        "dns; mx.example.com",
        "dns; mx",
        None,
        None,
        None,
    ]
    assert ["Last-Attempt-Date" in g for g in groups] == [True] * 5 + [False]
    text = parse(data).get_body(("plain",))
    assert text is not None
    explanation = " ".join(text.get_content().split())
    assert "<carol@example.com>: delivery time expired; last attempt: host mx.example.com" in explanation
    assert "<gina@example.com>: no delivery attempt was made" in explanation


def test_delayed_only_is_a_warning() -> None:
    later = rcpt("bob@example.net", 452, "4.2.2", "mailbox full", "mx[::1]")
    odd = rcpt("carol@example.com", 421, "5.0.0", "?")
    _, data = dsn([], delayed=[later, odd, rcpt("dan@example.com")])
    message = parse(data)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert re.fullmatch(rf"<{QUEUE_ID}\.delay\.\d+@{re.escape(MTA)}>", message["Message-ID"])
    _, *groups = status_groups(data)
    assert [(g["Action"], g["Status"]) for g in groups] == [
        ("delayed", "4.2.2"),
        ("delayed", "4.0.0"),
        ("delayed", "4.0.0"),
    ]
    text = message.get_body(("plain",))
    assert text is not None and "THIS IS A WARNING ONLY" in text.get_content()
    head, _ = returned_headers(data)
    assert head["Content-Description"] == "Delayed Message Headers"


def test_failed_and_delayed_together() -> None:
    later = rcpt("carol@example.com", 451, "4.3.0", "later", "mx[::1]")
    _, data = dsn([BOB], delayed=[later])
    assert parse(data)["Subject"] == "Undelivered Mail Returned to Sender"
    _, *groups = status_groups(data)
    assert [(g["Final-Recipient"], g["Action"]) for g in groups] == [
        ("rfc822; bob@example.net", "failed"),
        ("rfc822; carol@example.com", "delayed"),
    ]
    text = parse(data).get_body(("plain",))
    assert text is not None and "still being retried" in text.get_content()


def test_no_dsn_to_the_null_sender() -> None:
    null = Envelope(sender="", recipients=("bob@example.net",))
    assert build([BOB], envelope=null) is None
    assert build([], delayed=[BOB], envelope=null) is None


def test_no_dsn_without_recipients_to_report() -> None:
    assert build([]) is None
    assert build([], delayed=[]) is None


@pytest.mark.parametrize(
    ("host", "remote"),
    [
        ("mx.example.net[192.0.2.1]:2525", "dns; mx.example.net"),
        ("mx.example.net[192.0.2.1]", "dns; mx.example.net"),
        ("mx.example.net[2001:db8::1]:587", "dns; mx.example.net"),
        ("smtp.provider1.com:587", "dns; smtp.provider1.com"),
        ("smtp.provider1.com", "dns; smtp.provider1.com"),
        ("[192.0.2.1]:25", "dns; 192.0.2.1"),
        ("", None),
    ],
)
def test_remote_mta_is_the_host_name(host: str, remote: str | None) -> None:
    _, data = dsn([rcpt("bob@example.net", 550, "5.1.1", "no", host)])
    assert status_groups(data)[1].get("Remote-MTA") == remote


def test_non_ascii_recipient_uses_the_global_types() -> None:
    rs = rcpt("jösé@exämple.net", 550, "5.1.1", "ünknown", "mx[192.0.2.1]")
    headers = "Subject: Grüße\r\nFrom: jösé@exämple.net\r\n".encode()
    envelope, data = dsn([rs], headers=headers + b"\r\nbody")
    assert (envelope.smtputf8, envelope.body_type) == (True, "8BITMIME")
    message = parse(data)
    assert message.get_param("report-type") == "global-delivery-status"
    assert message["Content-Transfer-Encoding"] == "8bit"
    assert [p.get_content_type() for p in message.iter_parts()] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    per_message, group = status_groups(data)
    assert per_message["X-Hedwig-Sender"] == "rfc822; alice@example.org"
    assert group["Final-Recipient"] == "utf-8; jösé@exämple.net"
    assert group["Diagnostic-Code"] == "smtp; 550 5.1.1 ünknown"
    assert "jösé@exämple.net" in data.decode("utf-8")
    assert returned_headers(data)[1] == headers


def test_non_ascii_sender_makes_it_smtputf8() -> None:
    envelope, data = dsn([BOB], envelope=Envelope(sender="ännä@example.org", recipients=("bob@example.net",)))
    assert envelope.recipients == ("ännä@example.org",) and envelope.smtputf8
    assert parse(data)["To"] == "ännä@example.org"
    assert status_groups(data)[0]["X-Hedwig-Sender"] == "utf-8; ännä@example.org"


def test_non_ascii_reply_text_stays_seven_bit_in_an_ascii_dsn() -> None:
    rs = rcpt("bob@example.net", 550, "5.1.1", "Benützer unbekannt")
    envelope, data = dsn([rs])
    assert (envelope.smtputf8, envelope.body_type) == (False, "7BIT")
    assert data.isascii()
    assert status_groups(data)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Ben\\x{FC}tzer unbekannt"


@pytest.mark.parametrize(
    ("original", "cte", "expected"),
    [
        (b"Subject: caf\xe9\r\nX-Bin: \xff\xfe\r\n", "8bit", b"Subject: caf\xe9\r\nX-Bin: \xff\xfe\r\n"),
        (b"Subject: a\x00b\r\nTo: x\r\n", "quoted-printable", b"Subject: a\x00b\r\nTo: x\r\n"),
        (b"X-Long: " + b"y" * 2000 + b"\r\n", "quoted-printable", b"X-Long: " + b"y" * 2000 + b"\r\n"),
        (b"Subject: lf\nTo: cr\rX: crlf\r\n", None, b"Subject: lf\r\nTo: cr\r\nX: crlf\r\n"),
        (b"Subject: unterminated", None, b"Subject: unterminated\r\n"),
        (b"\x80\x81\x82 not a header at all", "8bit", b"\x80\x81\x82 not a header at all\r\n"),
    ],
)
def test_garbage_original_headers(original: bytes, cte: str | None, expected: bytes) -> None:
    envelope, data = dsn([BOB], headers=original)
    head, content = returned_headers(data)
    assert head["Content-Type"] == "text/rfc822-headers"
    assert head.get("Content-Transfer-Encoding") == cte
    assert content == expected
    assert envelope.body_type == ("8BITMIME" if cte == "8bit" else "7BIT")
    assert b"\x00" not in data
    for part in parse(data).walk():  # the email package copes with every part
        part.get_payload(decode=True)


def test_no_original_headers_means_no_third_part() -> None:
    _, data = dsn([BOB], headers=b"\r\nonly a body")
    types = [p.get_content_type() for p in parse(data).iter_parts()]
    assert types == ["text/plain", "message/delivery-status"]


def test_oversized_header_section_is_cut_at_a_line_end() -> None:
    line = b"X-Filler: " + b"z" * 90 + b"\r\n"  # 102 octets
    original = HEADERS + line * 2000 + b"\r\nbody"
    _, data = dsn([BOB], headers=original)
    _, content = returned_headers(data)
    assert HEADER_LIMIT - len(line) < len(content) <= HEADER_LIMIT
    assert content.endswith(b"\r\n") and original.startswith(content)


def test_boundary_never_occurs_in_the_content() -> None:
    _, first = dsn([BOB])
    boundary = parse(first).get_boundary()
    assert boundary is not None
    _, data = dsn([BOB], headers=f"X-Trick: --{boundary}\r\n--{boundary}--\r\n".encode())
    message = parse(data)
    assert message.get_boundary() != boundary
    assert [p.get_content_type() for p in message.iter_parts()][2] == "text/rfc822-headers"
    assert boundary.encode() in returned_headers(data)[1]


def test_long_diagnostic_text_is_folded() -> None:
    words = " ".join(f"word{i}" for i in range(600))
    text = words + " " + "x" * 3000 + "\n" + "second line of the reply"
    rs = rcpt("bob@example.net", 550, "5.7.1", text, "mx[192.0.2.1]")
    _, data = dsn([rs])
    [(_, body)] = [(h, b) for h, b in raw_parts(data) if h["Content-Type"] == "message/delivery-status"]
    lines = body.split(b"\r\n")
    assert all(len(line) <= 78 for line in lines if b"x" * 100 not in line)
    diagnostic = status_groups(data)[1]["Diagnostic-Code"]
    assert diagnostic.startswith("smtp; 550 5.7.1 word0 word1 word2")
    assert len(diagnostic) < 1100  # capped
    [text_part, *_] = parse(data).iter_parts()
    assert all(len(line) <= 76 for line in text_part.get_content().splitlines())


def test_hostile_field_values_cannot_inject_headers() -> None:
    rs = rcpt("bob@example.net\r\nBcc: eve@evil", 550, "5.1.1", "no\r\nX-Evil: 1", "h\r\nX: y")
    _, data = dsn([rs], envelope=Envelope(sender="a@b\r\nX-Injected: 1", recipients=("c@d",)))
    assert b"\r\nBcc:" not in data and b"\r\nX-Evil" not in data and b"\r\nX-Injected" not in data
    _, group = status_groups(data)
    assert group["Final-Recipient"] == "rfc822; bob@example.net Bcc: eve@evil"
    odd = build_dsn(
        envelope=ENVELOPE,
        message_id="../\r\nx",
        original_headers=b"",
        failed=[BOB],
        reporting_mta="mail example.com\r\n",
        now=NOW,
    )
    assert odd is not None
    check_wire_form(odd[1])
    assert parse(odd[1])["From"] == "Mail Delivery System <MAILER-DAEMON@mailexample.com>"
    huge = "a" * 3000 + "@" + "b" * 3000
    envelope, data = dsn(
        [rcpt(huge, 550, "5.1.1", huge, huge)], envelope=Envelope(sender=huge, recipients=())
    )
    assert envelope.recipients == (huge,)  # the header is capped, the envelope is not


def test_many_recipients() -> None:
    failed = [
        rcpt(f"user{i}@example.net", 550, "5.1.1", "no such user " * 20, "mx[192.0.2.1]") for i in range(1000)
    ]
    _, data = dsn(failed)
    assert len(status_groups(data)) == 1001
    assert len(data) < 2_000_000


@pytest.mark.parametrize(
    ("content", "limit", "section"),
    [
        (CONTENT, HEADER_LIMIT, HEADERS),
        (b"A: 1\nB: 2\n\nbody\n", HEADER_LIMIT, b"A: 1\nB: 2\n"),
        (b"A: 1\r\nB: 2\n\r\nbody", HEADER_LIMIT, b"A: 1\r\nB: 2\n"),
        (b"A: 1\r\nB: 2\r\n", HEADER_LIMIT, b"A: 1\r\nB: 2\r\n"),  # headers only, no blank line
        (b"A: 1\r\nB: unterminated", HEADER_LIMIT, b"A: 1\r\nB: unterminated"),
        (b"", HEADER_LIMIT, b""),
        (b"\r\nbody", HEADER_LIMIT, b""),
        (b"\nbody", HEADER_LIMIT, b""),
        (b"A: 1\r\nB: 2\r\nC: 3\r\n\r\nbody", 12, b"A: 1\r\nB: 2\r\n"),
        (b"A: 1\r\nB: 2\r\nC: 3\r\n\r\nbody", 11, b"A: 1\r\n"),  # B's CR fits, its LF does not
        (b"A: 1\r\nB: 2\r\n\r\nbody", 12, b"A: 1\r\nB: 2\r\n"),  # exactly the limit
        (b"X: " + b"y" * 100, 10, b"X: yyyyyyy"),  # one endless line: cut at the limit
        (b"A: 1\r\n", 0, b""),
        (b"A: 1\r\n", -5, b""),
        (b"\x00\xff\r\n\x00: \x80\r\n\r\n\xff", HEADER_LIMIT, b"\x00\xff\r\n\x00: \x80\r\n"),
    ],
)
def test_header_section(content: bytes, limit: int, section: bytes) -> None:
    assert header_section(content, limit) == section


addresses = st.one_of(
    st.emails(),
    st.text(min_size=1, max_size=60),
    st.just("jösé@exämple.net"),
)
texts = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=3000)
attempts = st.one_of(
    st.none(),
    st.builds(
        Attempt,
        at=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.just(NOW)),
        code=st.integers(min_value=-1, max_value=999),
        enhanced=st.one_of(st.sampled_from(["5.1.1", "4.4.1", "2.0.0", "", "5.9.999"]), st.text(max_size=20)),
        text=texts,
        host=st.one_of(st.just("mx.example.net[192.0.2.1]:2525"), st.text(max_size=80)),
    ),
)
statuses = st.builds(RecipientStatus, address=addresses, state=st.just("failed"), last=attempts)


@settings(max_examples=150, deadline=None)
@given(
    original=st.one_of(st.binary(max_size=4000), st.just(CONTENT)),
    sender=addresses,
    failed=st.lists(statuses, max_size=5),
    delayed=st.lists(statuses, max_size=3),
)
def test_build_dsn_never_raises_and_is_parseable(
    original: bytes, sender: str, failed: list[RecipientStatus], delayed: list[RecipientStatus]
) -> None:
    envelope = Envelope(sender=sender, recipients=("x@example.net",), received_at=ARRIVED)
    result = build_dsn(
        envelope=envelope,
        message_id=QUEUE_ID,
        original_headers=original,
        failed=failed,
        reporting_mta=MTA,
        now=NOW,
        delayed=delayed,
    )
    if not failed and not delayed:
        assert result is None
        return
    assert result is not None
    dsn_envelope, data = result
    assert dsn_envelope.sender == "" and dsn_envelope.recipients == (sender,)
    check_wire_form(data)
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    for part in message.walk():
        part.get_payload(decode=True)
    per_message, *groups = status_groups(data)
    assert per_message["Reporting-MTA"] == f"dns; {MTA}"
    assert [g["Action"] for g in groups] == ["failed"] * len(failed) + ["delayed"] * len(delayed)
    assert all(re.fullmatch(r"[45]\.\d{1,3}\.\d{1,3}", g["Status"]) for g in groups)
    section = header_section(original)
    if section.strip(b"\r\n"):
        _, content = returned_headers(data)
        assert content.replace(b"\r\n", b"") == re.sub(rb"\r\n|\r|\n", b"", section)
