"""API key checks racing a reload: a key the reload removed must not be accepted or remembered."""

from __future__ import annotations

import threading

import pytest
import trio

from hedwigpy.api import _auth
from hedwigpy.api._auth import ApiAuth
from hedwigpy.config import ApiKeyConfig


async def test_a_key_removed_while_it_is_being_verified_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    started, release = threading.Event(), threading.Event()

    def slow_verify(password: str, stored: str) -> bool:  # scrypt takes a while; here, until released
        started.set()
        release.wait(10)
        return password == "s3cret"

    monkeypatch.setattr(_auth, "verify_password", slow_verify)
    auth = ApiAuth([ApiKeyConfig("old", "hash")])
    names: list[str | None] = []
    async with trio.open_nursery() as nursery:

        async def check() -> None:
            names.append(await auth.key_name("s3cret"))

        nursery.start_soon(check)
        await trio.to_thread.run_sync(started.wait, 10)
        auth.reconfigure([])  # SIGHUP removed the key while its check was running
        release.set()
    assert names == [None]
    assert await auth.key_name("s3cret") is None  # nor was it remembered as verified
