"""`hedwigpy queue ...` and `hedwigpy send`: the operator's commands that talk to a running daemon.

Queue commands act through the daemon's admin API (`[http].addr`, see `hedwigpy.api.app`) with the
stdlib's urllib, so the daemon's view of its queue stays the only one. An API key, when the daemon
wants one, comes from the environment variable `HEDWIG_API_KEY`.

Exit codes: 0 done; 1 the daemon refused (unknown id, wrong state, bad key: its detail is printed);
2 no daemon answers, or the configuration cannot be read.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from . import __version__
from ._units import HostPort

ENV_API_KEY = "HEDWIG_API_KEY"
ENV_CONFIG = "HEDWIG_CONFIG"
DEFAULT_CONFIG = "hedwig.toml"
TIMEOUT = 30.0  # seconds; listing a large queue takes a while

EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2

_MARKS = {"held": "!", "bounced": "#", "corrupt": "?"}
_DONE = {"retry": "due now", "hold": "held", "release": "released", "delete": "deleted"}
_WILDCARD = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}

Json = Any


class CliError(Exception):
    """A failure the command reports on stderr and turns into its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


# --- finding and calling the daemon ------------------------------------------------------------------


def load_target_config(path: str | None) -> Any:
    """The daemon's `Config` from `-c FILE`, else `$HEDWIG_CONFIG`, else ./hedwig.toml; None when no
    file was named and the default one does not exist (every setting then has its default)."""
    from .config import ConfigError, load_config

    explicit = path if path is not None else os.environ.get(ENV_CONFIG)
    chosen = explicit or DEFAULT_CONFIG
    if explicit is None and not Path(chosen).exists():
        return None
    try:
        return load_config(chosen)
    except ConfigError as exc:
        raise CliError("\n".join(f"{chosen}: {err}" for err in exc.errors), EXIT_UNREACHABLE) from None


def connect_addr(addr: HostPort) -> HostPort:
    """Where a local client reaches a server bound to `addr` (a wildcard bind means loopback)."""
    return HostPort(_WILDCARD.get(addr.host, addr.host), addr.port)


def api_base_url(config_path: str | None) -> str:
    from .config import DEFAULT_HTTP_ADDR

    config = load_target_config(config_path)
    addr = connect_addr(DEFAULT_HTTP_ADDR if config is None else config.http.addr)
    if addr.port == 0:
        raise CliError(
            "[http].addr has port 0 (chosen at start-up): cannot find the daemon", EXIT_UNREACHABLE
        )
    return f"http://{addr}"


class AdminClient:
    """A blocking client of the admin API; proxies from the environment are ignored (it talks to the
    local daemon)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = TIMEOUT) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(self, method: str, path: str) -> Json:
        """The decoded JSON answer; raises CliError (exit 1 with the problem's detail, or exit 2 when
        nothing answers)."""
        headers = {"Accept": "application/json", "User-Agent": f"hedwigpy/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            with exc:
                raise CliError(_problem_detail(exc.code, exc.reason, exc.read()), EXIT_REFUSED) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            raise self.unreachable() from None
        try:
            return json.loads(body)
        except ValueError:
            raise CliError(f"{self.base_url} answered with something other than JSON", EXIT_REFUSED) from None

    def unreachable(self) -> CliError:
        return CliError(f"no hedwigpy daemon answers at {self.base_url} (is it running?)", EXIT_UNREACHABLE)


def _problem_detail(status: int, reason: object, body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and doc.get("detail"):
        return f"{doc['detail']} (HTTP {status})"
    return f"HTTP {status} {reason}"


def client_for(args: argparse.Namespace) -> AdminClient:
    return AdminClient(api_base_url(args.config), os.environ.get(ENV_API_KEY) or None)


# --- rendering ----------------------------------------------------------------------------------------


def _local(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).astimezone()
    except ValueError:
        return None


def _arrival(text: str | None) -> str:
    dt = _local(text)
    return "-" if dt is None else f"{dt:%a %b} {dt.day:>2} {dt:%H:%M:%S}"


def _when(text: str | None) -> str:
    dt = _local(text)
    return "-" if dt is None else f"{dt:%Y-%m-%d %H:%M:%S %z}"


def _sender(address: str) -> str:
    return address or "MAILER-DAEMON"


def describe_reply(last: Json) -> str:
    """A recipient's last answer the way postqueue shows it: `host H said: 451 4.7.1 text`."""
    code, enhanced, text, host = last.get("code"), last.get("enhanced"), last.get("text"), last.get("host")
    if code:
        reply = " ".join(str(part) for part in (code, enhanced, text) if part)
        return f"host {host} said: {reply}" if host else reply
    return f"{host}: {text}" if host else str(text)


