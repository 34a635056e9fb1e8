"""`GET /metrics`: the Prometheus text format, counters fed by the event bus, bounded labels, the latency
histogram, gauges read at scrape time, and the route's auth."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing

from hedwigpy.api import create_app
from hedwigpy.auth import hash_password
from hedwigpy.config import ApiKeyConfig
from hedwigpy.events import SUBSCRIBER_BUFFER, EventBus
from hedwigpy.metrics import CONTENT_TYPE, LATENCY_BUCKETS, MetricsCollector, Sources

from .fake_queue import sample_queue

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"({_NAME})(?:\{{(.*)\}})? (\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[dict[str, str], Samples]:
    """Check the exposition format strictly; the TYPE of each family and every sample's value."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: Samples = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(_NAME, name) and name not in helps and len(line.split(" ", 3)) == 4
            helps.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helps and name not in types, line  # HELP first, one TYPE per family
            assert kind in _SUFFIXES
            types[name] = kind
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, line
            name, labels_text, value = match.groups()
            family = next((f for f, k in types.items() for s in _SUFFIXES[k] if name == f + s), None)
            assert family is not None, f"sample before its TYPE: {line}"
            labels: list[tuple[str, str]] = []
            if labels_text is not None:
                pos = 0
                while pos < len(labels_text):
                    lm = _LABEL.match(labels_text, pos)
                    assert lm, line
                    labels.append((lm.group(1), lm.group(2)))
                    pos = lm.end()
            key = (name, frozenset(labels))
            assert key not in samples, f"duplicate {line}"
            samples[key] = float(value)  # "+Inf", "NaN" and integers all parse
    assert set(types) == helps
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[("hedwigpy_" + name, frozenset(labels.items()))]


def family(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == "hedwigpy_" + name}


@dataclass
class Pool:
    hosts: int = 1
    active: int = 2
    idle: int = 3
    waiting: int = 0
    opened: int = 7
    reused: int = 11
    failed: int = 1


async def settled() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_counters_follow_the_event_bus() -> None:
    bus = EventBus()
    collector = MetricsCollector()
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.serve, bus)
        bus.publish("received", "m1", recipients=["a@Example.net", "b@example.org"], listener="relay")
        bus.publish("received", "m2", recipients=["c@example.net"], listener="mx")
        bus.publish("received", "m3", recipients=["c@example.net"], listener="relay")
        bus.publish("deferred", "m1", recipient="a@Example.net", code=451)
        bus.publish("delivered", "m1", recipient="a@Example.net", code=250)
        bus.publish("bounced", "m1", recipient="b@example.org", code=550)
        bus.publish("delivered", "m2", recipient="c@example.net", code=250)
        bus.publish("held", "m3")
        await settled()
        types, samples = parse(collector.render())
        nursery.cancel_scope.cancel()
    assert types["hedwigpy_messages_received_total"] == "counter"
    assert family(samples, "messages_received_total") == {
        frozenset({("listener", "relay")}): 2,
        frozenset({("listener", "mx")}): 1,
    }
    assert value(samples, "recipients_delivered_total", domain="example.net") == 2
    assert value(samples, "recipients_deferred_total", domain="example.net") == 1
    assert value(samples, "recipients_bounced_total", domain="example.org") == 1
    assert value(samples, "delivery_latency_seconds_count") == 3  # final answers only
    assert value(samples, "events_dropped_total") == 0
    assert bus.subscribers == 0


async def test_domains_beyond_the_limit_fold_into_other() -> None:
    collector = MetricsCollector(max_domains=3)
    for i in range(6):
        collector.observe({"type": "delivered", "id": "m", "at": 1.0, "recipient": f"r@d{i}.example"})
    collector.observe({"type": "delivered", "id": "m", "at": 1.0, "recipient": "again@d0.example"})
    collector.observe({"type": "bounced", "id": "m", "at": 1.0, "recipient": "x@new.example"})
    collector.observe({"type": "deferred", "id": "m", "at": 1.0, "recipient": 'odd@we"ird\\.example'})
    _, samples = parse(collector.render())
    delivered = family(samples, "recipients_delivered_total")
    assert delivered == {
        frozenset({("domain", "d0.example")}): 2,
        frozenset({("domain", "d1.example")}): 1,
        frozenset({("domain", "d2.example")}): 1,
        frozenset({("domain", "other")}): 3,
    }
    assert family(samples, "recipients_bounced_total") == {frozenset({("domain", "other")}): 1}
    assert value(samples, "recipients_deferred_total", domain="other") == 1


def test_label_values_are_escaped() -> None:
    collector = MetricsCollector()
    collector.observe({"type": "deferred", "id": "m", "at": 1.0, "recipient": 'x@a"b\\c\nd'})
    text = collector.render()
    assert 'hedwigpy_recipients_deferred_total{domain="a\\"b\\\\c\\nd"} 1\n' in text
    parse(text)


