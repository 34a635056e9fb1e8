"""Serving SMTP on trio: bind the listeners of one `[[listeners]]` entry, enforce connection limits,
and run each connection's read → protocol → policy → write loop."""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass, field

import structlog
import trio

from ..lifecycle import Drain
from ..policy import parse_ip
from ..receiver import Receiver, ReceiverContext
from ..smtp import Reply, ServerConnection, State
from ..smtp import events as ev
from ._proxied import HEADER_TIMEOUT, PrefixedStream, read_header
from .proxy_protocol import ProxyError

log = structlog.get_logger("hedwigpy.smtp")

RECEIVE_SIZE = 65536
CLOSE_TIMEOUT = 5.0  # seconds to drop a half-received message once the connection is gone
LINGER = 1.0  # seconds a connection closed for shutdown waits for the client to close its side


@dataclass
class ConnectionLimits:
    """Connection counts shared by every listener of the daemon (max_connections is global)."""

    max_total: int
    max_per_ip: int
    total: int = 0
    per_ip: Counter[str] = field(default_factory=Counter)

    def refusal(self, ip: str) -> Reply | None:
        """Why a new connection from `ip` is refused; `total` already counts it, `per_ip` does not."""
        if self.total > self.max_total:
            return Reply(421, "4.7.0", "Too many connections, try again later")
        if self.per_ip[ip] >= self.max_per_ip:
            return Reply(421, "4.7.0", "Too many connections from your address, try again later")
        return None


@dataclass
class ListenerSetup:
    """What a new connection of one listener starts with. A reload swaps both fields between two
    connections; a connection keeps the pair it started with (Postfix: a reload affects new sessions)."""

    ctx: ReceiverContext
    ssl_context: ssl.SSLContext | None


