"""REST submission rate: `POST /v1/messages` at N concurrent clients, queued (durable) and cut-through.

    python -m bench.rest [--clients 50] [--messages 5000] [--size 4096] [--repeat 3]

Each client is a keep-alive HTTP/1.1 connection written here over trio (a general-purpose client such as
httpx costs more CPU per request than the daemon does, and would measure itself). Every request posts a
raw message (base64) to one recipient; the daemon relays to a counting sink on loopback. "queued" runs with
`cut_through = false` (202 after the spool's fsync); "cut-through" with `cut_through = true` (200 after the
sink's 250). Latency is per request, from the first byte written to the whole answer read.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import trio

from .count_sink import CountingSink
from .hedwig_peer import REPO, HedwigDaemon
from .postfix_peer import pick_port
from .report import machine_line, markdown_table, median, num, publish, run_interruptibly
from .smtp_load import percentile

RESULTS = REPO / "bench" / "results" / "rest.md"
MODES = {"queued": {"cut_through": False}, "cut-through": {"cut_through": True}}


@dataclass
class Run:
    mode: str
    repeat: int
    ok: int = 0
    failed: int = 0
    elapsed: float = math.nan
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    delivered: int = 0

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else math.nan


def request_bytes(port: int, n: int, size: int) -> bytes:
    headers = (
        f"From: <bench@example.org>\r\nTo: <r@example.net>\r\nSubject: rest {n}\r\n"
        f"Message-ID: <bench.{n:010d}@bench.local>\r\n\r\n"  # the sink counts bench.NUMBER ids
    )
    body = ("x" * 76 + "\r\n") * max(0, (size - len(headers)) // 78)
    raw = base64.b64encode((headers + body).encode()).decode()
    payload = json.dumps({"envelope_from": "bench@example.org", "recipients": ["r@example.net"], "raw": raw})
    data = payload.encode()
    head = (
        f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def read_response(stream: trio.SocketStream, buf: bytearray) -> int:
    """Read one HTTP/1.1 response (Content-Length bodies only); returns the status code."""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("closed mid-response")
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end]).decode("latin-1")
    status = int(head.split(" ", 2)[1])
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(buf) < end + length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buf += chunk
    del buf[: end + length]
    return status


async def load(port: int, clients: int, messages: int, size: int, run: Run) -> None:
    requests = [request_bytes(port, n, size) for n in range(messages)]
    next_index = iter(range(messages))

    async def client() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buf = bytearray()
        async with stream:
            for n in next_index:
                t0 = time.perf_counter()
                await stream.send_all(requests[n])
                status = await read_response(stream, buf)
                run.latencies_ms.append((time.perf_counter() - t0) * 1000)
                run.statuses[status] = run.statuses.get(status, 0) + 1
                if status in (200, 202):
                    run.ok += 1
                else:
                    run.failed += 1

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(client)
    run.elapsed = time.perf_counter() - started
    run.latencies_ms.sort()


def one_run(opts: argparse.Namespace, mode: str, repeat: int) -> Run:
    sink_port = pick_port(opts.sink_port)
    run = Run(mode, repeat)
    with (
        CountingSink(sink_port) as sink,
        HedwigDaemon(sink_port=sink_port, delivery=dict(MODES[mode])) as daemon,
    ):
        trio.run(load, daemon.http_port, opts.clients, opts.messages, opts.size, run)
        stats, _ = sink.wait_for(run.ok, 120.0, 30.0)
        run.delivered = stats.unique
    print(
        f"  {mode:11} ok={run.ok} failed={run.failed} {num(run.rate)} msg/s "
        f"p50={num(percentile(run.latencies_ms, 50), 2)}ms p99={num(percentile(run.latencies_ms, 99), 2)}ms "
        f"statuses={run.statuses} delivered={run.delivered}",
        flush=True,
    )
    return run


def render(opts: argparse.Namespace, runs: Sequence[Run]) -> str:
    med_rows = []
    for mode in MODES:
        sel = [r for r in runs if r.mode == mode]
        if sel:
            med_rows.append(
                [
                    mode,
                    str(len(sel)),
                    num(median([r.rate for r in sel])),
                    num(median([percentile(r.latencies_ms, 50) for r in sel]), 2),
                    num(median([percentile(r.latencies_ms, 99) for r in sel]), 2),
                    str(sum(r.failed for r in sel)),
                    str(sum(r.ok - r.delivered for r in sel)),
                ]
            )
    run_rows = [
        [
            str(r.repeat),
            r.mode,
            str(r.ok),
            str(r.failed),
            num(r.rate),
            num(percentile(r.latencies_ms, 50), 2),
            num(percentile(r.latencies_ms, 99), 2),
            " ".join(f"{k}:{v}" for k, v in sorted(r.statuses.items())),
            str(r.delivered),
        ]
        for r in runs
    ]
    return "\n".join(
        [
            f"# REST submission: POST /v1/messages at {opts.clients} concurrent clients",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            machine_line(),
            f"- load: {opts.messages} raw messages of ~{opts.size} B, one recipient each, {opts.clients} "
            "keep-alive HTTP/1.1 clients (bench/rest.py), "
            f"{opts.repeat} repeat(s); the daemon relays to bench.count_sink on loopback",
            "- queued: `cut_through = false` (202 after file and directory fsync); cut-through: "
            "`cut_through = true` (200 after the sink's 250, nothing written)",
            "",
            "## Medians",
            "",
            markdown_table(["mode", "runs", "msg/s", "p50 ms", "p99 ms", "failed", "undelivered"], med_rows),
            "",
            "## Runs",
            "",
            markdown_table(
                ["run", "mode", "ok", "failed", "msg/s", "p50 ms", "p99 ms", "statuses", "at the sink"],
                run_rows,
            ),
            "",
            "Target (issue 6): at least 1,000 messages/s queued (durable) on this 2-core machine. The "
            "client, the daemon and the sink share the two CPUs.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rest", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--mode", choices=[*MODES, "both"], default="both")
    p.add_argument("--sink-port", type=int, default=10036)
    p.add_argument("--out", default=str(RESULTS))
    opts = p.parse_args(argv)
    modes = list(MODES) if opts.mode == "both" else [opts.mode]

    def body() -> int:
        runs = []
        for repeat in range(1, opts.repeat + 1):
            print(f"run {repeat}/{opts.repeat}", flush=True)
            for mode in modes:
                runs.append(one_run(opts, mode, repeat))
        publish(render(opts, runs), opts.out)
        return 0 if all(r.failed == 0 for r in runs) else 1

    return run_interruptibly(body)


if __name__ == "__main__":
    sys.exit(main())