def test_latency_histogram_is_cumulative_and_ends_with_the_count() -> None:
    collector = MetricsCollector()
    collector.observe({"type": "received", "id": "m", "at": 100.0, "recipients": ["a@x", "b@x", "c@x"]})
    for recipient, at in (("a@x", 100.003), ("b@x", 107.0), ("c@x", 100.0 + 2 * 86400)):
        collector.observe({"type": "delivered", "id": "m", "at": at, "recipient": recipient})
    collector.observe({"type": "delivered", "id": "m", "at": 200.0, "recipient": "a@x"})  # forgotten
    collector.observe({"type": "delivered", "id": "unknown", "at": 200.0, "recipient": "z@x"})
    types, samples = parse(collector.render())
    assert types["hedwigpy_delivery_latency_seconds"] == "histogram"
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for labels, v in family(samples, "delivery_latency_seconds_bucket").items()
    )
    assert [b for b, _ in buckets] == [*LATENCY_BUCKETS, math.inf]
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)  # cumulative
    assert counts[-1] == value(samples, "delivery_latency_seconds_count") == 3
    assert dict(buckets)[0.005] == 1 and dict(buckets)[10.0] == 2 and dict(buckets)[86400.0] == 2
    assert math.isclose(value(samples, "delivery_latency_seconds_sum"), 0.003 + 7 + 2 * 86400)


def test_remembered_messages_are_bounded() -> None:
    collector = MetricsCollector(max_pending=2)
    for message_id in ("m1", "m2", "m3"):
        collector.observe({"type": "received", "id": message_id, "at": 0.0, "recipients": ["a@x"]})
    collector.observe({"type": "deleted", "id": "m3", "at": 0.0})
    for message_id in ("m1", "m2", "m3"):  # m1 was forgotten first, m3 was deleted
        collector.observe({"type": "delivered", "id": message_id, "at": 1.0, "recipient": "a@x"})
    assert collector.latency.count == 1


async def test_a_collector_that_falls_behind_counts_what_it_dropped() -> None:
    bus = EventBus()
    collector = MetricsCollector()
    async with trio.open_nursery() as nursery:
        await nursery.start(collector.serve, bus)
        for _ in range(SUBSCRIBER_BUFFER + 7):  # no checkpoint: the collector cannot run meanwhile
            bus.publish("received", "m", recipients=["a@x"], listener="relay")
        await settled()
        _, samples = parse(collector.render())
        nursery.cancel_scope.cancel()
    dropped = value(samples, "events_dropped_total")
    assert dropped >= 6  # a receiver already waiting takes one event past the buffer
    assert value(samples, "messages_received_total", listener="relay") + dropped == SUBSCRIBER_BUFFER + 7


def test_gauges_are_read_when_scraped() -> None:
    open_connections = [4]
    stats = {
        "queued": 1,
        "deferred": 2,
        "held": 0,
        "bounced": 3,
        "corrupt": 0,
        "scheduled": 3,
        "in_flight": 1,
    }
    collector = MetricsCollector(Sources(lambda: stats, Pool, lambda: open_connections[0]))
    types, samples = parse(collector.render())
    assert {dict(k)["state"]: v for k, v in family(samples, "queue_messages").items()} == {
        "queued": 1,
        "deferred": 2,
        "held": 0,
        "bounced": 3,
        "corrupt": 0,
    }
    assert types["hedwigpy_queue_messages"] == "gauge"
    assert value(samples, "queue_in_flight") == 1
    assert value(samples, "smtp_connections_open") == 4
    assert value(samples, "pool_connections", state="active") == 2
    assert value(samples, "pool_connections", state="idle") == 3
    assert value(samples, "pool_connections_opened_total") == 7
    assert value(samples, "pool_reused_total") == 11
    assert types["hedwigpy_pool_reused_total"] == "counter"
    open_connections[0] = 0
    stats["queued"] = 5
    _, samples = parse(collector.render())
    assert value(samples, "smtp_connections_open") == 0
    assert value(samples, "queue_messages", state="queued") == 5


async def get(app: Any, scope: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    return await app.test_client().get("/metrics", headers=headers or {}, scope_base=scope)


async def test_the_route_serves_the_page_with_the_same_auth_as_the_rest() -> None:
    loopback = {"client": ("127.0.0.1", 50000)}
    collector = MetricsCollector()
    collector.observe({"type": "received", "id": "m", "at": 0.0, "recipients": ["a@x"], "listener": "relay"})
    app = create_app(sample_queue(), lambda: True, metrics=collector)
    resp = await get(app, loopback)
    assert resp.status_code == 200 and resp.headers["Content-Type"] == CONTENT_TYPE
    _, samples = parse(await resp.get_data(as_text=True))
    assert value(samples, "messages_received_total", listener="relay") == 1

    resp = await get(app, {"client": ("192.0.2.1", 50000)})
    assert resp.status_code == 403

    # without a collector the queue gauges are still there
    _, samples = parse(await (await get(create_app(sample_queue(), lambda: True), loopback)).get_data(True))
    assert value(samples, "queue_messages", state="held") == 1

    keyed = create_app(sample_queue(), lambda: True, (ApiKeyConfig("prom", hash_password("s3cret", ln=1)),))
    remote = {"client": ("192.0.2.1", 50000)}
    assert (await get(keyed, remote)).status_code == 401
    ok = await get(keyed, remote, {"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    parse(await ok.get_data(as_text=True))
