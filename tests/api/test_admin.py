"""The admin API: every route, status code and problem document through quart's test client, auth
rules, and serve_http on a real socket with httpx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import structlog
import trio
from quart_trio import QuartTrio

from hedwigpy._units import HostPort
from hedwigpy.api import create_app, serve_http
from hedwigpy.api._auth import is_loopback_host, is_loopback_ip
from hedwigpy.auth import hash_password
from hedwigpy.config import ApiKeyConfig
from hedwigpy.storage import State, StorageError

from .fake_queue import (
    ID_BOUNCED,
    ID_CORRUPT,
    ID_DEFERRED,
    ID_HELD,
    ID_QUEUED,
    UNKNOWN,
    FakeQueue,
    make_config,
    sample_queue,
)

LOOPBACK = {"client": ("127.0.0.1", 50000)}
REMOTE = {"client": ("192.0.2.10", 50000)}
KEY = "k3y-for-billing"
KEYS = (
    ApiKeyConfig("ops", hash_password("other-key", ln=1)),
    ApiKeyConfig("billing", hash_password(KEY, ln=1)),
)


class Api:
    """A test client for one app, answering (status, headers, JSON body)."""

    def __init__(self, app: QuartTrio, scope: dict[str, Any] | None = None) -> None:
        self.client = app.test_client()
        self.scope = LOOPBACK if scope is None else scope

    async def call(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        scope: dict[str, Any] | None = None,
    ) -> tuple[int, Any, Any]:
        # the typed protocol of TestClient.open requires `json`; the per-method helpers do not
        send = {"GET": self.client.get, "POST": self.client.post, "DELETE": self.client.delete}[method]
        resp = await send(path, headers=headers or {}, scope_base=self.scope if scope is None else scope)
        return resp.status_code, resp.headers, await resp.get_json(force=True)


@pytest.fixture
def queue() -> FakeQueue:
    return sample_queue()


@pytest.fixture
def api(queue: FakeQueue) -> Api:
    return Api(create_app(queue, lambda: True))


def assert_problem(status: int, headers: Any, body: Any, expected: int, detail_part: str = "") -> None:
    assert status == expected
    assert headers["Content-Type"].startswith("application/problem+json")
    assert set(body) - {"errors"} == {"type", "title", "status", "detail"}
    assert body["type"] == "about:blank" and body["status"] == expected
    if expected == 401:  # the field at fault is the Authorization header
        assert [e["field"] for e in body["errors"]] == ["Authorization"]
    assert isinstance(body["title"], str) and body["title"]
    assert detail_part in body["detail"]


# --- probes -------------------------------------------------------------------------------------------------


async def test_healthz(api: Api) -> None:
    status, headers, body = await api.call("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    assert headers["Content-Type"].startswith("application/json")


async def test_readyz_follows_ready(queue: FakeQueue) -> None:
    ready = False
    api = Api(create_app(queue, lambda: ready))
    status, headers, body = await api.call("GET", "/readyz")
    assert_problem(status, headers, body, 503, "starting or draining")
    ready = True
    assert (await api.call("GET", "/readyz"))[::2] == (200, {"status": "ready"})


async def test_probes_need_no_auth() -> None:
    api = Api(create_app(FakeQueue(), lambda: True, KEYS), REMOTE)
    assert (await api.call("GET", "/healthz"))[0] == 200
    assert (await api.call("GET", "/readyz"))[0] == 200
    assert (await api.call("GET", "/v1/queue/stats"))[0] == 401


# --- reading the queue --------------------------------------------------------------------------------------


async def test_list_every_state_but_corrupt(api: Api) -> None:
    status, _, body = await api.call("GET", "/v1/queue")
    assert status == 200
    assert body["state"] is None and body["count"] == 4
    assert [m["id"] for m in body["messages"]] == [ID_QUEUED, ID_DEFERRED, ID_HELD, ID_BOUNCED]
    assert body["messages"][0] == {
        "id": ID_QUEUED,
        "state": "queued",
        "from": "alice@example.org",
        "recipients": ["carol@example.net"],
        "size": 512,
        "received_at": "2023-11-14T22:13:20.250Z",
    }
    assert body["messages"][2]["from"] == ""  # the null sender


@pytest.mark.parametrize("state", [s.value for s in State])
async def test_list_one_state(api: Api, state: str) -> None:
    status, _, body = await api.call("GET", f"/v1/queue?state={state}")
    assert status == 200 and body["state"] == state and body["count"] == 1
    assert [m["state"] for m in body["messages"]] == [state]


async def test_list_with_details(api: Api) -> None:
    status, _, body = await api.call("GET", "/v1/queue?state=deferred&details=true")
    assert status == 200
    (message,) = body["messages"]
    assert message["status"]["attempts"] == 2
    assert message["status"]["next_attempt"] == "2023-11-14T22:23:20.250Z"
    assert [r["state"] for r in message["status"]["recipients"]] == ["pending", "delivered"]


async def test_list_skips_messages_gone_meanwhile(queue: FakeQueue) -> None:
    real_show = queue.show

    async def vanishing_show(message_id: str) -> Any:
        return None if message_id == ID_HELD else await real_show(message_id)

    queue.show = vanishing_show  # type: ignore[method-assign]
    body = (await Api(create_app(queue, lambda: True)).call("GET", "/v1/queue?details=1"))[2]
    assert ID_HELD not in [m["id"] for m in body["messages"]] and body["count"] == 3


@pytest.mark.parametrize("query", ["state=frozen", "state=QUEUED", "details=maybe"])
async def test_list_bad_arguments(api: Api, query: str) -> None:
    status, headers, body = await api.call("GET", f"/v1/queue?{query}")
    assert_problem(status, headers, body, 400)
    assert "frozen" in body["detail"] or "QUEUED" in body["detail"] or "details" in body["detail"]


async def test_stats(api: Api) -> None:
    status, _, body = await api.call("GET", "/v1/queue/stats")
    assert status == 200
    assert body == {
        "queued": 1,
        "deferred": 1,
        "held": 1,
        "bounced": 1,
        "corrupt": 1,
        "scheduled": 2,
        "in_flight": 0,
    }


async def test_show(api: Api) -> None:
    status, _, body = await api.call("GET", f"/v1/messages/{ID_DEFERRED}")
    assert status == 200
    assert body == {
        "id": ID_DEFERRED,
        "state": "deferred",
        "from": "alice@example.org",
        "recipients": ["bob@example.com", "dan@example.org"],
        "size": 4096,
        "received_at": "2023-11-14T22:13:20.250Z",
        "listener": "relay",
        "client_addr": "127.0.0.1:40000",
        "auth_user": "app",
        "status": {
            "attempts": 2,
            "next_attempt": "2023-11-14T22:23:20.250Z",
            "bounce_sent": False,
            "recipients": [
                {
                    "address": "bob@example.com",
                    "state": "pending",
                    "attempts": 2,
                    "last": {
                        "at": "2023-11-14T22:14:20.250Z",
                        "code": 451,
                        "enhanced": "4.7.1",
                        "text": "Greylisted, try later",
                        "host": "mx.example.com",
                    },
                },
                {
                    "address": "dan@example.org",
                    "state": "delivered",
                    "attempts": 1,
                    "last": {
                        "at": "2023-11-14T22:13:50.250Z",
                        "code": 250,
                        "enhanced": "2.0.0",
                        "text": "Ok",
                        "host": "mx.example.org",
                    },
                },
            ],
        },
    }
    fresh = (await api.call("GET", f"/v1/messages/{ID_QUEUED}"))[2]
    assert fresh["status"]["next_attempt"] is None
    assert fresh["status"]["recipients"] == [
        {"address": "carol@example.net", "state": "pending", "attempts": 0, "last": None}
    ]


@pytest.mark.parametrize("message_id", [UNKNOWN, "..", "a.b", "x" * 200])
async def test_show_unknown(api: Api, queue: FakeQueue, message_id: str) -> None:
    status, headers, body = await api.call("GET", f"/v1/messages/{message_id}")
    assert_problem(status, headers, body, 404, "no message")
    if message_id != UNKNOWN:  # refused before the queue is asked
        assert not [c for c in queue.calls if c[0] == "show"]


# --- acting on the queue ------------------------------------------------------------------------------------


async def test_flush(api: Api, queue: FakeQueue) -> None:
    assert (await api.call("POST", "/v1/queue/flush"))[::2] == (200, {"flushed": 1})
    assert ("flush", "") in queue.calls


@pytest.mark.parametrize(
    ("action", "message_id", "after"),
    [
        ("retry", ID_QUEUED, State.QUEUED),
        ("retry", ID_DEFERRED, State.DEFERRED),
        ("hold", ID_QUEUED, State.HELD),
        ("hold", ID_DEFERRED, State.HELD),
        ("release", ID_HELD, State.DEFERRED),
    ],
)
async def test_action_ok(api: Api, queue: FakeQueue, action: str, message_id: str, after: State) -> None:
    status, _, body = await api.call("POST", f"/v1/queue/{message_id}/{action}")
    assert (status, body) == (200, {"id": message_id, "action": action})
    assert queue.state(message_id) == after


@pytest.mark.parametrize(
    ("action", "message_id", "state"),
    [
        ("retry", ID_HELD, "held"),
        ("retry", ID_BOUNCED, "bounced"),
        ("hold", ID_HELD, "held"),
        ("hold", ID_BOUNCED, "bounced"),
        ("hold", ID_CORRUPT, "corrupt"),
        ("release", ID_QUEUED, "queued"),
        ("release", ID_DEFERRED, "deferred"),
    ],
)
async def test_action_wrong_state(
    api: Api, queue: FakeQueue, action: str, message_id: str, state: str
) -> None:
    status, headers, body = await api.call("POST", f"/v1/queue/{message_id}/{action}")
    assert_problem(status, headers, body, 409, f"message {message_id} is {state}; {action} needs")
    assert queue.state(message_id) == State(state)


@pytest.mark.parametrize("action", ["retry", "hold", "release"])
async def test_action_unknown(api: Api, action: str) -> None:
    status, headers, body = await api.call("POST", f"/v1/queue/{UNKNOWN}/{action}")
    assert_problem(status, headers, body, 404, f"no message {UNKNOWN}")


async def test_delete(api: Api, queue: FakeQueue) -> None:
    for message_id in (ID_BOUNCED, ID_CORRUPT, ID_HELD):
        status, _, body = await api.call("DELETE", f"/v1/queue/{message_id}")
        assert (status, body) == (200, {"id": message_id, "action": "delete"})
        assert message_id not in queue.messages
    status, headers, body = await api.call("DELETE", f"/v1/queue/{ID_BOUNCED}")
    assert_problem(status, headers, body, 404, "no message")


# --- errors -------------------------------------------------------------------------------------------------


async def test_unknown_route_and_method(api: Api) -> None:
    status, headers, body = await api.call("GET", "/v1/nothing")
    assert_problem(status, headers, body, 404, "/v1/nothing")
    status, headers, body = await api.call("GET", f"/v1/queue/{ID_QUEUED}/hold")
    assert_problem(status, headers, body, 405, "GET is not allowed")
    assert headers["Allow"] == "POST"


async def test_queue_failure_is_a_500_problem(api: Api, queue: FakeQueue) -> None:
    queue.fail = OSError("disk on fire")
    status, headers, body = await api.call("GET", "/v1/queue")
    assert_problem(status, headers, body, 500, "internal error")
    assert "fire" not in body["detail"]


async def test_a_spool_read_error_is_a_503_problem(api: Api, queue: FakeQueue) -> None:
    """An I/O error reading the spool is temporary as far as a client can tell: 503, try again."""
    queue.fail = StorageError("reading 0123: [Errno 5] Input/output error")
    status, headers, body = await api.call("GET", f"/v1/messages/{ID_QUEUED}")
    assert_problem(status, headers, body, 503, "try again later")
    assert "Errno" not in body["detail"]


# --- auth ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_no_keys_loopback_served(queue: FakeQueue, client: str) -> None:
    api = Api(create_app(queue, lambda: True), {"client": (client, 5000)})
    assert (await api.call("GET", "/v1/queue/stats"))[0] == 200
    assert (await api.call("POST", "/v1/queue/flush", {"Origin": "http://localhost:8025"}))[0] == 200


@pytest.mark.parametrize("scope", [REMOTE, {"client": ("::ffff:192.0.2.1", 1)}, {}])
async def test_no_keys_remote_forbidden(queue: FakeQueue, scope: dict[str, Any]) -> None:
    api = Api(create_app(queue, lambda: True), scope)
    status, headers, body = await api.call("GET", "/v1/queue")
    assert_problem(status, headers, body, 403, "only loopback clients")
    assert queue.calls == []


async def test_no_keys_browser_tricks_forbidden(api: Api, queue: FakeQueue) -> None:
    # DNS rebinding: a loopback client, but the browser thinks it talks to evil.example
    status, headers, body = await api.call("POST", "/v1/queue/flush", {"Host": "evil.example:8025"})
    assert_problem(status, headers, body, 403, "Host")
    # a cross-site form post to the loopback address
    status, headers, body = await api.call("POST", "/v1/queue/flush", {"Origin": "https://evil.example"})
    assert_problem(status, headers, body, 403, "cross-origin")
    assert ("flush", "") not in queue.calls


@pytest.mark.parametrize(
    ("authorization", "error"),
    [(None, False), ("", False), ("Basic Zm9vOmJhcg==", False), ("Bearer ", False), ("Bearer wrong", True)],
)
async def test_keys_missing_or_wrong(queue: FakeQueue, authorization: str | None, error: bool) -> None:
    api = Api(create_app(queue, lambda: True, KEYS))
    headers = {} if authorization is None else {"Authorization": authorization}
    status, resp_headers, body = await api.call("GET", "/v1/queue/stats", headers)
    assert_problem(status, resp_headers, body, 401)
    challenge = resp_headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is error
    assert queue.calls == []


async def test_keys_right_key_from_anywhere(queue: FakeQueue) -> None:
    api = Api(create_app(queue, lambda: True, KEYS), REMOTE)
    for scheme in ("Bearer", "bearer"):  # scheme names are case-insensitive; second call hits the cache
        status, _, body = await api.call("GET", "/v1/queue/stats", {"Authorization": f"{scheme} {KEY}"})
        assert status == 200 and body["queued"] == 1
    other = {"Authorization": "Bearer other-key"}
    assert (await api.call("POST", "/v1/queue/flush", other))[0] == 200


def test_loopback_helpers() -> None:
    assert is_loopback_ip("127.0.0.1") and is_loopback_ip("::1") and is_loopback_ip("fe80::1%lo") is False
    assert not is_loopback_ip(None) and not is_loopback_ip("not-an-ip") and not is_loopback_ip("10.0.0.1")
    for host in ("localhost", "LOCALHOST:8025", "127.0.0.1:8025", "[::1]:8025", "[::1]"):
        assert is_loopback_host(host), host
    for other in (None, "", "evil.example", "localhost.evil.example", "10.0.0.1:80", "[::2]:1"):
        assert not is_loopback_host(other), other


# --- a real socket ------------------------------------------------------------------------------------------


async def test_serve_http_on_a_real_socket() -> None:
    queue = sample_queue()
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            addr: HostPort = await nursery.start(
                serve_http, make_config(HostPort("127.0.0.1", 0), KEYS), queue, lambda: True
            )
            assert addr.host == "127.0.0.1" and addr.port > 0
            auth = {"Authorization": f"Bearer {KEY}"}
            async with httpx.AsyncClient(base_url=f"http://{addr}", timeout=5) as client:
                assert (await client.get("/healthz")).json() == {"status": "ok"}
                resp = await client.get("/v1/queue?state=held")
                assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Bearer")
                assert resp.headers["content-type"].startswith("application/problem+json")
                resp = await client.get("/v1/queue?state=held", headers=auth)
                assert [m["id"] for m in resp.json()["messages"]] == [ID_HELD]
                resp = await client.post(f"/v1/queue/{ID_DEFERRED}/hold", headers=auth)
                assert resp.json() == {"id": ID_DEFERRED, "action": "hold"}
                resp = await client.delete(f"/v1/queue/{UNKNOWN}", headers=auth)
                assert resp.status_code == 404 and resp.json()["status"] == 404
                assert "server" not in resp.headers
            nursery.cancel_scope.cancel()
    assert queue.state(ID_DEFERRED) == State.HELD
    listening = [e for e in logs if e["event"] == "listening"]
    assert listening == [
        {"event": "listening", "log_level": "info", "service": "http", "addr": str(addr), "api_keys": 2}
    ]
    # hypercorn's own chatter is debug-level, through structlog; its access log too
    banner = [e for e in logs if e["event"] == "hypercorn"]
    assert banner and all(e["log_level"] == "debug" for e in banner)
    assert any(e["event"] == "http request" and e["status"] == 404 for e in logs)


async def test_serve_http_bind_failure_propagates() -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="in use"):  # a plain OSError, not wrapped by hypercorn's nurseries
            await serve_http(make_config(HostPort("127.0.0.1", port)), FakeQueue(), lambda: True)
