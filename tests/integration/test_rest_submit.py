"""`POST /v1/messages` against the real daemon with httpx: cut-through to an aiosmtpd upstream found over
the loopback DNS server — 200 when the upstream takes the message, 202 (and the spool) when it answers
450, 200 "rejected" (and nothing kept) on a 550. The same submit step as SMTP, end to end."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dns_server import DnsServer

from .daemon import Daemon, read_message
from .outbound import HOST1, MX1, events, publish, run, where
from .upstream import UpstreamPool

pytestmark = pytest.mark.timeout(60)


def message(subject: str) -> bytes:
    return (
        f"From: App <app@src.example>\r\nTo: ann@example.net\r\nSubject: {subject}\r\n\r\n"
        f"This is {subject}.\r\n"
    ).encode()


def post(client: httpx.Client, subject: str, *recipients: str) -> httpx.Response:
    return client.post(
        "/v1/messages",
        json={
            "envelope_from": "app@src.example",
            "recipients": list(recipients),
            "raw": base64.b64encode(message(subject)).decode(),
        },
    )


def test_cut_through_200_queued_202_refused_200(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    mx1 = upstreams.add(
        MX1,
        name="mx1.example.net",
        rcpt_replies={
            "busy@example.net": "450 4.2.1 Mailbox busy",
            "gone@example.net": "550 5.1.1 No such user",
        },
    )
    d = run(tmp_path, config, daemon_factory, dns, upstreams, cut_through=True, cut_through_timeout="10s")
    base_url = f"http://{config['http']['addr']}"
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as client:
        # the upstream takes it while we wait: 200, its reply, nothing kept
        resp = post(client, "through", "ann@example.net")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"] == "delivered"
        [rcpt] = body["recipients"]
        assert rcpt["address"] == "ann@example.net" and rcpt["status"] == "delivered"
        host, _, text = rcpt["message"].partition(": ")
        assert rcpt["code"] == 250 and host == HOST1 and text.startswith("OK")
        assert where(d, body["id"]) == "gone"
        [txn] = mx1.transactions
        assert (txn.mail_from, txn.rcpt_tos, txn.subject) == (
            "app@src.example",
            ["ann@example.net"],
            "through",
        )
        assert txn.content.startswith(
            b"Received: from [127.0.0.1]\r\n\tby mx.test.example (hedwigpy) with HTTP"
        )
        assert f"Message-ID: <{body['id']}@mx.test.example>".encode() in txn.content

        # the upstream says 450: 202, queued for the worker, which knows what the upstream said
        resp = post(client, "later", "busy@example.net")
        assert resp.status_code == 202, resp.text
        body = resp.json()
        assert body["status"] == "queued"
        assert body["recipients"] == [
            {
                "address": "busy@example.net",
                "status": "queued",
                "code": 250,
                "enhanced": "2.0.0",
                "message": f"Ok: queued as {body['id']}",
            }
        ]
        assert where(d, body["id"]) in ("queued", "deferred")
        shown = client.get(f"/v1/messages/{body['id']}").json()
        assert shown["listener"] == "http" and shown["client_addr"].startswith("127.0.0.1:")
        [status] = shown["status"]["recipients"]
        assert status["state"] == "pending" and status["last"]["code"] == 450

        # refused for good: 200, the upstream's 550, nothing kept (the client has its answer)
        resp = post(client, "never", "gone@example.net")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"] == "rejected"
        assert body["recipients"][0]["code"] == 550 and body["recipients"][0]["enhanced"] == "5.1.1"
        assert where(d, body["id"]) == "gone"

        # structured: composed here, delivered the same way
        resp = client.post(
            "/v1/messages",
            json={
                "from": "App <app@src.example>",
                "to": ["Ann <ann@example.net>"],
                "subject": "Grüße",
                "text": "Hi",
            },
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] == "delivered"
        txn = mx1.transactions[-1]
        assert txn.rcpt_tos == ["ann@example.net"] and b"Subject: =?utf-8?" in txn.content
        assert b"To: Ann <ann@example.net>\r\n" in txn.content

        # a bad request: 400, nothing reaches the upstream or the spool
        before = len(mx1.connections)
        resp = client.post(
            "/v1/messages",
            json={
                "envelope_from": "app@src.example\r\nRCPT TO:<x@example.net>",
                "recipients": [],
                "raw": "%",
            },
        )
        assert resp.status_code == 400
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert [e["field"] for e in resp.json()["errors"]] == ["envelope_from", "recipients", "raw"]
        assert len(mx1.connections) == before

    queued = d.spooled("queued") + d.spooled("deferred")
    assert len(queued) == 1
    envelope, content = read_message(queued[0])
    assert envelope["recipients"] == ["busy@example.net"] and b"Subject: later" in content
    received = [e for e in events(d, "received") if e.get("listener") == "http"]
    assert [e["status"] for e in received] == ["delivered", "queued", "rejected", "delivered"]
