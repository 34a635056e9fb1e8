"""The submit step (issue 5): the cut-through decision in `hedwigpy.submit` row by row — the reply the
sender gets, what is kept in the spool and with which status — and what the queue then does with a kept
message (retry only what is pending, bounce what was refused).

Delivery is scripted per recipient: a reply line, or "hang" (no answer until the cut-through deadline,
answered as `Deliverer` does then). The spool is the in-memory one, or the filesystem one where fsync,
tmp/ and status files matter. The scheduler is the real one, serving only where a test needs the worker.
"""

from __future__ import annotations

import email
import email.policy
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from hedwigpy.config import Config, ListenerRole, parse_config
from hedwigpy.smtp import Reply
from hedwigpy.storage import (
    DeliveryStatus,
    Envelope,
    FilesystemStorage,
    MemoryStorage,
    State,
    Storage,
    StorageError,
    StoredMessage,
)
from hedwigpy.storage.filesystem import BUFFER_LIMIT
from hedwigpy.submit import RecipientOutcome, Submitted, Submitter
from hedwigpy.worker.results import Result, TransientFailure, result_for
from hedwigpy.worker.scheduler import Scheduler

pytestmark = pytest.mark.timeout(20)

HOST = "mx1.example.net[192.0.2.1]"
HOST2 = "mx2.example.org[192.0.2.2]"
SENDER = "sender@example.org"
BODY = b"Subject: cut-through\r\nFrom: <sender@example.org>\r\n\r\nHello.\r\n"
TIMEOUT = 20.0
HANG = "hang"
# What `Deliverer.deliver` answers for a group still waiting at the deadline.
NO_ANSWER = Reply(451, "4.4.2", "no answer from the upstream in time; the message is kept and retried")
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")

Step = str | tuple[str, str]  # "CODE [ENHANCED] text" from HOST, (host, line), or HANG


def parse_reply(line: str) -> Reply:
    code, _, rest = line.partition(" ")
    first, _, text = rest.partition(" ")
    if _ENHANCED.match(first):
        return Reply(int(code), first, text)
    return Reply(int(code), "", rest)


@dataclass(frozen=True)
class Call:
    message_id: str
    recipients: tuple[str, ...]
    content: bytes | None  # read through `content=` (cut-through), None when the worker delivers
    deadline: float | None
    at: float  # trio time


class ScriptedDelivery:
    """Answers each recipient from its script, one step per attempt (the last one repeats). A "hang"
    answers nothing until `deadline`, then gives what `Deliverer` gives: 451 4.4.2 with no host."""

    def __init__(self, scripts: Mapping[str, Sequence[Step]]) -> None:
        # Bounces to the sender stay queued, so tests can read them.
        self.scripts: dict[str, list[Step]] = {SENDER: ["451 4.0.0 keep the bounce"]}
        self.scripts.update({rcpt: list(steps) for rcpt, steps in scripts.items()})
        self.calls: list[Call] = []

    async def deliver(
        self,
        message: StoredMessage,
        recipients: Sequence[str],
        *,
        content: Callable[[], AsyncIterator[bytes]] | None = None,
        deadline: float | None = None,
    ) -> list[Result]:
        body = None
        if content is not None:
            body = b"".join([chunk async for chunk in content()])
        self.calls.append(Call(message.id, tuple(recipients), body, deadline, trio.current_time()))
        results: dict[str, Result] = {}
        hanging: list[str] = []
        for rcpt in recipients:
            script = self.scripts.get(rcpt, ["250 2.0.0 ok"])
            step = script.pop(0) if len(script) > 1 else script[0]
            if step == HANG:
                hanging.append(rcpt)
                continue
            host, line = step if isinstance(step, tuple) else (HOST, step)
            results[rcpt] = result_for(rcpt, parse_reply(line), host)
        if hanging:
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await trio.sleep_forever()
            for rcpt in hanging:
                results[rcpt] = TransientFailure(rcpt, NO_ANSWER, "")
        return [results[r] for r in recipients]

    def calls_for(self, message_id: str) -> list[tuple[str, ...]]:
        return [c.recipients for c in self.calls if c.message_id == message_id]


