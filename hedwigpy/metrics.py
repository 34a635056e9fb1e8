"""Metrics for `GET /metrics`, in the Prometheus text exposition format 0.0.4 (written here: the format is
a few lines of text, and prometheus_client's process-global registry fits a library embedded in other
programs badly).

Counters are fed by `MetricsCollector.serve`, a task subscribed to the `EventBus`; gauges (queue depth,
open SMTP connections, the delivery pool) are read from their owners when a scrape renders the page.
Label values that come from mail are bounded: at most `MAX_DOMAINS` recipient domains (and
`MAX_LISTENERS` listener names) get their own series, later ones are counted as "other". The delivery
latency histogram needs each message's received time; at most `MAX_PENDING` messages are remembered (the
oldest are forgotten first), so a message received before a restart, or one waiting behind that many
others, is not observed.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from .events import Event, EventBus, Subscription

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "hedwigpy_"
OTHER = "other"
MAX_DOMAINS = 1000
MAX_LISTENERS = 100
MAX_PENDING = 100_000
# From a cut-through relay (milliseconds) to the end of a retry schedule (days).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    86400.0,
    5 * 86400.0,
)
_RECIPIENT_EVENTS = {"delivered": "delivered", "deferred": "deferred", "bounced": "bounced"}


class PoolStats(Protocol):
    @property
    def active(self) -> int: ...
    @property
    def idle(self) -> int: ...
    @property
    def opened(self) -> int: ...
    @property
    def reused(self) -> int: ...
    @property
    def failed(self) -> int: ...


@dataclass
class Sources:
    """Where gauges are read at scrape time; any may be missing (its metrics are left out)."""

    queue_stats: Callable[[], Mapping[str, int]] | None = None
    pool_stats: Callable[[], PoolStats] | None = None
    smtp_connections: Callable[[], int] | None = None


class BoundedLabels:
    """Label values seen so far, at most `limit` of them; `get` answers "other" once the set is full."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: set[str] = set()

    def get(self, value: str) -> str:
        if value in self._known:
            return value
        if len(self._known) >= self.limit or value == OTHER:
            return OTHER
        self._known.add(value)
        return value


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations ≤ it) for every bucket, then (+inf, count)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip(self.buckets, self.counts, strict=True):
            running += n
            out.append((bound, running))
        out.append((math.inf, self.count))
        return out


@dataclass
class _Pending:
    received_at: float
    left: int  # recipients without a final answer yet


