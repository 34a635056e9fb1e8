"""`hedwigpy events [--follow] [--id ID] [--type T] [--json]`: a running daemon's delivery events.

A WebSocket client (trio-websocket) of `WS /v1/events` (`hedwigpy.api._events`), found like the queue
commands find the daemon (`-c FILE`, `$HEDWIG_CONFIG`, ./hedwig.toml; key from `$HEDWIG_API_KEY`).
One line per event: `TIME TYPE ID RECIPIENT CODE TEXT`, or with `--json` the event as the daemon sent it.
Without `--follow` it prints what arrives until `IDLE` seconds pass with nothing new; with it, it runs
until interrupted (or the daemon goes away).

Exit codes: 0 done (interrupted, with --follow); 1 the daemon refused (bad key, bad filter: its detail
is printed); 2 no daemon answers, the stream broke, or the configuration cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from . import __version__
from .cli_queue import (
    ENV_API_KEY,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    CliError,
    _config_option,
    _problem_detail,
    api_base_url,
    run_command,
)

IDLE = 1.0  # seconds without an event before `events` (without --follow) is done
CONNECT_TIMEOUT = 10.0
EVENT_TYPES = ("received", "delivered", "deferred", "bounced", "held", "released", "deleted")

Event = dict[str, Any]


def events_url(base_url: str, ids: list[str], types: list[str]) -> str:
    """`ws://HOST:PORT/v1/events?id=...&type=...` for the API at `base_url` (http://...)."""
    query = urlencode([("id", i) for i in ids] + [("type", t) for t in types])
    return "ws" + base_url.removeprefix("http") + "/v1/events" + (f"?{query}" if query else "")


def _field(value: object) -> str:
    text = " ".join(str(value).split()) if value is not None and value != "" else "-"
    return text


def format_event(event: Event) -> str:
    """`TIME TYPE ID RECIPIENT CODE TEXT`; received events show their recipients and sender."""
    at = event.get("at")
    when = "-"
    if isinstance(at, int | float):
        when = datetime.fromtimestamp(at).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    kind = str(event.get("type", "?"))
    if kind == "dropped":
        n = event.get("count", 0)
        return f"{when} dropped - - - {n} event{'' if n == 1 else 's'} lost (the client fell behind)"
    recipient = event.get("recipient")
    if recipient is None and isinstance(event.get("recipients"), list):
        recipient = ",".join(str(r) for r in event["recipients"])
    code = event.get("code")
    if kind == "received":
        text = f"from <{event.get('sender', '')}>"
    else:
        parts = [event.get("enhanced"), event.get("text")]
        text = " ".join(" ".join(str(p).split()) for p in parts if p)
        if event.get("host"):
            text = f"{text} ({event['host']})" if text else str(event["host"])
    return " ".join(
        [when, kind, _field(event.get("id")), _field(recipient), _field(code), text or "-"]
    ).rstrip()


def _show(message: str | bytes, as_json: bool) -> None:
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    if as_json:
        print(text, flush=True)
        return
    try:
        event = json.loads(text)
    except ValueError:
        print(text, flush=True)
        return
    print(format_event(event) if isinstance(event, dict) else text, flush=True)


async def _pump(ws: WebSocketConnection, follow: bool, as_json: bool) -> None:
    while True:
        if follow:
            message = await ws.get_message()
        else:
            with trio.move_on_after(IDLE):
                message = await ws.get_message()
                _show(message, as_json)
                continue
            return
        _show(message, as_json)


async def stream_events(url: str, api_key: str | None, follow: bool, as_json: bool) -> None:
    headers = [(b"User-Agent", f"hedwigpy/{__version__}".encode())]
    if api_key:
        headers.append((b"Authorization", f"Bearer {api_key}".encode()))
    base = url.split("/v1/", 1)[0].replace("ws", "http", 1)
    unreachable = CliError(f"no hedwigpy daemon answers at {base} (is it running?)", EXIT_UNREACHABLE)
    try:
        async with open_websocket_url(
            url, extra_headers=headers, connect_timeout=CONNECT_TIMEOUT, disconnect_timeout=1
        ) as ws:
            try:
                await _pump(ws, follow, as_json)
            except ConnectionClosed as exc:
                raise CliError(
                    f"the daemon at {base} closed the event stream ({exc.reason})", EXIT_UNREACHABLE
                ) from None
    except ConnectionRejected as exc:
        detail = _problem_detail(exc.status_code, "refused", exc.body or b"")
        raise CliError(detail, EXIT_REFUSED) from None
    except (HandshakeError, OSError):
        raise unreachable from None
    except BaseExceptionGroup as group:  # trio-websocket's nursery may wrap a connect failure
        if group.subgroup((HandshakeError, OSError)) is not None and group.subgroup(CliError) is None:
            raise unreachable from None
        raise


def _cmd_events(args: argparse.Namespace) -> None:
    url = events_url(api_base_url(args.config), args.ids, args.types)
    try:
        trio.run(stream_events, url, os.environ.get(ENV_API_KEY) or None, args.follow, args.json)
    except KeyboardInterrupt:
        pass  # --follow ends when interrupted
    except BaseExceptionGroup as group:
        errors = group.subgroup(CliError)
        if errors is not None:
            first = errors.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        raise


def add_events_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`events [--follow] [--id ID]... [--type T]... [--json]` (INTERFACE.md, CLI)."""
    events = subparsers.add_parser("events", help="stream delivery events from a running daemon")
    events.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help=f"run until interrupted (default: stop after {IDLE:g}s idle)",
    )
    events.add_argument(
        "--id", dest="ids", action="append", default=[], metavar="ID", help="only this message (repeatable)"
    )
    events.add_argument(
        "--type",
        "--state",
        dest="types",
        action="append",
        default=[],
        choices=EVENT_TYPES,
        metavar="T",
        help=f"only events of this type (repeatable): {', '.join(EVENT_TYPES)}",
    )
    events.add_argument("--json", action="store_true", help="print each event as the daemon's JSON")
    _config_option(events)
    events.set_defaults(func=run_command(_cmd_events))
