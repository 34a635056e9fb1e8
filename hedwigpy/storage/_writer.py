"""`FilesystemWriter`: one message streamed into `tmp/`, read back for cut-through, committed into `queued/`.

Content is buffered in memory up to BUFFER_LIMIT, then streamed to the file in worker threads; the
envelope line is written only when the file is created, so mail cut-through delivers from memory never
touches the disk. `commit` fsyncs the file (and a status first, when given), renames it into `queued/`
and has the directory fsynced before returning.

`prepend` (DKIM signatures go at the very top) inserts into the buffer while nothing is on disk: the
common case, free. A message already streaming to `tmp/` (over BUFFER_LIMIT) keeps the prefix aside and
is copied once, at commit, into a fresh file (envelope line, prefix, old content; `copy_file_range`, in
a worker thread) — the spool's files are written once and never modified in place.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import structlog
import trio

from .._offload import run_sync
from ._dirsync import write_all
from ._format import encode_envelope
from ._status import encode_status
from .base import DeliveryStatus, Envelope, InsufficientSpace, State, StorageError, StoredMessage

if TYPE_CHECKING:
    from .filesystem import FilesystemStorage

log = structlog.get_logger("hedwigpy.storage")

BUFFER_LIMIT = 256 * 1024  # content kept in memory before the writer starts streaming to tmp/
READ_CHUNK = 64 * 1024


def storage_error(exc: OSError, what: str) -> StorageError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"{what}: {exc}")
    return StorageError(f"{what}: {exc}")


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove a temporary file", path=str(path), error=str(exc))


class FilesystemWriter:
    """Streams one message into `tmp/`, then commits it into `queued/`."""

    def __init__(self, storage: FilesystemStorage, envelope: Envelope, message_id: str) -> None:
        self.message_id = message_id
        self.envelope = envelope
        self._storage = storage
        self._buffer = bytearray()  # content not yet in the file
        self._header_len = 0  # the envelope line, encoded when the file is created (cut-through mail
        # that is never kept never needs it)
        self._written = 0  # bytes already in the file, envelope line included
        self._fd: int | None = None
        self._prefix = b""  # prepended after the file was started: goes before its content at commit
        self._done = False
        self._tmp = storage.root / "tmp" / f"{message_id}.msg"
        self._flushing = trio.Lock()

    async def write(self, data: bytes) -> None:
        if self._done:
            raise StorageError("writer already finished")
        self._buffer += data
        if len(self._buffer) >= BUFFER_LIMIT:
            chunk = bytes(self._buffer)
            self._buffer.clear()
            await self._run(self._write_sync, chunk)

    async def prepend(self, data: bytes) -> None:
        if self._done:
            raise StorageError("writer already finished")
        if self._fd is None and not self._written:
            self._buffer[0:0] = data
        else:
            self._prefix = data + self._prefix

    async def content(self) -> AsyncGenerator[bytes, None]:
        if self._done:
            raise StorageError("writer already finished")
        if self._fd is None:  # everything is still in memory
            yield bytes(self._buffer)
            return
        if self._prefix:
            yield self._prefix
        async with self._flushing:  # concurrent readers (one per delivery group) wait for one flush
            if self._buffer:  # the file must hold everything before it is read back
                chunk = bytes(self._buffer)
                self._buffer.clear()
                await self._run(self._write_sync, chunk)
        try:
            f = await run_sync(self._open_content_sync)
        except OSError as exc:
            raise storage_error(exc, f"reading back {self.message_id}") from exc
        try:
            while chunk := await run_sync(f.read, READ_CHUNK):
                yield chunk
        finally:
            f.close()

    async def commit(self, status: DeliveryStatus | None = None) -> StoredMessage:
        if self._done:
            raise StorageError("writer already finished")
        chunk = bytes(self._buffer)
        self._buffer.clear()
        whole = self._fd is None and not self._written  # the content never left memory
        if status is not None:
            # Durable before the data file appears in queued/ (a status without its data file is an
            # orphan that open() removes; the reverse would resend what cut-through delivered).
            await self._run(self._storage.status_first_sync, self.message_id, encode_status(status))
        await self._run(self._commit_sync, chunk)
        self._done = True
        storage = self._storage
        try:
            # The file is in queued/ now: finish filing it even if cancelled meanwhile (else it would sit
            # there unindexed and be delivered after a restart although its sender never got a 250).
            with trio.CancelScope(shield=True):
                await storage.syncers[State.QUEUED].sync()
        except StorageError:
            # The sender hears 451 and sends again: this copy must not be delivered as well.
            with trio.CancelScope(shield=True):
                await run_sync(unlink_quietly, storage.path(self.message_id, State.QUEUED))
            raise
        storage.index[self.message_id] = State.QUEUED
        if whole:
            storage.remember_fresh(self.message_id, chunk)
        return StoredMessage(self.message_id, State.QUEUED, self.envelope, self._written - self._header_len)

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        if self._fd is not None or self._written:
            await run_sync(self._discard_sync)

    async def _run(self, fn: Callable[..., None], *args: object) -> None:
        try:
            await run_sync(fn, *args)
        except (OSError, StorageError) as exc:
            self._done = True
            await run_sync(self._discard_sync)
            if isinstance(exc, StorageError):
                raise
            raise storage_error(exc, f"writing {self.message_id}") from exc

    # -- blocking parts, run in worker threads ------------------------------------------------------

    def _write_sync(self, chunk: bytes) -> None:
        if self._fd is None:
            header = encode_envelope(self.envelope)  # may refuse the envelope: before any file exists
            self._fd = _create(self._tmp)
            self._header_len = len(header)
            chunk = header + chunk
        write_all(self._fd, chunk)
        self._written += len(chunk)

    def _open_content_sync(self) -> BinaryIO:
        f = self._tmp.open("rb")
        f.seek(self._header_len)
        return f

    def _commit_sync(self, chunk: bytes) -> None:
        self._write_sync(chunk)
        if self._prefix:
            self._rewrite_with_prefix_sync()
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.rename(self._tmp, self._storage.root / "queued" / f"{self.message_id}.msg")

    def _rewrite_with_prefix_sync(self) -> None:
        """Envelope line + prefix + the old file's content into a new file in tmp/, which replaces it."""
        old_fd, old_tmp = self._fd, self._tmp
        assert old_fd is not None
        os.close(old_fd)
        self._fd = None
        self._tmp = old_tmp.with_name(f"{self.message_id}.prefixed.msg")  # also swept from tmp/ at start
        try:  # a failure discards the new file (self._tmp); the old one goes in any case
            self._fd = _create(self._tmp)
            head = encode_envelope(self.envelope) + self._prefix
            write_all(self._fd, head)
            src = os.open(old_tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _copy_range(src, self._fd, self._header_len, self._written - self._header_len)
            finally:
                os.close(src)
        finally:
            os.unlink(old_tmp)
        self._written += len(self._prefix)
        self._prefix = b""

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


def _create(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """`count` bytes of `src` from `offset` to the end of `dst`: in the kernel where it can, else by reads."""
    try:
        while count > 0:
            n = os.copy_file_range(src, dst, count, offset)
            if n == 0:  # some filesystems answer 0 instead of an error: the reads below decide
                break
            offset += n
            count -= n
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while count > 0:  # copy_file_range is not available here (or stopped short): plain reads and writes
        chunk = os.pread(src, min(count, READ_CHUNK), offset)
        if not chunk:
            raise OSError(errno.EIO, "spool file shorter than written")
        write_all(dst, chunk)
        offset += len(chunk)
        count -= len(chunk)