class MetricsCollector:
    """The daemon's counters, and the page a scrape gets (`render`)."""

    def __init__(
        self,
        sources: Sources | None = None,
        *,
        max_domains: int = MAX_DOMAINS,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.sources = sources if sources is not None else Sources()
        self.received: Counter[str] = Counter()  # by listener
        self.recipients: dict[str, Counter[str]] = {kind: Counter() for kind in _RECIPIENT_EVENTS}
        self.latency = Histogram(LATENCY_BUCKETS)
        self._domains = BoundedLabels(max_domains)
        self._listeners = BoundedLabels(MAX_LISTENERS)
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._max_pending = max_pending
        self._subscription: Subscription | None = None

    @property
    def events_dropped(self) -> int:
        """Events the collector missed because it could not keep up (the bus never blocks)."""
        return 0 if self._subscription is None else self._subscription.dropped

    async def serve(
        self, events: EventBus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Count `events` until cancelled; started once subscribed, so nothing published after is missed."""
        async with events.subscribe() as subscription:
            self._subscription = subscription
            task_status.started()
            async for event in subscription:
                self.observe(event)

    def observe(self, event: Event) -> None:
        """Count one event from the bus."""
        kind = event.get("type")
        if kind == "received":
            self._received(event)
        elif kind in _RECIPIENT_EVENTS:
            recipient = event.get("recipient")
            domain = _domain(recipient) if isinstance(recipient, str) else ""
            self.recipients[kind][self._domains.get(domain)] += 1
            if kind != "deferred":
                self._finished(str(event.get("id")), event.get("at"))
        elif kind == "deleted":
            self._pending.pop(str(event.get("id")), None)

    def _received(self, event: Event) -> None:
        listener = event.get("listener")
        self.received[self._listeners.get(listener if isinstance(listener, str) else "")] += 1
        at, recipients = event.get("at"), event.get("recipients")
        if not isinstance(at, int | float) or not isinstance(recipients, list) or not recipients:
            return
        message_id = str(event.get("id"))
        self._pending[message_id] = _Pending(float(at), len(recipients))
        self._pending.move_to_end(message_id)
        while len(self._pending) > self._max_pending:
            self._pending.popitem(last=False)

    def _finished(self, message_id: str, at: object) -> None:
        pending = self._pending.get(message_id)
        if pending is None:
            return
        if isinstance(at, int | float):
            self.latency.observe(max(0.0, float(at) - pending.received_at))
        pending.left -= 1
        if pending.left <= 0:
            del self._pending[message_id]

    def render(self) -> str:
        """The exposition page: `# HELP`, `# TYPE` and samples for every metric family."""
        out: list[str] = []
        _family(
            out,
            "messages_received_total",
            "counter",
            "Messages accepted (SMTP or HTTP), by listener.",
            (({"listener": k}, v) for k, v in sorted(self.received.items())),
        )
        helps = {
            "delivered": "Recipients delivered, by recipient domain.",
            "deferred": "Delivery attempts deferred (to be retried), by recipient domain.",
            "bounced": "Recipients that failed for good, by recipient domain.",
        }
        for kind, counts in self.recipients.items():
            _family(
                out,
                f"recipients_{kind}_total",
                "counter",
                helps[kind] + f' At most {self._domains.limit} domains; the rest are "{OTHER}".',
                (({"domain": k}, v) for k, v in sorted(counts.items())),
            )
        self._render_latency(out)
        if self.sources.queue_stats is not None:
            stats = self.sources.queue_stats()
            states = {k: v for k, v in stats.items() if k not in ("scheduled", "in_flight")}
            _family(
                out,
                "queue_messages",
                "gauge",
                "Messages in the spool, by state.",
                (({"state": k}, v) for k, v in sorted(states.items())),
            )
            if "in_flight" in stats:
                _family(
                    out,
                    "queue_in_flight",
                    "gauge",
                    "Delivery attempts running now.",
                    [({}, stats["in_flight"])],
                )
        if self.sources.smtp_connections is not None:
            _family(
                out,
                "smtp_connections_open",
                "gauge",
                "SMTP client connections open now, every listener together.",
                [({}, self.sources.smtp_connections())],
            )
        if self.sources.pool_stats is not None:
            pool = self.sources.pool_stats()
            _family(
                out,
                "pool_connections",
                "gauge",
                "Outbound SMTP connections in the delivery pool: active (in use) or idle.",
                [({"state": "active"}, pool.active), ({"state": "idle"}, pool.idle)],
            )
            _family(
                out,
                "pool_connections_opened_total",
                "counter",
                "Outbound SMTP connections opened.",
                [({}, pool.opened)],
            )
            _family(
                out,
                "pool_connections_failed_total",
                "counter",
                "Outbound SMTP connections that could not be set up.",
                [({}, pool.failed)],
            )
            _family(
                out,
                "pool_reused_total",
                "counter",
                "Deliveries that reused an idle pooled connection.",
                [({}, pool.reused)],
            )
        _family(
            out,
            "events_dropped_total",
            "counter",
            "Events the metrics collector missed because it fell behind the event bus.",
            [({}, self.events_dropped)],
        )
        return "".join(out)

    def _render_latency(self, out: list[str]) -> None:
        name = PREFIX + "delivery_latency_seconds"
        out.append(f"# HELP {name} Seconds from a message's receipt to the final answer for a recipient.\n")
        out.append(f"# TYPE {name} histogram\n")
        for bound, n in self.latency.cumulative():
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {n}\n')
        out.append(f"{name}_sum {_number(self.latency.sum)}\n")
        out.append(f"{name}_count {self.latency.count}\n")


def _domain(address: str) -> str:
    _, at, domain = address.rpartition("@")
    return domain.lower() if at and domain else ""


def _family(
    out: list[str],
    name: str,
    kind: str,
    help_text: str,
    samples: Iterable[tuple[Mapping[str, str], float]],
) -> None:
    full = PREFIX + name
    out.append(f"# HELP {full} {_escape_help(help_text)}\n")
    out.append(f"# TYPE {full} {kind}\n")
    for labels, value in samples:
        out.append(f"{full}{_labels(labels)} {_number(value)}\n")


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
