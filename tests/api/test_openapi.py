"""`GET /openapi.json`: every route the app serves is described (a route added without a description
fails here), every description is of a route that exists, and the document holds together."""

from __future__ import annotations

import re
from typing import Any

from quart_trio import QuartTrio

from hedwigpy.api import create_app
from hedwigpy.events import EventBus

from .fake_queue import sample_queue

LOOPBACK = {"client": ("127.0.0.1", 50000)}
_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def full_app() -> QuartTrio:
    """The app with every optional part on (the event stream included)."""
    return create_app(sample_queue(), lambda: True, events=EventBus())


async def fetch(app: QuartTrio) -> dict[str, Any]:
    resp = await app.test_client().get("/openapi.json", scope_base=LOOPBACK)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    doc = await resp.get_json()
    assert isinstance(doc, dict)
    return doc


def served(app: QuartTrio) -> set[tuple[str, str]]:
    """(OpenAPI path template, lower-case method) for every rule; a WebSocket is a GET (101)."""
    ops: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        methods = set(rule.methods or ()) - {"OPTIONS"}
        if "GET" in methods:
            methods.discard("HEAD")  # implied by GET
        for method in methods:
            ops.add((path, method.lower()))
    return ops


def normalized(path: str) -> str:
    return re.sub(r"\{[^{}]+\}", "{}", path)


async def test_every_route_is_described_and_nothing_else() -> None:
    app = full_app()
    doc = await fetch(app)
    documented = {
        (normalized(path), method)
        for path, item in doc["paths"].items()
        for method in item
        if method in _METHODS
    }
    routes = {(normalized(path), method) for path, method in served(app)}
    assert routes - documented == set(), "routes without a description in hedwigpy/api/_openapi.py"
    assert documented - routes == set(), "described routes the app does not serve"
    expected = {
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
        ("/v1/messages", "post"),
        ("/v1/messages/{}", "get"),
        ("/v1/queue", "get"),
        ("/v1/queue/stats", "get"),
        ("/v1/queue/flush", "post"),
        ("/v1/queue/{}/retry", "post"),
        ("/v1/queue/{}/hold", "post"),
        ("/v1/queue/{}/release", "post"),
        ("/v1/queue/{}", "delete"),
        ("/v1/events", "get"),
    }
    assert expected <= routes


async def test_the_websocket_is_a_get_answered_with_101() -> None:
    app = full_app()
    doc = await fetch(app)
    websockets = [r.rule for r in app.url_map.iter_rules() if getattr(r, "websocket", False)]
    assert websockets == ["/v1/events"]
    for path in websockets:
        assert "101" in doc["paths"][path]["get"]["responses"]


def walk(node: Any) -> list[Any]:
    found = [node]
    if isinstance(node, dict):
        for child in node.values():
            found += walk(child)
    elif isinstance(node, list):
        for child in node:
            found += walk(child)
    return found


async def test_the_document_holds_together() -> None:
    doc = await fetch(full_app())
    assert doc["openapi"] == "3.1.0" and doc["info"]["title"] and doc["info"]["version"]
    schemas = doc["components"]["schemas"]
    for node in walk(doc):
        if isinstance(node, dict) and "$ref" in node:
            assert node["$ref"].removeprefix("#/components/schemas/") in schemas, node["$ref"]
    ids: list[str] = []
    for path, item in doc["paths"].items():
        params = set(re.findall(r"\{([^{}]+)\}", path))
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == params, (method, path)
            assert op["responses"] and op["summary"], (method, path)
            ids.append(op["operationId"])
            if op.get("security") != []:  # authorized routes say how they refuse
                assert {"401", "403"} <= set(op["responses"]), (method, path)
            for status, response in op["responses"].items():
                if status.startswith(("4", "5")):
                    media = response["content"]["application/problem+json"]["schema"]
                    assert media == {"$ref": "#/components/schemas/Problem"}
    assert len(ids) == len(set(ids))
    # the probes are open; everything else needs the key
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert doc["security"] == [{"apiKey": []}]


async def test_the_send_request_has_both_shapes() -> None:
    doc = await fetch(full_app())
    op = doc["paths"]["/v1/messages"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]
    assert body == {
        "oneOf": [
            {"$ref": "#/components/schemas/StructuredMessage"},
            {"$ref": "#/components/schemas/RawMessage"},
        ]
    }
    schemas = doc["components"]["schemas"]
    assert set(schemas["RawMessage"]["properties"]) == {"envelope_from", "recipients", "raw"}
    assert {"from", "to", "attachments", "headers", "metadata"} <= set(
        schemas["StructuredMessage"]["properties"]
    )
    assert {"200", "202", "400", "413", "429", "503"} <= set(op["responses"])
    assert any(p["name"] == "Idempotency-Key" for p in op["parameters"])


async def test_the_shapes_match_what_the_views_produce() -> None:
    """The detail of a real message has every key the schema requires, and no other."""
    app = full_app()
    doc = await fetch(app)
    schemas = doc["components"]["schemas"]
    client = app.test_client()
    resp = await client.get("/v1/messages/0000018bcfe5680000000002", scope_base=LOOPBACK)
    shown = await resp.get_json()
    detail_keys = set(schemas["MessageSummary"]["required"]) | set(
        schemas["MessageDetail"]["allOf"][1]["required"]
    )
    assert set(shown) == detail_keys
    assert set(shown["status"]) == set(schemas["DeliveryStatus"]["required"])
    assert set(shown["status"]["recipients"][0]) == set(schemas["RecipientStatus"]["required"])
    assert set(shown["status"]["recipients"][0]["last"]) == set(schemas["Attempt"]["required"])
    stats = await (await client.get("/v1/queue/stats", scope_base=LOOPBACK)).get_json()
    assert set(stats) == set(schemas["QueueStats"]["required"])
    missing = await client.get("/v1/messages/ffffffffffffffffffffffff", scope_base=LOOPBACK)
    problem = await missing.get_json()
    assert set(schemas["Problem"]["required"]) <= set(problem)
