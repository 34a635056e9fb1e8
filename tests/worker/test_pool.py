"""The session pool: `PoolState`'s decisions as plain sync code, then `ConnectionPool` with real
`SmtpSession`s against a scripted upstream on loopback (counting connections on the server side)."""

from __future__ import annotations

import math
import socket

import pytest
import trio
import trio.testing

from hedwigpy.net.smtp_client import SessionFailure, SessionOptions
from hedwigpy.worker.pool import ConnectionPool, PoolKey, PoolState, PoolStatistics
from tests.scripted_upstream import BODY, Script, Upstream, outgoing, start_upstream

pytestmark = pytest.mark.timeout(10)

# --- PoolState -----------------------------------------------------------------------------------------


def test_max_per_host_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PoolState[str, str](0, 10.0)


def test_grants_up_to_max_per_host_then_queues() -> None:
    state: PoolState[str, str] = PoolState(2, 10.0)
    a, expired = state.request("mx", 0.0)
    b, _ = state.request("mx", 0.0)
    c, _ = state.request("mx", 0.0)
    assert expired == []
    assert (a.granted, a.connection) == (True, None)
    assert (b.granted, b.connection) == (True, None)
    assert (c.granted, c.connection) == (False, None)
    assert state.counts() == (1, 2, 0, 1)
    other, _ = state.request("other", 0.0)  # another host has its own limit
    assert other.granted
    assert state.counts() == (2, 3, 0, 1)


def test_release_hands_the_connection_to_the_first_waiter() -> None:
    state: PoolState[str, str] = PoolState(2, 10.0)
    a, _ = state.request("mx", 0.0)
    b, _ = state.request("mx", 0.0)
    c, _ = state.request("mx", 0.0)
    d, _ = state.request("mx", 0.0)
    assert state.release(a, "conn-a", 1.0) == [c]  # first come, first served
    assert (c.granted, c.connection) == (True, "conn-a")
    assert not d.granted
    assert (a.granted, a.connection) == (False, None)
    assert state.reused == 1
    assert state.release(b, None, 1.0) == [d]  # b's connection died: d may open a new one
    assert (d.granted, d.connection) == (True, None)
    assert state.counts() == (1, 2, 0, 0)
    assert state.reused == 1


def test_release_without_waiters_keeps_the_connection_idle() -> None:
    state: PoolState[str, str] = PoolState(2, 10.0)
    a, _ = state.request("mx", 0.0)
    assert state.release(a, "conn", 1.0) == []
    assert state.counts() == (1, 0, 1, 0)
    again, _ = state.request("mx", 2.0)
    assert (again.granted, again.connection) == (True, "conn")
    assert state.reused == 1
    assert state.counts() == (1, 1, 0, 0)


def test_release_of_nothing_forgets_the_host() -> None:
    state: PoolState[str, str] = PoolState(1, 10.0)
    a, _ = state.request("mx", 0.0)
    assert state.release(a, None, 1.0) == []
    assert state.counts() == (0, 0, 0, 0)


def test_release_twice_is_a_bug() -> None:
    state: PoolState[str, str] = PoolState(1, 10.0)
    a, _ = state.request("mx", 0.0)
    state.release(a, None, 1.0)
    with pytest.raises(AssertionError):
        state.release(a, None, 1.0)


def test_idle_connections_are_reused_most_recent_first() -> None:
    state: PoolState[str, str] = PoolState(3, 10.0)
    leases = [state.request("mx", 0.0)[0] for _ in range(3)]
    for i, lease in enumerate(leases):
        state.release(lease, f"conn{i}", float(i))
    assert [state.request("mx", 3.0)[0].connection for _ in range(3)] == ["conn2", "conn1", "conn0"]


def test_cancel_a_waiting_lease() -> None:
    state: PoolState[str, str] = PoolState(1, 10.0)
    a, _ = state.request("mx", 0.0)
    b, _ = state.request("mx", 0.0)
    c, _ = state.request("mx", 0.0)
    assert state.cancel(b, 1.0) == []
    assert state.counts() == (1, 1, 0, 1)
    assert state.release(a, "conn", 2.0) == [c]  # b is not woken any more
    assert not b.granted


