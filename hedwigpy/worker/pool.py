"""Per-host pools of outbound SMTP sessions, shaped like httpcore's connection pool.

`PoolState` is the bookkeeping as plain sync code — who may open a connection, who gets an idle one, who
waits, what has idled too long — so it is tested without sockets or clocks. `ConnectionPool` is the thin
trio shell: it turns a grant into an open session, wakes waiters, and closes what the state says to close.

A host is a `PoolKey`: the address and port plus everything that makes sessions non-interchangeable
(TLS mode and context, credentials, HELO name). At most `max_per_host` sessions per key exist at once;
a session is reused for at most `max_messages` transactions, and closed after `idle_timeout` unused.
A session that failed, saw 421 or is in a state that cannot take another transaction is dropped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog
import trio

from ..net.smtp_client import SessionOptions, SmtpSession

log = structlog.get_logger("hedwigpy.pool")

K = TypeVar("K", bound=Hashable)
C = TypeVar("C")


@dataclass(eq=False)
class Lease(Generic[K, C]):
    """A request for a connection to `key`. Once `granted`, `connection` is an idle connection to reuse,
    or None: the holder opens a new one. Until then it waits in the host's queue (first come, first
    served)."""

    key: K
    granted: bool = False
    connection: C | None = None


@dataclass
class _Host(Generic[K, C]):
    active: int = 0  # granted leases: connections in use or being opened
    idle: deque[tuple[C, float]] = field(default_factory=deque)  # (connection, idle since), oldest first
    waiting: deque[Lease[K, C]] = field(default_factory=deque)


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    hosts: int
    active: int
    idle: int
    waiting: int
    opened: int  # connections opened since start
    reused: int  # leases served by an idle connection
    failed: int  # connection attempts that failed


class PoolState(Generic[K, C]):
    """The pool's decisions, without I/O. Connections to close are returned, never closed here."""

    def __init__(self, max_per_host: int, idle_timeout: float) -> None:
        if max_per_host < 1:
            raise ValueError("max_per_host must be at least 1")
        self.max_per_host = max_per_host
        self.idle_timeout = idle_timeout
        self.reused = 0
        self._hosts: dict[K, _Host[K, C]] = {}

    def request(self, key: K, now: float) -> tuple[Lease[K, C], list[C]]:
        """A lease for `key`: granted at once (with an idle connection, or leave to open one) or waiting."""
        host = self._hosts.setdefault(key, _Host())
        expired = self._expire_host(host, now)
        lease: Lease[K, C] = Lease(key)
        if host.idle:
            self._grant(host, lease, host.idle.pop()[0])  # the most recently used: likeliest still open
        elif host.active < self.max_per_host:
            self._grant(host, lease, None)
        else:
            host.waiting.append(lease)
        return lease, expired

    def release(self, lease: Lease[K, C], connection: C | None, now: float) -> list[Lease[K, C]]:
        """The holder is done: `connection` is reusable, or None (closed, failed, never opened).

        Returns the waiting leases this granted: wake them.
        """
        assert lease.granted, "only a granted lease can be released"
        host = self._hosts[lease.key]
        host.active -= 1
        lease.granted, lease.connection = False, None
        woken: list[Lease[K, C]] = []
        if host.waiting:
            waiter = host.waiting.popleft()
            self._grant(host, waiter, connection)
            woken.append(waiter)
        elif connection is not None:
            host.idle.append((connection, now))
        self._forget_if_empty(lease.key, host)
        return woken

    def cancel(self, lease: Lease[K, C], now: float) -> list[Lease[K, C]]:
        """The holder gave up waiting (or never used what it was granted); returns leases to wake."""
        host = self._hosts.get(lease.key)
        if host is None:
            return []
        if lease.granted:
            return self.release(lease, lease.connection, now)
        if lease in host.waiting:
            host.waiting.remove(lease)
        self._forget_if_empty(lease.key, host)
        return []

    def expire(self, now: float) -> list[C]:
        """Idle connections past `idle_timeout`, removed from the pool for the caller to close."""
        expired: list[C] = []
        for key, host in list(self._hosts.items()):
            expired += self._expire_host(host, now)
            self._forget_if_empty(key, host)
        return expired

    def next_expiry(self) -> float:
        """When the oldest idle connection expires (math.inf when nothing is idle)."""
        oldest = [host.idle[0][1] for host in self._hosts.values() if host.idle]
        return min(oldest) + self.idle_timeout if oldest else math.inf

    def drain(self) -> list[C]:
        """Every idle connection, removed: the pool is shutting down."""
        idle = [conn for host in self._hosts.values() for conn, _ in host.idle]
        for host in self._hosts.values():
            host.idle.clear()
        return idle

    def counts(self) -> tuple[int, int, int, int]:
        """(hosts, active, idle, waiting)."""
        hosts = self._hosts.values()
        return (
            len(self._hosts),
            sum(h.active for h in hosts),
            sum(len(h.idle) for h in hosts),
            sum(len(h.waiting) for h in hosts),
        )

    def _grant(self, host: _Host[K, C], lease: Lease[K, C], connection: C | None) -> None:
        host.active += 1
        lease.granted, lease.connection = True, connection
        if connection is not None:
            self.reused += 1

    def _expire_host(self, host: _Host[K, C], now: float) -> list[C]:
        expired = []
        while host.idle and host.idle[0][1] + self.idle_timeout <= now:
            expired.append(host.idle.popleft()[0])
        return expired

    def _forget_if_empty(self, key: K, host: _Host[K, C]) -> None:
        if not host.active and not host.idle and not host.waiting:
            del self._hosts[key]


