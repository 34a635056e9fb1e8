"""The filesystem spool: one data file per message, its directory its state.

    root/tmp/       being written (swept at start: anything here is a torn write)
    root/queued/    accepted, waiting for delivery
    root/deferred/  a delivery attempt failed transiently
    root/held/      held by an operator
    root/bounced/   bounced; kept for `bounced_retention`
    root/corrupt/   quarantined: unreadable files, never delivered
    root/status/    ID.json: per-recipient delivery status, replaced whole (the data file never changes)

A message is written to `tmp/`, fsynced, renamed into `queued/`, and the directory fsynced (shared
between concurrent commits, see `_dirsync`) before `commit` returns. Every blocking call runs in a
worker thread so the event loop never waits on the disk.

A status file is written the same way (unique tmp name in `status/`, fsync, rename over the old one, fsync
of `status/`). A message without one has every recipient pending. A status that cannot be read quarantines
its message: guessing could resend to a recipient already delivered.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import BinaryIO

import structlog
import trio

from .._offload import run_sync
from ._dirsync import DirSyncer, fsync_dir, replace_file_sync
from ._format import CorruptFile, read_envelope
from ._status import MAX_STATUS_SIZE, CorruptStatus, decode_status, encode_status

# BUFFER_LIMIT and READ_CHUNK are re-exported: they are part of this backend's behaviour.
from ._writer import BUFFER_LIMIT as BUFFER_LIMIT
from ._writer import READ_CHUNK as READ_CHUNK
from ._writer import FilesystemWriter, storage_error
from .base import (
    DeliveryStatus,
    DueTimes,
    Envelope,
    InsufficientSpace,
    State,
    StorageError,
    StoredMessage,
    new_message_id,
)

log = structlog.get_logger("hedwigpy.storage")

ID_PATTERN = re.compile(r"^[0-9a-f]{24}$")
_CHECKED_AT_OPEN = (State.QUEUED, State.HELD)
FRESH_LIMIT = 32 * 1024 * 1024  # bytes of just-committed content kept in memory (`remember_fresh`)
STATUS_DIR = "status"
_DIRS = ("tmp", STATUS_DIR, *(s.value for s in State))


class FilesystemStorage:
    """The spool on a local filesystem. Keeps an in-memory index id → state, built at `open`."""

    def __init__(self, root: Path, *, reserve_bytes: int = 0) -> None:
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self.index: dict[str, State] = {}
        self.syncers = {state: DirSyncer(self.root / state.value) for state in State}
        self.status_syncer = DirSyncer(self.root / STATUS_DIR)
        self._status_locks: dict[str, trio.Lock] = {}  # one status writer (or deleter) per message
        # Messages that have (or may have) a status file; most never get one (delivered at the first
        # attempt), and their removal then skips a thread round trip for an unlink that would fail.
        self._with_status: set[str] = set()
        # The content of small messages just committed, so their first delivery attempt (moments later,
        # usually) reads memory instead of paying a thread round trip and an open/read. The files are
        # never modified, so a copy cannot go stale; it is dropped when the message moves or goes.
        self._fresh: dict[str, bytes] = {}
        self._fresh_bytes = 0

    # -- lifecycle -----------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await run_sync(self._open_sync)
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
        self._with_status.clear()
        for state in State:
            for entry in os.scandir(self.root / state.value):
                name = entry.name
                if not name.endswith(".msg") or not ID_PATTERN.match(name[:-4]):
                    log.warning("unexpected file in spool", path=entry.path)
                    continue
                message_id = name[:-4]
                if state is not State.CORRUPT and not self._plausible_sync(entry, state):
                    self._quarantine_sync(message_id, state)
                    continue
                self.index[message_id] = state
        self._open_status_sync()

    def _open_status_sync(self) -> None:
        """Sweep `status/` of torn writes and orphans; quarantine messages whose status is unreadable."""
        removed = 0
        for entry in os.scandir(self.root / STATUS_DIR):
            name = entry.name
            if name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
                continue
            message_id = name.removesuffix(".json")
            if not name.endswith(".json") or not ID_PATTERN.fullmatch(message_id):
                log.warning("unexpected file in spool", path=entry.path)
                continue
            state = self.index.get(message_id)
            if state is None:  # its data file is gone: a delete interrupted between the two unlinks
                os.unlink(entry.path)
                removed += 1
                continue
            self._with_status.add(message_id)
            if state in _CHECKED_AT_OPEN:
                try:
                    self._read_status_sync(message_id)
                except (OSError, CorruptStatus) as exc:
                    log.error("unreadable status file, message quarantined", id=message_id, error=str(exc))
                    self._quarantine_sync(message_id, state)
        if removed:
            log.warning("removed stale files from status/", count=removed)
            fsync_dir(self.root / STATUS_DIR)

    async def close(self) -> None:
        return None

    # -- writing -------------------------------------------------------------------------------------

    def check_space(self, needed: int) -> None:
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise storage_error(exc, "statvfs") from exc
        free = st.f_bavail * st.f_frsize
        if free < needed + self.reserve_bytes:
            raise InsufficientSpace(f"{free} bytes free, {needed + self.reserve_bytes} needed")

    def writer(self, envelope: Envelope, message_id: str | None = None) -> FilesystemWriter:
        if message_id is not None and (not ID_PATTERN.fullmatch(message_id) or message_id in self.index):
            # Ids become file names and the index key: a foreign shape could escape the spool's
            # directories, a known one would replace another message.
            raise ValueError(f"not a fresh message id: {message_id!r}")
        return FilesystemWriter(self, envelope, message_id or new_message_id())

    # -- reading -------------------------------------------------------------------------------------

    def _index_snapshot(self) -> tuple[tuple[str, State], ...]:
        """The index's entries, copied in one step: worker threads (a load finding a file gone, a
        quarantine) may change the dict while the event loop walks it."""
        return tuple(self.index.items())

    def path(self, message_id: str, state: State) -> Path:
        return self.root / state.value / f"{message_id}.msg"

    def status_path(self, message_id: str) -> Path:
        return self.root / STATUS_DIR / f"{message_id}.json"

    async def get(self, message_id: str) -> StoredMessage | None:
        state = self.index.get(message_id)
        if state is None:
            return None
        return await run_sync(self._load_sync, message_id, state)

    async def list(self, state: State) -> list[StoredMessage]:
        ids = sorted(i for i, s in self._index_snapshot() if s is state)

        def load_all() -> list[StoredMessage]:
            loaded = []
            for message_id in ids:
                try:
                    message = self._load_sync(message_id, state)
                except StorageError as exc:  # one unreadable file does not hide the others
                    log.warning("could not list a message", id=message_id, error=str(exc))
                    continue
                if message is not None:
                    loaded.append(message)
            return loaded

        return await run_sync(load_all)

    def remember_fresh(self, message_id: str, content: bytes) -> None:
        """Keep a just-committed message's content for its first attempt (bounded by FRESH_LIMIT)."""
        if self._fresh_bytes + len(content) <= FRESH_LIMIT:
            self._fresh[message_id] = content
            self._fresh_bytes += len(content)

    def _forget_fresh(self, message_id: str) -> None:
        content = self._fresh.pop(message_id, None)
        if content is not None:
            self._fresh_bytes -= len(content)

    async def read_content(self, message_id: str) -> AsyncGenerator[bytes, None]:
        state = self.index.get(message_id)
        if state is None:
            raise StorageError(f"no message {message_id}")
        fresh = self._fresh.get(message_id) if state is State.QUEUED else None
        if fresh is not None:
            yield fresh
            return
        try:
            f, first = await run_sync(self._open_content_sync, self.path(message_id, state))
        except OSError as exc:
            raise storage_error(exc, f"reading {message_id}") from exc
        except CorruptFile as exc:
            raise StorageError(f"reading {message_id}: {exc}") from exc
        if f is None:  # a message smaller than READ_CHUNK: read whole in the one thread round trip
            yield first
            return
        try:
            yield first
            while chunk := await run_sync(f.read, READ_CHUNK):
                yield chunk
        finally:
            f.close()

    @staticmethod
    def _open_content_sync(path: Path) -> tuple[BinaryIO | None, bytes]:
        """Open, skip the envelope and read the first chunk; the file is returned open only if more
        remains. Thread round trips cost more than the reads themselves for small messages."""
        f = path.open("rb")
        try:
            read_envelope(f)
            first = f.read(READ_CHUNK)
        except BaseException:
            f.close()
            raise
        if len(first) < READ_CHUNK:
            f.close()
            return None, first
        return f, first

    def _plausible_sync(self, entry: os.DirEntry[str], state: State) -> bool:
        """At open, queued/ and held/ files are read (envelope and status): they are few and next in line.
        deferred/ and bounced/ can hold a deep queue, so there only empty files are caught; anything else
        unreadable is quarantined when it is loaded (`get`, `load_status`), before any delivery."""
        if state in _CHECKED_AT_OPEN:
            return self._readable_sync(Path(entry.path))
        try:
            if entry.stat(follow_symlinks=False).st_size > 0:
                return True
        except OSError:
            pass
        log.error("corrupt spool file", path=entry.path, error="empty")
        return False

    def _readable_sync(self, path: Path) -> bool:
        """False for a file whose envelope cannot be parsed (quarantined). An I/O error may pass (a
        full disk, a permission fixed by hand): the file stays, and its first load says again."""
        try:
            with path.open("rb") as f:
                read_envelope(f)
        except CorruptFile as exc:
            log.error("corrupt spool file", path=str(path), error=str(exc))
            return False
        except OSError as exc:
            log.warning("spool file unreadable for now, kept", path=str(path), error=str(exc))
        return True

    def _load_sync(self, message_id: str, state: State) -> StoredMessage | None:
        """The message's metadata; None if it is gone. Raises StorageError on an I/O error (the caller
        retries later: Postfix too defers, rather than quarantines, what it cannot read right now)."""
        found: State | None = state
        for retry in (False, True):
            assert found is not None
            path = self.path(message_id, found)
            try:
                with path.open("rb") as f:
                    envelope, offset = read_envelope(f)
                    size = os.fstat(f.fileno()).st_size - offset
            except FileNotFoundError:
                # A `move` may have renamed it since the index was read: look before forgetting it.
                found = None if retry else self._find_sync(message_id, state)
                if found is None:
                    break
                continue
            except CorruptFile as exc:
                log.error("corrupt spool file", path=str(path), error=str(exc))
                self._quarantine_sync(message_id, found)
                return None
            except OSError as exc:
                raise storage_error(exc, f"reading {message_id}") from exc
            return StoredMessage(message_id, found, envelope, size)
        if self.index.get(message_id) is state:  # unless a concurrent change already filed it
            self.index.pop(message_id, None)
        return None

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
        self._forget_fresh(message_id)
        try:
            await run_sync(os.rename, self.path(message_id, state), self.path(message_id, to))
        except OSError as exc:
            raise storage_error(exc, f"moving {message_id}") from exc
        self.index[message_id] = to
        await self.syncers[to].sync()
        await self.syncers[state].sync()

    async def delete(self, message_id: str) -> None:
        state = self.index.pop(message_id, None)
        if state is None:
            return
        self._forget_fresh(message_id)
        try:
            await run_sync(os.unlink, self.path(message_id, state))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, f"deleting {message_id}") from exc
        else:
            await self.syncers[state].sync()
        # Only once the data file's removal is durable may its status go: the reverse order could bring
        # the message back after a crash with every recipient pending. A status left behind is harmless
        # (`open` removes orphans), so it is not worth a directory fsync.
        if message_id not in self._with_status:
            return
        self._with_status.discard(message_id)
        async with self._status_lock(message_id):
            try:
                await run_sync(os.unlink, self.status_path(message_id))
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove a status file", id=message_id, error=str(exc))

    # -- delivery status -----------------------------------------------------------------------------

    async def load_status(self, message_id: str) -> DeliveryStatus:
        state = self.index.get(message_id)
        if state is None:
            raise StorageError(f"no message {message_id}")
        try:
            return await run_sync(self._load_status_sync, message_id, state)
        except OSError as exc:
            raise storage_error(exc, f"reading the status of {message_id}") from exc

    async def save_status(self, message_id: str, status: DeliveryStatus) -> None:
        data = encode_status(status)
        async with self._status_lock(message_id):
            if message_id not in self.index:
                raise StorageError(f"no message {message_id}")
            self._with_status.add(message_id)  # before the file exists: the set only over-approximates
            try:
                await run_sync(self._save_status_sync, message_id, data)
            except OSError as exc:
                raise storage_error(exc, f"saving the status of {message_id}") from exc
        await self.status_syncer.sync()

    @asynccontextmanager
    async def _status_lock(self, message_id: str) -> AsyncIterator[None]:
        """Serialise status replacements of one message, so the last `save_status` called wins."""
        lock = self._status_locks.setdefault(message_id, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._status_locks.pop(message_id, None)

    def _read_status_sync(self, message_id: str) -> DeliveryStatus | None:
        try:
            with self.status_path(message_id).open("rb") as f:
                raw = f.read(MAX_STATUS_SIZE + 1)
        except FileNotFoundError:
            return None
        return decode_status(raw)

    def _load_status_sync(self, message_id: str, state: State) -> DeliveryStatus:
        try:
            status = self._read_status_sync(message_id)
        except CorruptStatus as exc:
            log.error("corrupt status file, message quarantined", id=message_id, error=str(exc))
            found = self._find_sync(message_id, state)
            if found is not None and found is not State.CORRUPT:
                self._quarantine_sync(message_id, found)
            raise
        if status is not None:
            return status
        found = self._find_sync(message_id, state)
        if found is None:
            raise StorageError(f"no message {message_id}")
        path = self.path(message_id, found)
        try:
            with path.open("rb") as f:
                envelope, _ = read_envelope(f)
        except CorruptFile as exc:
            log.error("corrupt spool file", path=str(path), error=str(exc))
            if found is not State.CORRUPT:
                self._quarantine_sync(message_id, found)
            raise
        return DeliveryStatus.initial(envelope)

    def _find_sync(self, message_id: str, state: State) -> State | None:
        """The directory holding the data file: the index's guess first (a `move` may be under way)."""
        for candidate in (state, *(s for s in State if s is not state)):
            if self.path(message_id, candidate).exists():
                return candidate
        return None

    def status_first_sync(self, message_id: str, data: bytes) -> None:
        self._with_status.add(message_id)  # not in the index yet: nothing can delete it meanwhile
        self._save_status_sync(message_id, data)
        fsync_dir(self.root / STATUS_DIR)

    def _save_status_sync(self, message_id: str, data: bytes) -> None:
        final = self.status_path(message_id)  # a unique tmp name: concurrent saves never share one
        replace_file_sync(final.with_name(f"{message_id}.{os.urandom(4).hex()}.tmp"), final, data)

    async def set_due(self, message_id: str, when: float) -> None:
        state = self.index.get(message_id)
        if state is None:
            raise StorageError(f"no message {message_id}")
        try:
            await run_sync(os.utime, self.path(message_id, state), (when, when))
        except OSError as exc:
            raise storage_error(exc, f"scheduling {message_id}") from exc

    async def due_times(self, state: State) -> DueTimes:
        wanted = {i for i, s in self._index_snapshot() if s is state}

        def scan() -> list[tuple[str, float]]:
            found = []
            for entry in os.scandir(self.root / state.value):
                message_id = entry.name.removesuffix(".msg")
                if message_id in wanted:
                    try:
                        found.append((message_id, entry.stat(follow_symlinks=False).st_mtime))
                    except FileNotFoundError:  # moved or deleted meanwhile
                        continue
            return found

        try:
            return await run_sync(scan)
        except OSError as exc:
            raise storage_error(exc, f"listing {state.value}/") from exc

    def statistics(self) -> dict[str, int]:
        counts = dict.fromkeys((s.value for s in State), 0)
        for _, state in self._index_snapshot():
            counts[state.value] += 1
        return counts
