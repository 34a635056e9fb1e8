"""Delivery status files: format, atomic replacement, recovery at `open`, and quarantine when unreadable."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from hedwigpy.storage import (
    Attempt,
    DeliveryStatus,
    FilesystemStorage,
    InsufficientSpace,
    RecipientStatus,
    State,
    StorageError,
    new_message_id,
)
from hedwigpy.storage._status import CorruptStatus, decode_status, encode_status

from .helpers import envelope, files, read_all, store

CONTENT = b"Subject: status\r\n\r\nbody\r\n"
RECIPIENTS = ("a@example.com", "b@example.com")

DELIVERED_A = DeliveryStatus(
    recipients=(
        RecipientStatus(
            "a@example.com", "delivered", 1, Attempt(10.0, 250, "2.0.0", "Ok: queued as X", "mx.a")
        ),
        RecipientStatus("b@example.com", "pending", 1, Attempt(10.0, 451, "4.7.1", "Try later", "mx.b")),
    ),
    attempts=1,
    next_attempt=310.0,
)


# -- the format ---------------------------------------------------------------------------------------

attempts = st.builds(
    Attempt,
    at=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    code=st.integers(min_value=0, max_value=599),
    enhanced=st.text(max_size=10),
    text=st.text(max_size=50),  # includes lone surrogates: undecodable bytes from upstream
    host=st.text(max_size=20),
)
recipient_statuses = st.builds(
    RecipientStatus,
    address=st.text(max_size=30),
    state=st.sampled_from(["pending", "delivered", "failed"]),
    attempts=st.integers(min_value=0, max_value=1000),
    last=st.none() | attempts,
)
statuses = st.builds(
    DeliveryStatus,
    recipients=st.lists(recipient_statuses, max_size=5).map(tuple),
    attempts=st.integers(min_value=0, max_value=1000),
    next_attempt=st.none() | st.floats(min_value=0, max_value=4e9, allow_nan=False),
    bounce_sent=st.booleans(),
)


@settings(max_examples=200, deadline=None)
@given(statuses)
def test_format_round_trip(status: DeliveryStatus) -> None:
    raw = encode_status(status)
    assert raw.endswith(b"\n")
    assert json.loads(raw)["v"] == 1
    assert decode_status(raw) == status


def test_format_rejects_every_truncation() -> None:
    raw = encode_status(DELIVERED_A)
    for end in range(len(raw)):
        with pytest.raises(CorruptStatus):
            decode_status(raw[:end])


def _mutated(change: str) -> bytes:
    data = json.loads(encode_status(DELIVERED_A))
    recipient = data["recipients"][0]
    if change == "version":
        data["v"] = 2
    elif change == "no version":
        del data["v"]
    elif change == "state":
        recipient["state"] = "sent"
    elif change == "bool count":
        recipient["attempts"] = True
    elif change == "negative count":
        data["attempts"] = -1
    elif change == "string code":
        recipient["last"]["code"] = "250"
    elif change == "missing key":
        del recipient["address"]
    elif change == "recipients not a list":
        data["recipients"] = {"a": 1}
    elif change == "bounce_sent not a bool":
        data["bounce_sent"] = 0
    elif change == "next_attempt a string":
        data["next_attempt"] = "soon"
    elif change == "array":
        data = [data]
    return json.dumps(data).encode() + b"\n"


@pytest.mark.parametrize(
    "change",
    [
        "version",
        "no version",
        "state",
        "bool count",
        "negative count",
        "string code",
        "missing key",
        "recipients not a list",
        "bounce_sent not a bool",
        "next_attempt a string",
        "array",
    ],
)
def test_format_rejects_bad_values(change: str) -> None:
    decode_status(_mutated("none"))  # the unmutated document is fine
    with pytest.raises(CorruptStatus):
        decode_status(_mutated(change))


@pytest.mark.parametrize("raw", [b"", b"\n", b"\xff\xfe\n", b"NaN\n", b'{"v":1}\n', b"null\n"])
def test_format_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(CorruptStatus):
        decode_status(raw)


def test_corrupt_status_is_a_storage_error() -> None:
    assert issubclass(CorruptStatus, StorageError)


# -- on disk ------------------------------------------------------------------------------------------


async def _message(fs: FilesystemStorage) -> str:
    return (await store(fs, CONTENT, envelope(*RECIPIENTS))).id


async def test_save_writes_one_file_and_never_touches_the_data(fs: FilesystemStorage) -> None:
    message_id = await _message(fs)
    data_path = fs.path(message_id, State.QUEUED)
    before = data_path.read_bytes(), data_path.stat().st_ino, data_path.stat().st_mtime_ns

    assert await fs.load_status(message_id) == DeliveryStatus.initial(envelope(*RECIPIENTS))
    assert files(fs.root / "status") == []  # loading the initial status writes nothing

    await fs.save_status(message_id, DELIVERED_A)
    assert files(fs.root / "status") == [f"{message_id}.json"]
    assert decode_status(fs.status_path(message_id).read_bytes()) == DELIVERED_A
    inode = fs.status_path(message_id).stat().st_ino

    final = DeliveryStatus(
        (RecipientStatus("a@example.com", "delivered", 1), RecipientStatus("b@example.com", "failed", 2)), 2
    )
    await fs.save_status(message_id, final)
    assert files(fs.root / "status") == [f"{message_id}.json"]  # no tmp file left behind
    assert fs.status_path(message_id).stat().st_ino != inode  # replaced by a rename, not rewritten in place
    assert await fs.load_status(message_id) == final
    assert (data_path.read_bytes(), data_path.stat().st_ino, data_path.stat().st_mtime_ns) == before
    assert fs.status_syncer.syncs >= 2


async def test_status_survives_reopen(fs: FilesystemStorage) -> None:
    message_id = await _message(fs)
    other = await _message(fs)
    await fs.save_status(message_id, DELIVERED_A)
    await fs.move(message_id, State.DEFERRED)

    reopened = FilesystemStorage(fs.root)
    await reopened.open()
    assert await reopened.load_status(message_id) == DELIVERED_A
    assert (await reopened.load_status(message_id)).pending() == ("b@example.com",)
    assert await reopened.load_status(other) == DeliveryStatus.initial(envelope(*RECIPIENTS))
    assert reopened.index[message_id] is State.DEFERRED


@pytest.mark.parametrize("call", ["write", "fsync", "rename"])
@pytest.mark.parametrize(("err", "expected"), [(errno.ENOSPC, InsufficientSpace), (errno.EIO, StorageError)])
async def test_failed_save_keeps_the_old_status(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch, call: str, err: int, expected: type[StorageError]
) -> None:
    message_id = await _message(fs)
    await fs.save_status(message_id, DELIVERED_A)

    def fail(*args: object) -> None:
        raise OSError(err, os.strerror(err))

    with monkeypatch.context() as patch:
        patch.setattr(f"hedwigpy.storage.filesystem.os.{call}", fail)
        with pytest.raises(StorageError) as info:
            await fs.save_status(message_id, DeliveryStatus.initial(envelope(*RECIPIENTS)))
    assert type(info.value) is expected
    assert files(fs.root / "status") == [f"{message_id}.json"]
    assert await fs.load_status(message_id) == DELIVERED_A
    assert fs.index[message_id] is State.QUEUED


async def test_open_removes_orphans_and_tmp_files(fs: FilesystemStorage) -> None:
    kept = await _message(fs)
    deleted = await _message(fs)
    await fs.save_status(kept, DELIVERED_A)
    await fs.save_status(deleted, DELIVERED_A)
    # a delete interrupted between its two unlinks, and torn status writes
    os.unlink(fs.path(deleted, State.QUEUED))
    status_dir = fs.root / "status"
    (status_dir / f"{new_message_id()}.json").write_bytes(encode_status(DELIVERED_A))
    (status_dir / f"{kept}.0badc0de.tmp").write_bytes(b'{"v":1,"rec')
    (status_dir / f"{kept}.json.tmp").write_bytes(b"")

    reopened = FilesystemStorage(fs.root)
    await reopened.open()
    assert files(status_dir) == [f"{kept}.json"]
    assert await reopened.load_status(kept) == DELIVERED_A
    assert reopened.index == {kept: State.QUEUED}


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage\n",
        encode_status(DELIVERED_A)[:-10],  # truncated
        encode_status(DELIVERED_A).replace(b'"delivered"', b'"done"'),
        b"",
    ],
)
async def test_corrupt_status_quarantines_at_load(fs: FilesystemStorage, raw: bytes) -> None:
    message_id = await _message(fs)
    fs.status_path(message_id).write_bytes(raw)
    with pytest.raises(StorageError):
        await fs.load_status(message_id)
    assert fs.index[message_id] is State.CORRUPT
    assert files(fs.root / "corrupt") == [f"{message_id}.msg"]
    assert files(fs.root / "queued") == []
    assert await fs.list(State.QUEUED) == []
    with pytest.raises(StorageError):  # still refuses: nobody may guess who was delivered
        await fs.load_status(message_id)
    assert await read_all(fs, message_id) == CONTENT  # the content is kept for the operator


async def test_corrupt_status_quarantines_at_open(fs: FilesystemStorage) -> None:
    bad = await _message(fs)
    good = await _message(fs)
    await fs.save_status(good, DELIVERED_A)
    fs.status_path(bad).write_bytes(b'{"v":1,"recipients":[')

    reopened = FilesystemStorage(fs.root)
    await reopened.open()
    assert reopened.index == {bad: State.CORRUPT, good: State.QUEUED}
    assert files(reopened.root / "corrupt") == [f"{bad}.msg"]
    assert files(reopened.root / "queued") == [f"{good}.msg"]
    assert await reopened.load_status(good) == DELIVERED_A
    assert files(reopened.root / "status") == sorted([f"{bad}.json", f"{good}.json"])  # kept for forensics


async def test_a_deep_queue_is_checked_when_loaded_not_at_open(fs: FilesystemStorage) -> None:
    """deferred/ may hold 100,000 messages: open() does not read them; the first load quarantines."""
    bad = await _message(fs)
    await fs.move(bad, State.DEFERRED)
    fs.status_path(bad).write_bytes(b'{"v":1,"recipients":[')

    reopened = FilesystemStorage(fs.root)
    await reopened.open()
    assert reopened.index == {bad: State.DEFERRED}
    with pytest.raises(StorageError):
        await reopened.load_status(bad)
    assert files(reopened.root / "corrupt") == [f"{bad}.msg"]
    assert files(reopened.root / "deferred") == []


async def test_delete_removes_data_then_status(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    message_id = await _message(fs)
    await fs.save_status(message_id, DELIVERED_A)
    await fs.move(message_id, State.BOUNCED)
    unlinked: list[str] = []
    real_unlink = os.unlink

    def spy(path: str | Path, *args: object, **kwargs: object) -> None:
        unlinked.append(Path(path).parent.name)
        real_unlink(path)

    monkeypatch.setattr("hedwigpy.storage.filesystem.os.unlink", spy)
    await fs.delete(message_id)
    assert unlinked == ["bounced", "status"]
    assert files(fs.root / "bounced") == []
    assert files(fs.root / "status") == []


async def test_concurrent_saves_all_land(fs: FilesystemStorage) -> None:
    ids = [await _message(fs) for _ in range(30)]

    def status_for(i: int) -> DeliveryStatus:
        return DeliveryStatus((RecipientStatus(f"r{i}@example.com", "delivered", i),), attempts=i)

    async with trio.open_nursery() as nursery:
        for i, message_id in enumerate(ids):
            nursery.start_soon(fs.save_status, message_id, status_for(i))
            nursery.start_soon(fs.save_status, message_id, status_for(i))  # same id twice: serialised

    assert files(fs.root / "status") == sorted(f"{i}.json" for i in ids)
    assert fs._status_locks == {}
    reopened = FilesystemStorage(fs.root)
    await reopened.open()
    for i, message_id in enumerate(ids):
        assert await reopened.load_status(message_id) == status_for(i)


async def test_status_of_a_corrupt_data_file(fs: FilesystemStorage) -> None:
    message_id = await _message(fs)
    fs.path(message_id, State.QUEUED).write_bytes(b"\x00 not an envelope")  # damaged after open
    with pytest.raises(StorageError):
        await fs.load_status(message_id)
    assert fs.index[message_id] is State.CORRUPT
    assert files(fs.root / "corrupt") == [f"{message_id}.msg"]


async def test_delete_racing_a_save_leaves_no_status(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save in flight when the message is deleted must not leave its status file behind."""
    real_save = fs._save_status_sync

    def slow_save(message_id: str, data: bytes) -> None:
        time.sleep(0.05)
        real_save(message_id, data)

    monkeypatch.setattr(fs, "_save_status_sync", slow_save)
    message_id = await _message(fs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.save_status, message_id, DELIVERED_A)
        await trio.sleep(0.01)  # the save is now writing in its thread
        await fs.delete(message_id)
    assert files(fs.root / "status") == []
    assert fs.index == {}
    with pytest.raises(StorageError):  # and a save after the delete is refused
        await fs.save_status(message_id, DELIVERED_A)
    assert files(fs.root / "status") == []
