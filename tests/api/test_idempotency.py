"""`Idempotency-Key` on `POST /v1/messages` through quart's test client (`hedwigpy.api._idempotency`):
the first answer replayed without sending again (also from a new store over the same directory, as after
a restart), 422 for another body, 409 while the first is in flight, 400 for a bad key, keys per principal,
errors not recorded, expiry."""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from hedwigpy.api._idempotency import MAX_KEY_LENGTH, IdempotencyStore
from hedwigpy.auth import hash_password
from hedwigpy.config import ApiKeyConfig
from hedwigpy.storage import StoredMessage
from hedwigpy.worker.results import Result

from .submit_api import Api, ScriptedUpstream, assert_problem, raw

pytestmark = pytest.mark.timeout(60)

KEY = {"Idempotency-Key": "order-1234"}


def files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def principals(directory: Path) -> list[str]:
    return sorted(json.loads(p.read_bytes())["principal"] for p in files(directory))


def age(path: Path, seconds: float) -> None:
    """Make the record at `path` `seconds` older, inside and out."""
    record = json.loads(path.read_bytes())
    record["created"] -= seconds
    path.write_text(json.dumps(record))
    old = time.time() - seconds
    os.utime(path, (old, old))


async def store_at(path: Path, **kwargs: Any) -> IdempotencyStore:
    store = IdempotencyStore(path, **kwargs)
    await store.open()
    return store


async def test_same_key_replays_the_first_answer_and_sends_once(tmp_path: Path) -> None:
    api = Api(idempotency=await store_at(tmp_path / "idem"))
    first = await api.post(raw(), KEY)
    assert first[0] == 200 and first[2]["status"] == "delivered"
    assert "Idempotent-Replayed" not in first[1]
    again = await api.post(raw(), KEY)
    assert (again[0], again[2]) == (first[0], first[2])
    assert again[1]["Idempotent-Replayed"] == "true"
    assert len(api.upstream.calls) == 1

    # the record: durable JSON named by the key's hash, with the answer and the body's hash
    [path] = (tmp_path / "idem").iterdir()
    assert path.suffix == ".json" and len(path.stem) == 64
    record = json.loads(path.read_bytes())
    assert record["status"] == 200 and record["body"] == first[2]
    assert record["principal"] == "ip:127.0.0.1" and abs(record["created"] - time.time()) < 60

    # a restart: a new store and app over the same directory still replays
    restarted = Api(idempotency=await store_at(tmp_path / "idem"))
    replay = await restarted.post(raw(), KEY)
    assert (replay[0], replay[2]) == (first[0], first[2])
    assert restarted.untouched()

    # another key is another request
    other = await api.post(raw(), {"Idempotency-Key": "order-1235"})
    assert other[0] == 200 and other[2]["id"] != first[2]["id"]
    assert len(api.upstream.calls) == 2


async def test_a_queued_202_is_replayed_and_queued_once(tmp_path: Path) -> None:
    api = Api({"ann@example.net": "450 4.2.1 Busy"}, idempotency=await store_at(tmp_path))
    first = await api.post(raw(), KEY)
    assert first[0] == 202
    again = await api.post(raw(), KEY)
    assert (again[0], again[2]) == (202, first[2])
    assert len(api.stored()) == 1


async def test_without_a_key_nothing_is_recorded(tmp_path: Path) -> None:
    api = Api(idempotency=await store_at(tmp_path))
    assert [(await api.post(raw()))[0] for _ in range(2)] == [200, 200]
    assert len(api.upstream.calls) == 2
    assert files(tmp_path) == []


async def test_another_body_with_the_same_key_is_422(tmp_path: Path) -> None:
    api = Api(idempotency=await store_at(tmp_path))
    assert (await api.post(raw(), KEY))[0] == 200
    answer = await api.post(raw(recipients=["bob@example.net"]), KEY)
    assert_problem(answer, 422, ["Idempotency-Key"], "different request body")
    assert len(api.upstream.calls) == 1


