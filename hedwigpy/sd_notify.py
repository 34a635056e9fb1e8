"""systemd's notification protocol (sd_notify(3)): one datagram of newline-separated `KEY=value` lines
to the AF_UNIX socket named by `$NOTIFY_SOCKET`, which systemd sets for `Type=notify` services.

`notify("READY=1")` once every listener is bound and the spool is open, `notify("STOPPING=1")` when a
drain begins, and `serve_watchdog` pings `WATCHDOG=1` when the unit sets `WatchdogSec=`. Outside
systemd (no `$NOTIFY_SOCKET`) all of it does nothing. Nothing here raises into the daemon: a service
manager that cannot be told is logged once, and the daemon goes on serving mail.
"""

from __future__ import annotations

import os
import socket

import structlog
import trio

log = structlog.get_logger("hedwigpy")

_warned = False


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=...") in one datagram; True when it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # Linux abstract namespace
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        _warn_once(f"unsupported NOTIFY_SOCKET address {address[:64]!r}")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            # Non-blocking: a service manager that does not read must not stall the event loop.
            sock.setblocking(False)
            sock.connect(address)
            sock.send("\n".join(states).encode())
    except OSError as exc:
        _warn_once(f"cannot notify the service manager: {exc}")
        return False
    return True


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("sd_notify failed", error=message)


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises;
    None when no watchdog is asked of this process (unset, or `$WATCHDOG_PID` names another one)."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


async def serve_watchdog(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Ping the watchdog until cancelled. It runs on the event loop like every connection, so a loop
    blocked by a stuck call stops the pings and systemd restarts the daemon."""
    interval = watchdog_interval()
    task_status.started()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await trio.sleep(interval)
