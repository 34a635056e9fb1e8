"""[[webhooks]] with the real daemon: a message sent over REST to an aiosmtpd upstream produces signed
"received" and "delivered" POSTs to a stdlib receiver, the first answered 500 and retried; events that
could not be delivered are kept under spool/webhooks/ and sent after a restart."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dns_server import DnsServer

from .daemon import Daemon, free_port
from .outbound import MX1, publish, run
from .upstream import UpstreamPool

pytestmark = pytest.mark.timeout(60)

SECRET = "integration-secret"


class Receiver:
    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(body) for _, body in self.requests]

    def wait(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.requests) < count:
            assert time.monotonic() < deadline, self.requests
            time.sleep(0.05)


@contextmanager
def receiving(port: int, statuses: list[int] | None = None) -> Iterator[Receiver]:
    receiver = Receiver(list(statuses or []))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with receiver.lock:
                receiver.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def verified(headers: dict[str, str], body: bytes) -> bool:
    ts = headers["x-hedwig-timestamp"]
    mac = hmac.new(SECRET.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["x-hedwig-signature"], f"sha256={mac}")


def send(config: dict[str, Any], subject: str) -> httpx.Response:
    raw = f"From: app@src.example\r\nTo: ann@example.net\r\nSubject: {subject}\r\n\r\nx\r\n".encode()
    body = {
        "envelope_from": "app@src.example",
        "recipients": ["ann@example.net"],
        "raw": base64.b64encode(raw).decode(),
    }
    with httpx.Client(base_url=f"http://{config['http']['addr']}", timeout=30, trust_env=False) as client:
        return client.post("/v1/messages", json=body)


def test_signed_retried_and_kept_across_a_restart(
    tmp_path: Path,
    config: dict[str, Any],
    daemon_factory: type[Daemon],
    dns: DnsServer,
    upstreams: UpstreamPool,
) -> None:
    port = free_port()
    config["webhooks"] = [
        {"url": f"http://127.0.0.1:{port}/hook", "secret": SECRET, "events": ["received", "delivered"]}
    ]
    publish(dns, "example.net", (10, "mx1.example.net", MX1))
    upstreams.add(MX1, name="mx1.example.net")
    with receiving(port, [500]) as receiver:
        d = run(tmp_path, config, daemon_factory, dns, upstreams, cut_through=True, cut_through_timeout="10s")
        resp = send(config, "one")
        assert resp.status_code == 200, resp.text
        message_id = resp.json()["id"]
        receiver.wait(3)  # received (500), received again, delivered
        time.sleep(0.3)
    assert all(verified(h, b) for h, b in receiver.requests)
    assert [(e["type"], e["id"]) for e in receiver.events()] == [
        ("received", message_id),
        ("received", message_id),
        ("delivered", message_id),
    ]
    assert receiver.events()[2]["recipient"] == "ann@example.net"

    # the receiver is gone: the events wait in the spool, and go out after a restart
    resp = send(config, "two")
    assert resp.status_code == 200, resp.text
    second_id = resp.json()["id"]
    hooks = d.spool / "webhooks"
    deadline = time.monotonic() + 10
    while len(list(hooks.glob("*/*.json"))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert d.stop() == 0
    assert len(list(hooks.glob("*/*.json"))) == 2
    with receiving(port) as receiver:
        d.start()
        receiver.wait(2)
        deadline = time.monotonic() + 10
        while list(hooks.glob("*/*.json")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert [(e["type"], e["id"]) for e in receiver.events()] == [
        ("received", second_id),
        ("delivered", second_id),
    ]
    assert all(verified(h, b) for h, b in receiver.requests)