@pytest.mark.parametrize("key", ["", "   ", "k" * (MAX_KEY_LENGTH + 1)])
async def test_a_bad_key_is_400_and_nothing_is_sent(tmp_path: Path, key: str) -> None:
    api = Api(idempotency=await store_at(tmp_path))
    assert_problem(await api.post(raw(), {"Idempotency-Key": key}), 400, ["Idempotency-Key"])
    assert api.untouched()


async def test_the_longest_key_is_accepted(tmp_path: Path) -> None:
    api = Api(idempotency=await store_at(tmp_path))
    headers = {"Idempotency-Key": "k" * MAX_KEY_LENGTH}
    assert [(await api.post(raw(), headers))[0] for _ in range(2)] == [200, 200]
    assert len(api.upstream.calls) == 1


async def test_errors_are_not_recorded(tmp_path: Path) -> None:
    api = Api(idempotency=await store_at(tmp_path))
    assert_problem(await api.post(raw(recipients=[]), KEY), 400, ["recipients"])
    api.ready = False
    assert_problem(await api.post(raw(), KEY), 503)
    api.ready = True
    assert (await api.post(raw(), KEY))[0] == 200  # nothing was sent before: this one goes
    assert len(api.upstream.calls) == 1


async def test_keys_are_per_principal(tmp_path: Path) -> None:
    keys = (
        ApiKeyConfig("billing", hash_password("k1", ln=1)),
        ApiKeyConfig("shop", hash_password("k2", ln=1)),
    )
    api = Api(api_keys=keys, idempotency=await store_at(tmp_path))
    remote = {"client": ("192.0.2.7", 40000)}
    first = await api.post(raw(), {**KEY, "Authorization": "Bearer k1"}, remote)
    second = await api.post(raw(), {**KEY, "Authorization": "Bearer k2"}, remote)
    assert first[0] == second[0] == 200 and first[2]["id"] != second[2]["id"]
    replay = await api.post(raw(), {**KEY, "Authorization": "Bearer k1"}, {"client": ("192.0.2.8", 1)})
    assert replay[2] == first[2]
    assert len(api.upstream.calls) == 2
    assert principals(tmp_path) == ["key:billing", "key:shop"]


class SlowUpstream(ScriptedUpstream):
    """Delivery that waits for `release` before answering."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = trio.Event()
        self.release = trio.Event()

    async def deliver(
        self,
        message: StoredMessage,
        recipients: Sequence[str],
        *,
        content: Callable[[], AsyncIterator[bytes]] | None = None,
        deadline: float | None = None,
    ) -> list[Result]:
        self.entered.set()
        await self.release.wait()
        return await super().deliver(message, recipients, content=content, deadline=deadline)


async def test_a_duplicate_in_flight_is_409(tmp_path: Path) -> None:
    api = Api(idempotency=await store_at(tmp_path))
    slow = SlowUpstream()
    api.upstream.deliver = slow.deliver  # type: ignore[method-assign]
    answers: list[tuple[int, Any, Any]] = []

    async def first() -> None:
        answers.append(await api.post(raw(), KEY))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        with trio.fail_after(10):
            await slow.entered.wait()
        busy = await api.post(raw(), KEY)
        assert_problem(busy, 409, ["Idempotency-Key"], "request in progress")
        slow.release.set()
    [(status, _, body)] = answers
    assert status == 200
    again = await api.post(raw(), KEY)
    assert again[2] == body and len(slow.calls) == 1


async def test_expired_records_are_ignored_and_swept(tmp_path: Path) -> None:
    store = await store_at(tmp_path, ttl=3600)
    api = Api(idempotency=store)
    first = await api.post(raw(), KEY)
    [path] = files(tmp_path)
    age(path, 7200)
    await trio.Path(tmp_path / "leftover.tmp").write_bytes(b"{")
    assert await store.sweep() == 2
    assert files(tmp_path) == []

    # expired but not yet swept: served afresh
    again = await api.post(raw(), KEY)
    assert again[0] == 200 and again[2]["id"] != first[2]["id"]
    [path] = files(tmp_path)
    age(path, 7200)  # the file is young, the record expired
    os.utime(path)
    third = await api.post(raw(), KEY)
    assert third[2]["id"] not in (first[2]["id"], again[2]["id"])
    assert len(api.upstream.calls) == 3
