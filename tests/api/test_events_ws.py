"""`WS /v1/events` (hedwigpy.api._events) through hypercorn on a real socket with a trio-websocket client:
filters, auth, the dropped notice; and the `hedwigpy events` command's output and exit codes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from quart.testing import WebsocketResponseError
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

import hedwigpy.events
from hedwigpy._units import HostPort
from hedwigpy.api import create_app, serve_http
from hedwigpy.auth import hash_password
from hedwigpy.cli import main
from hedwigpy.cli_events import events_url, format_event, stream_events
from hedwigpy.cli_queue import CliError
from hedwigpy.config import ApiKeyConfig
from hedwigpy.events import EventBus
from tests.integration.daemon import free_port

from .fake_queue import FakeQueue, make_config

pytestmark = pytest.mark.timeout(20)

KEY = "k3y-for-events"
KEYS = (ApiKeyConfig("watcher", hash_password(KEY, ln=1)),)
A, B = "0000018bcfe5680000000001", "0000018bcfe5680000000002"


@asynccontextmanager
async def server(bus: EventBus, keys: Sequence[ApiKeyConfig] = ()) -> AsyncIterator[str]:
    """serve_http on 127.0.0.1, a port the OS picks; its ws:// base URL."""
    async with trio.open_nursery() as nursery:
        addr: HostPort = await nursery.start(
            lambda task_status: serve_http(
                make_config(HostPort("127.0.0.1", 0), keys),
                FakeQueue(),
                lambda: True,
                events=bus,
                task_status=task_status,
            )
        )
        yield f"ws://{addr}"
        nursery.cancel_scope.cancel()


async def take(ws: WebSocketConnection, n: int) -> list[dict[str, Any]]:
    with trio.fail_after(5):
        return [json.loads(await ws.get_message()) for _ in range(n)]


async def quiet(ws: WebSocketConnection, wait: float = 0.2) -> bool:
    """True when nothing more arrives for `wait` seconds."""
    with trio.move_on_after(wait):
        await ws.get_message()
        return False
    return True


async def drain(ws: WebSocketConnection, wait: float = 0.3) -> list[dict[str, Any]]:
    """Every message until nothing arrives for `wait` seconds."""
    got = []
    while True:
        with trio.move_on_after(wait):
            got.append(json.loads(await ws.get_message()))
            continue
        return got


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await trio.sleep(0.01)
    raise AssertionError("timed out")


def publish_sample(bus: EventBus) -> None:
    bus.publish("received", A, sender="s@example.org", recipients=["r@example.net"], size=10)
    bus.publish("received", B, sender="s@example.org", recipients=["x@example.net"], size=10)
    bus.publish("deferred", B, recipient="x@example.net", code=451, enhanced="4.7.1", text="later")
    bus.publish("delivered", A, recipient="r@example.net", code=250, enhanced="2.0.0", text="ok")
    bus.publish("bounced", B, recipient="x@example.net", code=550, enhanced="5.1.1", text="no")


async def test_streams_every_event_as_json_text() -> None:
    bus = EventBus()
    async with server(bus) as base, open_websocket_url(f"{base}/v1/events") as ws:
        assert bus.subscribers == 1  # subscribed before the handshake completed
        publish_sample(bus)
        got = await take(ws, 5)
        assert [(e["type"], e["id"]) for e in got] == [
            ("received", A),
            ("received", B),
            ("deferred", B),
            ("delivered", A),
            ("bounced", B),
        ]
        assert got[3] == {
            "type": "delivered",
            "id": A,
            "at": got[3]["at"],
            "recipient": "r@example.net",
            "code": 250,
            "enhanced": "2.0.0",
            "text": "ok",
        }
        assert isinstance(got[0]["at"], float) and got[0]["recipients"] == ["r@example.net"]
        await ws.send_message("ignored")  # what the client says is ignored
        assert await quiet(ws)
    await until(lambda: bus.subscribers == 0)  # the subscription ends with the connection


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (f"id={A}", [("received", A), ("delivered", A)]),
        ("type=delivered&type=bounced", [("delivered", A), ("bounced", B)]),
        ("state=deferred,bounced", [("deferred", B), ("bounced", B)]),
        (f"id={B}&type=received&state=bounced", [("received", B), ("bounced", B)]),
        (f"id={A}&id={B}&type=deferred", [("deferred", B)]),
    ],
)
async def test_filters(query: str, expected: list[tuple[str, str]]) -> None:
    bus = EventBus()
    async with server(bus) as base, open_websocket_url(f"{base}/v1/events?{query}") as ws:
        publish_sample(bus)
        got = await take(ws, len(expected))
        assert [(e["type"], e["id"]) for e in got] == expected
        assert await quiet(ws)


async def test_an_unknown_type_is_refused() -> None:
    async with server(EventBus()) as base:
        with pytest.raises(ConnectionRejected) as err:
            async with open_websocket_url(f"{base}/v1/events?type=delivered&type=sent"):
                pass
    assert err.value.status_code == 400
    assert "unknown event type 'sent'" in json.loads(err.value.body or b"")["detail"]


