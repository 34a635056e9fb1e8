"""`IncomingMessage`: Bcc removal on the way into the spool (and the header-section handling around it)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hedwigpy.inbound import IncomingMessage
from hedwigpy.storage import Envelope, MemoryStorage

TRACE = b"Received: from client.test by mx.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
MSGID = b"Message-ID: <1@client.test>\r\n"


async def stored(chunks: Sequence[bytes]) -> bytes:
    storage = MemoryStorage()
    writer = storage.writer(Envelope(sender="a@example.org", recipients=("b@example.net",)))
    incoming = IncomingMessage(writer, trace=TRACE, max_size=1 << 20, max_hops=50, hostname="mx.test")
    for chunk in chunks:
        await incoming.write(chunk)
    await incoming.finish()
    assert incoming.verdict(False) is None
    message = await incoming.writer.commit()
    content = storage.messages[message.id][1]
    assert content.startswith(TRACE)
    return content[len(TRACE) :]


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"From: a\r\nBcc: x@example.net\r\nTo: b\r\n", b"From: a\r\nTo: b\r\n"),
        (b"Bcc: x@example.net\r\nFrom: a\r\n", b"From: a\r\n"),  # the first field
        (b"From: a\r\nBcc: x@example.net\r\n", b"From: a\r\n"),  # the last field
        (
            b"From: a\r\nBCC : x@example.net\r\nTo: b\r\n",
            b"From: a\r\nTo: b\r\n",
        ),  # any case, space before ':'
        (b"From: a\r\nbcc:\r\nTo: b\r\n", b"From: a\r\nTo: b\r\n"),  # empty
        (  # folded over several lines
            b"From: a\r\nBcc: x@example.net,\r\n y@example.net,\r\n\tz@example.net\r\nTo: b\r\n",
            b"From: a\r\nTo: b\r\n",
        ),
        (b"From: a\nBcc: x@example.net,\n y@example.net\nTo: b\n", b"From: a\nTo: b\n"),  # bare LF
        (b"Bcc: x\r\nFrom: a\r\nBcc: y\r\nTo: b\r\nBcc: z\r\n", b"From: a\r\nTo: b\r\n"),  # every one
        (
            b"From: a\r\nX-Bcc: kept\r\nResent-Bcc-Note: kept\r\n",
            b"From: a\r\nX-Bcc: kept\r\nResent-Bcc-Note: kept\r\n",
        ),
        (b"From: a\r\nBccx: kept\r\n", b"From: a\r\nBccx: kept\r\n"),  # another field name
        (b"Subject: Bcc: in a value\r\n", b"Subject: Bcc: in a value\r\n"),
    ],
)
async def test_bcc_removed_from_the_header_section(head: bytes, expected: bytes) -> None:
    eol = b"\n" if b"\r" not in head else b"\r\n"
    body = b"Bcc: this line is body text" + eol + b"more" + eol
    content = await stored([MSGID + head + eol + body])
    assert content == MSGID + expected + eol + body


async def test_bcc_removed_across_chunk_boundaries() -> None:
    message = MSGID + b"From: a\r\nBcc: x@example.net,\r\n y@example.net\r\nTo: b\r\n\r\nbody\r\n"
    content = await stored([message[i : i + 1] for i in range(len(message))])
    assert content == MSGID + b"From: a\r\nTo: b\r\n\r\nbody\r\n"


async def test_only_bcc_in_the_header_section() -> None:
    content = await stored([b"Bcc: x@example.net\r\n\r\nbody\r\n"])
    assert b"Bcc" not in content
    assert content.startswith(b"Message-ID: <") and content.endswith(b"@mx.test>\r\n\r\nbody\r\n")


async def test_headers_only_message_without_blank_line() -> None:
    content = await stored([MSGID, b"From: a\r\nBcc: x@example.net\r\n"])
    assert content == MSGID + b"From: a\r\n"


async def test_missing_message_id_is_added_after_bcc_removal() -> None:
    content = await stored([b"From: a\r\nBcc: x\r\n\r\nbody\r\n"])
    head, _, body = content.partition(b"\r\n\r\n")
    assert head.startswith(b"From: a\r\nMessage-ID: <") and body == b"body\r\n"
