"""The filesystem spool: streaming, durability steps, failure handling, and recovery at `open`."""

from __future__ import annotations

import errno
import hashlib
import os
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from hedwigpy.storage import (
    FilesystemStorage,
    InsufficientSpace,
    MemoryStorage,
    State,
    StorageError,
    new_message_id,
)
from hedwigpy.storage import filesystem as fs_module
from hedwigpy.storage._format import encode_envelope

from .helpers import envelope, files, read_all, store

MiB = 1024 * 1024
CONTENT = b"Subject: test\r\n\r\n" + b"x" * 1000 + b"\r\n"


async def test_commit_goes_through_tmp_into_queued(fs: FilesystemStorage) -> None:
    writer = fs.writer(envelope())
    await writer.write(b"a" * (fs_module.BUFFER_LIMIT + 1))  # big enough to start streaming
    assert files(fs.root / "tmp") == [f"{writer.message_id}.msg"]
    assert files(fs.root / "queued") == []
    stored = await writer.commit()
    assert files(fs.root / "tmp") == []
    assert files(fs.root / "queued") == [f"{stored.id}.msg"]
    for state in State:
        if state is not State.QUEUED:
            assert files(fs.root / state.value) == []
    on_disk = (fs.root / "queued" / f"{stored.id}.msg").read_bytes()
    assert on_disk == encode_envelope(stored.envelope) + b"a" * (fs_module.BUFFER_LIMIT + 1)


@pytest.mark.parametrize("size", [0, 100, fs_module.BUFFER_LIMIT * 3])
async def test_abort_leaves_nothing(fs: FilesystemStorage, size: int) -> None:
    writer = fs.writer(envelope())
    await writer.write(b"z" * size)
    await writer.abort()
    assert files(fs.root / "tmp") == []
    assert files(fs.root / "queued") == []
    assert fs.index == {}


async def test_large_message_streams_to_disk(fs: FilesystemStorage) -> None:
    """20 MiB in 64 KiB writes: memory stays bounded by the buffer, the file grows as data arrives."""
    base = os.urandom(64 * 1024)
    chunks = 20 * MiB // len(base)
    expected = hashlib.sha256()
    writer = fs.writer(envelope())
    tmp_file = fs.root / "tmp" / f"{writer.message_id}.msg"
    tracemalloc.start()
    try:
        for i in range(chunks):
            chunk = i.to_bytes(4, "big") + base[4:]
            expected.update(chunk)
            await writer.write(chunk)
            assert len(writer._buffer) < fs_module.BUFFER_LIMIT
            written = (i + 1) * len(chunk)
            if written >= fs_module.BUFFER_LIMIT:
                assert tmp_file.stat().st_size >= written - fs_module.BUFFER_LIMIT
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB, f"peak {peak} bytes while writing 20 MiB"
    stored = await writer.commit()
    assert stored.size == 20 * MiB

    got = hashlib.sha256()
    async for chunk in fs.read_content(stored.id):
        assert len(chunk) <= fs_module.READ_CHUNK
        got.update(chunk)
    assert got.hexdigest() == expected.hexdigest()


def _failing(err: int) -> Callable[..., object]:
    def fail(*args: object) -> object:
        raise OSError(err, os.strerror(err))

    return fail


@pytest.mark.parametrize("call", ["write", "fsync"])
@pytest.mark.parametrize(("err", "expected"), [(errno.ENOSPC, InsufficientSpace), (errno.EIO, StorageError)])
@pytest.mark.parametrize("size", [100, fs_module.BUFFER_LIMIT * 2])
async def test_write_errors(
    fs: FilesystemStorage,
    monkeypatch: pytest.MonkeyPatch,
    call: str,
    err: int,
    expected: type[StorageError],
    size: int,
) -> None:
    writer = fs.writer(envelope())
    with monkeypatch.context() as patch:
        patch.setattr(f"hedwigpy.storage.filesystem.os.{call}", _failing(err))
        with pytest.raises(StorageError) as info:
            await writer.write(b"q" * size)  # streams (and may fail) only past BUFFER_LIMIT
            await writer.commit()
    assert type(info.value) is expected
    assert files(fs.root / "tmp") == []
    assert files(fs.root / "queued") == []
    assert fs.index == {}
    with pytest.raises(StorageError):
        await writer.commit()
    await writer.abort()
    # the spool still works afterwards
    stored = await store(fs, CONTENT)
    assert await read_all(fs, stored.id) == CONTENT