async def test_api_keys_guard_the_stream() -> None:
    bus = EventBus()
    async with server(bus, KEYS) as base:
        for headers, detail in [
            ([], "API key is required"),
            ([(b"Authorization", b"Bearer nope")], "not valid"),
        ]:
            with pytest.raises(ConnectionRejected) as err:
                async with open_websocket_url(f"{base}/v1/events", extra_headers=headers):
                    pass
            assert err.value.status_code == 401
            assert dict(err.value.headers)[b"www-authenticate"].startswith(b"Bearer")
            problem = json.loads(err.value.body or b"")
            assert problem["status"] == 401 and detail in problem["detail"]
        assert bus.subscribers == 0
        auth = [(b"Authorization", f"Bearer {KEY}".encode())]
        async with open_websocket_url(f"{base}/v1/events", extra_headers=auth) as ws:
            bus.publish("held", A)
            assert [e["type"] for e in await take(ws, 1)] == ["held"]


async def test_without_keys_only_loopback_is_served() -> None:
    client = create_app(FakeQueue(), lambda: True, events=EventBus()).test_client()
    for scope, headers in [
        ({"client": ("192.0.2.10", 5000)}, {}),
        ({"client": ("127.0.0.1", 5000)}, {"Host": "evil.example"}),
        ({"client": ("127.0.0.1", 5000)}, {"Origin": "https://evil.example"}),
    ]:
        ws = client.websocket("/v1/events", headers=headers, scope_base=scope)
        refused: list[WebsocketResponseError] = []
        try:
            async with ws as conn:
                await conn.receive()
        except* WebsocketResponseError as group:
            refused.extend(e for e in group.exceptions if isinstance(e, WebsocketResponseError))
        assert [e.response.status_code for e in refused] == [403]


async def test_a_subscriber_that_fell_behind_is_told_how_many_it_missed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hedwigpy.events, "SUBSCRIBER_BUFFER", 5)
    bus = EventBus()
    async with server(bus) as base, open_websocket_url(f"{base}/v1/events") as ws:
        for i in range(20):  # at once: the stream cannot keep up
            bus.publish("deferred", f"{i:024x}")
        got = await drain(ws)
    notices = [e for e in got if e["type"] == "dropped"]
    delivered = [e for e in got if e["type"] == "deferred"]
    assert len(notices) == 1 and notices[0]["count"] == 20 - len(delivered) > 0
    assert [e["id"] for e in delivered] == [f"{i:024x}" for i in range(len(delivered))]


# --- the CLI ------------------------------------------------------------------------------------------


def test_format_event() -> None:
    at = 1_700_000_000.0
    line = format_event(
        {
            "type": "deferred",
            "id": A,
            "at": at,
            "recipient": "x@example.net",
            "code": 451,
            "enhanced": "4.7.1",
            "text": "Greylisted,\r\n try later",
            "host": "mx1.example.net[127.0.0.2]",
        }
    )
    fields = line.split(" ")
    assert fields[2:6] == ["deferred", A, "x@example.net", "451"]
    assert line.endswith(" 4.7.1 Greylisted, try later (mx1.example.net[127.0.0.2])")
    received = format_event(
        {"type": "received", "id": A, "at": at, "sender": "s@x", "recipients": ["a", "b"]}
    )
    assert received.split(" ")[2:] == ["received", A, "a,b", "-", "from", "<s@x>"]
    assert format_event({"type": "held", "id": A, "at": at}).split(" ")[2:] == ["held", A, "-", "-", "-"]
    assert " dropped - - - 3 events lost" in format_event({"type": "dropped", "count": 3, "at": at})
    assert events_url("http://127.0.0.1:8025", ["a"], ["delivered", "bounced"]) == (
        "ws://127.0.0.1:8025/v1/events?id=a&type=delivered&type=bounced"
    )


async def test_the_cli_client_prints_until_idle(capsys: pytest.CaptureFixture[str]) -> None:
    bus = EventBus()
    async with server(bus) as base, trio.open_nursery() as nursery:
        nursery.start_soon(stream_events, f"{base}/v1/events?type=delivered", None, False, True)
        await until(lambda: bus.subscribers == 1)
        publish_sample(bus)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]  # not logs
    assert [json.loads(line)["type"] for line in lines] == ["delivered"]


def test_the_cli_says_when_no_daemon_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "hedwig.toml"
    port = free_port()
    config.write_text(f'[http]\naddr = "127.0.0.1:{port}"\n')
    with pytest.raises(SystemExit) as done:
        main(["events", "-c", str(config)])
    assert done.value.code == 2
    assert f"no hedwigpy daemon answers at http://127.0.0.1:{port}" in capsys.readouterr().err


async def test_the_cli_client_reports_a_refusal() -> None:
    async with server(EventBus(), KEYS) as base:
        with pytest.raises(CliError) as err:
            await stream_events(f"{base}/v1/events", None, True, False)
        assert err.value.exit_code == 1 and err.value.message.endswith(
            "API key is required (Authorization: Bearer KEY) (HTTP 401)"
        )
        with pytest.raises(CliError) as err:
            await stream_events(f"{base}/v1/events?type=nope", KEY, True, False)
        assert err.value.exit_code == 1 and "unknown event type 'nope'" in err.value.message
