"""Behaviour both backends share: the `Storage` protocol as the layers above the spool see it."""

from __future__ import annotations

import pytest

from hedwigpy.storage import (
    Attempt,
    DeliveryStatus,
    RecipientStatus,
    State,
    StorageError,
    new_message_id,
)

from .helpers import AnyStorage, envelope, read_all, store

CONTENT = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody \xff\x00 line\r\n.\r\n" * 3


async def test_round_trip(storage: AnyStorage) -> None:
    env = envelope("x@example.com", "y@example.net")
    stored = await store(storage, CONTENT, env)
    assert stored.state is State.QUEUED
    assert stored.envelope == env
    assert stored.size == len(CONTENT)

    got = await storage.get(stored.id)
    assert got == stored
    assert await read_all(storage, stored.id) == CONTENT
    assert await storage.list(State.QUEUED) == [stored]
    assert await storage.list(State.DEFERRED) == []


async def test_empty_message(storage: AnyStorage) -> None:
    stored = await store(storage, b"")
    assert stored.size == 0
    assert await read_all(storage, stored.id) == b""


async def test_explicit_message_id(storage: AnyStorage) -> None:
    message_id = new_message_id()
    writer = storage.writer(envelope(), message_id)
    assert writer.message_id == message_id
    await writer.write(CONTENT)
    stored = await writer.commit()
    assert stored.id == message_id
    assert (await storage.get(message_id)) == stored


async def test_ids_sort_by_creation_time(storage: AnyStorage) -> None:
    ids = [(await store(storage, b"%d\r\n" % i)).id for i in range(8)]
    assert ids == sorted(ids)
    assert [m.id for m in await storage.list(State.QUEUED)] == ids
    for i, message_id in enumerate(ids):
        assert await read_all(storage, message_id) == b"%d\r\n" % i


def test_new_message_id_format_and_order() -> None:
    a = new_message_id(1)
    b = new_message_id(2)
    assert len(a) == len(b) == 24
    assert a < b
    assert int(a, 16) >= 0
    assert new_message_id(5) != new_message_id(5)  # the random part


async def test_statistics_counts(storage: AnyStorage) -> None:
    ids = [(await store(storage, CONTENT)).id for _ in range(5)]
    await storage.move(ids[0], State.DEFERRED)
    await storage.move(ids[1], State.DEFERRED)
    await storage.move(ids[2], State.HELD)
    await storage.delete(ids[3])
    assert storage.statistics() == {"queued": 1, "deferred": 2, "held": 1, "bounced": 0, "corrupt": 0}


async def test_uncommitted_message_is_invisible(storage: AnyStorage) -> None:
    writer = storage.writer(envelope())
    await writer.write(CONTENT)
    assert await storage.get(writer.message_id) is None
    assert await storage.list(State.QUEUED) == []
    await writer.abort()
    await writer.abort()  # twice is fine
    assert await storage.get(writer.message_id) is None
    with pytest.raises(StorageError):
        await writer.commit()


async def test_writer_is_single_use(storage: AnyStorage) -> None:
    writer = storage.writer(envelope())
    await writer.write(CONTENT)
    await writer.commit()
    with pytest.raises(StorageError):
        await writer.write(b"more")
    with pytest.raises(StorageError):
        await writer.commit()
    await writer.abort()  # after commit: a no-op, the message stays
    assert await storage.get(writer.message_id) is not None


async def test_move_between_states(storage: AnyStorage) -> None:
    stored = await store(storage, CONTENT)
    for state in (State.DEFERRED, State.HELD, State.BOUNCED, State.QUEUED, State.QUEUED):
        await storage.move(stored.id, state)
        got = await storage.get(stored.id)
        assert got is not None
        assert got.state is state
        assert got.envelope == stored.envelope
        assert [m.id for m in await storage.list(state)] == [stored.id]
        assert await read_all(storage, stored.id) == CONTENT
    assert await storage.list(State.DEFERRED) == []


