"""The floor under `bench.rest`: the same client against an empty quart-trio handler on hypercorn.

    python -m bench.rest_floor [--clients 50] [--messages 5000] [--size 4096] [--repeat 3]

The handler reads the body and answers a small JSON document with 202: no parsing, no spool, no
delivery. What it sustains, and the server CPU it spends per request, bound what any route written on
this framework (the shape the project fixed: quart-trio served by hypercorn in one process) can do on
this machine, so `bench.rest`'s figures can be read against it.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

import trio

from .hedwig_peer import REPO
from .postfix_peer import pick_port
from .report import machine_line, markdown_table, median, num, publish
from .rest import Run, load
from .smtp_load import percentile

RESULTS = REPO / "bench" / "results" / "rest_floor.md"

SERVER = """
import sys, trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

app = QuartTrio("floor")

@app.post("/v1/messages")
async def post():
    body = await request.get_data()
    return {"id": "0", "status": "queued", "size": len(body)}, 202

config = Config()
config.bind = [f"127.0.0.1:{sys.argv[1]}"]
config.accesslog = config.errorlog = None
trio.run(serve, app, config)
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(opts: argparse.Namespace, repeat: int) -> tuple[Run, float]:
    """A run and the server's CPU milliseconds per request."""
    port = pick_port(18025)
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the floor server did not start")
            time.sleep(0.1)
        run = Run("floor", repeat)
        before = cpu_seconds(server.pid)
        trio.run(load, port, opts.clients, opts.messages, opts.size, run)
        cpu_ms = (cpu_seconds(server.pid) - before) * 1000 / max(run.ok, 1)
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"  floor ok={run.ok} failed={run.failed} {num(run.rate)} req/s "
        f"p50={num(percentile(run.latencies_ms, 50), 2)}ms server CPU {num(cpu_ms, 2)} ms/req",
        flush=True,
    )
    return run, cpu_ms


def render(opts: argparse.Namespace, runs: Sequence[tuple[Run, float]]) -> str:
    rows = [
        [
            str(r.repeat),
            str(r.ok),
            str(r.failed),
            num(r.rate),
            num(percentile(r.latencies_ms, 50), 2),
            num(percentile(r.latencies_ms, 99), 2),
            num(cpu, 2),
        ]
        for r, cpu in runs
    ]
    medians = [
        str(len(runs)),
        num(median([r.rate for r, _ in runs])),
        num(median([percentile(r.latencies_ms, 50) for r, _ in runs]), 2),
        num(median([cpu for _, cpu in runs]), 2),
    ]
    return "\n".join(
        [
            "# The framework floor: an empty quart-trio handler on hypercorn, the bench.rest client",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            machine_line(),
            f"- load: {opts.messages} POSTs of ~{opts.size} B raw messages (the bench.rest requests), "
            f"{opts.clients} keep-alive HTTP/1.1 clients, {opts.repeat} repeat(s)",
            "- the handler reads the body and answers 202 with a small JSON document: no parsing, no spool, "
            "no delivery",
            "",
            "## Medians",
            "",
            markdown_table(["runs", "req/s", "p50 ms", "server CPU ms/req"], [medians]),
            "",
            "## Runs",
            "",
            markdown_table(["run", "ok", "failed", "req/s", "p50 ms", "p99 ms", "server CPU ms/req"], rows),
            "",
            "Read `bench/results/rest.md` against this: the server CPU per request here is spent before any "
            "line of hedwigpy runs. The client and the server share the two CPUs.",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog="python -m bench.rest_floor", description=doc.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    opts = p.parse_args(argv)
    runs = []
    for repeat in range(1, opts.repeat + 1):
        print(f"run {repeat}/{opts.repeat}", flush=True)
        runs.append(one_run(opts, repeat))
    publish(render(opts, runs), opts.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
