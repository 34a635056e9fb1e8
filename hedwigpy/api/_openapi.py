"""`GET /openapi.json`: the admin API's own description, OpenAPI 3.1.

Written by hand from the routes in `hedwigpy.api.app` and the shapes in `hedwigpy.api._views`;
tests/api/test_openapi.py walks the app's URL map, so a route added without a description here fails it.
"""

from __future__ import annotations

import json
from typing import Any

from quart import Response
from quart_trio import QuartTrio

from .. import __version__
from ..storage import State

Schema = dict[str, Any]

PROBLEM_JSON = "application/problem+json"


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    schema["required"] = list(properties) if required is None else required
    return schema | extra


_STR: Schema = {"type": "string"}
_INT: Schema = {"type": "integer"}
_TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
_STATES = [s.value for s in State]


def _schemas() -> dict[str, Schema]:
    attempt = _obj(
        {
            "at": _TIME,
            "code": {"type": "integer", "description": "0: no reply (connection, DNS or TLS failure)"},
            "enhanced": _STR,
            "text": _STR,
            "host": {"type": "string", "description": '"" when no host was reached'},
        }
    )
    summary = _obj(
        {
            "id": _STR,
            "state": {"type": "string", "enum": _STATES},
            "from": {"type": "string", "description": '"" for the null sender <>'},
            "recipients": {"type": "array", "items": _STR},
            "size": {"type": "integer", "description": "octets of content"},
            "received_at": _TIME,
        }
    )
    return {
        "Problem": _obj(
            {
                "type": {"type": "string", "const": "about:blank"},
                "title": _STR,
                "status": _INT,
                "detail": _STR,
                "errors": {"type": "array", "items": _ref("FieldError")},
            },
            ["type", "title", "status", "detail"],
            description="RFC 9457 problem details; `errors` lists the fields at fault",
        ),
        "FieldError": _obj({"field": _STR, "detail": _STR}),
        "Status": _obj({"status": _STR}),
        "Attempt": attempt,
        "RecipientStatus": _obj(
            {
                "address": _STR,
                "state": {"type": "string", "enum": ["pending", "delivered", "failed"]},
                "attempts": _INT,
                "last": {"oneOf": [_ref("Attempt"), {"type": "null"}]},
            }
        ),
        "DeliveryStatus": _obj(
            {
                "attempts": _INT,
                "next_attempt": _TIME,
                "bounce_sent": {"type": "boolean"},
                "recipients": {"type": "array", "items": _ref("RecipientStatus")},
            }
        ),
        "MessageSummary": summary,
        "MessageSummaryWithStatus": {
            "allOf": [_ref("MessageSummary"), _obj({"status": _ref("DeliveryStatus")})]
        },
        "MessageDetail": {
            "allOf": [
                _ref("MessageSummary"),
                _obj(
                    {
                        "listener": _STR,
                        "client_addr": _STR,
                        "auth_user": {"type": ["string", "null"]},
                        "status": _ref("DeliveryStatus"),
                    }
                ),
            ]
        },
        "QueueList": _obj(
            {
                "state": {"type": ["string", "null"], "enum": [*_STATES, None]},
                "count": _INT,
                "messages": {
                    "type": "array",
                    "items": {"anyOf": [_ref("MessageSummary"), _ref("MessageSummaryWithStatus")]},
                },
            }
        ),
        "QueueStats": _obj(
            {s: _INT for s in _STATES}
            | {
                "scheduled": {"type": "integer", "description": "entries in the retry schedule"},
                "in_flight": {"type": "integer", "description": "delivery attempts running now"},
            }
        ),
        "Flushed": _obj({"flushed": _INT}),
        "Action": _obj(
            {"id": _STR, "action": {"type": "string", "enum": ["retry", "hold", "release", "delete"]}}
        ),
        "RawMessage": _obj(
            {
                "envelope_from": {"type": "string", "description": '"" or "<>" for the null sender'},
                "recipients": {"type": "array", "items": _STR, "minItems": 1},
                "raw": {"type": "string", "contentEncoding": "base64", "description": "RFC 5322 message"},
            },
            additionalProperties=False,
        ),
        "StructuredMessage": _obj(
            {
                "from": _STR,
                "to": {"type": "array", "items": _STR},
                "cc": {"type": "array", "items": _STR},
                "bcc": {"type": "array", "items": _STR},
                "reply_to": _STR,
                "subject": _STR,
                "text": _STR,
                "html": _STR,
                "attachments": {"type": "array", "items": _ref("Attachment")},
                "headers": {"type": "object", "additionalProperties": _STR},
                "metadata": {"type": "object"},
            },
            ["from", "to"],
            additionalProperties=False,
            description='Addresses may carry display names ("Ann <ann@example.com>")',
        ),
        "Attachment": _obj(
            {
                "filename": _STR,
                "content_type": _STR,
                "content": {"type": "string", "contentEncoding": "base64"},
            },
            ["filename", "content"],
            additionalProperties=False,
        ),
        "RecipientOutcome": _obj(
            {
                "address": _STR,
                "status": {"type": "string", "enum": ["delivered", "queued", "rejected"]},
                "code": _INT,
                "enhanced": _STR,
                "message": _STR,
            }
        ),
        "Submission": _obj(
            {
                "id": _STR,
                "status": {"type": "string", "enum": ["delivered", "queued", "partial", "rejected"]},
                "recipients": {"type": "array", "items": _ref("RecipientOutcome")},
            }
        ),
        "Event": _obj(
            {
                "type": {
                    "type": "string",
                    "enum": ["received", "delivered", "deferred", "bounced", "held", "released", "deleted"],
                },
                "id": _STR,
                "at": {"type": "number", "description": "unix time"},
                "recipient": _STR,
                "code": _INT,
                "enhanced": _STR,
                "text": _STR,
                "host": _STR,
            },
            ["type", "id", "at"],
            description="one WebSocket text frame; per-recipient events add recipient, code, enhanced, "
            "text and host",
        ),
    }


