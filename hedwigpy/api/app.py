"""The admin HTTP API as a quart-trio app: health, readiness, and the queue (INTERFACE.md, REST/JSON).

Routes (JSON bodies; shapes in `hedwigpy.api._views`; errors `application/problem+json`, RFC 9457):

    GET    /healthz                   200 {"status": "ok"}                     (no auth)
    GET    /readyz                    200 {"status": "ready"} | 503 problem    (no auth)
    GET    /v1/queue?state=S&details=true
                                      200 {"state": S|null, "count": n, "messages": [summary...]}
                                      S: queued|deferred|held|bounced|corrupt (400 otherwise); no S =
                                      every state but corrupt. details=true adds "status" to each.
    GET    /v1/queue/stats            200 {"queued": n, "deferred": n, "held": n, "bounced": n,
                                           "corrupt": n, "scheduled": n, "in_flight": n}
    POST   /v1/queue/flush            200 {"flushed": n}
    POST   /v1/queue/{id}/retry       200 {"id", "action": "retry"}   404 unknown · 409 wrong state
    POST   /v1/queue/{id}/hold        200 {"id", "action": "hold"}    404 · 409
    POST   /v1/queue/{id}/release     200 {"id", "action": "release"} 404 · 409
    DELETE /v1/queue/{id}             200 {"id", "action": "delete"}  404
    GET    /v1/messages/{id}          200 summary + {"listener", "client_addr", "auth_user", "status"}
                                      404 unknown
    POST   /v1/messages               raw {"envelope_from", "recipients": [...], "raw": base64} or
                                      structured {"from", "to", "subject", "text", ...}
                                      200 every recipient answered · 202 any queued:
                                      {"id", "status", "recipients": [outcome...]}
                                      400 · 413 · 415 · 429 · 503, with "errors": [{"field", "detail"}]
                                      (`hedwigpy.api._request`, `._compose`, `._intake`)

Everything but the probes is authorized by `hedwigpy.api._auth.ApiAuth` (401 with
`WWW-Authenticate: Bearer`, or 403).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from ..config import ApiKeyConfig
from ..events import EventBus
from ..metrics import MetricsCollector, Sources
from ..storage import State, StorageError
from ..worker.control import QueueControl
from . import _views as views
from ._auth import ApiAuth
from ._events import add_event_routes
from ._intake import Client, MessageIntake
from ._metrics import register_metrics
from ._openapi import register_openapi
from ._request import BODY, FieldError, RequestProblem

log = structlog.get_logger("hedwigpy.http")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
# Message ids are 24 hex digits today; anything that could not be a file name is refused up front.
_MESSAGE_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z_-]{0,127}")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

# What each action may act on, for the 409 detail.
_ACTION_NEEDS = {
    "retry": "a queued or deferred message",
    "hold": "a queued or deferred message",
    "release": "a held message",
}


def json_response(data: object, status: int = 200, content_type: str = "application/json") -> Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return Response(body, status=status, content_type=f"{content_type}; charset=utf-8")


def problem_response(
    status: int, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> Response:
    resp = json_response(views.problem(status, detail, **extra), status, views.PROBLEM_JSON)
    for name, value in (headers or {}).items():
        resp.headers[name] = value
    return resp


class _Problem(Exception):
    """Raised in a route to answer with a problem document."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def create_app(
    queue: QueueControl,
    ready: Callable[[], bool],
    api_keys: Sequence[ApiKeyConfig] = (),
    *,
    intake: MessageIntake | None = None,
    events: EventBus | None = None,
    metrics: MetricsCollector | None = None,
    auth: ApiAuth | None = None,
    stopping: Callable[[], Awaitable[None]] | None = None,
) -> QuartTrio:
    """The admin API acting on `queue`; `ready()` answers /readyz. `POST /v1/messages` goes to `intake`
    (without one it answers 503)."""
    app = QuartTrio("hedwigpy.api", static_folder=None)  # no /static route: every route is documented
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    if intake is not None:  # a bigger body is refused (413) before it is read
        app.config["MAX_CONTENT_LENGTH"] = intake.max_body
    if auth is None:  # the daemon passes its own, to swap the keys on reload
        auth = ApiAuth(api_keys)
    if events is not None:  # WS /v1/events (hedwigpy.api._events)
        add_event_routes(app, events, auth, stopping)

    @app.before_request
    async def authorize() -> Response | None:
        if request.path in OPEN_PATHS:
            return None
        denied = await auth.check(
            request.remote_addr,
            request.headers.get("Host"),
            request.headers.get("Origin"),
            request.headers.get("Authorization"),
        )
        if denied is None:
            return None
        log.info("http denied", path=request.path, client=request.remote_addr, status=denied.status)
        headers = {"WWW-Authenticate": denied.challenge} if denied.challenge else None
        # INTERFACE.md: every error lists the fields at fault; for a missing or wrong key, the header.
        at_fault = [{"field": "Authorization", "detail": denied.detail}] if denied.status == 401 else []
        return problem_response(denied.status, denied.detail, headers, errors=at_fault)

    @app.errorhandler(_Problem)
    async def on_problem(exc: _Problem) -> Response:
        return problem_response(exc.status, exc.detail)

    @app.errorhandler(StorageError)
    async def on_storage_error(exc: StorageError) -> Response:
        # The spool could not be read or written just now (I/O error, disk full): try again later.
        log.error("http spool error", method=request.method, path=request.path, error=str(exc))
        return problem_response(503, "the spool cannot answer right now; try again later")

    @app.after_request
    async def close_after_refused_body(response: Response) -> Response:
        # An error may be answered before the body is read; what is left of it would stall the
        # connection (hypercorn stops reading once the app does), so it cannot carry another request.
        has_body = bool(request.content_length) or "Transfer-Encoding" in request.headers
        if response.status_code >= 400 and has_body and request.http_version.startswith("1"):
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(RequestProblem)
    async def on_request_problem(exc: RequestProblem) -> Response:
        body = views.problem(exc.status, exc.detail, errors=[e.json() for e in exc.errors])
        resp = json_response(body, exc.status, views.PROBLEM_JSON)
        for name, value in exc.headers.items():
            resp.headers[name] = value
        return resp

    @app.errorhandler(HTTPException)
    async def on_http_exception(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = None
        detail = exc.description or views.problem(status, "")["title"]
        if isinstance(exc, MethodNotAllowed):
            detail = f"{request.method} is not allowed on {request.path}"
            if exc.valid_methods:
                headers = {"Allow": ", ".join(sorted(exc.valid_methods))}
        elif status == 404:
            detail = f"no resource at {request.path}"
        return problem_response(status, detail, headers)

    @app.errorhandler(Exception)
    async def on_error(exc: Exception) -> Response:
        log.error("http error", method=request.method, path=request.path, exc_info=exc)
        return problem_response(500, "internal error; see the daemon's log")

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        if ready():
            return json_response({"status": "ready"})
        return problem_response(503, "the daemon is starting or draining")

    @app.get("/v1/queue")
    async def queue_list() -> Response:
        state = _state_arg(request.args.get("state"))
        details = _bool_arg("details", request.args.get("details"))
        messages = await queue.list(state)
        items: list[views.JsonObject] = []
        for message in messages:
            item = views.summary(message)
            if details:
                shown = await queue.show(message.id)
                if shown is None:  # gone (delivered or deleted) since the listing
                    continue
                item = views.summary(shown[0]) | {"status": views.delivery(shown[1])}
            items.append(item)
        state_name = None if state is None else state.value
        return json_response({"state": state_name, "count": len(items), "messages": items})

    @app.get("/v1/queue/stats")
    async def queue_stats() -> Response:
        return json_response(queue.stats())

    @app.post("/v1/queue/flush")
    async def queue_flush() -> Response:
        flushed = await queue.flush()
        log.debug("http queue flush", count=flushed, client=request.remote_addr)
        return json_response({"flushed": flushed})

    async def act(message_id: str, action: str, do: Callable[[str], Awaitable[bool]]) -> Response:
        _check_id(message_id)
        if await do(message_id):
            log.debug("http queue action", action=action, id=message_id, client=request.remote_addr)
            return json_response({"id": message_id, "action": action})
        shown = await queue.show(message_id)
        if shown is None:
            raise _Problem(404, f"no message {message_id} in the queue")
        needs = _ACTION_NEEDS.get(action, "another state")
        raise _Problem(409, f"message {message_id} is {shown[0].state.value}; {action} needs {needs}")

    @app.post("/v1/queue/<message_id>/retry")
    async def queue_retry(message_id: str) -> Response:
        return await act(message_id, "retry", queue.retry)

    @app.post("/v1/queue/<message_id>/hold")
    async def queue_hold(message_id: str) -> Response:
        return await act(message_id, "hold", queue.hold)

    @app.post("/v1/queue/<message_id>/release")
    async def queue_release(message_id: str) -> Response:
        return await act(message_id, "release", queue.release)

    @app.delete("/v1/queue/<message_id>")
    async def queue_delete(message_id: str) -> Response:
        return await act(message_id, "delete", queue.delete)

    @app.get("/v1/messages/<message_id>")
    async def message_show(message_id: str) -> Response:
        _check_id(message_id)
        shown = await queue.show(message_id)
        if shown is None:
            raise _Problem(404, f"no message {message_id} in the queue")
        return json_response(views.detail(*shown))

    @app.post("/v1/messages")
    async def message_submit() -> Response:
        if intake is None:
            raise RequestProblem(503, "this server does not accept messages over HTTP")
        if not ready():
            raise RequestProblem(503, "the daemon is starting or draining", headers={"Retry-After": "5"})
        _check_json_type(request.headers.get("Content-Type"))
        try:
            body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        except RequestEntityTooLarge:
            limit = intake.max_body
            raise RequestProblem(
                413,
                f"the request body is larger than {limit} octets ([limits].max_message_size, base64)",
                [FieldError(BODY, f"larger than {limit} octets")],
            ) from None
        scope_client = request.scope.get("client")
        user = await auth.user(request.headers.get("Authorization"))
        client = _client(scope_client, user)
        async with intake.idempotent(request.headers.get("Idempotency-Key"), client, body) as claim:
            if claim.answer is None:
                message = await intake.parse(body)
                del body
                answer = await intake.accept(message, client)
                await claim.record(answer.status, answer.body)
        assert claim.answer is not None
        resp = json_response(claim.answer[1], claim.answer[0])
        if claim.replayed:
            resp.headers["Idempotent-Replayed"] = "true"
        return resp

    # GET /metrics (hedwigpy.metrics; without a collector, only the queue gauges) and GET /openapi.json
    register_metrics(app, metrics if metrics is not None else MetricsCollector(Sources(queue.stats)))
    register_openapi(app)
    return app


def _check_json_type(content_type: str | None) -> None:
    """A body must say it is JSON (or say nothing): a form a browser posts across sites cannot."""
    if content_type is None:
        return
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise RequestProblem(
        415,
        f"the body must be JSON (Content-Type: application/json), not {media or 'empty'}",
        [FieldError("Content-Type", "must be application/json")],
    )


def _client(peer: object, user: str | None) -> Client:
    """The envelope's view of the peer: its IP and "ip:port" ("[v6]:port"), as SMTP writes them."""
    if not isinstance(peer, tuple | list) or len(peer) < 2:
        return Client("unknown", "", user)
    ip, port = str(peer[0]), peer[1]
    addr = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return Client(ip, addr, user)


def _check_id(message_id: str) -> None:
    if not _MESSAGE_ID.fullmatch(message_id):
        raise _Problem(404, f"no message {message_id} in the queue")


def _state_arg(value: str | None) -> State | None:
    if value is None or value == "":
        return None
    try:
        return State(value)
    except ValueError:
        names = ", ".join(s.value for s in State)
        raise _Problem(400, f"unknown state {value!r} (use one of {names})") from None


def _bool_arg(name: str, value: str | None) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _Problem(400, f"{name} must be true or false (got {value!r})")
