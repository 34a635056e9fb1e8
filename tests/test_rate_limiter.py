"""`policy.RateLimiter`: a sliding window per key, per-key overrides, and how long to wait."""

from __future__ import annotations

import pytest

from hedwigpy.policy import RateLimiter


def test_limit_within_the_window() -> None:
    limiter = RateLimiter(2, window=60.0)
    assert limiter.allow("a.test", now=0.0)
    assert limiter.allow("a.test", now=1.0)
    assert not limiter.allow("a.test", now=2.0)
    assert limiter.allow("b.test", now=2.0)  # per key
    assert not limiter.allow("a.test", now=59.9)
    assert limiter.allow("a.test", now=60.0)  # the first event left the window
    assert not limiter.allow("a.test", now=60.5)


def test_refused_events_are_not_counted() -> None:
    limiter = RateLimiter(1, window=10.0)
    assert limiter.allow("k", now=0.0)
    for t in (1.0, 2.0, 9.0):
        assert not limiter.allow("k", now=t)
    assert limiter.allow("k", now=10.0)


def test_zero_disables() -> None:
    limiter = RateLimiter(0)
    assert all(limiter.allow("a.test", now=0.0) for _ in range(1000))
    assert limiter.wait_time("a.test", now=0.0) == 0.0


def test_overrides() -> None:
    limiter = RateLimiter(1, overrides={"big.test": 3, "free.test": 0})
    assert [limiter.allow("big.test", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert [limiter.allow("small.test", now=0.0) for _ in range(2)] == [True, False]
    assert all(limiter.allow("free.test", now=0.0) for _ in range(100))
    only_overrides = RateLimiter(0, overrides={"slow.test": 1})
    assert only_overrides.allow("slow.test", now=0.0) and not only_overrides.allow("slow.test", now=0.0)
    assert all(only_overrides.allow("other.test", now=0.0) for _ in range(10))


def test_wait_time() -> None:
    limiter = RateLimiter(2, window=60.0, overrides={"big.test": 3})
    assert limiter.wait_time("a.test", now=0.0) == 0.0  # never seen
    limiter.allow("a.test", now=10.0)
    assert limiter.wait_time("a.test", now=11.0) == 0.0  # below the limit
    limiter.allow("a.test", now=20.0)
    assert limiter.wait_time("a.test", now=30.0) == pytest.approx(40.0)  # until the event at 10 expires
    assert not limiter.allow("a.test", now=69.9)
    assert limiter.allow("a.test", now=70.0)
    assert limiter.wait_time("a.test", now=70.0) == pytest.approx(10.0)  # now the event at 20 decides
    assert limiter.wait_time("a.test", now=500.0) == 0.0
    for t in (0.0, 5.0, 6.0):
        limiter.allow("big.test", now=t)
    assert limiter.wait_time("big.test", now=7.0) == pytest.approx(53.0)  # the override's 3rd-last event


def test_wait_time_agrees_with_allow() -> None:
    limiter = RateLimiter(3, window=10.0)
    for t in (0.0, 1.0, 2.5):
        assert limiter.allow("k", now=t)
    wait = limiter.wait_time("k", now=4.0)
    assert not limiter.allow("k", now=4.0 + wait - 0.01)
    assert limiter.allow("k", now=4.0 + wait)
