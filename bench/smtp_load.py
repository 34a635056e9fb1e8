"""A trio SMTP load generator: many concurrent sessions, pipelined transactions, bulk I/O.

Usable as a library (`run_load`, `run_load_sync`) and as a command:

    python -m bench.smtp_load --host 127.0.0.1 --port 2525 --sessions 20 --messages 5000 --size 4096

Each session connects, reads the banner, says EHLO and then sends up to `--per-session` messages on that
connection (MAIL, RCPT, DATA pipelined when the server offers PIPELINING), then QUIT; sessions reconnect until
the shared message budget is spent. Message latency is measured from sending MAIL to reading the reply to the
end of data. Everything is bounded: the number of messages, the number of connections (at most one per
`--per-session` messages) and the wall clock (`--timeout`).
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

READ_SIZE = 65536
MAX_REPLY_BUFFER = 1 << 20  # a reply (or a run of pipelined replies) larger than this is a protocol error
QUIT_TIMEOUT = 5.0
MAX_FAILURE_SAMPLES = 5
LINE_LEN = 76  # characters per body line, CRLF not included
FIXED_DATE = "Thu, 01 Jan 2026 00:00:00 +0000"
_INDEX_WIDTH = 10  # zero-padded message number: every message of a run has the same size
_FILL_ALPHABET = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 "


class SmtpProtocolError(Exception):
    """The peer said something that is not an SMTP reply, or closed the connection mid-reply."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...]

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    def __str__(self) -> str:
        return f"{self.code} {' / '.join(self.lines)}"


