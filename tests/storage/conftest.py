"""Fixtures for the spool tests: a fresh filesystem spool in tmp_path, and both backends side by side."""

from __future__ import annotations

from pathlib import Path

import pytest

from hedwigpy.storage import FilesystemStorage, MemoryStorage

from .helpers import AnyStorage


@pytest.fixture
async def fs(tmp_path: Path) -> FilesystemStorage:
    storage = FilesystemStorage(tmp_path / "spool")
    await storage.open()
    return storage


@pytest.fixture(params=["filesystem", "memory"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AnyStorage:
    kind: str = request.param
    backend: AnyStorage = FilesystemStorage(tmp_path / "spool") if kind == "filesystem" else MemoryStorage()
    await backend.open()
    return backend