class RecordingScheduler(Scheduler):
    """The real scheduler, remembering what the submit step handed over: (id, due, has_status)."""

    def __init__(self, storage: Storage, delivery: ScriptedDelivery, cfg: Config) -> None:
        super().__init__(storage, delivery, cfg)
        self.handed: list[tuple[str, float, bool]] = []

    def submit(self, message: StoredMessage, due: float, *, has_status: bool) -> None:
        self.handed.append((message.id, due, has_status))
        super().submit(message, due, has_status=has_status)


def config(*, cut_through: bool = True, **queue: object) -> Config:
    defaults: dict[str, object] = {"retry_initial": "60s", "retry_jitter": 0.0}
    return parse_config(
        {
            "server": {"hostname": "mx.test.example"},
            "delivery": {"cut_through": cut_through, "cut_through_timeout": f"{TIMEOUT:g}s"},
            "queue": {**defaults, **queue},
        },
        Path("/x"),
        {},
    )


class Harness:
    """A Submitter over `storage`, scripted delivery and a (recording) real scheduler."""

    def __init__(
        self,
        scripts: Mapping[str, Sequence[Step]],
        *,
        storage: Storage | None = None,
        cfg: Config | None = None,
    ) -> None:
        self.storage: Storage = storage if storage is not None else MemoryStorage()
        self.config = cfg if cfg is not None else config()
        self.delivery = ScriptedDelivery(scripts)
        self.scheduler = RecordingScheduler(self.storage, self.delivery, self.config)
        self.submitter = Submitter(self.config, self.storage, self.delivery, self.scheduler)

    async def send(
        self, *recipients: str, role: ListenerRole = "submission", body: bytes = BODY, sender: str = SENDER
    ) -> Submitted:
        writer = self.storage.writer(Envelope(sender=sender, recipients=recipients))
        await writer.write(body)
        submitted = await self.submitter.submit(writer, len(body), role)
        assert submitted.message_id == writer.message_id
        return submitted

    @property
    def memory(self) -> MemoryStorage:
        assert isinstance(self.storage, MemoryStorage)
        return self.storage

    @asynccontextmanager
    async def worker(self) -> AsyncIterator[Scheduler]:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.scheduler.serve)
            yield self.scheduler
            nursery.cancel_scope.cancel()


async def until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    with trio.fail_after(limit):
        while not predicate():  # noqa: ASYNC110 - polling plain state
            await trio.sleep(0.01)


