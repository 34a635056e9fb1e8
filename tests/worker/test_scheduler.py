"""The scheduler under trio's MockClock: backoff timing, lifetime, bounces, hold/release, flush, rebuild —
hours of queue time in milliseconds. Delivery is scripted; the spool is the in-memory one."""

from __future__ import annotations

import email
import email.policy
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from hedwigpy.config import Config, parse_config
from hedwigpy.lifecycle import Drain
from hedwigpy.smtp import Reply
from hedwigpy.storage import (
    Attempt,
    DeliveryStatus,
    Envelope,
    MemoryStorage,
    RecipientStatus,
    State,
    StoredMessage,
)
from hedwigpy.worker.results import Result, result_for
from hedwigpy.worker.scheduler import Scheduler

BASE = 1_800_000_000.0  # the wall clock at trio time 0
HOST = "mx.example.net[192.0.2.1]"
pytestmark = pytest.mark.timeout(20)


class ScriptedDelivery:
    """Answers each recipient from its script, one reply per attempt (the last one repeats)."""

    def __init__(self, scripts: dict[str, Sequence[str]], *, delay: float = 0.0) -> None:
        self.delay = delay  # each attempt takes this long
        self.finished: list[str] = []  # ids of the attempts that were not cancelled
        # Bounces to the sender stay queued, so tests can read them.
        self.scripts = {"sender@example.org": ["451 4.0.0 keep the bounce"]}
        self.scripts.update({rcpt: list(replies) for rcpt, replies in scripts.items()})
        self.calls: list[tuple[float, str, tuple[str, ...]]] = []  # (wall time, message id, recipients)

    async def deliver(
        self,
        message: StoredMessage,
        recipients: Sequence[str],
        *,
        content: Callable[[], AsyncIterator[bytes]] | None = None,
        deadline: float | None = None,
    ) -> list[Result]:
        self.calls.append((wall(), message.id, tuple(recipients)))
        if self.delay:
            await trio.sleep(self.delay)
        self.finished.append(message.id)
        results: list[Result] = []
        for rcpt in recipients:
            script = self.scripts.get(rcpt, ["250 2.0.0 ok"])
            line = script.pop(0) if len(script) > 1 else script[0]
            code, enhanced, text = line.split(" ", 2)
            results.append(result_for(rcpt, Reply(int(code), enhanced, text), HOST))
        return results

    def times(self, message_id: str) -> list[float]:
        return [t - BASE for t, mid, _ in self.calls if mid == message_id]

    def attempts_of(self, recipient: str) -> int:
        return sum(recipient in rcpts for _, _, rcpts in self.calls)


def wall() -> float:
    return BASE + trio.current_time()


def config(**queue: object) -> Config:
    defaults: dict[str, object] = {"retry_initial": "60s", "retry_factor": 2.0, "retry_jitter": 0.0}
    return parse_config(
        {"server": {"hostname": "mx.test.example"}, "queue": {**defaults, **queue}}, Path("/x"), {}
    )


async def spool(
    storage: MemoryStorage, *recipients: str, sender: str = "sender@example.org"
) -> StoredMessage:
    writer = storage.writer(Envelope(sender=sender, recipients=recipients, received_at=wall()))
    await writer.write(b"Subject: test\r\nFrom: <sender@example.org>\r\n\r\nbody\r\n")
    return await writer.commit()


@asynccontextmanager
async def running(
    storage: MemoryStorage, delivery: ScriptedDelivery, cfg: Config
) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(storage, delivery, cfg, clock=wall)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.serve)
        yield scheduler
        nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], bool], limit: float = 30 * 86400) -> None:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - polling plain state; the mock clock makes it free
            await trio.sleep(1)


def dsns(storage: MemoryStorage) -> list[tuple[StoredMessage, bytes]]:
    return [(m, body) for m, body in storage.messages.values() if m.envelope.sender == ""]


async def test_450_twice_then_250_is_delivered_once_on_the_third_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage, delivery = (
        MemoryStorage(),
        ScriptedDelivery({"r@example.net": ["450 4.2.1 busy"] * 2 + ["250 2.0.0 ok"]}),
    )
    async with running(storage, delivery, config()) as scheduler:
        message = await spool(storage, "r@example.net")
        scheduler.submit_fresh(message)
        await until(lambda: message.id not in storage.messages)
    assert delivery.times(message.id) == pytest.approx([0, 60, 180], abs=1.5)
    assert [c[2] for c in delivery.calls] == [("r@example.net",)] * 3
    assert not storage.statuses and not dsns(storage)


async def test_backoff_is_capped_and_the_status_records_each_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage, delivery = MemoryStorage(), ScriptedDelivery({"r@example.net": ["451 4.4.1 no"]})
    async with running(storage, delivery, config(retry_max="5m")) as scheduler:
        message = await spool(storage, "r@example.net")
        scheduler.submit_fresh(message)
        await until(lambda: len(delivery.calls) >= 6)
        status = storage.statuses[message.id]
    gaps = [b - a for a, b in zip(delivery.times(message.id), delivery.times(message.id)[1:], strict=False)]
    assert gaps == pytest.approx([60, 120, 240, 300, 300], abs=1.5)
    assert status.attempts >= 5 and status.recipients[0].state == "pending"
    assert storage.messages[message.id][0].state is State.DEFERRED
    assert status.next_attempt is not None and status.next_attempt > wall() - 1