def format_queue(listing: Json) -> str:
    """postqueue -p: a header, then per message its id (marked ! held, # bounced, ? corrupt), size,
    arrival time and sender, its undelivered recipients below with their last reply, then a total."""
    messages = listing.get("messages", [])
    if not messages:
        return "Mail queue is empty"
    indent = " " * 57  # under the sender
    lines = [f"{'-Queue ID-':<25} {'--Size--':>8} {'----Arrival Time----':>20}  -Sender/Recipient-------"]
    total = 0
    for m in messages:
        total += int(m.get("size", 0))
        qid = m["id"] + _MARKS.get(m.get("state", ""), "")
        lines.append(
            f"{qid:<25} {m.get('size', 0):>8} {_arrival(m.get('received_at')):>20}  {_sender(m['from'])}"
        )
        status = m.get("status")
        if status is None:
            lines.extend(indent + rcpt for rcpt in m.get("recipients", []))
        else:
            for rcpt in status.get("recipients", []):
                if rcpt.get("state") == "delivered":
                    continue
                if rcpt.get("last"):
                    lines.append(f"{indent}({describe_reply(rcpt['last'])})")
                lines.append(indent + rcpt["address"])
        lines.append("")
    n = len(messages)
    legend = {mark for state, mark in _MARKS.items() if any(m.get("state") == state for m in messages)}
    lines.append(f"-- {(total + 1023) // 1024} Kbytes in {n} Request{'' if n == 1 else 's'}.")
    if legend:
        names = ", ".join(f"{mark} {state}" for state, mark in _MARKS.items() if mark in legend)
        lines.append(f"   ({names})")
    return "\n".join(lines)


def format_message(doc: Json) -> str:
    """`queue show`: the envelope, where the message stands, and each recipient's last answer."""
    status = doc.get("status") or {}
    origin = [f"via {doc['listener']}" if doc.get("listener") else ""]
    origin.append(f"from {doc['client_addr']}" if doc.get("client_addr") else "")
    origin.append(f"as {doc['auth_user']}" if doc.get("auth_user") else "")
    rows = [
        ("id", doc["id"]),
        ("state", doc.get("state", "")),
        ("from", f"<{doc.get('from', '')}>"),
        ("received", " ".join([_when(doc.get("received_at")), *filter(None, origin)])),
        ("size", f"{doc.get('size', 0)} bytes"),
        ("attempts", str(status.get("attempts", 0))),
        ("next attempt", _when(status.get("next_attempt"))),
    ]
    if status.get("bounce_sent"):
        rows.append(("bounce", "sent"))
    lines = [f"{name + ':':<14}{value}" for name, value in rows]
    lines.append("recipients:")
    for rcpt in status.get("recipients", []):
        attempts = rcpt.get("attempts", 0)
        lines.append(
            f"  {rcpt['address']}  {rcpt.get('state', '')}, {attempts} attempt{'' if attempts == 1 else 's'}"
        )
        last = rcpt.get("last")
        if last:
            lines.append(f"    last: {_when(last.get('at'))} ({describe_reply(last)})")
    return "\n".join(lines)


def format_stats(stats: Json) -> str:
    width = max((len(str(k)) for k in stats), default=0)
    return "\n".join(f"{name:<{width}}  {count:>7}" for name, count in stats.items())


def _print_json(doc: Json) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False))


# --- commands -------------------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> None:
    query = {"details": "true"} | ({"state": args.state} if args.state else {})
    _print(args, client_for(args).call("GET", f"/v1/queue?{urlencode(query)}"), format_queue)


