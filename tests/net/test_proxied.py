"""Reading a PROXY header off a trio stream: a header split over many reads, EOF, the deadline, and the
bytes after the header handed on unchanged."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from hedwigpy.net._proxied import PrefixedStream, read_header
from hedwigpy.net.proxy_protocol import ProxyError
from tests import proxy_headers as ph


async def test_a_header_in_single_bytes_then_the_rest_in_order() -> None:
    client, server = trio.testing.memory_stream_pair()
    data = ph.v1("192.0.2.1", 1000, "192.0.2.2", 25) + b"EHLO a\r\n"

    async def trickle() -> None:
        for i in range(len(data) - 8):
            await client.send_all(data[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()  # the reader takes each byte alone
        await client.send_all(data[len(data) - 8 :])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        header, rest = await read_header(server, trio.current_time() + 5)
    assert header.source is not None and str(header.source[0]) == "192.0.2.1"
    stream = PrefixedStream(server, rest)
    received = b""
    while len(received) < 8:
        received += await stream.receive_some(3)  # smaller than the prefix: handed out in pieces
    assert received == b"EHLO a\r\n"
    await client.send_all(b"NOOP\r\n")
    assert await stream.receive_some() == b"NOOP\r\n"


async def test_eof_before_the_header_is_complete() -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(ph.v2_local()[:10])
    await client.send_eof()
    with pytest.raises(ProxyError, match="closed after 10 bytes"):
        await read_header(server, trio.current_time() + 5)


async def test_deadline(autojump_clock: trio.testing.MockClock) -> None:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"PROXY ")
    start = trio.current_time()
    with pytest.raises(ProxyError, match="in time"):
        await read_header(server, start + 10)
    assert trio.current_time() - start == pytest.approx(10)


async def test_prefixed_stream_passes_sending_and_closing_through() -> None:
    client, server = trio.testing.memory_stream_pair()
    stream = PrefixedStream(server, b"x")
    await stream.send_all(b"220 hi\r\n")
    assert await client.receive_some() == b"220 hi\r\n"
    await stream.wait_send_all_might_not_block()
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"more")
