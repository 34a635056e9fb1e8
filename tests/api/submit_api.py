"""The harness for the `POST /v1/messages` tests: the app over the real `Submitter`, the in-memory spool
and a scripted upstream standing in for delivery, driven through quart's test client."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hedwigpy.api import create_app
from hedwigpy.api._idempotency import IdempotencyStore
from hedwigpy.api._intake import MessageIntake
from hedwigpy.config import ApiKeyConfig, Config, parse_config
from hedwigpy.policy import RateLimiter
from hedwigpy.smtp import Reply
from hedwigpy.storage import MemoryStorage, StoredMessage
from hedwigpy.submit import Submitter
from hedwigpy.worker.results import Result, result_for
from hedwigpy.worker.scheduler import Scheduler

LOOPBACK = {"client": ("127.0.0.1", 50000)}
HOST = "mx.example.net[192.0.2.1]"
MiB = 1024 * 1024
MESSAGE = b"From: App <app@example.org>\r\nTo: Ann <ann@example.net>\r\nSubject: hello\r\n\r\nHello, Ann.\r\n"


class ScriptedUpstream:
    """Delivery answering each recipient from `replies` (default 250), recording what it was given."""

    def __init__(self, replies: Mapping[str, str] | None = None) -> None:
        self.replies = dict(replies or {})
        self.calls: list[tuple[StoredMessage, tuple[str, ...], bytes]] = []

    async def deliver(
        self,
        message: StoredMessage,
        recipients: Sequence[str],
        *,
        content: Callable[[], AsyncIterator[bytes]] | None = None,
        deadline: float | None = None,
    ) -> list[Result]:
        data = b""
        if content is not None:
            data = b"".join([chunk async for chunk in content()])
        self.calls.append((message, tuple(recipients), data))
        results: list[Result] = []
        for rcpt in recipients:
            code, enhanced, text = self.replies.get(rcpt, "250 2.0.0 Ok: accepted").split(" ", 2)
            results.append(result_for(rcpt, Reply(int(code), enhanced, text), HOST))
        return results


def make_config(**sections: Any) -> Config:
    data: dict[str, Any] = {"server": {"hostname": "mx.test.example"}, **sections}
    return parse_config(data, Path("/x"), {})


class Api:
    """The app over a real Submitter, in-memory spool and scripted upstream; `post` answers
    (status, headers, JSON body)."""

    def __init__(
        self,
        replies: Mapping[str, str] | None = None,
        *,
        free_bytes: int = 1 << 40,
        api_keys: Sequence[ApiKeyConfig] = (),
        per_client: int = 0,
        idempotency: IdempotencyStore | None = None,
        **sections: Any,
    ) -> None:
        self.config = make_config(**sections)
        self.storage = MemoryStorage(free_bytes=free_bytes)
        self.upstream = ScriptedUpstream(replies)
        self.scheduler = Scheduler(self.storage, self.upstream, self.config)
        submitter = Submitter(self.config, self.storage, self.upstream, self.scheduler)
        self.intake = MessageIntake(
            self.config, self.storage, submitter.submit, RateLimiter(per_client), idempotency
        )
        self.ready = True
        self.app = create_app(self.scheduler, lambda: self.ready, api_keys, intake=self.intake)
        self.client = self.app.test_client()

    async def post(
        self,
        body: object,
        headers: Mapping[str, str] | None = None,
        scope: dict[str, Any] | None = None,
    ) -> tuple[int, Any, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
        resp = await self.client.post(
            "/v1/messages", data=data, headers=sent, scope_base=LOOPBACK if scope is None else scope
        )
        return resp.status_code, resp.headers, await resp.get_json(force=True)

    def stored(self) -> list[tuple[StoredMessage, bytes]]:
        return list(self.storage.messages.values())

    def untouched(self) -> bool:
        """Nothing spooled, nothing delivered."""
        return not self.storage.messages and not self.upstream.calls


def raw(
    sender: str = "app@example.org",
    recipients: Sequence[object] = ("ann@example.net",),
    content: bytes = MESSAGE,
    **extra: object,
) -> dict[str, object]:
    return {
        "envelope_from": sender,
        "recipients": list(recipients),
        "raw": base64.b64encode(content).decode(),
        **extra,
    }


def assert_problem(
    answer: tuple[int, Any, Any], status: int, fields: Sequence[str] | None = None, detail_part: str = ""
) -> list[dict[str, str]]:
    """The answer is a problem document with `status`, naming exactly `fields` (when given)."""
    code, headers, body = answer
    assert code == status, body
    assert headers["Content-Type"].startswith("application/problem+json")
    assert set(body) == {"type", "title", "status", "detail", "errors"}
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    assert detail_part in body["detail"]
    errors: list[dict[str, str]] = body["errors"]
    assert all(set(e) == {"field", "detail"} and e["detail"] for e in errors)
    if fields is not None:
        assert [e["field"] for e in errors] == list(fields), errors
    return errors