async def test_check_space(tmp_path: Path) -> None:
    roomy = FilesystemStorage(tmp_path / "a")
    await roomy.open()
    roomy.check_space(1024)
    full = FilesystemStorage(tmp_path / "b", reserve_bytes=1 << 62)
    await full.open()
    with pytest.raises(InsufficientSpace):
        full.check_space(0)
    with pytest.raises(InsufficientSpace):
        roomy.check_space(1 << 62)

    memory = MemoryStorage(free_bytes=1000)
    memory.check_space(1000)
    with pytest.raises(InsufficientSpace):
        memory.check_space(1001)


async def test_open_sweeps_tmp_and_quarantines_corrupt_files(fs: FilesystemStorage) -> None:
    good = [await store(fs, CONTENT) for _ in range(3)]
    line = encode_envelope(envelope())
    garbage_id, truncated_id, version_id, empty_id = (new_message_id() for _ in range(4))
    queued = fs.root / "queued"
    (queued / f"{garbage_id}.msg").write_bytes(b"\x00\x01 not json at all\nbody\r\n")
    (queued / f"{truncated_id}.msg").write_bytes(line[: len(line) // 2])
    (queued / f"{version_id}.msg").write_bytes(line.replace(b'"v":1', b'"v":99') + b"body")
    (fs.root / "deferred" / f"{empty_id}.msg").write_bytes(b"")
    (fs.root / "tmp" / f"{new_message_id()}.msg").write_bytes(line + b"torn")
    (fs.root / "tmp" / "junk").write_bytes(b"x")

    reopened = FilesystemStorage(fs.root)
    await reopened.open()
    assert files(reopened.root / "tmp") == []
    bad = {garbage_id, truncated_id, version_id, empty_id}
    assert files(reopened.root / "corrupt") == sorted(f"{i}.msg" for i in bad)
    assert files(queued) == sorted(f"{m.id}.msg" for m in good)
    assert files(reopened.root / "deferred") == []
    assert [m.id for m in await reopened.list(State.QUEUED)] == [m.id for m in good]
    assert {i for i, s in reopened.index.items() if s is State.CORRUPT} == bad
    assert reopened.statistics()["corrupt"] == 4
    for message in good:
        assert await read_all(reopened, message.id) == CONTENT


async def test_reopen_rebuilds_the_index(fs: FilesystemStorage) -> None:
    ids = [(await store(fs, CONTENT + b"%d" % i)).id for i in range(5)]
    await fs.move(ids[1], State.DEFERRED)
    await fs.move(ids[2], State.HELD)
    await fs.move(ids[3], State.BOUNCED)
    await fs.delete(ids[4])
    (fs.root / "queued" / "README").write_text("not a message")  # ignored, with a warning

    reopened = FilesystemStorage(fs.root)
    await reopened.open()
    assert reopened.index == {
        ids[0]: State.QUEUED,
        ids[1]: State.DEFERRED,
        ids[2]: State.HELD,
        ids[3]: State.BOUNCED,
    }
    for i, message_id in enumerate(ids[:4]):
        got = await reopened.get(message_id)
        assert got is not None
        assert got.state is reopened.index[message_id]
        assert got.envelope == envelope()
        assert await read_all(reopened, message_id) == CONTENT + b"%d" % i
    assert await reopened.get(ids[4]) is None
    assert reopened.statistics() == {"queued": 1, "deferred": 1, "held": 1, "bounced": 1, "corrupt": 0}


async def test_open_creates_the_layout(tmp_path: Path) -> None:
    storage = FilesystemStorage(tmp_path / "deep" / "spool")
    await storage.open()
    assert files(storage.root) == sorted(["tmp", "status", *(s.value for s in State)])


async def test_move_and_delete_on_disk(fs: FilesystemStorage) -> None:
    stored = await store(fs, CONTENT)
    await fs.move(stored.id, State.HELD)
    assert files(fs.root / "queued") == []
    assert files(fs.root / "held") == [f"{stored.id}.msg"]
    await fs.delete(stored.id)
    assert files(fs.root / "held") == []


async def test_many_concurrent_commits(fs: FilesystemStorage) -> None:
    count = 50
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        writer = fs.writer(envelope(f"r{i}@example.com"))
        await writer.write(b"message %d\r\n" % i)
        await trio.lowlevel.checkpoint()
        await writer.write(b"end\r\n")
        results[i] = (await writer.commit()).id

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)

    assert len(set(results.values())) == count
    assert files(fs.root / "tmp") == []
    assert files(fs.root / "queued") == sorted(f"{i}.msg" for i in results.values())
    listed = await fs.list(State.QUEUED)
    assert sorted(m.id for m in listed) == sorted(results.values())
    for i, message_id in results.items():
        assert await read_all(fs, message_id) == b"message %d\r\nend\r\n" % i
        got = await fs.get(message_id)
        assert got is not None
        assert got.envelope.recipients == (f"r{i}@example.com",)
    assert 1 <= fs.syncers[State.QUEUED].syncs <= count

    reopened = FilesystemStorage(fs.root)
    await reopened.open()
    assert sorted(reopened.index) == sorted(results.values())


async def test_a_fresh_small_message_is_read_from_memory_until_it_moves(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt right after the commit reads no file; once the message moves (deferred, held)
    its copy is dropped and reads go to the disk again."""
    stored = await store(fs, CONTENT)
    opened: list[Path] = []
    real_open = fs_module.FilesystemStorage._open_content_sync

    def spy(path: Path) -> tuple[object, bytes]:
        opened.append(path)
        return real_open(path)

    monkeypatch.setattr(fs_module.FilesystemStorage, "_open_content_sync", staticmethod(spy))
    assert await read_all(fs, stored.id) == CONTENT
    assert opened == []
    await fs.move(stored.id, State.DEFERRED)
    assert await read_all(fs, stored.id) == CONTENT
    assert opened == [fs.path(stored.id, State.DEFERRED)]
    assert fs._fresh_bytes == 0


async def test_fresh_copies_are_bounded_and_released(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fs_module, "FRESH_LIMIT", 2 * len(CONTENT))
    ids = [(await store(fs, CONTENT, chunk=len(CONTENT))).id for _ in range(3)]
    assert sorted(fs._fresh) == sorted(ids[:2])  # the third did not fit
    big = await store(fs, b"b" * (fs_module.BUFFER_LIMIT + 1), chunk=fs_module.BUFFER_LIMIT + 1)
    assert big.id not in fs._fresh  # streamed to disk: never kept whole
    for message_id in ids:
        assert await read_all(fs, message_id) == CONTENT
        await fs.delete(message_id)
    assert fs._fresh == {} and fs._fresh_bytes == 0


async def test_an_io_error_while_loading_is_retried_later_not_quarantined(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    stored = await store(fs, CONTENT)
    real = fs_module.read_envelope  # type: ignore[attr-defined]

    def failing(f: object) -> object:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fs_module, "read_envelope", failing)
    with pytest.raises(StorageError, match="Input/output"):
        await fs.get(stored.id)
    assert await fs.list(State.QUEUED) == []  # listed without it, and the listing still works
    monkeypatch.setattr(fs_module, "read_envelope", real)
    assert files(fs.root / "corrupt") == []
    assert fs.index[stored.id] is State.QUEUED
    got = await fs.get(stored.id)
    assert got is not None and got.state is State.QUEUED


async def test_loading_during_a_move_finds_the_message_where_it_went(fs: FilesystemStorage) -> None:
    """The index said queued/ but a move renamed the file meanwhile: the message is found in its new
    place, and the index is not emptied under the move's feet."""
    stored = await store(fs, CONTENT)
    os.rename(fs.path(stored.id, State.QUEUED), fs.path(stored.id, State.DEFERRED))
    got = await trio.to_thread.run_sync(fs._load_sync, stored.id, State.QUEUED)
    assert got is not None and got.state is State.DEFERRED
    assert stored.id in fs.index
    os.unlink(fs.path(stored.id, State.DEFERRED))
    assert await fs.get(stored.id) is None  # really gone: forgotten
    assert stored.id not in fs.index


@pytest.mark.parametrize("message_id", ["../../etc/passwd", "0" * 23, "0" * 24 + "\n", "X" * 24])
async def test_a_message_id_must_be_a_fresh_spool_id(fs: FilesystemStorage, message_id: str) -> None:
    with pytest.raises(ValueError, match="not a fresh message id"):
        fs.writer(envelope(), message_id)


async def test_a_known_message_id_is_refused(fs: FilesystemStorage) -> None:
    stored = await store(fs, CONTENT)
    with pytest.raises(ValueError):
        fs.writer(envelope(), stored.id)


async def test_an_unencodable_envelope_is_a_storage_error(fs: FilesystemStorage) -> None:
    writer = fs.writer(envelope("bad\udcff@example.com"))
    await writer.write(CONTENT)
    with pytest.raises(StorageError, match="not encodable"):
        await writer.commit()
    assert files(fs.root / "tmp") == [] and files(fs.root / "queued") == []


@pytest.mark.parametrize("copy_file_range", ["kernel", "unavailable", "answers 0"])
async def test_prepend_to_a_message_already_on_disk(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch, copy_file_range: str
) -> None:
    """Past the buffer the content is in tmp/: the prefix is read back first, and commit writes one new
    file (envelope, prefix, old content) in place of the old one, by copy_file_range or by reads."""
    if copy_file_range == "unavailable":
        monkeypatch.setattr(os, "copy_file_range", _failing(errno.ENOSYS))
    elif copy_file_range == "answers 0":  # as some filesystems do instead of an error
        monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)
    content = os.urandom(3 * fs_module.BUFFER_LIMIT + 123)
    writer = fs.writer(envelope())
    for start in range(0, len(content), 50_000):
        await writer.write(content[start : start + 50_000])
    assert (fs.root / "tmp" / f"{writer.message_id}.msg").exists()
    prefix = b"DKIM-Signature: v=1; d=example.org\r\n"
    await writer.prepend(prefix)
    assert b"".join([c async for c in writer.content()]) == prefix + content
    stored = await writer.commit()
    assert stored.size == len(prefix) + len(content)
    assert await read_all(fs, stored.id) == prefix + content
    assert files(fs.root / "tmp") == []
    assert files(fs.root / "queued") == [f"{stored.id}.msg"]


async def test_prepend_in_memory_never_touches_the_disk(fs: FilesystemStorage) -> None:
    writer = fs.writer(envelope())
    await writer.write(b"Subject: small\r\n\r\nbody\r\n")
    await writer.prepend(b"DKIM-Signature: x\r\n")
    assert files(fs.root / "tmp") == []
    expected = b"DKIM-Signature: x\r\nSubject: small\r\n\r\nbody\r\n"
    assert b"".join([c async for c in writer.content()]) == expected
    await writer.abort()
    assert files(fs.root / "tmp") == []


async def test_prepend_rewrite_failure_leaves_nothing_in_tmp(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = fs.writer(envelope())
    await writer.write(os.urandom(2 * fs_module.BUFFER_LIMIT))
    await writer.prepend(b"X-Prefix: 1\r\n")
    monkeypatch.setattr(os, "copy_file_range", _failing(errno.EIO))
    with pytest.raises(StorageError):
        await writer.commit()
    assert files(fs.root / "tmp") == []
    assert files(fs.root / "queued") == []


async def test_a_failed_directory_sync_takes_the_message_back(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file was renamed into queued/ but the directory fsync failed: the sender hears 451 and sends
    again, so this copy is removed (not left to be delivered after a restart as well)."""
    monkeypatch.setattr("hedwigpy.storage._dirsync.fsync_dir", _failing(errno.EIO))
    with pytest.raises(StorageError, match="fsync"):
        await store(fs, CONTENT)
    assert files(fs.root / "queued") == [] and files(fs.root / "tmp") == []
    assert fs.index == {}


async def test_a_commit_cancelled_during_the_directory_sync_still_files_the_message(
    fs: FilesystemStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the file is in queued/, a cancellation (a drain's end) cannot leave it there unindexed."""
    syncer = fs.syncers[State.QUEUED]
    real_sync = syncer.sync
    writer = fs.writer(envelope())
    await writer.write(CONTENT)
    with trio.CancelScope() as scope:

        async def cancelled_meanwhile() -> None:
            scope.cancel()
            await real_sync()

        monkeypatch.setattr(syncer, "sync", cancelled_meanwhile)
        stored = await writer.commit()
    assert fs.index[stored.id] is State.QUEUED
    assert files(fs.root / "queued") == [f"{stored.id}.msg"]