def _cmd_show(args: argparse.Namespace) -> None:
    _print(args, client_for(args).call("GET", f"/v1/messages/{quote(args.id, safe='')}"), format_message)


def _cmd_stats(args: argparse.Namespace) -> None:
    _print(args, client_for(args).call("GET", "/v1/queue/stats"), format_stats)


def _print(args: argparse.Namespace, doc: dict[str, Any], formatter: Callable[[dict[str, Any]], str]) -> None:
    """The API's answer as JSON (--json, for scripts) or as the formatter lays it out for people."""
    if args.json:
        _print_json(doc)
    else:
        print(formatter(doc))


def _cmd_flush(args: argparse.Namespace) -> None:
    answer = client_for(args).call("POST", "/v1/queue/flush")
    n = int(answer.get("flushed", 0))
    print(f"flushed: {n} message{'' if n == 1 else 's'} due now")


def _action(action: str) -> Callable[[argparse.Namespace], None]:
    def run(args: argparse.Namespace) -> None:
        path = f"/v1/queue/{quote(args.id, safe='')}"
        method = "DELETE" if action == "delete" else "POST"
        client_for(args).call(method, path if action == "delete" else f"{path}/{action}")
        print(f"{args.id}: {_DONE[action]}")

    return run


def run_command(command: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so a CliError becomes its message on stderr and its exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            command(args)
        except CliError as exc:
            print(f"hedwigpy: {exc.message}", file=sys.stderr)
            return exc.exit_code
        return 0

    return run


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        help=f"the daemon's config file (default ${ENV_CONFIG}, else {DEFAULT_CONFIG})",
    )


def add_queue_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`queue list|show|stats|flush|retry|delete|hold|release` (INTERFACE.md, CLI)."""
    from .storage import State

    queue = subparsers.add_parser("queue", help="inspect and act on a running daemon's queue")
    queue_sub = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")

    listing = queue_sub.add_parser("list", help="list queued messages (postqueue -p)")
    listing.add_argument("--state", choices=[s.value for s in State], help="only messages in this state")
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    listing.set_defaults(func=run_command(_cmd_list))

    show = queue_sub.add_parser("show", help="one message and each recipient's last answer")
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="print the API's JSON")
    show.set_defaults(func=run_command(_cmd_show))

    stats = queue_sub.add_parser("stats", help="messages per state")
    stats.add_argument("--json", action="store_true", help="print the API's JSON")
    stats.set_defaults(func=run_command(_cmd_stats))

    flush = queue_sub.add_parser("flush", help="make every deferred message due now (postqueue -f)")
    flush.set_defaults(func=run_command(_cmd_flush))

    helps = {
        "retry": "make one queued or deferred message due now",
        "delete": "remove a message in any state (postsuper -d)",
        "hold": "keep a message from delivery until released (postsuper -h)",
        "release": "put a held message back, due now (postsuper -H)",
    }
    for action, text in helps.items():
        cmd = queue_sub.add_parser(action, help=text)
        cmd.add_argument("id")
        cmd.set_defaults(func=run_command(_action(action)))
    for parser in (listing, show, stats, flush, *(queue_sub.choices[a] for a in helps)):
        _config_option(parser)


def add_send_command(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`send --to ADDR [--to ...] [--from ADDR] ...`: a test message through the local daemon."""
    from ._send import cmd_send

    send = subparsers.add_parser("send", help="send a test message through the local daemon (SMTP)")
    send.add_argument("--to", action="append", required=True, metavar="ADDR", help="recipient (repeatable)")
    send.add_argument("--from", dest="sender", metavar="ADDR", help="sender (default hedwigpy@HOSTNAME)")
    send.add_argument("--subject", default="hedwigpy test message")
    send.add_argument("--body", help="message text (default: a line saying when and how it was sent)")
    send.add_argument(
        "--listener", metavar="NAME", help="the [[listeners]] entry to use (default: the first)"
    )
    send.add_argument(
        "--user", help="AUTH as this [[users]] name; password from $HEDWIG_PASSWORD or a prompt"
    )
    _config_option(send)
    send.set_defaults(func=run_command(cmd_send))
