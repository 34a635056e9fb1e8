"""The real daemon under a pretend systemd: `$NOTIFY_SOCKET` is a datagram socket this test reads. READY=1
must not come before the SMTP port answers; WATCHDOG=1 follows when `$WATCHDOG_USEC` asks for it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .daemon import Daemon
from .wire import Wire


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        yield sock


def spawn(d: Daemon, manager: socket.socket, **env: str) -> None:
    """Start the daemon without waiting for its log: the notification alone must say when it is ready."""
    d.spawn(NOTIFY_SOCKET=manager.getsockname(), **env)


def receive(manager: socket.socket, timeout: float) -> list[str]:
    manager.settimeout(timeout)
    return manager.recv(4096).decode().split("\n")


def test_ready_only_once_smtp_answers(tmp_path: Path, config: dict[str, Any], manager: socket.socket) -> None:
    d = Daemon(tmp_path, config)
    spawn(d, manager)
    try:
        states = receive(manager, 20)
        # The very moment READY=1 arrives, the listener must already take connections.
        with Wire(d.port()) as w:
            assert w.banner.startswith("220 ")
        assert states[0] == "READY=1"
        assert states[1].startswith("STATUS=Accepting mail: SMTP 127.0.0.1:")
        assert any(e.get("event") == "ready" for e in d.log_events())
    finally:
        d.kill()


def test_watchdog_pings_when_asked(tmp_path: Path, config: dict[str, Any], manager: socket.socket) -> None:
    d = Daemon(tmp_path, config)
    spawn(d, manager, WATCHDOG_USEC="400000")  # WatchdogSec=0.4s: a ping every 0.2 s
    try:
        assert receive(manager, 20)[0] == "READY=1"
        started = time.monotonic()
        pings = [receive(manager, 5) for _ in range(5)]
        assert pings == [["WATCHDOG=1"]] * 5
        assert 0.6 < time.monotonic() - started < 3.0
    finally:
        d.kill()


def test_no_watchdog_without_watchdog_usec(
    tmp_path: Path, config: dict[str, Any], manager: socket.socket
) -> None:
    d = Daemon(tmp_path, config)
    spawn(d, manager)
    try:
        assert receive(manager, 20)[0] == "READY=1"
        with pytest.raises(TimeoutError):
            receive(manager, 1.0)
    finally:
        d.kill()


def test_stopping_on_sigterm(tmp_path: Path, config: dict[str, Any], manager: socket.socket) -> None:
    d = Daemon(tmp_path, config)
    spawn(d, manager)
    try:
        assert receive(manager, 20)[0] == "READY=1"
        assert d.stop() == 0
        assert "STOPPING=1" in receive(manager, 5)
    finally:
        d.kill()
