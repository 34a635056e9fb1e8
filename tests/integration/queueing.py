"""Helpers for the queue tests (test_queue*.py): short backoff, the sender's own MX (where bounces go),
the `hedwigpy queue` CLI and the admin API of a running daemon, DSNs as upstreams receive them, and
spool files planted by hand in the spool's on-disk format."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import httpx

from hedwigpy.storage import DeliveryStatus, Envelope, new_message_id
from hedwigpy.storage._format import encode_envelope
from hedwigpy.storage._status import encode_status
from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import MX1, MX3, SENDER, Host, events, publish
from .upstream import Transaction, Upstream, UpstreamPool, wait_until

SENDER_MX = MX3  # src.example's MX, mx.src.example: where bounces to SENDER arrive
SENDER_HOST = Host("mx.src.example", SENDER_MX)


def short_backoff(
    config: dict[str, Any],
    initial: str = "500ms",
    factor: float = 1.0,
    *,
    max_lifetime: str = "1h",
    retry_max: str = "1h",
) -> dict[str, Any]:
    """`[queue]` with a fast, predictable backoff (no jitter)."""
    config["queue"] = {
        "retry_initial": initial,
        "retry_factor": factor,
        "retry_max": retry_max,
        "retry_jitter": 0,
        "max_lifetime": max_lifetime,
    }
    return config


def topology(dns: DnsServer, upstreams: UpstreamPool, **mx1: Any) -> tuple[Upstream, Upstream]:
    """example.net's MX (mx1, scripted by `mx1`) and src.example's MX (the sender's: bounces go there)."""
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    publish(dns, "src.example", (10, "mx.src.example", SENDER_MX))
    return (
        upstreams.add(MX1, name="mx1.example.net", **mx1),
        upstreams.add(SENDER_MX, name="mx.src.example"),
    )


# ---- the CLI and the admin API of a running daemon -----------------------------------------------------


def hedwig(daemon: Daemon, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`hedwigpy ARGS -c CONFIG` as a subprocess (the daemon's own config unless `config`)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEDWIG_")}
    return subprocess.run(
        [sys.executable, "-m", "hedwigpy", *args, "-c", str(config or daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        cwd=daemon.tmp,
    )


def api(daemon: Daemon) -> httpx.Client:
    """An httpx client of the daemon's admin API (`[http].addr`)."""
    return httpx.Client(base_url=f"http://{daemon.config['http']['addr']}", timeout=10, trust_env=False)


# ---- log events -------------------------------------------------------------------------------------------


STATE_CHANGES = frozenset(
    {
        "received",
        "delivered",
        "deferred",
        "failed",
        "deferred message",
        "bounce queued",
        "bounced message",
        "held",
        "released",
        "deleted",
        "expired",
    }
)


def state_changes(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's state-change log events, checked to be one JSON object per line, each at level info
    with a UTC timestamp and the message id (`-c` config `log.format = "json"`)."""
    found = []
    for line in daemon.log_path.read_text().splitlines():
        event = json.loads(line)  # every line, not only the ones we look at
        assert isinstance(event, dict) and isinstance(event.get("event"), str), line
        if event["event"] in STATE_CHANGES:
            assert event["level"] == "info", line
            assert str(event["timestamp"]).endswith("Z"), line
            assert re.fullmatch(r"[0-9a-f]{24}", event["id"]), line
            found.append(event)
    return found


def logged(daemon: Daemon, kind: str, message_id: str | None = None, count: int = 1) -> list[dict[str, Any]]:
    """`outbound.events`, once there are at least `count` of them: per-recipient lines are written after
    the outcome is on disk, so they can trail the spool change a test waited for."""
    wait_until(lambda: len(events(daemon, kind, message_id)) >= count, 10, f"{count} {kind!r} log events")
    return events(daemon, kind, message_id)


def when(event: dict[str, Any]) -> float:
    """The unix time of a log event (structlog's ISO timestamp)."""
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


# ---- bounces ---------------------------------------------------------------------------------------------


def bounces(upstream: Upstream) -> list[Transaction]:
    """The transactions from the null sender <> (DSNs) the upstream accepted (aiosmtpd records the null
    reverse-path as "<>")."""
    return [t for t in upstream.transactions if t.mail_from == "<>"]


def mail_commands(upstream: Upstream) -> list[str]:
    """The argument of every MAIL command the upstream received, as sent."""
    return [arg for c in list(upstream.connections) for verb, arg in c.commands if verb == "MAIL"]


@dataclass
class Dsn:
    """A delivery status notification, taken apart."""

    message: EmailMessage
    notification: str  # the human-readable part
    per_message: Message  # the delivery-status part's first field group
    per_recipient: list[Message]  # one field group per recipient reported on
    returned: str  # the third part (the original's headers), "" if absent
    returned_type: str

    @property
    def text(self) -> str:
        """The human-readable part on one line (it is wrapped at 76 columns)."""
        return " ".join(self.notification.split())

    def recipient(self, address: str) -> Message:
        for group in self.per_recipient:
            if str(group["Final-Recipient"]).split(";", 1)[1].strip() == address:
                return group
        raise AssertionError(
            f"{address} not reported in {[g['Final-Recipient'] for g in self.per_recipient]}"
        )


def parse_dsn(content: bytes) -> Dsn:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert message.get_content_type() == "multipart/report", message.get_content_type()
    assert message.get_param("report-type") == "delivery-status"
    parts = list(message.iter_parts())
    assert [p.get_content_type() for p in parts[:2]] == ["text/plain", "message/delivery-status"]
    payload = parts[1].get_payload()  # message/delivery-status: one Message per field group
    assert isinstance(payload, list) and len(payload) >= 2, payload
    groups = [g for g in payload if isinstance(g, Message)]
    assert len(groups) == len(payload)
    returned = parts[2] if len(parts) > 2 else None
    raw = b"" if returned is None else returned.get_payload(decode=True)
    assert isinstance(raw, bytes)
    return Dsn(
        message=message,
        notification=str(parts[0].get_content()),
        per_message=groups[0],
        per_recipient=groups[1:],
        returned=raw.decode(),
        returned_type="" if returned is None else returned.get_content_type(),
    )


# ---- planting spool files ----------------------------------------------------------------------------------


def spool_dirs(spool: Path) -> None:
    for name in ("tmp", "queued", "deferred", "held", "bounced", "corrupt", "status"):
        (spool / name).mkdir(parents=True, exist_ok=True)


def plant(
    spool: Path,
    state: str,
    recipients: Sequence[str],
    content: bytes,
    *,
    sender: str = SENDER,
    status: DeliveryStatus | None = None,
    due: float | None = None,
    message_id: str | None = None,
) -> str:
    """Write a message into `spool/state/` as the daemon would have (envelope line, then content), with a
    status file if given and its due time (the file's mtime) if given; its id."""
    spool_dirs(spool)
    message_id = message_id or new_message_id()
    envelope = Envelope(sender=sender, recipients=tuple(recipients), listener="relay")
    path = spool / state / f"{message_id}.msg"
    path.write_bytes(encode_envelope(envelope) + content)
    if due is not None:
        os.utime(path, (due, due))
    if status is not None:
        (spool / "status" / f"{message_id}.json").write_bytes(encode_status(status))
    return message_id