@dataclass(frozen=True, slots=True)
class PoolKey:
    """One upstream as the pool sees it; `name` is the host name we looked up (for labels and SNI)."""

    name: str
    address: str
    port: int
    options: SessionOptions


class ConnectionPool:
    """Open SMTP sessions per `PoolKey`, reused across messages; run `serve` to close idle ones."""

    def __init__(self, *, max_per_host: int, max_messages: int, idle_timeout: float) -> None:
        self.max_messages = max_messages
        self._state: PoolState[PoolKey, SmtpSession] = PoolState(max_per_host, idle_timeout)
        self._wakeups: dict[Lease[PoolKey, SmtpSession], trio.Event] = {}
        self._changed = trio.Event()
        self._opened = 0
        self._failed = 0

    def statistics(self) -> PoolStatistics:
        hosts, active, idle, waiting = self._state.counts()
        return PoolStatistics(hosts, active, idle, waiting, self._opened, self._state.reused, self._failed)

    @asynccontextmanager
    async def session(self, key: PoolKey) -> AsyncIterator[SmtpSession]:
        """A ready session with `key`'s host, returned to the pool afterwards if it can carry more mail.

        Raises `SessionFailure` when a new connection cannot be set up. If the body raises, the session
        is closed rather than reused.
        """
        lease = await self._acquire(key)
        session = lease.connection
        if session is None:
            try:
                session = await SmtpSession.open(key.name, key.address, key.port, key.options)
            except BaseException:
                self._failed += 1
                self._release(lease, None)
                raise
            self._opened += 1
        try:
            yield session
        except BaseException:
            try:
                await session.aclose(quit=False)
            finally:
                self._release(lease, None)
            raise
        if session.usable and session.messages < self.max_messages:
            self._release(lease, session)
        else:
            try:  # the slot is free only once the session is gone (QUIT may take a while)
                await session.aclose()
            finally:
                self._release(lease, None)

    async def _acquire(self, key: PoolKey) -> Lease[PoolKey, SmtpSession]:
        lease, expired = self._state.request(key, trio.current_time())
        await self._close_all(expired)
        if lease.granted:
            return lease
        event = self._wakeups[lease] = trio.Event()
        try:
            await event.wait()
        except BaseException:
            self._wake(self._state.cancel(lease, trio.current_time()))
            raise
        finally:
            del self._wakeups[lease]
        return lease

    def _release(self, lease: Lease[PoolKey, SmtpSession], session: SmtpSession | None) -> None:
        self._wake(self._state.release(lease, session, trio.current_time()))
        self._changed.set()

    def _wake(self, leases: list[Lease[PoolKey, SmtpSession]]) -> None:
        for lease in leases:
            self._wakeups[lease].set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Close sessions that idle past `idle_timeout`; on cancellation, close every idle session."""
        task_status.started()
        try:
            while True:
                self._changed = trio.Event()
                with trio.move_on_at(self._state.next_expiry()):
                    await self._changed.wait()
                await self._close_all(self._state.expire(trio.current_time()))
        finally:
            with trio.CancelScope(shield=True):
                await self._close_all(self._state.drain())

    async def _close_all(self, sessions: list[SmtpSession]) -> None:
        if not sessions:
            return
        async with trio.open_nursery() as nursery:
            for session in sessions:
                nursery.start_soon(session.aclose)
