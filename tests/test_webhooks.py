"""`hedwigpy.webhooks` against a tiny trio HTTP receiver on loopback and a real spool directory: signed
POSTs, retry after a 500, only the configured events, pending events kept across a restart, the bound."""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from hedwigpy.config import WEBHOOK_EVENTS, WebhookConfig
from hedwigpy.events import EventBus
from hedwigpy.webhooks import WebhookError, WebhookService, hook_directory, post, signature

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cret"


@dataclass
class Request:
    target: str
    headers: dict[str, str]
    body: bytes

    def verified(self, secret: str = SECRET) -> bool:
        """What a receiver does: recompute the HMAC over "timestamp.body", compare in constant time."""
        ts = self.headers["x-hedwig-timestamp"]
        mac = hmac.new(secret.encode(), f"{ts}.".encode() + self.body, hashlib.sha256).hexdigest()
        fresh = abs(time.time() - int(ts)) < 300
        return fresh and hmac.compare_digest(self.headers["x-hedwig-signature"], f"sha256={mac}")


@dataclass
class Receiver:
    """Answers each request with the next status of `statuses` (then 200), recording what it got."""

    statuses: list[int] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    port: int = 0
    arrived: trio.Event = field(default_factory=trio.Event)

    async def handle(self, stream: trio.abc.Stream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        while len(body) < int(headers.get("content-length", "0")):
            body += await stream.receive_some(4096)
        self.requests.append(Request(line.split(" ")[1], headers, body))
        status = self.statuses.pop(0) if self.statuses else 200
        await stream.send_all(
            f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await stream.aclose()
        self.arrived.set()
        self.arrived = trio.Event()

    async def wait_for(self, count: int) -> None:
        with trio.fail_after(10):
            while len(self.requests) < count:
                await self.arrived.wait()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.requests]


@asynccontextmanager
async def receiving(statuses: Sequence[int] = (), port: int = 0) -> AsyncIterator[Receiver]:
    receiver = Receiver(list(statuses))
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, receiver.handle, port, host="127.0.0.1"))
        receiver.port = listener.socket.getsockname()[1]
        yield receiver
        nursery.cancel_scope.cancel()


def hook(port: int, events: tuple[str, ...] = WEBHOOK_EVENTS) -> WebhookConfig:
    return WebhookConfig(url=f"http://127.0.0.1:{port}/hook?x=1", secret=SECRET, events=events)


@asynccontextmanager
async def service(
    hooks: Sequence[WebhookConfig], spool: Path, bus: EventBus, **kwargs: Any
) -> AsyncIterator[WebhookService]:
    svc = WebhookService(hooks, spool / "webhooks", bus, retry_initial=0.05, retry_max=0.2, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.serve)
        yield svc
        nursery.cancel_scope.cancel()


def pending(spool: Path, config: WebhookConfig) -> list[Path]:
    directory = hook_directory(spool / "webhooks", config)
    return sorted(directory.iterdir()) if directory.exists() else []


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("timed out")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    expected = hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    assert signature("k", "1700000000", b"{}") == f"sha256={expected}"


async def test_a_500_is_retried_and_the_event_delivered_once_signed(tmp_path: Path) -> None:
    bus = EventBus()
    async with receiving([500]) as receiver:
        config = hook(receiver.port, ("delivered", "bounced"))
        async with service([config], tmp_path, bus):
            bus.publish("received", "m1")  # not asked for
            bus.publish("delivered", "m1", recipient="ann@example.net", code=250)
            await receiver.wait_for(2)
            await trio.sleep(0.1)
        first, second = receiver.requests
    assert len(receiver.requests) == 2  # the 500, then the 200: nothing after
    assert first.body == second.body and all(r.verified() for r in receiver.requests)
    assert not first.verified("another secret")
    event = json.loads(second.body)
    assert {k: event[k] for k in ("type", "id", "recipient", "code")} == {
        "type": "delivered",
        "id": "m1",
        "recipient": "ann@example.net",
        "code": 250,
    }
    assert second.target == "/hook?x=1"
    assert second.headers["content-type"] == "application/json"
    assert second.headers["x-hedwig-event"] == "delivered"
    assert second.headers["x-hedwig-delivery"] == first.headers["x-hedwig-delivery"]
    assert second.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert pending(tmp_path, config) == []


async def test_events_are_delivered_in_order_to_every_hook(tmp_path: Path) -> None:
    bus = EventBus()
    async with receiving() as a, receiving([503, 502]) as b:
        hooks = [hook(a.port), hook(b.port, ("bounced",))]
        async with service(hooks, tmp_path, bus):
            for i in range(5):
                bus.publish("deferred" if i % 2 else "bounced", f"m{i}")
            await a.wait_for(5)
            await b.wait_for(5)  # 2 failures, then m0 m2 m4
    assert [e["id"] for e in a.events()] == ["m0", "m1", "m2", "m3", "m4"]
    assert [e["id"] for e in b.events()] == ["m0", "m0", "m0", "m2", "m4"]


async def test_a_pending_event_survives_a_restart(tmp_path: Path) -> None:
    bus = EventBus()
    port = free_port()  # nobody listens: connection refused
    config = hook(port)
    async with service([config], tmp_path, bus):
        bus.publish("bounced", "m1", recipient="ann@example.net", code=550)
        await until(lambda: bool(pending(tmp_path, config)))
        await trio.sleep(0.2)  # a few refused attempts
    [path] = pending(tmp_path, config)
    assert json.loads(path.read_bytes())["type"] == "bounced"

    async with receiving(port=port) as receiver, service([config], tmp_path, EventBus()):
        await receiver.wait_for(1)
        await until(lambda: not pending(tmp_path, config))
    [request] = receiver.requests
    assert request.verified() and json.loads(request.body)["id"] == "m1"
    assert request.headers["x-hedwig-delivery"] == path.stem


async def test_pending_events_are_bounded(tmp_path: Path) -> None:
    bus = EventBus()
    config = hook(free_port())
    async with service([config], tmp_path, bus, max_pending=2):
        for i in range(4):
            bus.publish("held", f"m{i}")
        await trio.sleep(0.3)
    assert [json.loads(p.read_bytes())["id"] for p in pending(tmp_path, config)] == ["m0", "m1"]


async def test_no_webhooks_no_directory(tmp_path: Path) -> None:
    async with service([], tmp_path, EventBus()):
        pass
    assert not (tmp_path / "webhooks").exists()


async def test_post_answers_the_status_or_raises(tmp_path: Path) -> None:
    async with receiving([204]) as receiver:
        assert await post(f"http://127.0.0.1:{receiver.port}", b"{}", [("X-A", "b")]) == 204
        assert receiver.requests[0].target == "/" and receiver.requests[0].headers["x-a"] == "b"
    with pytest.raises(WebhookError, match="connection failed"):
        await post(f"http://127.0.0.1:{free_port()}/", b"{}", [])


async def test_https_with_the_servers_certificate_checked() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    receiver = Receiver()

    async def handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ctx, server_side=True)
        try:
            await receiver.handle(tls)
        except (trio.BrokenResourceError, ssl.SSLError):
            pass

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        url = f"https://127.0.0.1:{listener.socket.getsockname()[1]}/tls"
        assert await post(url, b"{}", [], ssl_context=client_ctx) == 200
        with pytest.raises(WebhookError, match="connection failed"):  # not trusted by default
            await post(url, b"{}", [])
        nursery.cancel_scope.cancel()
    assert [r.target for r in receiver.requests] == ["/tls"]
