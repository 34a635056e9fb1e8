"""A counting SMTP sink on loopback: accepts and discards every message, and counts what arrived.

    python -m bench.count_sink --port 10026      # then type commands on stdin (below); EOF stops it

The relay benchmark's upstream. Both MTAs relay into it, so both are measured against the same peer. It
counts connections (and the most open at once), transactions and bytes, and for each message of
`bench.smtp_load` (found by its `Message-ID: <bench.NUMBER@...>`) records the message number and the
`time.monotonic()` at which the end of data arrived, so the load generator's send times give end-to-end
latencies (CLOCK_MONOTONIC is the same clock in every process).

It speaks just enough ESMTP (EHLO with PIPELINING, SIZE and 8BITMIME; MAIL, RCPT, DATA, RSET, NOOP, QUIT),
answers pipelined commands in one write, and reads with large `receive_some` calls and `bytes.find`.
Memory is bounded: a command line longer than 64 KiB closes the connection, and message data is dropped
as it streams past (only its first 16 KiB are kept until the message number is found).

Control: one command per line on stdin, one JSON line answer on stdout:
`stats` → counters; `reset` → zero every counter; `arrivals` → `[[number, monotonic time], ...]`.
The first line on stdout is `{"ready": PORT}` once the listener is bound. `CountingSink` runs it as a
subprocess and speaks this for the benchmarks.
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import trio

from .postfix_peer import LOOPBACK, tree_cpu_seconds

READ_SIZE = 65536
MAX_LINE = 65536
HEAD_SCAN = 16384  # the message number is looked for in the first bytes of the data (the headers)
TAG = b"<bench."
TAG_DIGITS = 24
COMMAND_TIMEOUT = 300.0

BANNER = b"220 count-sink ESMTP\r\n"
EHLO_REPLY = b"250-count-sink\r\n250-PIPELINING\r\n250-SIZE 0\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
REPLIES = {
    b"HELO": b"250 count-sink\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}
DATA_REPLY = b"354 End data with <CR><LF>.<CR><LF>\r\n"
QUEUED_REPLY = b"250 2.0.0 Ok: discarded\r\n"
QUIT_REPLY = b"221 2.0.0 Bye\r\n"
UNKNOWN_REPLY = b"502 5.5.2 Error: command not recognized\r\n"
END_OF_DATA = b"\r\n.\r\n"


@dataclass
class Counters:
    connections: int = 0
    active: int = 0
    max_active: int = 0
    transactions: int = 0  # MAIL commands
    messages: int = 0  # ends of data
    untagged: int = 0  # messages without a bench message number
    bytes: int = 0  # everything read from clients
    first: float | None = None  # monotonic time of the first and the last end of data
    last: float | None = None
    arrivals: list[tuple[int, float]] = field(default_factory=list)
    numbers: set[int] = field(default_factory=set)
    per_connection: list[int] = field(default_factory=list)  # messages on each closed connection

    def stats(self) -> dict[str, Any]:
        closed = self.per_connection
        return {
            "connections": self.connections,
            "active": self.active,
            "max_active": self.max_active,
            "transactions": self.transactions,
            "messages": self.messages,
            "tagged": len(self.arrivals),
            "unique": len(self.numbers),
            "untagged": self.untagged,
            "bytes": self.bytes,
            "first": self.first,
            "last": self.last,
            "closed": len(closed),
            "max_per_connection": max(closed, default=0),
            "min_per_connection": min(closed, default=0),
        }

    def reset(self) -> None:
        """Zero everything but the connections open now."""
        active = self.active
        self.__init__()  # type: ignore[misc]
        self.active = self.max_active = active

    def arrived(self, number: int | None, at: float) -> None:
        self.messages += 1
        if self.first is None:
            self.first = at
        self.last = at
        if number is None:
            self.untagged += 1
        else:
            self.arrivals.append((number, at))
            self.numbers.add(number)


def _message_number(buf: bytearray, start: int, stop: int) -> int | None:
    i = buf.find(TAG, start, stop)
    if i < 0:
        return None
    j = i + len(TAG)
    k = buf.find(b"@", j, j + TAG_DIGITS)
    digits = bytes(buf[j:k]) if k > j else b""
    return int(digits) if digits.isdigit() else None


async def handle_connection(stream: trio.SocketStream, counters: Counters) -> None:
    counters.connections += 1
    counters.active += 1
    counters.max_active = max(counters.max_active, counters.active)
    delivered = 0
    buf = bytearray()
    pos = 0
    out: list[bytes] = [BANNER]

    async def more() -> bool:
        """Flush pending replies, then read; False at end of stream."""
        if out:
            await stream.send_all(b"".join(out))
            out.clear()
        with trio.fail_after(COMMAND_TIMEOUT):
            data = await stream.receive_some(READ_SIZE)
        if not data:
            return False
        counters.bytes += len(data)
        buf.extend(data)
        return True

    try:
        while True:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                del buf[:pos]
                pos = 0
                if len(buf) > MAX_LINE or not await more():
                    return
                continue
            verb = bytes(buf[pos : pos + 4]).upper()
            pos = end + 2
            if verb == b"DATA":
                out.append(DATA_REPLY)
                # The CRLF that ended the DATA line is still in buf, so "\r\n.\r\n" also finds empty data.
                data_start = pos
                scan = pos - 2
                number: int | None = None
                head_done = False
                while True:
                    stop = buf.find(END_OF_DATA, scan)
                    if not head_done and (stop >= 0 or len(buf) - data_start >= HEAD_SCAN):
                        limit = stop if stop >= 0 else len(buf)
                        number = _message_number(buf, data_start, min(limit, data_start + HEAD_SCAN))
                        head_done = True
                    if stop >= 0:
                        break
                    # Keep the last 4 bytes (a terminator may straddle reads) and, until the message
                    # number was looked for, the head of the data.
                    keep = data_start - 2 if not head_done else len(buf) - 4
                    cut = max(0, min(keep, len(buf) - 4))
                    del buf[:cut]
                    data_start -= cut
                    scan = max(0, len(buf) - 4)
                    if not await more():
                        return
                counters.arrived(number, time.monotonic())
                delivered += 1
                pos = stop + len(END_OF_DATA)
                out.append(QUEUED_REPLY)
            elif verb == b"EHLO":
                out.append(EHLO_REPLY)
            elif verb == b"QUIT":
                out.append(QUIT_REPLY)
                await stream.send_all(b"".join(out))
                return
            else:
                if verb == b"MAIL":
                    counters.transactions += 1
                out.append(REPLIES.get(verb, UNKNOWN_REPLY))
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, OSError):
        pass
    finally:
        counters.active -= 1
        counters.per_connection.append(delivered)
        await trio.aclose_forcefully(stream)


async def serve_control(counters: Counters) -> None:
    """Answer `stats`, `reset` and `arrivals` from stdin; return at end of input."""
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    stdout = trio.lowlevel.FdStream(sys.stdout.fileno())
    buf = b""
    while True:
        data = await stdin.receive_some(4096)
        if not data:
            return
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            cmd = line.strip().decode(errors="replace")
            answer: Any
            if cmd == "stats":
                answer = counters.stats()
            elif cmd == "reset":
                counters.reset()
                answer = {"ok": True}
            elif cmd == "arrivals":
                answer = counters.arrivals
            else:
                answer = {"error": f"unknown command {cmd!r}"}
            await stdout.send_all(json.dumps(answer, separators=(",", ":")).encode() + b"\n")


async def run_sink(host: str, port: int, backlog: int) -> None:
    counters = Counters()
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:

        async def handler(stream: trio.SocketStream) -> None:
            await handle_connection(stream, counters)

        nursery.start_soon(trio.serve_listeners, handler, listeners)
        sys.stdout.write(json.dumps({"ready": bound}) + "\n")
        sys.stdout.flush()
        await serve_control(counters)
        nursery.cancel_scope.cancel()


# ----------------------------------------------------------------------------------------------------
# The sink as a subprocess of a benchmark

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SinkStats:
    connections: int
    max_active: int
    transactions: int
    messages: int
    tagged: int
    unique: int
    untagged: int
    bytes: int
    first: float | None
    last: float | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SinkStats:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    @property
    def duplicates(self) -> int:
        return self.tagged - self.unique


class CountingSink:
    """`python -m bench.count_sink` on 127.0.0.1:<port> in its own process; a context manager.

    The sink exits when its stdin closes, so it never outlives the benchmark that started it.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr = ""

    def start(self, timeout: float = 15.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.count_sink", "--host", LOOPBACK, "--port", str(self.port)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C meant for the benchmark reaches the sink only through stop()
        )
        ready = self._read_line(timeout)
        if ready.get("ready") != self.port:
            raise RuntimeError(f"count_sink did not start: {ready}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _pipes(self) -> tuple[IO[bytes], IO[bytes]]:
        if self.proc is None or self.proc.stdin is None or self.proc.stdout is None:
            raise RuntimeError("count_sink is not running")
        return self.proc.stdin, self.proc.stdout

    def _read_line(self, timeout: float) -> Any:
        _, stdout = self._pipes()
        ready, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise RuntimeError(f"count_sink gave no answer within {timeout:g}s: {self.stderr[-500:]}")
        return json.loads(line)

    def ask(self, command: str, timeout: float = 30.0) -> Any:
        stdin, _ = self._pipes()
        stdin.write(command.encode() + b"\n")
        stdin.flush()
        return self._read_line(timeout)

    def reset(self) -> None:
        self.ask("reset")

    def stats(self) -> SinkStats:
        return SinkStats.from_json(self.ask("stats"))

    def arrivals(self) -> dict[int, float]:
        """Message number → monotonic time of its first arrival."""
        first: dict[int, float] = {}
        for number, at in self.ask("arrivals"):
            first.setdefault(int(number), float(at))
        return first

    def cpu_seconds(self) -> float:
        pid = self.pid
        return tree_cpu_seconds(pid) if pid is not None else 0.0

    def wait_for(
        self, count: int, timeout: float, stall: float, interval: float = 0.05
    ) -> tuple[SinkStats, str]:
        """Poll until `count` distinct bench messages arrived; give up after `timeout` seconds in all or
        `stall` seconds without a new one. Returns the last stats and why it stopped ("" when complete)."""
        started = last_progress = time.monotonic()
        stats = self.stats()
        seen = stats.unique
        while stats.unique < count:
            now = time.monotonic()
            if now - started >= timeout:
                return stats, f"timeout after {timeout:g}s"
            if now - last_progress >= stall:
                return stats, f"stalled {stall:g}s without a delivery"
            time.sleep(interval)
            stats = self.stats()
            if stats.unique > seen:
                seen, last_progress = stats.unique, time.monotonic()
        return stats, ""

    def stop(self) -> str:
        """Close its stdin (it exits), kill it if it does not; returns what it wrote on stderr."""
        proc, self.proc = self.proc, None
        if proc is None:
            return self.stderr
        if proc.stdin is not None:
            try:
                proc.stdin.close()
            except OSError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            self.stderr = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
        return self.stderr

    def __enter__(self) -> CountingSink:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.count_sink", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="loopback only")
    p.add_argument("--port", type=int, default=10026, help="0 = any free port")
    p.add_argument("--backlog", type=int, default=1024)
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        print("count_sink: loopback only", file=sys.stderr)
        return 2
    try:
        trio.run(run_sink, args.host, args.port, args.backlog)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
