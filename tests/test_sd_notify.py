"""sd_notify against real AF_UNIX datagram sockets, as systemd listens: a path and an abstract name."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from hedwigpy import sd_notify
from hedwigpy.sd_notify import notify, serve_watchdog, watchdog_interval


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sd_notify, "_warned", False)


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A service manager's notification socket bound to a path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        path = tmp_path / "notify"
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_states_go_in_one_datagram(manager: socket.socket) -> None:
    assert notify("READY=1", "STATUS=serving")
    assert manager.recv(4096) == b"READY=1\nSTATUS=serving"
    assert notify("STOPPING=1")
    assert manager.recv(4096) == b"STOPPING=1"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hedwigpy-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1")
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_happens() -> None:
    assert not notify("READY=1")


def test_an_unreachable_manager_is_logged_once_and_never_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not notify("READY=1")
    assert not notify("STOPPING=1")
    assert capsys.readouterr().out.count("sd_notify failed") == 1
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert not notify("READY=1")


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("0", "-5", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert watchdog_interval() is None


async def test_watchdog_pings_every_half_interval(
    manager: socket.socket, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # WatchdogSec=2s: a ping every second
    manager.setblocking(False)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_watchdog)
        await trio.sleep(3.5)
        nursery.cancel_scope.cancel()
    pings = []
    while True:
        try:
            pings.append(manager.recv(4096))
        except BlockingIOError:
            break
    assert pings == [b"WATCHDOG=1"] * 4  # at 0, 1, 2 and 3 s


async def test_no_watchdog_task_returns_at_once(manager: socket.socket) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_watchdog)
    manager.setblocking(False)
    with pytest.raises(BlockingIOError):
        manager.recv(4096)
