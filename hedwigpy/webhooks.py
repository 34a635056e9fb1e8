"""Webhooks: delivery events POSTed to the `[[webhooks]]` URLs, signed, retried, kept across restarts.

Each event from the `EventBus` (received, delivered, deferred, bounced, held, released, deleted) that a
webhook's `events` list names is POSTed to its `url` as the event's JSON (`{"type", "id", "at", ...}`,
as the WebSocket stream shows it) with these headers:

    Content-Type: application/json
    X-Hedwig-Event: <type>
    X-Hedwig-Delivery: <a unique id for this event and webhook; the same on every retry>
    X-Hedwig-Timestamp: <unix time of this attempt, in seconds>
    X-Hedwig-Signature: sha256=<hex HMAC-SHA256, keyed with the webhook's secret, of
                        "<X-Hedwig-Timestamp>.<body>">

A receiver recomputes the HMAC over the timestamp, a dot and the raw body, compares it in constant time,
and refuses timestamps too far from its own clock (say five minutes) so a captured request cannot be
replayed later. Delivery is at least once: a receiver that must not act twice dedupes on
X-Hedwig-Delivery.

Any 2xx answer acknowledges the event. Anything else — another status, a refused connection, a timeout
(`timeout`, per attempt) — is retried after `RETRY_INITIAL` seconds, doubling up to `RETRY_MAX`. Events
to one webhook are delivered in order, one at a time; a failing webhook holds back only its own.

Durability: before an event is offered to a webhook it is written to
`<spool>/webhooks/<sha256(url)[:16]>/<ns time>-<seq>.json` (the exact body; tmp name, fsync, rename,
directory fsync), and the file is deleted once acknowledged, so pending events survive a restart and
are sent then. Each webhook keeps at most `MAX_PENDING` events; beyond that new ones are dropped with a
warning (a webhook down for days must not fill the spool).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import os
import ssl
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import structlog
import trio

from .config import WebhookConfig
from .events import Event, EventBus
from .storage._dirsync import fsync_dir, replace_file_sync

log = structlog.get_logger("hedwigpy.webhooks")

DIRECTORY = "webhooks"  # under the spool directory
RETRY_INITIAL = 5.0
RETRY_MAX = 3600.0
MAX_PENDING = 10_000
_MAX_STATUS_LINE = 8192
USER_AGENT = "hedwigpy-webhooks"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Hedwig-Signature` value: `sha256=` and the hex HMAC of `timestamp.body`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def hook_directory(root: Path, hook: WebhookConfig) -> Path:
    return root / hashlib.sha256(hook.url.encode()).hexdigest()[:16]


class WebhookError(Exception):
    """An attempt that did not get a 2xx answer."""


async def post(
    url: str,
    body: bytes,
    headers: Sequence[tuple[str, str]],
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """POST `body` to `url` (HTTP/1.1, one connection per request) and return the status code; raises
    WebhookError on a connection, TLS or protocol failure. The caller bounds the time."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    head = [
        f"POST {target} HTTP/1.1",
        f"Host: {parts.netloc}",
        f"User-Agent: {USER_AGENT}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        try:
            if https:
                ctx = ssl_context or ssl.create_default_context()
                stream = trio.SSLStream(stream, ctx, server_hostname=host, https_compatible=True)
                await stream.do_handshake()
            await stream.send_all(request)
            return await _status(stream)
        finally:
            await trio.aclose_forcefully(stream)
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        raise WebhookError(f"connection failed: {exc}") from None


async def _status(stream: trio.abc.Stream) -> int:
    buffer = b""
    while b"\r\n" not in buffer:
        if len(buffer) > _MAX_STATUS_LINE:
            raise WebhookError("the status line is too long")
        chunk = await stream.receive_some(4096)
        if not chunk:
            raise WebhookError("the connection closed before an answer")
        buffer += chunk
    line = buffer.split(b"\r\n", 1)[0].decode("latin-1")
    version, _, rest = line.partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise WebhookError(f"not an HTTP answer: {line[:80]!r}")
    return int(code)