def queued(message_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {message_id}")


def states(status: DeliveryStatus) -> dict[str, str]:
    return {r.address: r.state for r in status.recipients}


def dsns(storage: MemoryStorage) -> list[tuple[StoredMessage, bytes]]:
    return [(m, body) for m, body in storage.messages.values() if m.envelope.sender == ""]


def assert_nothing_kept(h: Harness, submitted: Submitted) -> None:
    assert submitted.stored is None
    assert h.memory.messages == {} and h.memory.statuses == {}
    assert h.scheduler.handed == [] and h.scheduler.stats()["scheduled"] == 0


ROLES: list[ListenerRole] = ["submission", "ingress"]


# ---- all delivered -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
async def test_all_delivered_with_one_reply_answers_that_reply_from_its_host_and_keeps_nothing(
    role: ListenerRole,
) -> None:
    h = Harness({r: ["250 2.0.0 Ok: queued as 4ZxQ1"] for r in ("a@example.net", "b@example.net")})
    started = trio.current_time()
    submitted = await h.send("a@example.net", "b@example.net", role=role)
    assert submitted.reply == Reply(250, "2.0.0", f"{HOST}: Ok: queued as 4ZxQ1")
    assert submitted.path == "cut-through" and submitted.status == "delivered"
    assert submitted.recipients == tuple(
        RecipientOutcome(r, "delivered", Reply(250, "2.0.0", "Ok: queued as 4ZxQ1"), HOST)
        for r in ("a@example.net", "b@example.net")
    )
    assert_nothing_kept(h, submitted)
    [call] = h.delivery.calls
    assert call.recipients == ("a@example.net", "b@example.net")
    assert call.content == BODY  # read back from the uncommitted writer
    assert call.deadline == pytest.approx(started + TIMEOUT, abs=1)


@pytest.mark.parametrize(
    "steps",
    [
        pytest.param(["250 2.0.0 Ok: one", "250 2.0.0 Ok: two"], id="different-text"),
        pytest.param(["250 2.0.0 Ok", (HOST2, "250 2.0.0 Ok")], id="different-host"),
        pytest.param(["250 2.0.0 Ok", "251 2.1.5 Ok, forwarded"], id="different-code"),
    ],
)
async def test_all_delivered_with_different_replies_answers_our_250(steps: list[Step]) -> None:
    h = Harness({"a@example.net": [steps[0]], "b@example.org": [steps[1]]})
    submitted = await h.send("a@example.net", "b@example.org")
    assert submitted.reply == Reply(250, "2.0.0", f"Ok: delivered to 2 recipients as {submitted.message_id}")
    assert submitted.path == "cut-through" and submitted.status == "delivered"
    assert_nothing_kept(h, submitted)


async def test_duplicate_recipients_are_delivered_once() -> None:
    h = Harness({})
    submitted = await h.send("a@example.net", "a@example.net")
    assert [c.recipients for c in h.delivery.calls] == [("a@example.net",)]
    assert submitted.reply == Reply(250, "2.0.0", f"{HOST}: ok")
    assert [r.address for r in submitted.recipients] == ["a@example.net"]


# ---- all refused for good ----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
async def test_all_refused_answers_the_first_refusal_verbatim_and_keeps_nothing(role: ListenerRole) -> None:
    h = Harness(
        {
            "a@example.net": ["550 5.1.1 <a@example.net>: Recipient address rejected"],
            "b@example.org": [(HOST2, "554 5.7.1 Relay access denied")],
        }
    )
    submitted = await h.send("a@example.net", "b@example.org", role=role)
    assert submitted.reply == Reply(550, "5.1.1", f"{HOST}: <a@example.net>: Recipient address rejected")
    assert submitted.path == "refused" and submitted.status == "rejected"
    assert [(r.status, r.reply.code, r.host) for r in submitted.recipients] == [
        ("rejected", 550, HOST),
        ("rejected", 554, HOST2),
    ]
    assert_nothing_kept(h, submitted)  # and so no bounce: the sender was told


# ---- all unfinished ----------------------------------------------------------------------------------


async def test_ingress_all_4xx_alike_answers_the_upstreams_4xx_and_keeps_nothing() -> None:
    h = Harness({r: ["450 4.2.1 Mailbox busy, try later"] for r in ("a@example.net", "b@example.net")})
    submitted = await h.send("a@example.net", "b@example.net", role="ingress")
    assert submitted.reply == Reply(450, "4.2.1", f"{HOST}: Mailbox busy, try later")
    assert submitted.path == "refused"
    assert_nothing_kept(h, submitted)


@pytest.mark.parametrize(
    "scripts",
    [
        pytest.param({"a@example.net": ["450 4.2.1 busy"], "b@example.net": ["451 4.3.0 other"]}, id="4xx"),
        pytest.param(
            {"a@example.net": ["450 4.2.1 busy"], "b@example.org": [(HOST2, "450 4.2.1 busy")]}, id="hosts"
        ),
        pytest.param({"a@example.net": ["450 4.2.1 busy"], "b@example.net": [HANG]}, id="4xx-and-timeout"),
    ],
)
async def test_ingress_4xx_that_differ_answer_451_and_keep_nothing(
    scripts: Mapping[str, Sequence[Step]], autojump_clock: trio.testing.MockClock
) -> None:
    h = Harness(scripts)
    submitted = await h.send(*scripts, role="ingress")
    assert submitted.reply == Reply(451, "4.4.2", "upstream not available, try again later")
    assert submitted.path == "refused"
    assert_nothing_kept(h, submitted)


async def test_ingress_timeout_answers_451_4_4_2_at_the_deadline_and_keeps_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    h = Harness({"a@example.net": [HANG], "b@example.net": [HANG]})
    started = trio.current_time()
    submitted = await h.send("a@example.net", "b@example.net", role="ingress")
    assert trio.current_time() - started == pytest.approx(TIMEOUT)
    assert (submitted.reply.code, submitted.reply.enhanced) == (451, "4.4.2")
    assert submitted.path == "refused"
    assert_nothing_kept(h, submitted)


@pytest.mark.parametrize("step", ["450 4.2.1 busy", "421 4.3.2 Service shutting down", HANG])
async def test_submission_unfinished_is_queued_with_every_recipient_pending(
    step: Step, autojump_clock: trio.testing.MockClock
) -> None:
    h = Harness({"a@example.net": [step], "b@example.net": [step]})
    before = time.time()
    submitted = await h.send("a@example.net", "b@example.net", role="submission")
    message_id = submitted.message_id
    assert submitted.reply == queued(message_id)
    assert submitted.path == "queued" and submitted.status == "queued"
    assert submitted.recipients == tuple(
        RecipientOutcome(r, "queued", queued(message_id)) for r in ("a@example.net", "b@example.net")
    )
    assert submitted.stored is not None and submitted.stored.id == message_id
    stored, content = h.memory.messages[message_id]
    assert stored.state is State.QUEUED and content == BODY
    status = h.memory.statuses[message_id]
    assert status.attempts == 1 and status.pending() == ("a@example.net", "b@example.net")
    expected = NO_ANSWER if step == HANG else parse_reply(str(step))
    for r in status.recipients:
        assert r.attempts == 1 and r.last is not None and not r.bounced
        assert Reply(r.last.code, r.last.enhanced, r.last.text) == expected
        assert r.last.host == ("" if step == HANG else HOST)
    # Handed to the queue with its status, due after the first backoff (retry_initial, no jitter).
    [(handed_id, due, has_status)] = h.scheduler.handed
    assert handed_id == message_id and has_status
    assert due - before == pytest.approx(60, abs=2)


# ---- mixed -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
async def test_mixed_250_and_550_is_queued_and_the_worker_bounces_the_550_without_resending(
    role: ListenerRole,
) -> None:
    h = Harness({"ok@example.net": ["250 2.0.0 ok"], "gone@example.net": ["550 5.1.1 no such user"]})
    before = time.time()
    submitted = await h.send("ok@example.net", "gone@example.net", role=role)
    message_id = submitted.message_id
    assert submitted.reply == queued(message_id)
    assert submitted.path == "queued" and submitted.status == "partial"
    assert [(r.address, r.status, r.reply.code) for r in submitted.recipients] == [
        ("ok@example.net", "delivered", 250),
        ("gone@example.net", "rejected", 550),
    ]
    status = h.memory.statuses[message_id]
    assert states(status) == {"ok@example.net": "delivered", "gone@example.net": "failed"}
    assert not any(r.bounced for r in status.recipients) and not status.bounce_sent
    [(_, due, has_status)] = h.scheduler.handed
    assert has_status and before - 1 <= due <= time.time()  # nothing to retry: due now, for the bounce

    async with h.worker():
        await until(lambda: bool(dsns(h.memory)))
        await until(lambda: h.memory.messages[message_id][0].state is State.BOUNCED)
    [(dsn, body)] = dsns(h.memory)
    assert dsn.envelope.recipients == (SENDER,)
    report = email.message_from_bytes(body, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert b"Final-Recipient: rfc822; gone@example.net" in body and b"5.1.1" in body
    assert b"ok@example.net" not in body
    assert h.delivery.calls_for(message_id) == [("ok@example.net", "gone@example.net")]  # no resend
    bounced = h.memory.statuses[message_id]
    assert states(bounced) == states(status) and bounced.recipients[1].bounced


@pytest.mark.parametrize("role", ROLES)
async def test_mixed_250_and_450_is_queued_and_only_the_450_is_retried(role: ListenerRole) -> None:
    h = Harness(
        {"ok@example.net": ["250 2.0.0 ok"], "busy@example.net": ["450 4.2.1 busy", "250 2.0.0 ok"]},
        cfg=config(retry_initial="200ms"),
    )
    submitted = await h.send("ok@example.net", "busy@example.net", role=role)
    message_id = submitted.message_id
    assert submitted.reply == queued(message_id)
    assert submitted.path == "queued" and submitted.status == "queued"
    assert [r.status for r in submitted.recipients] == ["delivered", "queued"]
    status = h.memory.statuses[message_id]
    assert states(status) == {"ok@example.net": "delivered", "busy@example.net": "pending"}
    assert status.pending() == ("busy@example.net",)

    async with h.worker():
        await until(lambda: message_id not in h.memory.messages)
    assert h.delivery.calls_for(message_id) == [("ok@example.net", "busy@example.net"), ("busy@example.net",)]
    assert h.delivery.calls[1].content is None  # the worker reads the spool, not the writer
    assert dsns(h.memory) == []


OK, GONE, BUSY = "250 2.0.0 ok", "550 5.1.1 no", "450 4.2.1 busy"
MIXES: list[tuple[ListenerRole, dict[str, list[Step]]]] = [
    ("ingress", {"gone@example.net": [GONE], "busy@example.net": [BUSY]}),
    ("submission", {"gone@example.net": [GONE], "slow@example.net": [HANG]}),
    ("ingress", {"ok@example.net": [OK], "slow@example.net": [HANG]}),
    ("submission", {"ok@example.net": [OK], "gone@example.net": [GONE], "busy@example.net": [BUSY]}),
    ("ingress", {"ok@example.net": [OK], "gone@example.net": [GONE], "busy@example.net": [BUSY]}),
]
_STATE = {OK: "delivered", GONE: "failed", BUSY: "pending", HANG: "pending"}


@pytest.mark.parametrize(("role", "scripts"), MIXES)
async def test_any_other_mix_is_queued_with_what_was_decided(
    role: ListenerRole, scripts: dict[str, list[Step]], autojump_clock: trio.testing.MockClock
) -> None:
    expected = {rcpt: _STATE[str(steps[0])] for rcpt, steps in scripts.items()}
    h = Harness(scripts)
    submitted = await h.send(*scripts, role=role)
    assert submitted.reply == queued(submitted.message_id)
    assert submitted.path == "queued" and submitted.status == "queued"
    assert states(h.memory.statuses[submitted.message_id]) == expected


# ---- no cut-through ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
async def test_without_cut_through_every_message_is_simply_queued(role: ListenerRole) -> None:
    h = Harness({"gone@example.net": ["550 5.1.1 no"]}, cfg=config(cut_through=False))
    before = time.time()
    submitted = await h.send("ok@example.net", "gone@example.net", role=role)
    message_id = submitted.message_id
    assert h.delivery.calls == []
    assert submitted.reply == queued(message_id)
    assert submitted.path == "queued" and submitted.status == "queued"
    assert [r.status for r in submitted.recipients] == ["queued", "queued"]
    assert h.memory.messages[message_id][1] == BODY
    assert h.memory.statuses == {}  # no status: the worker starts from "all pending"
    [(handed_id, due, has_status)] = h.scheduler.handed
    assert handed_id == message_id and not has_status and before - 1 <= due <= time.time()


# ---- what reaches the sender's wire ------------------------------------------------------------------

NASTY = "ok\rRCPT TO:<x@evil.example>\x00\x1b[0m\tend\x85next\u2028more\x7f"
CLEANED = "ok RCPT TO:<x@evil.example>  [0m end next more "


@pytest.mark.parametrize(
    ("role", "line", "code"),
    [
        ("submission", f"250 2.0.0 {NASTY}", 250),
        ("submission", f"550 5.7.1 {NASTY}", 550),
        ("ingress", f"450 4.2.1 {NASTY}", 450),
    ],
)
async def test_control_characters_from_upstream_never_reach_the_reply(
    role: ListenerRole, line: str, code: int
) -> None:
    h = Harness({"a@example.net": [line], "b@example.net": [line]})
    submitted = await h.send("a@example.net", "b@example.net", role=role)
    reply = submitted.reply
    assert reply.code == code
    assert reply.text == f"{HOST}: {CLEANED}"
    assert all(c.isprintable() for c in reply.text)
    wire = reply.to_bytes()
    assert wire.count(b"\r") == wire.count(b"\n") == 1 and wire.endswith(b"\r\n")
    assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", wire[:-2])


async def test_a_multiline_upstream_reply_keeps_its_lines_with_the_host_on_the_first() -> None:
    h = Harness({"a@example.net": ["554 5.7.1 Rejected\nsee https://example.net/\x07why"]})
    submitted = await h.send("a@example.net")
    assert submitted.reply == Reply(554, "5.7.1", f"{HOST}: Rejected\nsee https://example.net/ why")
    assert submitted.reply.to_bytes() == (
        f"554-5.7.1 {HOST}: Rejected\r\n554 5.7.1 see https://example.net/ why\r\n".encode()
    )


async def test_an_upstream_reply_without_an_enhanced_code_gets_one() -> None:
    h = Harness({"a@example.net": ["550 no such user"]})
    submitted = await h.send("a@example.net")
    assert submitted.reply == Reply(550, "5.0.0", f"{HOST}: no such user")


async def test_an_upstream_421_is_relayed_as_451_so_our_session_stays_open() -> None:
    h = Harness({"a@example.net": ["421 4.3.2 shutting down"]})
    submitted = await h.send("a@example.net", role="ingress")
    assert submitted.reply == Reply(451, "4.3.2", f"{HOST}: shutting down")
    assert submitted.path == "refused"


async def test_ingress_refusals_report_rejected_not_queued() -> None:
    """Nothing is kept when an ingress listener hands a 4xx back: no recipient is "queued"."""
    h = Harness({"a@example.net": ["450 4.2.1 busy"]})
    submitted = await h.send("a@example.net", role="ingress")
    assert [r.status for r in submitted.recipients] == ["rejected"] and submitted.status == "rejected"
    assert not h.memory.messages


# ---- the REST summary --------------------------------------------------------------------------------


def _summary(*states: str) -> str:
    outcomes = tuple(
        RecipientOutcome(f"r{i}@example.net", s, Reply(250, "2.0.0", "x"))  # type: ignore[arg-type]
        for i, s in enumerate(states)
    )
    return Submitted("id", Reply(250, "2.0.0", "x"), outcomes, "queued").status


@pytest.mark.parametrize(
    ("states_", "summary"),
    [
        (("delivered",), "delivered"),
        (("delivered", "delivered"), "delivered"),
        (("rejected",), "rejected"),
        (("rejected", "rejected"), "rejected"),
        (("delivered", "rejected"), "partial"),
        (("queued",), "queued"),
        (("delivered", "queued"), "queued"),
        (("rejected", "queued"), "queued"),
        (("delivered", "rejected", "queued"), "queued"),
    ],
)
def test_submitted_status_summarises_the_recipients(states_: tuple[str, ...], summary: str) -> None:
    assert _summary(*states_) == summary


# ---- the spool: failures, fsync, tmp/ ----------------------------------------------------------------


async def test_a_spool_that_cannot_keep_the_message_raises_but_delivered_mail_never_touches_it() -> None:
    h = Harness({"ok@example.net": ["250 2.0.0 ok"], "busy@example.net": ["450 4.2.1 busy"]})
    delivered = h.memory.writer(Envelope(sender=SENDER, recipients=("ok@example.net",)))
    kept = h.memory.writer(Envelope(sender=SENDER, recipients=("ok@example.net", "busy@example.net")))
    for writer in (delivered, kept):
        await writer.write(BODY)
    h.memory.fail_writes = True  # from now on every commit fails
    submitted = await h.submitter.submit(delivered, len(BODY), "submission")
    assert submitted.path == "cut-through"
    with pytest.raises(StorageError):
        await h.submitter.submit(kept, len(BODY), "submission")
    assert h.memory.messages == {} and h.scheduler.handed == []


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every os.fsync call from now on (file descriptors), still fsyncing for real."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    yield calls


def files(root: Path, directory: str) -> list[str]:
    return sorted(p.name for p in (root / directory).iterdir())


LARGE = BODY + b"x" * 998 + b"\r\n" + (b"y" * 998 + b"\r\n") * (BUFFER_LIMIT // 1000 + 10)


@pytest.mark.parametrize(
    ("role", "step", "path"),
    [
        ("submission", "250 2.0.0 ok", "cut-through"),
        ("submission", "550 5.1.1 no", "refused"),
        ("ingress", "450 4.2.1 busy", "refused"),
    ],
)
@pytest.mark.parametrize("body", [BODY, LARGE], ids=["small", "large"])
async def test_filesystem_mail_not_kept_leaves_no_file_and_is_never_fsynced(
    tmp_path: Path, fsyncs: list[int], role: ListenerRole, step: str, path: str, body: bytes
) -> None:
    storage = FilesystemStorage(tmp_path / "spool")
    await storage.open()
    fsyncs.clear()  # open() syncs the directories it made
    h = Harness({"a@example.net": [step], "b@example.net": [step]}, storage=storage)
    writer = storage.writer(Envelope(sender=SENDER, recipients=("a@example.net", "b@example.net")))
    for i in range(0, len(body), 65536):
        await writer.write(body[i : i + 65536])
    if len(body) > BUFFER_LIMIT:
        assert files(storage.root, "tmp") == [f"{writer.message_id}.msg"]  # streamed to tmp/ already
    submitted = await h.submitter.submit(writer, len(body), role)
    assert submitted.path == path
    assert h.delivery.calls[0].content == body  # read back whole, also from tmp/
    assert fsyncs == []
    for directory in ("tmp", "queued", "deferred", "bounced", "status"):
        assert files(storage.root, directory) == [], directory
    assert storage.statistics()["queued"] == 0 and h.scheduler.handed == []


@pytest.mark.parametrize("body", [BODY, LARGE], ids=["small", "large"])
async def test_filesystem_kept_mail_is_committed_with_its_status_and_survives_a_restart(
    tmp_path: Path, fsyncs: list[int], body: bytes
) -> None:
    storage = FilesystemStorage(tmp_path / "spool")
    await storage.open()
    fsyncs.clear()
    h = Harness({"ok@example.net": ["250 2.0.0 ok"], "busy@example.net": ["450 4.2.1 busy"]}, storage=storage)
    writer = storage.writer(Envelope(sender=SENDER, recipients=("ok@example.net", "busy@example.net")))
    await writer.write(body)
    submitted = await h.submitter.submit(writer, len(body), "submission")
    message_id = submitted.message_id
    assert submitted.reply == queued(message_id)
    # Durable before the 250: the status file and the data file, and both directories.
    assert len(fsyncs) >= 4
    assert files(storage.root, "tmp") == []
    assert files(storage.root, "queued") == [f"{message_id}.msg"]
    assert files(storage.root, "status") == [f"{message_id}.json"]

    restarted = FilesystemStorage(tmp_path / "spool")
    await restarted.open()
    message = await restarted.get(message_id)
    assert message is not None and message.state is State.QUEUED and message.size == len(body)
    assert b"".join([c async for c in restarted.read_content(message_id)]) == body
    status = await restarted.load_status(message_id)
    assert states(status) == {"ok@example.net": "delivered", "busy@example.net": "pending"}
    assert status.pending() == ("busy@example.net",)
