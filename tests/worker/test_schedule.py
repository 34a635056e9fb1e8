"""The backoff arithmetic and the Schedule heap: pure code, no clock."""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from hedwigpy.config import QueueConfig, parse_config
from hedwigpy.worker.schedule import Schedule, expired, retry_delay


def queue_config(**overrides: object) -> QueueConfig:
    return parse_config({"queue": overrides}, Path("/nonexistent"), {}).queue


def test_delays_grow_by_the_factor_until_the_cap() -> None:
    cfg = queue_config(retry_initial="60s", retry_factor=2.0, retry_max="10m", retry_jitter=0.0)
    rng = random.Random(1)
    assert [retry_delay(n, cfg, rng) for n in range(1, 8)] == [60, 120, 240, 480, 600, 600, 600]


def test_attempt_zero_waits_like_the_first() -> None:
    cfg = queue_config(retry_initial="30s", retry_jitter=0.0)
    assert retry_delay(0, cfg, random.Random()) == retry_delay(1, cfg, random.Random()) == 30


def test_a_huge_attempt_count_is_capped_not_an_overflow() -> None:
    cfg = queue_config(retry_initial="60s", retry_factor=10.0, retry_max="4h", retry_jitter=0.0)
    assert retry_delay(10_000, cfg, random.Random()) == 4 * 3600


def test_jitter_stays_within_bounds_and_spreads() -> None:
    cfg = queue_config(retry_initial="100s", retry_factor=2.0, retry_max="4h", retry_jitter=0.2)
    rng = random.Random(7)
    delays = [retry_delay(3, cfg, rng) for _ in range(2000)]
    assert min(delays) >= 400 * 0.8 and max(delays) <= 400 * 1.2
    assert max(delays) - min(delays) > 400 * 0.3  # really spread, not a constant
    capped = [retry_delay(50, cfg, rng) for _ in range(500)]
    assert min(capped) >= 4 * 3600 * 0.8 and max(capped) <= 4 * 3600 * 1.2


@given(
    attempts=st.integers(0, 10_000),
    initial=st.floats(0.001, 1e5),
    factor=st.floats(1.0, 100.0),
    jitter=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
def test_delay_is_never_negative_nor_beyond_the_jittered_cap(
    attempts: int, initial: float, factor: float, jitter: float, seed: int
) -> None:
    cfg = QueueConfig(retry_initial=initial, retry_factor=factor, retry_max=3600.0, retry_jitter=jitter)
    delay = retry_delay(attempts, cfg, random.Random(seed))
    assert 0.0 <= delay <= 3600.0 * (1 + jitter) + 1e-6


def test_lifetime() -> None:
    cfg = queue_config(max_lifetime="5d")
    assert not expired(1000.0, 1000.0 + 5 * 86400 - 1, cfg)
    assert expired(1000.0, 1000.0 + 5 * 86400, cfg)


def test_schedule_orders_by_due_time_and_moves_entries() -> None:
    s = Schedule()
    s.add("b", 20.0)
    s.add("a", 10.0)
    s.add("c", 30.0)
    assert s.next_due() == 10.0 and len(s) == 3 and "a" in s
    assert s.pop_due(5.0) is None
    s.add("c", 1.0)  # moved earlier: the old entry is stale
    assert s.pop_due(100.0) == "c"
    assert s.pop_due(100.0) == "a"
    assert s.remove("b") and not s.remove("b")
    assert s.pop_due(100.0) is None and s.next_due() is None and len(s) == 0


def test_equal_due_times_keep_insertion_order() -> None:
    s = Schedule()
    for message_id in ("x", "y", "z"):
        s.add(message_id, 5.0)
    assert [s.pop_due(5.0) for _ in range(3)] == ["x", "y", "z"]


def test_stale_entries_do_not_accumulate() -> None:
    s = Schedule()
    for i in range(10_000):
        s.add("same", float(i))
    assert len(s) == 1 and len(s._heap) < 200
    assert s.due_time("same") == 9999.0