class _Hook:
    """One webhook: its pending events on disk, in order, and the task that sends them."""

    def __init__(self, config: WebhookConfig, directory: Path, service: WebhookService) -> None:
        self.config = config
        self.directory = directory
        self.service = service
        self.pending: collections.deque[str] = collections.deque()
        self.wakeup = trio.Event()
        self._seq = 0

    def open_sync(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        names = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # never acknowledged to anyone: the event was not yet queued
            elif entry.name.endswith(".json"):
                names.append(entry.name)
        self.pending.extend(sorted(names))
        if names:
            log.info("webhook events pending", url=self.config.url, count=len(names))

    async def enqueue(self, event: Event) -> None:
        if len(self.pending) >= self.service.max_pending:
            log.warning("webhook queue full; event dropped", url=self.config.url, type=event["type"])
            return
        self._seq += 1
        name = f"{time.time_ns():020d}-{self._seq:06d}.json"
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str).encode()
        try:
            await trio.to_thread.run_sync(self._write_sync, name, body)
        except OSError as exc:
            log.error("webhook event not stored; dropped", url=self.config.url, error=str(exc))
            return
        self.pending.append(name)
        self.wakeup.set()

    def _write_sync(self, name: str, body: bytes) -> None:
        final = self.directory / name
        replace_file_sync(final.with_suffix(".tmp"), final, body)
        fsync_dir(self.directory)

    async def run(self) -> None:
        delay = self.service.retry_initial
        while True:
            while not self.pending:
                await self.wakeup.wait()
                self.wakeup = trio.Event()
            name = self.pending[0]
            path = self.directory / name
            try:
                body = await trio.Path(path).read_bytes()
            except OSError as exc:
                log.error("webhook event unreadable; dropped", url=self.config.url, file=name, error=str(exc))
                self.pending.popleft()
                continue
            try:
                await self._send(name, body)
            except WebhookError as exc:
                log.warning("webhook failed", url=self.config.url, error=str(exc), retry_in=delay)
                await trio.sleep(delay)
                delay = min(delay * 2, self.service.retry_max)
                continue
            delay = self.service.retry_initial
            self.pending.popleft()
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_unlink_quietly, path)

    async def _send(self, name: str, body: bytes) -> None:
        timestamp = str(int(time.time()))
        try:
            event_type = str(json.loads(body).get("type", ""))
        except (ValueError, AttributeError):
            event_type = ""
        headers = [
            ("Content-Type", "application/json"),
            ("X-Hedwig-Event", event_type),
            ("X-Hedwig-Delivery", name.removesuffix(".json")),
            ("X-Hedwig-Timestamp", timestamp),
            ("X-Hedwig-Signature", signature(self.config.secret, timestamp, body)),
        ]
        timeout = self.config.timeout
        try:
            with trio.fail_after(timeout):
                status = await post(self.config.url, body, headers, ssl_context=self.service.ssl_context)
        except trio.TooSlowError:
            raise WebhookError(f"no answer within {timeout:g}s") from None
        if not 200 <= status < 300:
            raise WebhookError(f"answered {status}")
        log.debug("webhook delivered", url=self.config.url, type=event_type, status=status)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class WebhookService:
    """Every `[[webhooks]]` entry, fed by the event bus; `serve` in the daemon's nursery."""

    def __init__(
        self,
        hooks: Sequence[WebhookConfig],
        directory: Path,
        events: EventBus,
        *,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
        max_pending: int = MAX_PENDING,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.directory = directory
        self.events = events
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.max_pending = max_pending
        self.ssl_context = ssl_context
        self.hooks = [_Hook(h, hook_directory(directory, h), self) for h in hooks]

    def _orphans_sync(self) -> list[Path]:
        """Directories of webhooks no longer configured: their events are kept, not sent."""
        known = {hook.directory for hook in self.hooks}
        return sorted(p for p in self.directory.iterdir() if p not in known)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load what is pending, subscribe to the bus and send until cancelled. Started once subscribed:
        no event published after that is missed."""
        if not self.hooks:
            task_status.started()
            return
        for hook in self.hooks:
            await trio.to_thread.run_sync(hook.open_sync)
        for orphan in await trio.to_thread.run_sync(self._orphans_sync):
            log.warning("webhook events for a URL no longer configured", directory=str(orphan))
        wanted = {t for hook in self.hooks for t in hook.config.events}
        async with (
            self.events.subscribe(lambda e: e.get("type") in wanted) as subscription,
            trio.open_nursery() as nursery,
        ):
            for hook in self.hooks:
                nursery.start_soon(hook.run)
            log.info("webhooks", urls=[h.config.url for h in self.hooks])
            task_status.started()
            reported = 0
            async for event in subscription:
                if subscription.dropped > reported:
                    log.warning("webhook events lost", dropped=subscription.dropped - reported)
                    reported = subscription.dropped
                for hook in self.hooks:
                    if event["type"] in hook.config.events:
                        await hook.enqueue(event)
