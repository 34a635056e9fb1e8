"""The filesystem spool: one data file per message, its directory its state.

    root/tmp/       being written (swept at start: anything here is a torn write)
    root/queued/    accepted, waiting for delivery
    root/deferred/  a delivery attempt failed transiently
    root/held/      held by an operator
    root/bounced/   bounced; kept for `bounced_retention`
    root/corrupt/   quarantined: unreadable files, never delivered

A message is written to `tmp/`, fsynced, renamed into `queued/`, and the directory fsynced (shared
between concurrent commits, see `_dirsync`) before `commit` returns. Every blocking call runs in a
worker thread so the event loop never waits on the disk.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
import trio

from ._dirsync import DirSyncer, fsync_dir
from ._format import CorruptFile, encode_envelope, read_envelope
from .base import Envelope, InsufficientSpace, State, StorageError, StoredMessage, new_message_id

log = structlog.get_logger("hedwigpy.storage")

ID_PATTERN = re.compile(r"^[0-9a-f]{24}$")
BUFFER_LIMIT = 256 * 1024  # content kept in memory before the writer starts streaming to tmp/
READ_CHUNK = 64 * 1024
_DIRS = ("tmp", *(s.value for s in State))


def _error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"{what}: {exc}")
    return StorageError(f"{what}: {exc}")


class FilesystemWriter:
    """Streams one message into `tmp/`, then commits it into `queued/`."""

    def __init__(self, storage: FilesystemStorage, envelope: Envelope, message_id: str) -> None:
        self.message_id = message_id
        self._storage = storage
        self._envelope = envelope
        self._buffer = bytearray(encode_envelope(envelope))
        self._header_len = len(self._buffer)
        self._written = 0  # bytes already in the file
        self._fd: int | None = None
        self._done = False
        self._tmp = storage.root / "tmp" / f"{message_id}.msg"

    async def write(self, data: bytes) -> None:
        if self._done:
            raise StorageError("writer already finished")
        self._buffer += data
        if len(self._buffer) >= BUFFER_LIMIT:
            chunk = bytes(self._buffer)
            self._buffer.clear()
            await self._run(self._write_sync, chunk)

    async def commit(self) -> StoredMessage:
        if self._done:
            raise StorageError("writer already finished")
        chunk = bytes(self._buffer)
        self._buffer.clear()
        await self._run(self._commit_sync, chunk)
        self._done = True
        storage = self._storage
        await storage.syncers[State.QUEUED].sync()
        storage.index[self.message_id] = State.QUEUED
        return StoredMessage(self.message_id, State.QUEUED, self._envelope, self._written - self._header_len)

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        if self._fd is not None or self._written:
            await trio.to_thread.run_sync(self._discard_sync)

    async def _run(self, fn: object, chunk: bytes) -> None:
        try:
            await trio.to_thread.run_sync(fn, chunk)  # type: ignore[arg-type]
        except OSError as exc:
            self._done = True
            await trio.to_thread.run_sync(self._discard_sync)
            raise _error(exc, f"writing {self.message_id}") from exc

    # -- blocking parts, run in worker threads ------------------------------------------------------

    def _write_sync(self, chunk: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        view = memoryview(chunk)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
            self._written += n

    def _commit_sync(self, chunk: bytes) -> None:
        self._write_sync(chunk)
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.rename(self._tmp, self._storage.root / "queued" / f"{self.message_id}.msg")

    def _discard_sync(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove a temporary file", path=str(self._tmp), error=str(exc))


class FilesystemStorage:
    """The spool on a local filesystem. Keeps an in-memory index id → state, built at `open`."""

    def __init__(self, root: Path, *, reserve_bytes: int = 0) -> None:
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self.index: dict[str, State] = {}
        self.syncers = {state: DirSyncer(self.root / state.value) for state in State}

    # -- lifecycle -----------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await trio.to_thread.run_sync(self._open_sync)
        except OSError as exc:
            raise StorageError(f"cannot open spool {self.root}: {exc}") from exc

    def _open_sync(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for name in _DIRS:
            (self.root / name).mkdir(exist_ok=True, mode=0o700)
        swept = 0
        for entry in os.scandir(self.root / "tmp"):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                swept += 1
        if swept:
            log.warning("removed torn writes from tmp/", count=swept)
        fsync_dir(self.root / "tmp")
        fsync_dir(self.root)
        self.index.clear()
        for state in State:
            for entry in os.scandir(self.root / state.value):
                name = entry.name
                if not name.endswith(".msg") or not ID_PATTERN.match(name[:-4]):
                    log.warning("unexpected file in spool", path=entry.path)
                    continue
                message_id = name[:-4]
                if state is not State.CORRUPT and not self._readable_sync(Path(entry.path)):
                    self._quarantine_sync(message_id, state)
                    continue
                self.index[message_id] = state

    async def close(self) -> None:
        return None

    # -- writing -------------------------------------------------------------------------------------

    def check_space(self, needed: int) -> None:
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise _error(exc, "statvfs") from exc
        free = st.f_bavail * st.f_frsize
        if free < needed + self.reserve_bytes:
            raise InsufficientSpace(f"{free} bytes free, {needed + self.reserve_bytes} needed")

    def writer(self, envelope: Envelope, message_id: str | None = None) -> FilesystemWriter:
        return FilesystemWriter(self, envelope, message_id or new_message_id())

    # -- reading -------------------------------------------------------------------------------------

    def path(self, message_id: str, state: State) -> Path:
        return self.root / state.value / f"{message_id}.msg"

    async def get(self, message_id: str) -> StoredMessage | None:
        state = self.index.get(message_id)
        if state is None:
            return None
        return await trio.to_thread.run_sync(self._load_sync, message_id, state)

    async def list(self, state: State) -> list[StoredMessage]:
        ids = sorted(i for i, s in self.index.items() if s is state)

        def load_all() -> list[StoredMessage]:
            loaded = (self._load_sync(i, state) for i in ids)
            return [m for m in loaded if m is not None]

        return await trio.to_thread.run_sync(load_all)

    async def read_content(self, message_id: str) -> AsyncIterator[bytes]:
        state = self.index.get(message_id)
        if state is None:
            raise StorageError(f"no message {message_id}")
        try:
            f = await trio.to_thread.run_sync(open, self.path(message_id, state), "rb")
        except OSError as exc:
            raise _error(exc, f"reading {message_id}") from exc
        try:
            await trio.to_thread.run_sync(read_envelope, f)
            while chunk := await trio.to_thread.run_sync(f.read, READ_CHUNK):
                yield chunk
        finally:
            f.close()

    def _readable_sync(self, path: Path) -> bool:
        try:
            with path.open("rb") as f:
                read_envelope(f)
        except (OSError, CorruptFile) as exc:
            log.error("corrupt spool file", path=str(path), error=str(exc))
            return False
        return True

    def _load_sync(self, message_id: str, state: State) -> StoredMessage | None:
        path = self.path(message_id, state)
        try:
            with path.open("rb") as f:
                envelope, offset = read_envelope(f)
                size = os.fstat(f.fileno()).st_size - offset
        except FileNotFoundError:
            self.index.pop(message_id, None)
            return None
        except (OSError, CorruptFile) as exc:
            log.error("corrupt spool file", path=str(path), error=str(exc))
            self._quarantine_sync(message_id, state)
            return None
        return StoredMessage(message_id, state, envelope, size)

    def _quarantine_sync(self, message_id: str, state: State) -> None:
        try:
            os.rename(self.path(message_id, state), self.path(message_id, State.CORRUPT))
            fsync_dir(self.root / State.CORRUPT.value)
        except OSError as exc:
            log.error("could not quarantine", id=message_id, error=str(exc))
        self.index[message_id] = State.CORRUPT

    # -- state changes -------------------------------------------------------------------------------

    async def move(self, message_id: str, to: State) -> None:
        state = self.index.get(message_id)
        if state is None:
            raise StorageError(f"no message {message_id}")
        if state is to:
            return
        try:
            await trio.to_thread.run_sync(os.rename, self.path(message_id, state), self.path(message_id, to))
        except OSError as exc:
            raise _error(exc, f"moving {message_id}") from exc
        self.index[message_id] = to
        await self.syncers[to].sync()
        await self.syncers[state].sync()

    async def delete(self, message_id: str) -> None:
        state = self.index.pop(message_id, None)
        if state is None:
            return
        try:
            await trio.to_thread.run_sync(os.unlink, self.path(message_id, state))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _error(exc, f"deleting {message_id}") from exc
        await self.syncers[state].sync()

    def statistics(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in State), 0)
        for state in self.index.values():
            counts[state.value] += 1
        return counts