def test_cancel_a_granted_lease_passes_it_on() -> None:
    state: PoolState[str, str] = PoolState(1, 10.0)
    a, _ = state.request("mx", 0.0)
    state.release(a, "conn", 1.0)
    b, _ = state.request("mx", 2.0)
    c, _ = state.request("mx", 2.0)
    assert b.connection == "conn" and not c.granted
    # b was granted the idle connection but gave up before using it: c gets it
    assert state.cancel(b, 3.0) == [c]
    assert (c.granted, c.connection) == (True, "conn")
    assert state.cancel(c, 4.0) == []  # nobody waits: back to idle
    assert state.counts() == (1, 0, 1, 0)


def test_cancel_a_granted_lease_without_connection_frees_the_slot() -> None:
    state: PoolState[str, str] = PoolState(1, 10.0)
    a, _ = state.request("mx", 0.0)
    assert state.cancel(a, 1.0) == []
    assert state.counts() == (0, 0, 0, 0)
    assert state.request("mx", 2.0)[0].granted


def test_cancel_for_a_forgotten_host() -> None:
    state: PoolState[str, str] = PoolState(1, 10.0)
    a, _ = state.request("mx", 0.0)
    state.release(a, None, 1.0)
    assert state.cancel(a, 2.0) == []


def test_idle_expiry() -> None:
    state: PoolState[str, str] = PoolState(2, 10.0)
    assert state.next_expiry() == math.inf
    a, _ = state.request("mx", 0.0)
    b, _ = state.request("other", 0.0)
    state.release(a, "conn-a", 5.0)
    state.release(b, "conn-b", 7.0)
    assert state.next_expiry() == 15.0
    assert state.expire(14.9) == []
    assert state.expire(15.0) == ["conn-a"]
    assert state.next_expiry() == 17.0
    assert state.counts() == (1, 0, 1, 0)
    assert state.expire(100.0) == ["conn-b"]
    assert state.counts() == (0, 0, 0, 0)
    assert state.next_expiry() == math.inf


def test_request_expires_what_idled_too_long() -> None:
    state: PoolState[str, str] = PoolState(2, 10.0)
    a, _ = state.request("mx", 0.0)
    b, _ = state.request("mx", 0.0)
    state.release(a, "old", 1.0)
    state.release(b, "newer", 8.0)
    lease, expired = state.request("mx", 12.0)
    assert expired == ["old"]
    assert lease.connection == "newer"


def test_request_with_every_idle_expired_opens_a_new_one() -> None:
    state: PoolState[str, str] = PoolState(1, 10.0)
    a, _ = state.request("mx", 0.0)
    state.release(a, "old", 1.0)
    lease, expired = state.request("mx", 11.0)
    assert expired == ["old"]
    assert (lease.granted, lease.connection) == (True, None)


def test_drain_returns_every_idle_connection() -> None:
    state: PoolState[str, str] = PoolState(2, 10.0)
    leases = [state.request(host, 0.0)[0] for host in ("a", "a", "b")]
    busy, _ = state.request("b", 0.0)
    for i, lease in enumerate(leases):
        state.release(lease, f"conn{i}", 1.0)
    assert sorted(state.drain()) == ["conn0", "conn1", "conn2"]
    assert state.counts() == (2, 1, 0, 0)  # the busy one is still out
    assert state.next_expiry() == math.inf
    state.release(busy, None, 2.0)


# --- ConnectionPool with real sessions -----------------------------------------------------------------


def pool_key(upstream: Upstream, port: int | None = None) -> PoolKey:
    options = SessionOptions(helo="client.test", tls="none", connect_timeout=2.0, reply_timeout=2.0)
    return PoolKey("mx.test", upstream.host, upstream.port if port is None else port, options)


async def send_one(pool: ConnectionPool, key: PoolKey) -> None:
    async with pool.session(key) as session:
        replies = await session.send(outgoing())
        assert replies.data is not None and replies.data.code == 250


