"""`GET /metrics` on the real daemon: one message in over SMTP, delivered over MX (loopback DNS, an
aiosmtpd upstream), and the counters, the latency histogram and the pool say so."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import MX1, publish, run, send, settle
from .upstream import UpstreamPool, wait_until

pytestmark = pytest.mark.timeout(60)


def scrape(client: httpx.Client) -> dict[str, float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, float] = {}
    for line in resp.text.splitlines():
        if not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_a_delivered_message_is_counted(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams)
    with httpx.Client(base_url=f"http://{config['http']['addr']}", timeout=10, trust_env=False) as client:
        before = scrape(client)
        assert before["hedwigpy_smtp_connections_open"] == 0
        assert not any(k.startswith("hedwigpy_messages_received_total{") for k in before)
        msg_id = send(d, ["ann@example.net"], "metrics")
        assert settle(d, msg_id) == "gone"
        assert len(mx1.transactions) == 1
        wait_until(lambda: 'hedwigpy_recipients_delivered_total{domain="example.net"}' in scrape(client))
        after = scrape(client)
    assert after['hedwigpy_messages_received_total{listener="relay"}'] == 1
    assert after['hedwigpy_recipients_delivered_total{domain="example.net"}'] == 1
    assert after["hedwigpy_delivery_latency_seconds_count"] == 1
    assert after['hedwigpy_delivery_latency_seconds_bucket{le="+Inf"}'] == 1
    assert after['hedwigpy_queue_messages{state="queued"}'] == 0
    assert after["hedwigpy_pool_connections_opened_total"] == 1
    assert after["hedwigpy_events_dropped_total"] == 0
    assert not any(re.match(r"hedwigpy_recipients_(deferred|bounced)_total\{", k) for k in after)