class ReplyReader:
    """Reads whole SMTP replies from a stream: large reads, `bytes.find` for line ends, no byte loops."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()
        self._pos = 0

    async def _fill(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        if len(self._buf) > MAX_REPLY_BUFFER:
            raise SmtpProtocolError(f"reply longer than {MAX_REPLY_BUFFER} bytes")
        data = await self._stream.receive_some(READ_SIZE)
        if not data:
            raise SmtpProtocolError("connection closed by server")
        self._buf += data

    async def read_reply(self) -> Reply:
        lines: list[bytes] = []
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end < 0:
                await self._fill()
                continue
            line = bytes(self._buf[self._pos : end])
            self._pos = end + 2
            if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in (b" ", b"-")):
                raise SmtpProtocolError(f"not an SMTP reply line: {line[:80]!r}")
            lines.append(line)
            if len(line) == 3 or line[3:4] == b" ":
                break
        code = int(lines[0][:3])
        return Reply(code, tuple(ln[4:].decode("utf-8", "replace") for ln in lines))

    async def read_replies(self, count: int) -> list[Reply]:
        return [await self.read_reply() for _ in range(count)]


class MessageFactory:
    """Deterministic RFC 5322 messages of exactly `size` bytes (headers included, when `size` allows).

    Headers: From, To, Subject, Message-ID, Date (fixed), MIME-Version, Content-Type; the body is 76-character
    lines of letters, digits and spaces (never a leading dot, so no dot-stuffing is needed). Only the message
    number differs between messages, so the bulk of the body is built once and shared.
    """

    def __init__(self, size: int, sender: str, recipients: Sequence[str], hostname: str) -> None:
        self.size = size
        self.sender = sender
        self.recipients = tuple(recipients)
        self.hostname = hostname
        self._header_template = (
            f"From: Bench Sender <{sender}>\r\n"
            f"To: {', '.join(f'<{r}>' for r in self.recipients)}\r\n"
            "Subject: hedwigpy bench message {index}\r\n"
            "Message-ID: <bench.{index}@" + hostname + ">\r\n"
            f"Date: {FIXED_DATE}\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n"
        )
        header_len = len(self.header(0))
        # The shared tail: body lines plus the end-of-data marker.
        self._tail = _fill_lines(max(0, size - header_len)) + b".\r\n"
        self.message_size = header_len + len(self._tail) - 3

    def header(self, index: int) -> bytes:
        number = f"{index:0{_INDEX_WIDTH}d}"
        return self._header_template.format(index=number).encode("ascii")

    def data(self, index: int) -> bytes:
        """The message as sent after a 354: headers, body, and the terminating `.` line."""
        return self.header(index) + self._tail


def _fill_lines(fill: int) -> bytes:
    """`fill` bytes of CRLF-terminated lines, 76 characters each except the last one or two."""
    if fill <= 0:
        return b""
    width = LINE_LEN + 2
    alphabet = _FILL_ALPHABET
    period = len(alphabet)
    doubled = alphabet * (1 + (LINE_LEN // period) + 1)
    block = b"".join(doubled[k : k + LINE_LEN] + b"\r\n" for k in range(period))
    full, rem = divmod(fill, width)
    tail_lines: list[int] = []
    if rem == 1:
        if full == 0:  # too small to end with CRLF: round up to one short line
            return b"x\r\n"
        full -= 1
        tail_lines = [40, width + 1 - 42 - 2]  # 42 + 37 bytes replace one 78-byte line plus one byte
    elif rem >= 2:
        tail_lines = [rem - 2]
    body = (block * (full // period + 1))[: full * width]
    # Short lines continue the same rotation so the text looks the same throughout.
    for n, chars in enumerate(tail_lines):
        k = (full + n) % period
        body += doubled[k : k + chars] + b"\r\n"
    return body


@dataclass
class SmtpClient:
    """One client connection speaking just enough SMTP to push messages through quickly."""

    stream: trio.SocketStream
    reader: ReplyReader
    extensions: dict[str, str] = field(default_factory=dict)
    needs_rset: bool = False

    @classmethod
    async def connect(cls, host: str, port: int) -> tuple[SmtpClient, Reply]:
        stream = await trio.open_tcp_stream(host, port)
        client = cls(stream, ReplyReader(stream))
        try:
            banner = await client.reader.read_reply()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return client, banner

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    async def command(self, line: str) -> Reply:
        await self.stream.send_all(line.encode("utf-8") + b"\r\n")
        return await self.reader.read_reply()

    async def ehlo(self, name: str) -> Reply:
        reply = await self.command(f"EHLO {name}")
        if reply.positive:
            self.extensions = {}
            for ext in reply.lines[1:]:
                keyword, _, params = ext.partition(" ")
                self.extensions[keyword.upper()] = params
            return reply
        reply = await self.command(f"HELO {name}")
        self.extensions = {}
        return reply

    async def send_message(self, sender: str, recipients: Sequence[str], data: bytes) -> Reply:
        """One transaction; `data` already ends with the `.` line. Returns the reply that decided it."""
        if self.needs_rset:
            await self.command("RSET")
            self.needs_rset = False
        size_param = f" SIZE={len(data) - 3}" if "SIZE" in self.extensions else ""
        mail_cmd = f"MAIL FROM:<{sender}>{size_param}\r\n".encode()
        rcpt_cmds = [f"RCPT TO:<{r}>\r\n".encode() for r in recipients]
        if self.pipelining:
            await self.stream.send_all(mail_cmd + b"".join(rcpt_cmds) + b"DATA\r\n")
            replies = await self.reader.read_replies(2 + len(rcpt_cmds))
            mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
        else:
            await self.stream.send_all(mail_cmd)
            mail_reply = await self.reader.read_reply()
            if not mail_reply.positive:
                self.needs_rset = True
                return mail_reply
            rcpt_replies = []
            for cmd in rcpt_cmds:
                await self.stream.send_all(cmd)
                rcpt_replies.append(await self.reader.read_reply())
            if not any(r.positive for r in rcpt_replies):
                self.needs_rset = True
                return rcpt_replies[0]
            await self.stream.send_all(b"DATA\r\n")
            data_reply = await self.reader.read_reply()
        refusal = mail_reply if not mail_reply.positive else None
        if refusal is None and not any(r.positive for r in rcpt_replies):
            refusal = rcpt_replies[0]
        if data_reply.code != 354:
            self.needs_rset = True
            return refusal or data_reply
        if refusal is not None:
            # A server that says 354 with no valid transaction: end the (empty) data at once.
            await self.stream.send_all(b".\r\n")
            await self.reader.read_reply()
            self.needs_rset = True
            return refusal
        await self.stream.send_all(data)
        final = await self.reader.read_reply()
        if not final.positive:
            self.needs_rset = True
        return final

    async def quit(self) -> None:
        with trio.move_on_after(QUIT_TIMEOUT):
            try:
                await self.command("QUIT")
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, SmtpProtocolError):
                pass

    async def aclose(self) -> None:
        await self.stream.aclose()


@dataclass(frozen=True)
class LoadConfig:
    host: str = "127.0.0.1"
    port: int = 2525
    sessions: int = 20
    messages: int = 5000
    size: int = 4096
    per_session: int = 50
    rcpts: int = 1
    timeout: float = 60.0
    sender: str = "bench@example.com"
    rcpt_domain: str = "example.net"
    helo: str = "loadgen.example.com"

    def validate(self) -> None:
        if not _is_loopback(self.host):
            raise ValueError(f"refusing to load {self.host!r}: only loopback targets are allowed")
        for name in ("sessions", "messages", "per_session", "rcpts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.size < 0 or self.timeout <= 0:
            raise ValueError("size must be >= 0 and timeout > 0")

    def recipients(self) -> list[str]:
        return [f"rcpt{n}@{self.rcpt_domain}" for n in range(1, self.rcpts + 1)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class LoadResult:
    accepted: int
    failed: int
    elapsed: float
    msgs_per_s: float
    p50_ms: float
    p99_ms: float
    message_size: int = 0
    connections: int = 0
    failure_samples: tuple[str, ...] = ()
    # `time.monotonic()` (CLOCK_MONOTONIC, the same clock in every process of the machine) when the run
    # started, and when each message's MAIL was sent (NaN for messages never sent), by message number.
    started_at: float = math.nan
    sent_at: tuple[float, ...] = field(default=(), repr=False)

    def summary(self) -> str:
        text = (
            f"accepted={self.accepted} failed={self.failed} elapsed={self.elapsed:.2f}s "
            f"rate={self.msgs_per_s:.1f} msg/s p50={self.p50_ms:.2f}ms p99={self.p99_ms:.2f}ms "
            f"size={self.message_size}B connections={self.connections}"
        )
        for sample in self.failure_samples:
            text += f"\n  failure: {sample}"
        return text


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (NaN when empty)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class _Run:
    """Shared state of one load run: the message budget and what happened to each message."""

    cfg: LoadConfig
    factory: MessageFactory
    next_index: int = 0
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    connections: int = 0
    failure_samples: list[str] = field(default_factory=list)
    sent_at: list[float] = field(default_factory=list)

    def take(self, count: int) -> range:
        start = self.next_index
        stop = min(self.cfg.messages, start + count)
        self.next_index = stop
        return range(start, stop)

    def fail(self, count: int, why: str) -> None:
        if count <= 0:
            return
        self.failed += count
        if len(self.failure_samples) < MAX_FAILURE_SAMPLES:
            self.failure_samples.append(why)


async def _session_worker(run: _Run) -> None:
    cfg = run.cfg
    recipients = cfg.recipients()
    # No session takes more than its share, so every session gets work even when per_session is large.
    batch_size = min(cfg.per_session, math.ceil(cfg.messages / cfg.sessions))
    while True:
        batch = run.take(batch_size)
        if not batch:
            return
        done = 0
        client: SmtpClient | None = None
        try:
            run.connections += 1
            client, banner = await SmtpClient.connect(cfg.host, cfg.port)
            if not banner.positive:
                run.fail(len(batch), f"banner: {banner}")
                continue
            hello = await client.ehlo(cfg.helo)
            if not hello.positive:
                run.fail(len(batch), f"EHLO/HELO: {hello}")
                continue
            for index in batch:
                data = run.factory.data(index)
                run.sent_at[index] = time.monotonic()
                started = time.perf_counter()
                reply = await client.send_message(cfg.sender, recipients, data)
                latency = time.perf_counter() - started
                done += 1
                if reply.positive:
                    run.latencies.append(latency)
                else:
                    run.fail(1, str(reply))
            await client.quit()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, SmtpProtocolError) as exc:
            run.fail(len(batch) - done, f"{type(exc).__name__}: {exc}")
        finally:
            if client is not None:
                await trio.aclose_forcefully(client.stream)


async def run_load(cfg: LoadConfig) -> LoadResult:
    """Run one bounded load against `cfg.host:cfg.port` and summarise it."""
    cfg.validate()
    factory = MessageFactory(cfg.size, cfg.sender, cfg.recipients(), cfg.helo)
    run = _Run(cfg, factory, sent_at=[math.nan] * cfg.messages)
    started_at = time.monotonic()
    started = time.perf_counter()
    with trio.move_on_after(cfg.timeout) as scope:
        async with trio.open_nursery() as nursery:
            for _ in range(min(cfg.sessions, cfg.messages)):
                nursery.start_soon(_session_worker, run)
    elapsed = time.perf_counter() - started
    accepted = len(run.latencies)
    unanswered = cfg.messages - accepted - run.failed
    if unanswered > 0:
        why = f"timeout after {cfg.timeout:g}s" if scope.cancelled_caught else "not attempted"
        run.fail(unanswered, why)
    latencies = sorted(run.latencies)
    return LoadResult(
        accepted=accepted,
        failed=run.failed,
        elapsed=elapsed,
        msgs_per_s=accepted / elapsed if elapsed > 0 else 0.0,
        p50_ms=percentile(latencies, 50) * 1000.0,
        p99_ms=percentile(latencies, 99) * 1000.0,
        message_size=factory.message_size,
        connections=run.connections,
        failure_samples=tuple(run.failure_samples),
        started_at=started_at,
        sent_at=tuple(run.sent_at),
    )


def run_load_sync(cfg: LoadConfig) -> LoadResult:
    """`run_load` in a fresh trio run, for synchronous callers."""
    return trio.run(run_load, cfg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.smtp_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="loopback address only (127.0.0.1, ::1)")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions")
    p.add_argument("--messages", type=int, default=5000, help="messages in total")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes, headers included")
    p.add_argument("--per-session", type=int, default=50, help="messages per connection")
    p.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    p.add_argument("--timeout", type=float, default=60.0, help="wall-clock limit of the whole run (s)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = LoadConfig(
        host=args.host,
        port=args.port,
        sessions=args.sessions,
        messages=args.messages,
        size=args.size,
        per_session=args.per_session,
        rcpts=args.rcpts,
        timeout=args.timeout,
    )
    try:
        result = run_load_sync(cfg)
    except ValueError as exc:
        print(f"smtp_load: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0 if result.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
