"""`WS /v1/events`: the event bus (`hedwigpy.events`) as a WebSocket stream (INTERFACE.md, REST/JSON).

Each text message is one JSON event as published: `{"type", "id", "at", ...}` (per-recipient events add
`recipient`, `code`, `enhanced`, `text`, `host`). Query filters, each repeatable or comma-separated:

    ?id=MESSAGE_ID            only events of these messages
    ?type=delivered&type=bounced   (alias `state=`) only these types; an unknown type is a 400

A subscriber that falls behind (a slow client: the bus keeps `SUBSCRIBER_BUFFER` events for it) loses
events rather than slowing delivery down, and is told: `{"type": "dropped", "count": n, "at": ...}`.

The subscription is made before the handshake is accepted: every event published once the client
sees the connection open is on its way. Authorization is the other routes' (`ApiAuth`: loopback-only
without `[[api_keys]]`, `Authorization: Bearer KEY` otherwise); a refusal is an HTTP problem document
instead of the handshake (401/403), as is a bad filter (400). The client sends nothing; what it does
send is ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import structlog
import trio
from quart import Response, websocket
from quart_trio import QuartTrio

from ..events import Event, EventBus, Subscription
from . import _views as views
from ._auth import ApiAuth

log = structlog.get_logger("hedwigpy.http")

PATH = "/v1/events"
EVENT_TYPES = frozenset({"received", "delivered", "deferred", "bounced", "held", "released", "deleted"})
MAX_FILTERS = 1000


class _BadFilter(Exception):
    pass


def _problem(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(views.problem(status, detail), ensure_ascii=False, separators=(",", ":"))
    resp = Response(body, status=status, content_type=f"{views.PROBLEM_JSON}; charset=utf-8")
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


def _values(names: tuple[str, ...]) -> set[str]:
    found: set[str] = set()
    for name in names:
        for value in websocket.args.getlist(name):
            found.update(part.strip() for part in value.split(",") if part.strip())
    if len(found) > MAX_FILTERS:
        raise _BadFilter(f"at most {MAX_FILTERS} values of {'/'.join(names)}")
    return found


def event_filter() -> Callable[[Event], bool]:
    """The predicate the query string asks for; raises _BadFilter."""
    ids = _values(("id",))
    types = _values(("type", "state"))
    unknown = sorted(types - EVENT_TYPES)
    if unknown:
        names = ", ".join(sorted(EVENT_TYPES))
        raise _BadFilter(f"unknown event type {unknown[0]!r} (use one of {names})")

    def wanted(event: Event) -> bool:
        return (not ids or event.get("id") in ids) and (not types or event.get("type") in types)

    return wanted


def encode(event: Event) -> str:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":"), default=str)


def add_event_routes(
    app: QuartTrio, events: EventBus, auth: ApiAuth, stopping: Callable[[], Awaitable[None]] | None = None
) -> None:
    """Register `WS /v1/events` on `app`, streaming `events`, authorized by `auth`. Once `stopping`
    returns (the daemon has drained), each stream is closed with 1001 Going Away: a subscriber sees
    the drain's last events, and does not hold up the exit."""

    @app.websocket(PATH)
    async def event_stream() -> Response | None:
        headers = websocket.headers
        client = websocket.remote_addr
        denied = await auth.check(
            client, headers.get("Host"), headers.get("Origin"), headers.get("Authorization")
        )
        if denied is not None:
            log.info("http denied", path=PATH, client=client, status=denied.status)
            challenge = {"WWW-Authenticate": denied.challenge} if denied.challenge else None
            return _problem(denied.status, denied.detail, challenge)
        try:
            wanted = event_filter()
        except _BadFilter as exc:
            return _problem(400, str(exc))
        async with events.subscribe(wanted) as subscription:
            await websocket.accept()
            log.info("events subscribed", client=client, query=websocket.query_string.decode("latin1"))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_discard_input)  # keeps the disconnect in view
                    if stopping is not None:
                        nursery.start_soon(_close_when, stopping, nursery.cancel_scope)
                    await _stream(subscription)
            except Exception as exc:  # the client went away mid-send, or the like: not the app's error
                log.debug("events stream ended", client=client, error=repr(exc))
            finally:
                log.info("events unsubscribed", client=client, dropped=subscription.dropped)
        return None


async def _close_when(stopping: Callable[[], Awaitable[None]], scope: trio.CancelScope) -> None:
    await stopping()
    with trio.move_on_after(1):
        await websocket.close(1001, "server shutting down")
    scope.cancel()


async def _discard_input() -> None:
    while True:
        await websocket.receive()


async def _stream(subscription: Subscription) -> None:
    reported = 0
    async for event in subscription:
        await websocket.send(encode(event))
        # A drop happens only while the buffer is full, so at least one more event follows it: checking
        # after each one finds every drop.
        if subscription.dropped > reported:
            count = subscription.dropped - reported
            reported = subscription.dropped
            await websocket.send(encode({"type": "dropped", "count": count, "at": time.time()}))
