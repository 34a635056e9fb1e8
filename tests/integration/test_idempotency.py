"""`Idempotency-Key` on `POST /v1/messages` against the real daemon: the same key twice is one delivery at
the aiosmtpd upstream and the same answer, and so it stays after a restart."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dns_server import DnsServer

from .daemon import Daemon
from .outbound import MX1, publish, run
from .upstream import UpstreamPool

pytestmark = pytest.mark.timeout(60)

MESSAGE = b"From: app@src.example\r\nTo: ann@example.net\r\nSubject: once\r\n\r\nx\r\n"
BODY = {
    "envelope_from": "app@src.example",
    "recipients": ["ann@example.net"],
    "raw": base64.b64encode(MESSAGE).decode(),
}
KEY = {"Idempotency-Key": "invoice-2026-0042"}


def test_same_key_is_delivered_once_across_a_restart(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(MX1, name="mx1.example.net")
    d = run(tmp_path, config, daemon_factory, dns, upstreams, cut_through=True, cut_through_timeout="10s")
    base_url = f"http://{config['http']['addr']}"
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
        first = client.post("/v1/messages", json=BODY, headers=KEY)
        assert first.status_code == 200, first.text
        assert first.json()["status"] == "delivered"
        again = client.post("/v1/messages", json=BODY, headers=KEY)
        assert (again.status_code, again.json()) == (200, first.json())
        assert again.headers["Idempotent-Replayed"] == "true"
        assert len(mx1.transactions) == 1

    [record] = (d.spool / "idempotency").glob("*.json")
    assert json.loads(record.read_bytes())["body"] == first.json()

    assert d.stop() == 0
    d.start()
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
        replay = client.post("/v1/messages", json=BODY, headers=KEY)
        assert (replay.status_code, replay.json()) == (200, first.json())
        other = client.post("/v1/messages", json={**BODY, "recipients": ["bob@example.net"]}, headers=KEY)
        assert other.status_code == 422
        assert other.headers["content-type"].startswith("application/problem+json")
    assert len(mx1.transactions) == 1
    [txn] = mx1.transactions
    assert txn.subject == "once"
