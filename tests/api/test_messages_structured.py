"""`POST /v1/messages` in structured mode: the message the stdlib email package composes from the JSON
fields (read back with the email package's parser, and as bytes where the wire form matters), the
envelope it gets, and every field's checks — header injection above all. Same harness as raw mode."""

from __future__ import annotations

import base64
import email
import email.policy
from email.message import EmailMessage, MIMEPart
from typing import Any

import pytest

from .submit_api import Api, assert_problem

pytestmark = pytest.mark.timeout(60)

PDF = b"%PDF-1.4\n% not really a PDF\n" + bytes(range(256))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def parse(content: bytes) -> EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def text_of(part: MIMEPart) -> str:
    """A text part's content with the wire's CRLF line ends as Python's LF."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def head(content: bytes) -> bytes:
    return content.partition(b"\r\n\r\n")[0]


def doc(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"from": "app@example.org", "to": ["ann@example.net"], "text": "Hello."}
    return base | fields


async def test_a_full_message_is_composed_and_delivered() -> None:
    api = Api()
    status, _, body = await api.post(
        {
            "from": "Jürgen Müller <app@example.org>",
            "to": ["Ann <ann@example.net>", "bob@example.net"],
            "cc": ['"Doe, Carol" <carol@example.net>'],
            "bcc": ["secret@example.net"],
            "reply_to": "Support <help@example.org>",
            "subject": "Grüße aus Köln ☃",
            "text": "Hallo Ann,\nschöne Grüße.\n",
            "html": "<p>Hallo Ann, <b>schöne</b> Grüße.</p>",
            "attachments": [
                {"filename": "rapport été.pdf", "content_type": "application/pdf", "content": b64(PDF)},
                {"filename": "notes.txt", "content": b64(b"plain notes\n")},
            ],
            "headers": {"X-Tag": "billing", "In-Reply-To": "<first@example.org>"},
            "metadata": {"customer": 42},
        }
    )
    assert status == 200 and body["status"] == "delivered"
    addresses = ["ann@example.net", "bob@example.net", "carol@example.net", "secret@example.net"]
    assert [r["address"] for r in body["recipients"]] == addresses
    [(stored, recipients, content)] = api.upstream.calls
    env = stored.envelope
    assert (env.sender, env.recipients, env.smtputf8, env.body_type) == (
        "app@example.org",
        tuple(addresses),
        False,
        "7BIT",
    )
    assert recipients == tuple(addresses)

    assert content.isascii()  # encoded-words, RFC 2231 and quoted-printable: 7-bit clean
    raw_head = head(content)
    assert b"Subject: =?utf-8?" in raw_head and b"From: =?utf-8?" in raw_head
    assert b"Bcc" not in content and b"secret" not in content
    msg = parse(content)
    assert msg["From"] == "Jürgen Müller <app@example.org>"
    assert msg["To"] == "Ann <ann@example.net>, bob@example.net"
    assert msg["Cc"] == '"Doe, Carol" <carol@example.net>'
    assert msg["Reply-To"] == "Support <help@example.org>"
    assert msg["Subject"] == "Grüße aus Köln ☃"
    assert msg["Message-ID"] == f"<{body['id']}@mx.test.example>"
    assert msg["Date"].datetime is not None
    assert (msg["X-Tag"], msg["In-Reply-To"]) == ("billing", "<first@example.org>")
    assert msg["MIME-Version"] == "1.0" and msg.get_content_type() == "multipart/mixed"
    assert content.count(b"MIME-Version") == 1
    assert msg["Received"].startswith("from [127.0.0.1]")

    alternative, pdf, notes = msg.iter_parts()
    assert alternative.get_content_type() == "multipart/alternative"
    plain, html = alternative.iter_parts()
    assert text_of(plain) == "Hallo Ann,\nschöne Grüße.\n"
    assert html.get_content_type() == "text/html" and "<b>schöne</b>" in text_of(html)
    assert pdf.get_filename() == "rapport été.pdf" and pdf.get_content_type() == "application/pdf"
    assert pdf.get_content() == PDF
    assert notes.get_content_type() == "text/plain" and notes.get_filename() == "notes.txt"  # guessed
    assert text_of(notes) == "plain notes\n"


async def test_text_only_html_only_and_attachments_only() -> None:
    api = Api()
    assert (await api.post(doc(text="Just text.")))[0] == 200
    assert (await api.post(doc(text=None, html="<p>Just html.</p>")))[0] == 200
    attachment = {"filename": "data.bin", "content": b64(b"\x00\x01\x02")}
    assert (await api.post(doc(text=None, attachments=[attachment])))[0] == 200
    text, html, files = (parse(call[2]) for call in api.upstream.calls)
    assert text.get_content_type() == "text/plain" and text_of(text) == "Just text.\n"
    assert html.get_content_type() == "text/html"
    assert files.get_content_type() == "multipart/mixed" and files["MIME-Version"] == "1.0"
    [part] = files.iter_parts()
    assert part.get_content_type() == "application/octet-stream" and part.get_content() == b"\x00\x01\x02"


async def test_non_ascii_addresses_need_smtputf8() -> None:
    api = Api(delivery={"cut_through": False})
    status, _, body = await api.post(doc(to="Jürgen <jürgen@exämple.net>", subject="Grüße"))
    assert status == 202 and body["recipients"][0]["address"] == "jürgen@exämple.net"
    [(stored, content)] = api.stored()
    assert stored.envelope.smtputf8 and stored.envelope.body_type == "8BITMIME"
    assert "To: Jürgen <jürgen@exämple.net>".encode() in head(content)  # RFC 6532: UTF-8 as is
    assert parse(content)["Subject"] == "Grüße"


async def test_a_queued_message_is_spooled_as_composed() -> None:
    api = Api({"ann@example.net": "450 4.2.1 busy"})
    status, _, body = await api.post(doc(subject="later"))
    assert status == 202 and body["status"] == "queued"
    [(stored, content)] = api.stored()
    assert stored.id == body["id"] and parse(content)["Subject"] == "later"


async def test_the_client_may_set_date_and_message_id() -> None:
    api = Api()
    headers = {"Date": "Mon, 02 Feb 2026 10:00:00 +0100", "Message-ID": "<mine@example.org>"}
    assert (await api.post(doc(headers=headers)))[0] == 200
    content = api.upstream.calls[0][2]
    assert head(content).count(b"Date:") == 1 and head(content).count(b"Message-ID:") == 1
    msg = parse(content)
    assert (msg["Date"], msg["Message-ID"]) == (headers["Date"], "<mine@example.org>")


async def test_duplicates_across_to_cc_and_bcc_are_one_recipient() -> None:
    api = Api()
    status, _, body = await api.post(
        doc(to=["ann@example.net"], cc=["Ann <ann@example.net>"], bcc=["ann@example.net"])
    )
    assert status == 200 and [r["address"] for r in body["recipients"]] == ["ann@example.net"]


# --- header injection: every value that becomes a header ---------------------------------------------------

INJECTION = "x\r\nBcc: victim@example.com"


@pytest.mark.parametrize("bad", ["\r\n", "\n", "\r", "\0"])
@pytest.mark.parametrize(
    ("field", "fields"),
    [
        ("from", lambda v: {"from": f"App{v}Bcc: v@example.com <app@example.org>"}),
        ("to[1]", lambda v: {"to": ["ok@example.net", f"ann@example.net{v}"]}),
        ("cc[0]", lambda v: {"cc": [f"Carol{v} <carol@example.net>"]}),
        ("bcc[0]", lambda v: {"bcc": [f"b@example.net{v}"]}),
        ("reply_to[0]", lambda v: {"reply_to": f"r@example.org{v}"}),
        ("subject", lambda v: {"subject": f"hi{v}Bcc: victim@example.com"}),
        ("headers.X-Tag", lambda v: {"headers": {"X-Tag": f"a{v}Bcc: victim@example.com"}}),
        (
            "attachments[0].filename",
            lambda v: {"attachments": [{"filename": f"a{v}.txt", "content": "eA=="}]},
        ),
    ],
)
async def test_control_characters_in_a_header_value_are_400(bad: str, field: str, fields: Any) -> None:
    api = Api()
    errors = assert_problem(await api.post(doc(**fields(bad))), 400, [field], field)
    assert "CR, LF, NUL" in errors[0]["detail"]
    assert api.untouched()


@pytest.mark.parametrize("name", ["X-Tag\r\nBcc", "X Tag", "X-Tag:", "", "X-Tägg", "X" * 77])
async def test_a_bad_header_name_is_400(name: str) -> None:
    api = Api()
    errors = assert_problem(await api.post(doc(headers={name: "v"})), 400)
    assert errors[0]["field"] == f"headers[{name!r}]" and "header name" in errors[0]["detail"]
    assert api.untouched()


@pytest.mark.parametrize(
    "name", ["From", "bcc", "Subject", "MIME-Version", "Content-Type", "content-transfer-encoding"]
)
async def test_headers_made_by_fields_or_the_composition_are_refused(name: str) -> None:
    api = Api()
    errors = assert_problem(await api.post(doc(headers={name: "v"})), 400, [f"headers.{name}"])
    assert "set by its own field" in errors[0]["detail"]


async def test_a_body_may_hold_line_breaks_but_no_nul() -> None:
    api = Api()
    assert (await api.post(doc(text="a\r\nb\rc\nd\te")))[0] == 200
    assert text_of(parse(api.upstream.calls[0][2])) == "a\nb\nc\nd\te\n"
    errors = assert_problem(await api.post(doc(text="a\0b", html="<p>\0</p>")), 400, ["text", "html"])
    assert errors[0]["detail"] == "must not contain NUL"


# --- other faults -------------------------------------------------------------------------------------------


async def test_every_fault_is_listed() -> None:
    api = Api()
    body = {
        "from": "not an address",
        "to": "also not",
        "cc": "x",
        "reply_to": 5,
        "subject": 7,
        "html": ["x"],
        "headers": ["X-Tag"],
        "metadata": "m",
        "envelope_from": "a@example.org",
        "priority": 1,
    }
    errors = assert_problem(await api.post(body), 400)
    assert [e["field"] for e in errors] == [
        "envelope_from",
        "priority",
        "from",
        "to[0]",
        "cc[0]",
        "reply_to",
        "subject",
        "html",
        "headers",
        "metadata",
    ]
    assert api.untouched()


@pytest.mark.parametrize(
    ("fields", "field", "detail"),
    [
        ({"to": []}, "to", "at least one recipient"),
        ({"to": None}, "to", "at least one recipient"),
        ({"to": {"a": 1}}, "to", "must be a list"),
        ({"text": None}, "text", "text, html or attachments"),
        ({"from": None}, "from", "required"),
        ({"from": 5}, "from", "must be a string"),
        ({"from": ""}, "from", "Empty path"),
        ({"subject": "a" * 901}, "subject", "longer than 900"),
        ({"attachments": {"a": 1}}, "attachments", "must be a list"),
        ({"attachments": ["x"]}, "attachments[0]", "must be an object"),
        ({"attachments": [{"content": "eA=="}]}, "attachments[0].filename", "required"),
        ({"attachments": [{"filename": "a"}]}, "attachments[0].content", "required"),
        ({"attachments": [{"filename": "a", "content": "%%"}]}, "attachments[0].content", "not valid base64"),
        (
            {"attachments": [{"filename": "a", "content": "eA==", "cid": "x"}]},
            "attachments[0].cid",
            "unknown",
        ),
        (
            {"attachments": [{"filename": "a", "content_type": "pdf", "content": "eA=="}]},
            "attachments[0].content_type",
            "media type",
        ),
        (
            {"attachments": [{"filename": "a.eml", "content_type": "message/rfc822", "content": "eA=="}]},
            "attachments[0].content_type",
            "cannot be attached",
        ),
    ],
)
async def test_field_faults_are_400(fields: dict[str, Any], field: str, detail: str) -> None:
    api = Api()
    body = {k: v for k, v in doc(**fields).items() if v is not None}
    errors = assert_problem(await api.post(body), 400, [field])
    assert detail in errors[0]["detail"]
    assert api.untouched()


async def test_too_many_recipients_is_400() -> None:
    api = Api(limits={"max_recipients": 2})
    body = doc(to=["a@example.net"], cc=["b@example.net"], bcc=["c@example.net"])
    assert_problem(await api.post(body), 400, ["to"], "at most 2")


async def test_too_large_is_413() -> None:
    api = Api(limits={"max_message_size": 4096})
    big = {"filename": "big.bin", "content": b64(b"x" * 5000)}
    assert_problem(await api.post(doc(attachments=[big])), 413, ["attachments[0].content"])
    two = [{"filename": f"{i}.bin", "content": b64(b"x" * 2100)} for i in range(2)]
    assert_problem(await api.post(doc(attachments=two)), 413, ["attachments[1].content"])
    # fits decoded, not once base64-encoded in the message
    assert_problem(
        await api.post(doc(attachments=[{"filename": "a.bin", "content": b64(b"x" * 3500)}])),
        413,
        ["(message)"],
    )
    assert api.untouched()
