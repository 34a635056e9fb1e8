"""Reading a PROXY protocol header off a trio stream, and handing the bytes that came with it (the
client's first SMTP command, or its TLS ClientHello) on to whoever reads the stream next."""

from __future__ import annotations

import trio

from .proxy_protocol import ProxyError, ProxyHeader, parse

# The spec asks for "at least 3 seconds to cover a TCP retransmit"; Postfix waits 5 s
# (smtpd_upstream_proxy_timeout). A balancer sends the header at once, so 10 s is generous.
HEADER_TIMEOUT = 10.0
_RECEIVE = 4096  # at least one whole header usually arrives in one segment


async def read_header(stream: trio.abc.ReceiveStream, deadline: float) -> tuple[ProxyHeader, bytes]:
    """The header and the bytes received after it. Raises `ProxyError` on a malformed header, on EOF
    before it is complete, and when it is not complete at `deadline` (trio's clock)."""
    buf = b""
    with trio.move_on_at(deadline):
        while True:
            result = parse(buf)
            if result is not None:
                return result
            # parse() refuses anything longer than a header can be, so `buf` stays bounded.
            data = await stream.receive_some(_RECEIVE)
            if not data:
                raise ProxyError(f"connection closed after {len(buf)} bytes of a PROXY header")
            buf += data
    raise ProxyError(f"no complete PROXY header in time ({len(buf)} bytes received)")


class PrefixedStream(trio.abc.Stream):
    """`inner` with `prefix` put back in front of what it receives, so no byte read past the header is
    lost. Everything else is the inner stream's (sending, closing)."""

    def __init__(self, inner: trio.abc.Stream, prefix: bytes):
        self.inner = inner
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._prefix:
            return await self.inner.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._prefix) if max_bytes is None else max_bytes
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()
