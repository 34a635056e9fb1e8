"""`WS /v1/events` and `hedwigpy events` against the real daemon (issue 6): a trio-websocket client and the
CLI (`events --follow --json`, a subprocess) subscribe, a message goes in over SMTP and is delivered to an
aiosmtpd upstream behind the loopback DNS MX, and both see it received, then delivered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import HOST1, MX1, SENDER, publish, run, send
from .queueing import hedwig
from .upstream import UpstreamPool

pytestmark = pytest.mark.timeout(60)

Event = dict[str, Any]


def subscribed(daemon: Daemon) -> int:
    return sum(1 for e in daemon.log_events() if e.get("event") == "events subscribed")


async def until(condition: Callable[[], object], what: str) -> None:
    for _ in range(500):  # 10 s
        if condition():
            return
        await trio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def lines_of(stream: trio.abc.ReceiveStream, into: list[Event], done: trio.Event) -> None:
    """Parse the CLI's JSON lines into `into`; set `done` when the stream ends."""
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        into.extend(json.loads(line) for line in complete if line.strip())
    done.set()


def of(events: list[Event], message_id: str) -> list[tuple[str, object]]:
    return [(e["type"], e.get("recipient")) for e in events if e.get("id") == message_id]


async def test_clients_see_a_message_received_then_delivered(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = await trio.to_thread.run_sync(lambda: run(tmp_path, config, daemon_factory, dns, upstreams))
    url = f"ws://{config['http']['addr']}/v1/events"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEDWIG_")}
    cli_events: list[Event] = []
    cli_done = trio.Event()
    cli = await trio.lowlevel.open_process(
        [sys.executable, "-m", "hedwigpy", "events", "--follow", "--json", "-c", str(d.config_path)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    try:
        async with open_websocket_url(url) as ws, trio.open_nursery() as nursery:
            assert cli.stdout is not None
            nursery.start_soon(lines_of, cli.stdout, cli_events, cli_done)
            await until(lambda: subscribed(d) == 2, "both clients to subscribe")

            rcpts = ["ann@example.net", "bob@example.net"]
            msg_id = await trio.to_thread.run_sync(lambda: send(d, rcpts, "watched"))
            seen: list[Event] = []
            with trio.fail_after(10):
                while sum(e["type"] == "delivered" for e in seen if e["id"] == msg_id) < 2:
                    seen.append(json.loads(await ws.get_message()))
            received, *delivered = [e for e in seen if e["id"] == msg_id]
            assert received["type"] == "received" and received["sender"] == SENDER
            assert received["recipients"] == rcpts and received["listener"] == "relay"
            assert sorted(e["recipient"] for e in delivered) == rcpts
            for e in delivered:
                assert e["type"] == "delivered" and e["code"] == 250 and e["enhanced"] == "2.0.0"
                assert e["host"] == HOST1 and isinstance(e["at"], float)
            assert [t.rcpt_tos for t in mx1.transactions] == [rcpts]

            await until(lambda: len(of(cli_events, msg_id)) == 3, "the CLI to print the same events")
            assert sorted(of(cli_events, msg_id), key=str) == sorted(of(seen, msg_id), key=str)
            cli.send_signal(signal.SIGINT)  # --follow runs until interrupted
            with trio.fail_after(10):
                assert await cli.wait() == 0
                await cli_done.wait()
    finally:
        if cli.returncode is None:
            cli.kill()

    # without --follow: nothing new for a second, and it is done (past events are not replayed)
    done = await trio.to_thread.run_sync(lambda: hedwig(d, "events", "--id", msg_id))
    assert (done.returncode, done.stdout) == (0, "")
    await trio.to_thread.run_sync(d.stop)
    done = await trio.to_thread.run_sync(lambda: hedwig(d, "events"))
    assert done.returncode == 2 and "no hedwigpy daemon answers at http://" in done.stderr