async def test_jittered_retries_stay_within_bounds(autojump_clock: trio.testing.MockClock) -> None:
    storage, delivery = MemoryStorage(), ScriptedDelivery({"r@example.net": ["451 4.4.1 no"]})
    async with running(storage, delivery, config(retry_jitter=0.2, retry_max="1h")) as scheduler:
        messages = [await spool(storage, "r@example.net") for _ in range(20)]
        for m in messages:
            scheduler.submit_fresh(m)
        await until(lambda: all(len(delivery.times(m.id)) >= 3 for m in messages))
    seconds = [delivery.times(m.id)[1] - delivery.times(m.id)[0] for m in messages]
    assert all(48 - 1 <= s <= 72 + 1 for s in seconds), seconds
    assert max(seconds) - min(seconds) > 5  # spread out, not in lockstep


async def test_mixed_recipients_end_delivered_retried_and_bounced_with_one_dsn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    scripts: dict[str, Sequence[str]] = {
        "ok@example.net": ["250 2.0.0 ok"],
        "busy@example.net": ["450 4.2.1 busy"],
        "gone@example.net": ["550 5.1.1 no such user"],
    }
    storage, delivery = MemoryStorage(), ScriptedDelivery(scripts)
    async with running(storage, delivery, config()) as scheduler:
        message = await spool(storage, *scripts)
        scheduler.submit_fresh(message)
        await until(lambda: len(delivery.times(message.id)) >= 2)
        states = {r.address: r.state for r in storage.statuses[message.id].recipients}
        [(dsn, body)] = dsns(storage)
    assert states == {
        "ok@example.net": "delivered",
        "busy@example.net": "pending",
        "gone@example.net": "failed",
    }
    tried = [rcpts for _, mid, rcpts in delivery.calls if mid == message.id]
    assert tried[1] == ("busy@example.net",)  # only the pending one is tried again
    assert dsn.envelope.recipients == ("sender@example.org",)
    report = email.message_from_bytes(body, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    text = body.decode("utf-8", "replace")
    assert text.count("Final-Recipient:") == 1 and "Final-Recipient: rfc822; gone@example.net" in text
    assert "5.1.1" in text and "busy@example.net" not in text


async def test_a_permanent_failure_bounces_at_once_and_is_removed_after_retention(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage, delivery = MemoryStorage(), ScriptedDelivery({"gone@example.net": ["550 5.1.1 no"]})
    async with running(storage, delivery, config(bounced_retention="1h")) as scheduler:
        message = await spool(storage, "gone@example.net")
        scheduler.submit_fresh(message)
        await until(
            lambda: message.id in storage.messages and storage.messages[message.id][0].state is State.BOUNCED
        )
        assert len(dsns(storage)) == 1
        await until(lambda: message.id not in storage.messages)
        assert wall() - BASE >= 3600
    assert len(delivery.times(message.id)) == 1


async def test_no_bounce_to_the_null_sender(autojump_clock: trio.testing.MockClock) -> None:
    storage, delivery = MemoryStorage(), ScriptedDelivery({"gone@example.net": ["550 5.1.1 no"]})
    async with running(storage, delivery, config()) as scheduler:
        message = await spool(storage, "gone@example.net", sender="")
        scheduler.submit_fresh(message)
        await until(lambda: storage.messages[message.id][0].state is State.BOUNCED)
    assert [m for m, _ in dsns(storage) if m.id != message.id] == []


async def test_lifetime_expiry_bounces_the_pending_recipients(autojump_clock: trio.testing.MockClock) -> None:
    storage, delivery = MemoryStorage(), ScriptedDelivery({"r@example.net": ["451 4.4.1 unreachable"]})
    async with running(storage, delivery, config(max_lifetime="1h", retry_max="10m")) as scheduler:
        message = await spool(storage, "r@example.net")
        scheduler.submit_fresh(message)
        await until(lambda: storage.messages[message.id][0].state is State.BOUNCED)
        expired_at = wall() - BASE
        [(_, body)] = dsns(storage)
    assert 3600 <= expired_at <= 3600 + 600 + 2
    assert storage.statuses[message.id].recipients[0].state == "failed"
    text = body.decode()
    assert "4.4.7" in text and "451 4.4.1 unreachable" in text


async def test_a_held_message_waits_until_released(autojump_clock: trio.testing.MockClock) -> None:
    storage, delivery = (
        MemoryStorage(),
        ScriptedDelivery({"r@example.net": ["450 4.2.1 busy", "250 2.0.0 ok"]}),
    )
    async with running(storage, delivery, config()) as scheduler:
        message = await spool(storage, "r@example.net")
        scheduler.submit_fresh(message)
        await until(
            lambda: len(delivery.calls) == 1 and storage.messages[message.id][0].state is State.DEFERRED
        )
        assert await scheduler.hold(message.id)
        assert storage.messages[message.id][0].state is State.HELD
        await trio.sleep(86400)
        assert len(delivery.calls) == 1 and scheduler.stats()["scheduled"] == 0
        assert not await scheduler.retry(message.id)  # held: not retryable until released
        assert await scheduler.release(message.id)
        await until(lambda: message.id not in storage.messages)
    assert len(delivery.calls) == 2
    assert not await scheduler.release(message.id)


async def test_flush_makes_deferred_mail_due_now(autojump_clock: trio.testing.MockClock) -> None:
    storage, delivery = (
        MemoryStorage(),
        ScriptedDelivery({"r@example.net": ["450 4.2.1 busy", "250 2.0.0 ok"]}),
    )
    async with running(storage, delivery, config(retry_initial="1h")) as scheduler:
        message = await spool(storage, "r@example.net")
        scheduler.submit_fresh(message)
        await until(lambda: storage.messages[message.id][0].state is State.DEFERRED)
        t = wall()
        assert await scheduler.flush() == 1
        await until(lambda: message.id not in storage.messages)
        assert wall() - t < 5


async def test_delete_and_unknown_ids(autojump_clock: trio.testing.MockClock) -> None:
    storage, delivery = MemoryStorage(), ScriptedDelivery({"r@example.net": ["450 4.2.1 busy"]})
    async with running(storage, delivery, config()) as scheduler:
        message = await spool(storage, "r@example.net")
        scheduler.submit_fresh(message)
        await until(lambda: storage.messages[message.id][0].state is State.DEFERRED)
        assert await scheduler.delete(message.id)
        assert message.id not in storage.messages and scheduler.stats()["scheduled"] == 0
        for action in (scheduler.delete, scheduler.hold, scheduler.release, scheduler.retry):
            assert not await action("0" * 24)
        assert await scheduler.show("0" * 24) is None


async def test_a_restart_rebuilds_the_schedule_from_the_spool(autojump_clock: trio.testing.MockClock) -> None:
    storage, delivery = (
        MemoryStorage(),
        ScriptedDelivery({"r@example.net": ["450 4.2.1 busy", "250 2.0.0 ok"]}),
    )
    async with running(storage, delivery, config(retry_initial="10m")) as scheduler:
        deferred = await spool(storage, "r@example.net")
        scheduler.submit_fresh(deferred)
        await until(lambda: storage.messages[deferred.id][0].state is State.DEFERRED)
    queued = await spool(storage, "q@example.net")  # arrived while "down": found in queued/ at start
    restarted = ScriptedDelivery({"r@example.net": ["250 2.0.0 ok"]})
    async with running(storage, restarted, config(retry_initial="10m")) as scheduler:
        await until(lambda: queued.id not in storage.messages)
        assert restarted.times(queued.id) == pytest.approx([delivery.calls[0][0] - BASE + 0], abs=2)
        await until(lambda: deferred.id not in storage.messages)
    assert restarted.times(deferred.id) == pytest.approx([600], abs=2)  # at its due time, not at start


async def test_a_recorded_failure_without_a_bounce_gets_one(autojump_clock: trio.testing.MockClock) -> None:
    """A failure recorded before the worker saw the message (cut-through, or a crash between the status
    and the DSN) is bounced by the next attempt, exactly once."""
    storage = MemoryStorage()
    message = await spool(storage, "gone@example.net", "busy@example.net")
    failed = RecipientStatus(
        "gone@example.net", "failed", 1, Attempt(wall(), 550, "5.1.1", "no such user", HOST)
    )
    await storage.save_status(
        message.id, DeliveryStatus((failed, RecipientStatus("busy@example.net", "pending")))
    )
    delivery = ScriptedDelivery({"busy@example.net": ["450 4.2.1 busy"]})
    async with running(storage, delivery, config()):
        await until(lambda: len(delivery.times(message.id)) >= 3)
        [(_, body)] = dsns(storage)
    assert next(rcpts for _, mid, rcpts in delivery.calls if mid == message.id) == ("busy@example.net",)
    assert b"Final-Recipient: rfc822; gone@example.net" in body and b"busy@example.net" not in body
    assert storage.statuses[message.id].recipients[0].bounced


async def test_a_drain_starts_no_attempt_and_waits_for_those_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    storage, delivery = MemoryStorage(), ScriptedDelivery({}, delay=10)
    drain = Drain()
    scheduler = Scheduler(storage, delivery, config(), clock=wall, concurrency=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(scheduler.serve, drain)
        messages = [await spool(storage, f"r{i}@example.net") for i in range(4)]
        for message in messages:
            scheduler.submit_fresh(message)
        await until(lambda: len(delivery.calls) == 2)  # two slots: two attempts under way
        drain.start()
        # serve returns on its own once the two attempts are done: the nursery needs no cancelling
    assert trio.current_time() == 10
    started = {message_id for _, message_id, _ in delivery.calls}
    assert len(started) == 2 and set(delivery.finished) == started
    assert set(storage.messages) == {m.id for m in messages} - started  # delivered and filed; the rest wait
