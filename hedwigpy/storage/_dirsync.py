"""Durable file replacement, and group commit for directory fsyncs.

After a rename, the directory must be fsynced before the rename is durable. When many sessions commit
at once, one fsync of the directory that *starts after* all their renames covers all of them: callers
wait for such a sync instead of each paying for their own.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from .._offload import run_sync
from .base import StorageError


def replace_file_sync(tmp: Path, final: Path, data: bytes) -> None:
    """Write `data` to `tmp`, fsync it and rename it over `final` (atomic: readers see the old file or
    the new one, never a part). `tmp` is removed if anything fails. The directory is not fsynced: the
    caller does that, alone or shared with others (`DirSyncer`)."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_all(fd: int, data: bytes) -> None:
    """os.write until all of `data` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSyncer:
    """Shares directory fsyncs between concurrent callers of `sync()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._started = 0  # number of syncs begun
        self._done = 0  # highest sync number finished
        self._running = False
        self._finished = trio.Event()
        self.syncs = 0  # statistics: real fsyncs made

    async def sync(self) -> None:
        """Return once a directory fsync that began after this call has completed."""
        target = self._started + 1
        while self._done < target:
            if self._running:
                await self._finished.wait()
                continue
            self._running = True
            self._started += 1
            number = self._started
            try:
                await run_sync(fsync_dir, self.path)
            except OSError as exc:
                raise StorageError(f"fsync of {self.path} failed: {exc}") from exc
            else:
                self.syncs += 1
                self._done = max(self._done, number)
            finally:  # a failed sync wakes the waiters too: one of them tries again for itself
                self._running = False
                self._finished.set()
                self._finished = trio.Event()