async def test_unknown_ids(storage: AnyStorage) -> None:
    unknown = new_message_id()
    assert await storage.get(unknown) is None
    with pytest.raises(StorageError):
        await storage.move(unknown, State.HELD)
    with pytest.raises(StorageError):
        await read_all(storage, unknown)
    with pytest.raises(StorageError):
        await storage.load_status(unknown)
    with pytest.raises(StorageError):
        await storage.save_status(unknown, DeliveryStatus(()))
    await storage.delete(unknown)  # not an error


async def test_delete(storage: AnyStorage) -> None:
    keep = await store(storage, CONTENT)
    gone = await store(storage, CONTENT)
    await storage.delete(gone.id)
    assert await storage.get(gone.id) is None
    assert [m.id for m in await storage.list(State.QUEUED)] == [keep.id]
    with pytest.raises(StorageError):
        await read_all(storage, gone.id)
    await storage.delete(gone.id)  # twice is fine


async def test_fresh_status_is_all_pending(storage: AnyStorage) -> None:
    env = envelope("a@example.com", "b@example.com", "a@example.com")
    stored = await store(storage, CONTENT, env)
    status = await storage.load_status(stored.id)
    assert status == DeliveryStatus.initial(env)
    assert status.pending() == ("a@example.com", "b@example.com")  # the duplicate collapsed
    assert all(r.state == "pending" and r.attempts == 0 and r.last is None for r in status.recipients)
    assert (status.attempts, status.next_attempt, status.bounce_sent) == (0, None, False)


async def test_status_round_trip(storage: AnyStorage) -> None:
    stored = await store(storage, CONTENT, envelope("a@example.com", "b@example.com", "c@example.com"))
    status = DeliveryStatus(
        recipients=(
            RecipientStatus(
                "a@example.com", "delivered", 1, Attempt(1.5, 250, "2.0.0", "Ok", "mx1.example.com")
            ),
            RecipientStatus("b@example.com", "failed", 2, Attempt(2.5, 550, "5.1.1", "No such user", "mx2")),
            RecipientStatus("c@example.com", "pending", 2, Attempt(3.5, 0, "", "connection refused", "")),
        ),
        attempts=2,
        next_attempt=1_700_000_600.0,
        bounce_sent=True,
    )
    await storage.save_status(stored.id, status)
    assert await storage.load_status(stored.id) == status
    assert status.pending() == ("c@example.com",)

    later = DeliveryStatus((*status.recipients[:2], RecipientStatus("c@example.com", "delivered", 3)), 3)
    await storage.save_status(stored.id, later)
    assert await storage.load_status(stored.id) == later
    assert later.pending() == ()

    await storage.move(stored.id, State.DEFERRED)  # the status does not depend on the state
    assert await storage.load_status(stored.id) == later


async def test_delete_forgets_the_status(storage: AnyStorage) -> None:
    env = envelope("a@example.com")
    stored = await store(storage, CONTENT, env)
    await storage.save_status(stored.id, DeliveryStatus((RecipientStatus("a@example.com", "delivered", 1),)))
    await storage.delete(stored.id)
    with pytest.raises(StorageError):
        await storage.load_status(stored.id)
    # a new message under the same id must not inherit the old status
    writer = storage.writer(env, stored.id)
    await writer.write(CONTENT)
    await writer.commit()
    assert await storage.load_status(stored.id) == DeliveryStatus.initial(env)


async def test_prepend_goes_before_everything_written(storage: AnyStorage) -> None:
    writer = storage.writer(envelope())
    await writer.write(CONTENT[:10])
    await writer.prepend(b"DKIM-Signature: two\r\n")
    await writer.write(CONTENT[10:])
    await writer.prepend(b"DKIM-Signature: one\r\n")
    expected = b"DKIM-Signature: one\r\nDKIM-Signature: two\r\n" + CONTENT
    assert b"".join([c async for c in writer.content()]) == expected
    stored = await writer.commit()
    assert stored.size == len(expected)
    assert await read_all(storage, stored.id) == expected


async def test_prepend_after_commit_is_an_error(storage: AnyStorage) -> None:
    writer = storage.writer(envelope())
    await writer.write(CONTENT)
    await writer.commit()
    with pytest.raises(StorageError):
        await writer.prepend(b"X: 1\r\n")