async def serve_smtp(
    setup: ListenerSetup,
    limits: ConnectionLimits,
    drain: Drain | None = None,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind `setup.ctx.listener.addr` and serve connections. Once `drain` starts, the listening sockets
    close (new connections are refused by the kernel) and this returns when the open sessions are done."""
    listener = setup.ctx.listener
    addr = listener.addr
    listeners = await trio.open_tcp_listeners(addr.port, host=addr.host)
    for lst in listeners:
        log.info("listening", listener=listener.name, addr=lst.socket.getsockname()[:2], tls=listener.tls)
    task_status.started(listeners)

    async def handler(stream: trio.SocketStream) -> None:
        await handle_connection(stream, setup.ctx, limits, setup.ssl_context, drain)

    async with trio.open_nursery() as sessions:
        with trio.CancelScope() as accepting:
            if drain is not None:
                sessions.start_soon(_cancel_on_drain, drain, accepting)
            await trio.serve_listeners(handler, listeners, handler_nursery=sessions)
        # serve_listeners closed the sockets on its way out; the sessions nursery now waits for them.
        log.info("listener closed", listener=listener.name, sessions=len(sessions.child_tasks))
    log.info("listener drained", listener=listener.name)


async def _cancel_on_drain(drain: Drain, scope: trio.CancelScope) -> None:
    await drain.wait()
    scope.cancel()


async def handle_connection(
    raw: trio.SocketStream,
    ctx: ReceiverContext,
    limits: ConnectionLimits,
    ssl_context: ssl.SSLContext | None,
    drain: Drain | None = None,
) -> None:
    """One connection, from accept to close. Errors end this connection only, and are logged."""
    try:
        peer = raw.socket.getpeername()
    except OSError as exc:  # reset between accept() and here (ENOTCONN): nothing to serve
        log.info("connection lost before it was served", error=str(exc))
        await raw.aclose()
        return
    # trio binds IPv6 sockets V6ONLY, so a mapped address only comes from a PROXY header, but the
    # client is named the same way (its IPv4 address) on every path: limits, logs and policy.
    ip_text, port = _client_ip(str(peer[0])), int(peer[1])
    client_addr = _address(ip_text, port)
    # Counted from the accept, so connections still sending their PROXY header count as well.
    limits.total += 1
    counted_ip: str | None = None
    try:
        async with raw:
            stream: trio.abc.Stream = raw
            if ctx.listener.proxy_protocol:
                if limits.total > limits.max_total:  # silent connections must not pile up unbounded
                    log.warning("connection refused", client=client_addr, reason="too many connections")
                    return
                # Before any byte of ours: the balancer speaks first (spec section 2).
                try:
                    timeout = min(ctx.config.limits.command_timeout, HEADER_TIMEOUT)
                    header, rest = await read_header(raw, trio.current_time() + timeout)
                except ProxyError as exc:
                    log.warning(
                        "proxy header refused", peer=client_addr, listener=ctx.listener.name, error=str(exc)
                    )
                    return
                if header.source is not None:  # else LOCAL/UNKNOWN: the balancer itself (health check)
                    # An IPv4-mapped source is its IPv4 client, for per-IP limits and logs as for policy.
                    ip_text, port = _client_ip(str(header.source[0])), header.source[1]
                    client_addr = _address(ip_text, port)
                stream = PrefixedStream(raw, rest) if rest else raw
            refusal = limits.refusal(ip_text)
            limits.per_ip[ip_text] += 1
            counted_ip = ip_text
            if refusal is not None:
                with trio.move_on_after(5):
                    await stream.send_all(
                        Reply(421, refusal.enhanced, f"{ctx.hostname} {refusal.text}").to_bytes()
                    )
                log.warning("connection refused", client=client_addr, reason=refusal.text)
                return
            implicit = ctx.listener.tls == "implicit"
            if implicit:
                assert ssl_context is not None
                stream = trio.SSLStream(stream, ssl_context, server_side=True)
            receiver = Receiver(ctx, parse_ip(ip_text), client_addr, tls=implicit)
            try:
                await _Session(stream, receiver, ssl_context, drain or Drain()).run()
            finally:
                # Also when the drain's grace ran out: the half-received message must not stay behind.
                with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                    await receiver.close()
    except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as exc:
        log.info("connection lost", client=client_addr, error=str(exc) or type(exc).__name__)
    except Exception:
        log.exception("connection failed", client=client_addr)
    finally:
        limits.total -= 1
        if counted_ip is not None:
            limits.per_ip[counted_ip] -= 1
            if not limits.per_ip[counted_ip]:
                del limits.per_ip[counted_ip]


def _client_ip(text: str) -> str:
    addr = parse_ip(text)
    return text if addr is None else str(addr)


def _address(ip_text: str, port: int) -> str:
    return f"[{ip_text}]:{port}" if ":" in ip_text else f"{ip_text}:{port}"


class _Session:
    """The socket loop of one connection: feed bytes to the protocol, answer its events through the
    `Receiver`, write replies in batches (one write per read, which is what makes PIPELINING cheap)."""

    def __init__(
        self, stream: trio.abc.Stream, receiver: Receiver, ssl_context: ssl.SSLContext | None, drain: Drain
    ):
        self.stream = stream
        self.receiver = receiver
        self.ssl_context = ssl_context
        self.drain = drain
        self.conn = ServerConnection()
        self.limits = receiver.ctx.config.limits
        self.out = bytearray()

    async def run(self) -> None:
        conn, receiver = self.conn, self.receiver
        pause = receiver.ctx.listener.greet_pause
        if pause > 0:
            with trio.move_on_after(pause):
                conn.receive_data(await self.stream.receive_some(RECEIVE_SIZE))
        self.out += conn.greet(receiver.greeting(conn.talked_early))
        deadline = trio.current_time() + self.limits.command_timeout
        while not conn.closed:
            event = conn.next_event()
            if event is ev.NEED_DATA:
                await self._flush()
                data: bytes | bytearray | None = None
                if receiver.in_transaction:  # a transaction may finish while draining
                    with trio.move_on_at(deadline):
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                else:  # between transactions a drain ends the wait (Postfix closes idle sessions)
                    with self.drain.interruptible(), trio.move_on_at(deadline):
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                    if self.drain.draining:
                        self._shutting_down()
                        break
                if data is None:
                    self.out += conn.close_with(
                        Reply(421, "4.4.2", f"{receiver.ctx.hostname} Error: timeout exceeded")
                    )
                    log.info("timeout", client=receiver.client_addr, state=conn.state.value)
                    break
                conn.receive_data(data)
                continue
            assert isinstance(event, ev.Event)
            if isinstance(event, ev.ConnectionClosed):
                return
            reply = await receiver.handle(event)
            if reply is not None:
                self.out += conn.send(reply)
                if receiver.count(reply) and not conn.closed:
                    self.out += conn.close_with(
                        Reply(421, "4.7.0", f"{receiver.ctx.hostname} Error: too many errors")
                    )
                    log.warning("too many errors", client=receiver.client_addr)
            if self.drain.draining and not receiver.in_transaction and not conn.closed:
                self._shutting_down()  # right after the reply that ended the transaction
            if conn.state is State.TLS:
                await self._start_tls()
            if conn.state in (State.DATA, State.BDAT):
                if not isinstance(event, ev.MessageData):
                    deadline = trio.current_time() + self.limits.data_timeout
            else:
                deadline = trio.current_time() + self.limits.command_timeout
        await self._flush()
        plain = self.stream.inner if isinstance(self.stream, PrefixedStream) else self.stream
        if self.drain.draining and isinstance(plain, trio.SocketStream):
            await _linger(plain)

    def _shutting_down(self) -> None:
        reply = Reply(421, "4.3.2", f"{self.receiver.ctx.hostname} Service shutting down")
        self.out += self.conn.close_with(reply)
        log.info("closed for shutdown", client=self.receiver.client_addr)

    async def _flush(self) -> None:
        if self.out:
            data = bytes(self.out)
            self.out.clear()
            await self.stream.send_all(data)

    async def _start_tls(self) -> None:
        await self._flush()
        assert self.ssl_context is not None
        tls = trio.SSLStream(self.stream, self.ssl_context, server_side=True)
        with trio.fail_after(self.limits.command_timeout):
            await tls.do_handshake()
        self.stream = tls
        self.conn.tls_established()
        self.receiver.tls_active = True


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close and read what the client still sends, briefly, before the socket closes: closing
    with unread input makes the kernel send a reset, which can destroy our 421 in the client's receive
    buffer before it reads it (a pipelining client has often sent its next command already)."""
    with trio.move_on_after(LINGER):
        await stream.send_eof()
        while await stream.receive_some(RECEIVE_SIZE):
            pass
