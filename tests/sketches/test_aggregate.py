"""DayAggregate: exact counters and mean, nearest-rank quantiles, merge, serialization."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sketches import DayAggregate, summarize


def nearest_rank(values: np.ndarray, q: float) -> float:
    """The smallest value with at least q * n values at or below it."""
    ordered = np.sort(values)
    return float(ordered[max(1, math.ceil(q * len(ordered))) - 1])


def build(statuses: np.ndarray, durations: np.ndarray, k: int = 200) -> DayAggregate:
    agg = DayAggregate(k)
    agg.add(
        len(statuses),
        int(np.count_nonzero(statuses < 400)),
        int(np.count_nonzero((statuses >= 400) & (statuses < 500))),
        int(np.count_nonzero(statuses >= 500)),
        float(durations.sum()),
        durations,
    )
    return agg


@pytest.mark.parametrize("n", [1, 2, 3, 7, 99, 100, 101, 150, 199, 200])
def test_small_days_are_exact(n: int) -> None:
    """With at most k requests, counts, mean, median and p99 are exact nearest-rank values."""
    rng = np.random.default_rng(n)
    statuses = rng.choice([200, 201, 301, 400, 404, 500, 503], n)
    durations = np.round(rng.uniform(0.1, 2.0, n), 3)
    s = build(statuses, durations).stats("2024-09-03")
    assert s.date == "2024-09-03"
    assert s.total_requests == n
    assert s.successful_requests == int(np.sum(statuses < 400))
    assert s.failed_requests == int(np.sum(statuses >= 400))
    assert s.client_errors == int(np.sum((statuses >= 400) & (statuses < 500)))
    assert s.server_errors == int(np.sum(statuses >= 500))
    assert s.uptime_pct == round(100 * (n - np.sum(statuses >= 500)) / n, 3)
    assert s.avg_latency_ms == pytest.approx(durations.mean() * 1000, abs=1e-3)
    assert s.median_latency_ms == round(nearest_rank(durations, 0.5) * 1000, 3)
    assert s.p99_latency_ms == round(nearest_rank(durations, 0.99) * 1000, 3)


def test_empty_aggregate_has_null_latencies() -> None:
    """No requests: zero counts, and uptime and latencies are null rather than made up."""
    s = DayAggregate(200).stats()
    assert (s.total_requests, s.successful_requests, s.failed_requests) == (0, 0, 0)
    assert s.uptime_pct is None and s.avg_latency_ms is None
    assert s.median_latency_ms is None and s.p99_latency_ms is None


def test_large_day_quantiles_within_rank_error() -> None:
    """Past k requests, the returned p50/p99 sit within 2% rank of the truth."""
    rng = np.random.default_rng(11)
    durations = rng.lognormal(np.log(0.3), 0.8, 200_000)
    agg = DayAggregate(200)
    for part in np.array_split(durations, 50):
        agg.add(len(part), len(part), 0, 0, float(part.sum()), part)
    s = agg.stats()
    ordered = np.sort(durations)
    for q, got in ((0.5, s.median_latency_ms), (0.99, s.p99_latency_ms)):
        assert got is not None
        low = np.searchsorted(ordered, got / 1000 - 1e-9, side="left") / len(ordered)
        high = np.searchsorted(ordered, got / 1000 + 1e-9, side="right") / len(ordered)
        assert low - 0.02 <= q <= high + 0.02
    assert s.avg_latency_ms == pytest.approx(durations.mean() * 1000, abs=5.01e-4)  # 3 decimals


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.integers(1, 5000), min_size=1, max_size=200), min_size=1, max_size=6))
def test_summary_of_exact_days_is_exact(groups: list[list[int]]) -> None:
    """Days of at most k requests summarize to exact nearest-rank values, even past k in total."""
    statuses = [np.array([200, 404, 503] * 70)[: len(g)] for g in groups]
    parts = [build(st_, np.array(g) / 1000) for st_, g in zip(statuses, groups, strict=True)]
    everything = np.concatenate([np.array(g) / 1000 for g in groups])
    all_statuses = np.concatenate(statuses)
    s = summarize(parts)
    assert s.total_requests == len(everything)
    assert s.client_errors == int(np.sum(all_statuses == 404))
    assert s.server_errors == int(np.sum(all_statuses == 503))
    assert s.avg_latency_ms == pytest.approx(everything.mean() * 1000, abs=5.01e-4)
    assert s.median_latency_ms == round(nearest_rank(everything, 0.5) * 1000, 3)
    assert s.p99_latency_ms == round(nearest_rank(everything, 0.99) * 1000, 3)


def test_summary_is_deterministic_and_single_day_matches_the_day() -> None:
    """Large days summarize to the same answer every time; one day summarizes to itself."""
    rng = np.random.default_rng(2)
    days = [build(np.full(50_000, 200), rng.lognormal(0, 1, 50_000)) for _ in range(5)]
    assert len({msgspec_key(summarize(days)) for _ in range(5)}) == 1
    assert summarize(days[:1]) == days[0].stats()
    assert summarize([]) == DayAggregate(200).stats()


def msgspec_key(stats: object) -> str:
    import msgspec

    return msgspec.json.encode(stats).decode()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=0, max_size=500), st.integers(8, 400))
def test_serialize_round_trip(values: list[float], k: int) -> None:
    """A restored aggregate answers exactly like the original."""
    durations = np.array(values, dtype=np.float64)
    agg = build(np.full(len(values), 503), durations, k)
    back = DayAggregate.restore(
        agg.total,
        agg.successful,
        agg.client_errors,
        agg.server_errors,
        agg.duration_sum,
        agg.sketch_bytes(),
        "kll_doubles",
    )
    assert back.stats() == agg.stats()
    assert back.sketch_bytes() == agg.sketch_bytes()


def test_unknown_sketch_kind_is_refused() -> None:
    """A row written by an unknown sketch family is not silently misread."""
    with pytest.raises(ValueError, match="unknown sketch kind"):
        DayAggregate.restore(1, 1, 0, 0, 1.0, DayAggregate(200).sketch_bytes(), "tdigest")