def _json(schema: Schema, description: str, media: str = "application/json") -> Schema:
    return {"description": description, "content": {media: {"schema": schema}}}


def _problem(description: str) -> Schema:
    return _json(_ref("Problem"), description, PROBLEM_JSON)


_AUTH_ERRORS = {
    "401": _problem("API key missing or wrong"),
    "403": _problem("not allowed (with no keys: a client, Host or Origin that is not loopback)"),
}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _op(summary: str, responses: dict[str, Schema], *, public: bool = False, **extra: Any) -> Schema:
    op: Schema = {"summary": summary, "responses": responses if public else responses | _AUTH_ERRORS}
    if public:
        op["security"] = []
    return op | extra


def _action(verb: str, needs: str) -> Schema:
    return _op(
        f"{verb.capitalize()} a message ({needs})",
        {
            "200": _json(_ref("Action"), "done"),
            "404": _problem("no such message"),
            "409": _problem(f"the message is in another state; {verb} needs {needs}"),
        },
        operationId=f"queue_{verb}",
        parameters=[_ID],
    )


def _paths() -> dict[str, Schema]:
    metrics_text = {"text/plain; version=0.0.4": {"schema": {"type": "string"}}}
    return {
        "/healthz": {
            "get": _op(
                "Liveness",
                {"200": _json(_ref("Status"), '{"status": "ok"}')},
                public=True,
                operationId="healthz",
            )
        },
        "/readyz": {
            "get": _op(
                "Readiness",
                {
                    "200": _json(_ref("Status"), '{"status": "ready"}'),
                    "503": _problem("starting or draining"),
                },
                public=True,
                operationId="readyz",
            )
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics (text exposition format 0.0.4)",
                {"200": {"description": "metric families", "content": metrics_text}},
                operationId="metrics",
            )
        },
        "/openapi.json": {
            "get": _op(
                "This document",
                {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                operationId="openapi",
            )
        },
        "/v1/messages": {
            "post": _op(
                "Send a message: structured (composed from fields) or raw (envelope and RFC 5322 text)",
                {
                    "200": _json(_ref("Submission"), "every recipient has a final answer"),
                    "202": _json(_ref("Submission"), "at least one recipient is queued"),
                    "400": _problem("invalid request; `errors` lists the fields at fault"),
                    "413": _problem("too large"),
                    "415": _problem("the body is not JSON"),
                    "429": _problem("rate limited"),
                    "503": _problem("the spool cannot accept (disk full, starting, draining)"),
                },
                operationId="message_submit",
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "a retried request with the same key gets the first answer (24 h)",
                    }
                ],
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"oneOf": [_ref("StructuredMessage"), _ref("RawMessage")]}
                        }
                    },
                },
            )
        },
        "/v1/messages/{id}": {
            "get": _op(
                "A message's state and per-recipient attempts",
                {"200": _json(_ref("MessageDetail"), "the message"), "404": _problem("no such message")},
                operationId="message_show",
                parameters=[_ID],
            )
        },
        "/v1/queue": {
            "get": _op(
                "List the queue",
                {"200": _json(_ref("QueueList"), "messages, oldest first"), "400": _problem("bad parameter")},
                operationId="queue_list",
                parameters=[
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": _STATES},
                        "description": "no state: every state but corrupt",
                    },
                    {
                        "name": "details",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "boolean"},
                        "description": "add each message's delivery status",
                    },
                ],
            )
        },
        "/v1/queue/stats": {
            "get": _op(
                "Messages per state", {"200": _json(_ref("QueueStats"), "counts")}, operationId="queue_stats"
            )
        },
        "/v1/queue/flush": {
            "post": _op(
                "Make every deferred message due now",
                {"200": _json(_ref("Flushed"), "how many")},
                operationId="queue_flush",
            )
        },
        "/v1/queue/{id}/retry": {"post": _action("retry", "a queued or deferred message")},
        "/v1/queue/{id}/hold": {"post": _action("hold", "a queued or deferred message")},
        "/v1/queue/{id}/release": {"post": _action("release", "a held message")},
        "/v1/queue/{id}": {
            "delete": _op(
                "Delete a message in any state",
                {"200": _json(_ref("Action"), "deleted"), "404": _problem("no such message")},
                operationId="queue_delete",
                parameters=[_ID],
            )
        },
        "/v1/events": {
            "get": _op(
                "Live events over a WebSocket (JSON text frames, one event each)",
                {
                    "101": {
                        "description": "switching to the WebSocket protocol; then one `Event` per frame",
                        "content": {"application/json": {"schema": _ref("Event")}},
                    }
                },
                operationId="events",
                parameters=[
                    {"name": "Upgrade", "in": "header", "required": True, "schema": {"const": "websocket"}}
                ],
                **{"x-websocket": True},
            )
        },
    }


def document() -> Schema:
    """The OpenAPI 3.1 document for the routes `create_app` serves."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hedwigpy admin API",
            "version": __version__,
            "description": "Send mail, inspect and act on the queue, health, metrics and live events. "
            "Errors are application/problem+json (RFC 9457).",
        },
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a key from [[api_keys]]; with none configured, loopback clients "
                    "are served without one",
                }
            },
        },
        "security": [{"apiKey": []}],
    }


def register_openapi(app: QuartTrio) -> None:
    body = json.dumps(document(), ensure_ascii=False, separators=(",", ":"))

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return Response(body, status=200, content_type="application/json; charset=utf-8")