async def test_one_connection_for_many_messages(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    pool = ConnectionPool(max_per_host=2, max_messages=100, idle_timeout=10.0)
    key = pool_key(upstream)
    for _ in range(5):
        await send_one(pool, key)
    assert len(upstream.connections) == 1
    assert upstream.messages == [BODY] * 5
    assert pool.statistics() == PoolStatistics(
        hosts=1, active=0, idle=1, waiting=0, opened=1, reused=4, failed=0
    )


async def test_max_messages_closes_and_reopens(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    pool = ConnectionPool(max_per_host=2, max_messages=2, idle_timeout=10.0)
    key = pool_key(upstream)
    for _ in range(5):
        await send_one(pool, key)
    await trio.testing.wait_all_tasks_blocked()
    assert [len(c.messages) for c in upstream.connections] == [2, 2, 1]
    assert [c.closed for c in upstream.connections] == [True, True, False]
    assert upstream.connections[0].verbs[-1] == "QUIT"
    assert pool.statistics().opened == 3


async def test_idle_sessions_are_closed(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    pool = ConnectionPool(max_per_host=2, max_messages=100, idle_timeout=0.15)
    await nursery.start(pool.serve)
    key = pool_key(upstream)
    await send_one(pool, key)
    assert pool.statistics().idle == 1
    started = trio.current_time()
    with trio.fail_after(1):
        await upstream.connections[0].gone.wait()
    assert trio.current_time() - started >= 0.1
    assert upstream.connections[0].verbs[-1] == "QUIT"
    assert pool.statistics().hosts == 0
    await send_one(pool, key)  # a new connection next time
    assert len(upstream.connections) == 2


async def test_serve_closes_idle_sessions_on_the_way_out(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    pool = ConnectionPool(max_per_host=2, max_messages=100, idle_timeout=60.0)
    async with trio.open_nursery() as inner:
        await inner.start(pool.serve)
        await send_one(pool, pool_key(upstream))
        inner.cancel_scope.cancel()
    await trio.testing.wait_all_tasks_blocked()
    assert upstream.connections[0].closed
    assert upstream.connections[0].verbs[-1] == "QUIT"
    assert pool.statistics().idle == 0


async def test_a_session_whose_user_raised_is_not_reused(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    pool = ConnectionPool(max_per_host=1, max_messages=100, idle_timeout=10.0)
    key = pool_key(upstream)
    with pytest.raises(RuntimeError):
        async with pool.session(key):
            raise RuntimeError("boom")
    assert pool.statistics().active == 0 and pool.statistics().idle == 0
    await send_one(pool, key)
    await trio.testing.wait_all_tasks_blocked()
    assert len(upstream.connections) == 2
    assert upstream.connections[0].closed
    assert "QUIT" not in upstream.connections[0].verbs


async def test_a_session_that_failed_is_not_reused(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(rcpt_replies={"bob@example.net": "421 4.3.2 bye"}))
    pool = ConnectionPool(max_per_host=1, max_messages=100, idle_timeout=10.0)
    key = pool_key(upstream)
    with pytest.raises(SessionFailure):
        async with pool.session(key) as session:
            await session.send(outgoing())
    assert pool.statistics().idle == 0
    async with pool.session(key) as session:
        replies = await session.send(outgoing(["carol@example.net"]))
    assert replies.data is not None and replies.data.code == 250
    assert len(upstream.connections) == 2


async def test_failed_connect_counts_and_frees_the_slot(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    pool = ConnectionPool(max_per_host=1, max_messages=100, idle_timeout=10.0)
    bad = pool_key(upstream, closed_port)
    for _ in range(2):  # a leaked slot would make the second attempt wait forever
        with pytest.raises(SessionFailure) as info:
            await send_one(pool, bad)
        assert info.value.reply.enhanced == "4.4.1"
    stats = pool.statistics()
    assert (stats.failed, stats.opened, stats.active, stats.hosts) == (2, 0, 0, 0)


async def test_refusing_banner_counts_as_failed(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(greeting="554 5.7.1 no"))
    pool = ConnectionPool(max_per_host=1, max_messages=100, idle_timeout=10.0)
    with pytest.raises(SessionFailure):
        await send_one(pool, pool_key(upstream))
    assert pool.statistics().failed == 1 and pool.statistics().active == 0


@pytest.mark.parametrize("max_messages", [100, 1])
async def test_max_per_host_bounds_concurrent_connections(nursery: trio.Nursery, max_messages: int) -> None:
    # a slow QUIT: a session being closed still counts until it is gone
    upstream = await start_upstream(nursery, Script(quit_delay=0.05))
    pool = ConnectionPool(max_per_host=2, max_messages=max_messages, idle_timeout=10.0)
    key = pool_key(upstream)
    go = trio.Event()
    done = 0

    async def deliver() -> None:
        nonlocal done
        async with pool.session(key) as session:
            await go.wait()
            replies = await session.send(outgoing())
        assert replies.data is not None and replies.data.code == 250
        done += 1

    async with trio.open_nursery() as senders:
        for _ in range(8):
            senders.start_soon(deliver)
        await trio.testing.wait_all_tasks_blocked()
        stats = pool.statistics()
        assert (stats.active, stats.waiting) == (2, 6)
        assert upstream.open_now == 2
        go.set()
    assert done == 8  # every waiter got a slot in the end
    assert upstream.max_open <= 2
    assert len(upstream.messages) == 8
    assert pool.statistics().active == 0 and pool.statistics().waiting == 0


async def test_waiter_proceeds_when_a_slot_frees(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    pool = ConnectionPool(max_per_host=1, max_messages=100, idle_timeout=10.0)
    key = pool_key(upstream)
    release = trio.Event()
    order: list[str] = []

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with pool.session(key) as session:
            task_status.started()
            await release.wait()
            await session.send(outgoing())
            order.append("holder")

    async def waiter() -> None:
        await send_one(pool, key)
        order.append("waiter")

    async with trio.open_nursery() as tasks:
        await tasks.start(holder)
        tasks.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert pool.statistics().waiting == 1 and order == []
        release.set()
    assert order == ["holder", "waiter"]
    assert len(upstream.connections) == 1  # the waiter got the holder's session


async def test_cancelled_waiter_does_not_leak_a_slot(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    pool = ConnectionPool(max_per_host=1, max_messages=100, idle_timeout=10.0)
    key = pool_key(upstream)
    release = trio.Event()

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with pool.session(key):
            task_status.started()
            await release.wait()

    async with trio.open_nursery() as tasks:
        await tasks.start(holder)
        with trio.move_on_after(0.05) as scope:
            await send_one(pool, key)
        assert scope.cancelled_caught
        assert pool.statistics().waiting == 0
        release.set()
    assert pool.statistics().active == 0
    with trio.fail_after(2):
        await send_one(pool, key)
    assert len(upstream.connections) == 1


async def test_waiter_cancelled_before_the_grant_passes_the_session_on(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    pool = ConnectionPool(max_per_host=1, max_messages=100, idle_timeout=10.0)
    key = pool_key(upstream)
    release = trio.Event()
    cancel_scope = trio.CancelScope()

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with pool.session(key):
            task_status.started()
            await release.wait()
            # Cancelled while still queued, and granted the session in the same step, before it could run:
            # its cancellation must hand the session on instead of leaking it.
            cancel_scope.cancel()

    async def cancelled_waiter() -> None:
        with cancel_scope:
            await send_one(pool, key)

    async with trio.open_nursery() as tasks:
        await tasks.start(holder)
        tasks.start_soon(cancelled_waiter)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert cancel_scope.cancelled_caught
    stats = pool.statistics()
    assert (stats.active, stats.waiting, stats.idle) == (0, 0, 1)
    await send_one(pool, key)
    assert len(upstream.connections) == 1


async def test_waiter_cancelled_after_the_grant_drops_the_session(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery)
    pool = ConnectionPool(max_per_host=1, max_messages=100, idle_timeout=10.0)
    key = pool_key(upstream)
    release = trio.Event()
    cancel_scope = trio.CancelScope()

    async def holder(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with pool.session(key):
            task_status.started()
            await release.wait()
        cancel_scope.cancel()  # the waiter already holds the session: cancelled inside its body

    async def cancelled_waiter() -> None:
        with cancel_scope:
            await send_one(pool, key)

    async with trio.open_nursery() as tasks:
        await tasks.start(holder)
        tasks.start_soon(cancelled_waiter)
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    stats = pool.statistics()
    assert (stats.active, stats.waiting, stats.idle) == (0, 0, 0)  # closed, not leaked
    await send_one(pool, key)
    assert len(upstream.connections) == 2


async def test_cancelled_while_closing_expired_sessions_does_not_leak_a_slot(nursery: trio.Nursery) -> None:
    upstream = await start_upstream(nursery, Script(quit_delay=0.2))
    pool = ConnectionPool(
        max_per_host=1, max_messages=100, idle_timeout=0.05
    )  # no serve(): expiry at request
    key = pool_key(upstream)
    await send_one(pool, key)
    await trio.sleep(0.06)
    with trio.move_on_after(0.05) as scope:
        await send_one(pool, key)  # closes the expired session first (a slow QUIT), and is cancelled then
    assert scope.cancelled_caught
    assert upstream.connections[0].verbs[-1] == "QUIT"
    assert pool.statistics().active == 0
    with trio.fail_after(1):
        await send_one(pool, key)
