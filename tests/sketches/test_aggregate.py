"""DayAggregate: exact counters and mean, exact small days, sketched busy days within 1%."""

from __future__ import annotations

import math
import struct

import msgspec
import numpy as np
import pytest
from datasketches import kll_doubles_sketch, req_floats_sketch
from hypothesis import given, settings
from hypothesis import strategies as st

from sketches import DayAggregate, SketchConfig, quantile_name, summarize
from sketches.aggregate import _kll_items, _req_items, _sketch_items

CONFIG = SketchConfig(kll_k=200, req_k=48)


def nearest_rank(values: np.ndarray, q: float) -> float:
    """The smallest value with at least q * n values at or below it."""
    ordered = np.sort(values)
    return float(ordered[max(1, math.ceil(q * len(ordered))) - 1])


def build(statuses: np.ndarray, durations: np.ndarray, parts: int = 1) -> DayAggregate:
    agg = DayAggregate(CONFIG)
    for st_, du in zip(
        np.array_split(statuses, parts), np.array_split(durations, parts), strict=True
    ):
        agg.add(
            len(st_),
            int(np.count_nonzero(st_ < 400)),
            int(np.count_nonzero((st_ >= 400) & (st_ < 500))),
            int(np.count_nonzero(st_ >= 500)),
            float(du.sum()),
            du,
        )
    return agg


@pytest.mark.parametrize("n", [1, 2, 3, 7, 99, 100, 101, 150, 199, 200])
def test_small_days_are_exact(n: int) -> None:
    """With at most k requests: exact counts, mean and nearest-rank quantiles, error 0."""
    rng = np.random.default_rng(n)
    statuses = rng.choice([200, 201, 301, 400, 404, 500, 503], n)
    durations = np.round(rng.uniform(0.1, 2.0, n), 3)
    s = build(statuses, durations, parts=min(n, 5)).stats("2024-09-03", [0.9, 0.001])
    assert s.date == "2024-09-03"
    assert s.total_requests == n
    assert s.successful_requests == int(np.sum(statuses < 400))
    assert s.failed_requests == int(np.sum(statuses >= 400))
    assert s.client_errors == int(np.sum((statuses >= 400) & (statuses < 500)))
    assert s.server_errors == int(np.sum(statuses >= 500))
    assert s.uptime_pct == round(100 * (n - np.sum(statuses >= 500)) / n, 3)
    assert s.avg_latency_ms == pytest.approx(durations.mean() * 1000, abs=5.01e-4)
    assert s.median_latency_ms == round(nearest_rank(durations, 0.5) * 1000, 3)
    assert s.p99_latency_ms == round(nearest_rank(durations, 0.99) * 1000, 3)
    assert s.quantiles_ms == {
        "p90": round(nearest_rank(durations, 0.9) * 1000, 3),
        "p0.1": round(nearest_rank(durations, 0.001) * 1000, 3),
    }
    assert s.quantile_error == {"p50": 0.0, "p99": 0.0, "p90": 0.0, "p0.1": 0.0}


def test_empty_aggregate_has_null_latencies() -> None:
    """No requests: zero counts, and uptime and latencies are null rather than made up."""
    s = DayAggregate(CONFIG).stats(extra=[0.9])
    assert (s.total_requests, s.successful_requests, s.failed_requests) == (0, 0, 0)
    assert s.uptime_pct is None and s.avg_latency_ms is None
    assert s.median_latency_ms is None and s.p99_latency_ms is None
    assert s.quantiles_ms == {"p90": None} and s.quantile_error == {}


def lognormal(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).lognormal(np.log(0.3), 1.0, n)


@pytest.mark.parametrize("seed", [1, 2])
def test_busy_day_quantiles_within_one_percent_and_their_stated_bound(seed: int) -> None:
    """A 100k-request lognormal day: p50 and p99 within 1% of exact, and within quantile_error."""
    durations = lognormal(100_000, seed)
    s = build(np.full(len(durations), 200), durations, parts=40).stats()
    assert not build(np.full(300, 200), durations[:300]).is_exact
    for q, got in ((0.5, s.median_latency_ms), (0.99, s.p99_latency_ms)):
        exact = nearest_rank(durations, q) * 1000
        assert got is not None
        error = abs(got - exact) / exact
        assert error < 0.01, (q, error)
        # The bound is a ~99.7% statement about randomised (unseedable) sketches: allow 2x.
        assert error <= 2 * s.quantile_error[quantile_name(q)] + 1e-6, (q, error, s.quantile_error)
    assert 0 < s.quantile_error["p99"] < 0.01
    assert s.avg_latency_ms == pytest.approx(durations.mean() * 1000, abs=5.01e-4)


def test_thirty_day_summary_within_one_percent() -> None:
    """Thirty sketched days pooled: p50 and p99 within 1% of the exact values over all requests."""
    days = [lognormal(20_000, 100 + i) * (1 + i / 30) for i in range(30)]
    s = summarize([build(np.full(len(d), 500), d, parts=4) for d in days])
    everything = np.concatenate(days)
    assert s.total_requests == len(everything) and s.server_errors == len(everything)
    for q, got in ((0.5, s.median_latency_ms), (0.99, s.p99_latency_ms)):
        exact = nearest_rank(everything, q) * 1000
        assert got is not None and abs(got - exact) / exact < 0.01


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
    assert s.quantile_error == {"p50": 0.0, "p99": 0.0}


@pytest.mark.parametrize("sketched", [False, True])
def test_extra_quantiles_named_like_p50_or_p99_leave_the_median_and_p99_alone(
    sketched: bool,
) -> None:
    """0.5000000000001 is named "p50" (10 decimals) but is another rank: the median and the
    p99 are still those of 0.5 and 0.99."""
    durations = np.arange(1, 201 if not sketched else 20_001) / 1000
    day = build(np.full(len(durations), 200), durations)
    plain = summarize([day])
    odd = summarize([day], [0.5000000000001, 0.9900000000001])
    assert odd.median_latency_ms == plain.median_latency_ms
    assert odd.p99_latency_ms == plain.p99_latency_ms
    if not sketched:
        assert (plain.median_latency_ms, plain.p99_latency_ms) == (100.0, 198.0)
        assert odd.quantiles_ms == {"p50": 101.0, "p99": 199.0}


def test_summary_is_deterministic_and_single_day_matches_the_day() -> None:
    """Busy days summarize to the same answer every time; one day summarizes to itself."""
    days = [build(np.full(50_000, 200), lognormal(50_000, i)) for i in range(5)]
    answers = {msgspec.json.encode(summarize(days, [0.9])) for _ in range(3)}
    assert len(answers) == 1
    assert summarize(days[:1]) == days[0].stats()
    assert summarize([]) == DayAggregate(CONFIG).stats()


@pytest.mark.parametrize("n", [0, 5, 200, 201, 5000])
def test_serialize_round_trip(n: int) -> None:
    """A restored aggregate, exact or sketched, serializes as the original did and answers
    exactly like it, before and after either is read and restored again.

    (Reading a sketch sorts its first level in place, so its bytes change with the first
    read: the same items in another order.)"""
    agg = build(np.full(n, 503), lognormal(n, n), parts=3)
    kind, blob = agg.to_blob()
    assert kind == ("exact_f64" if n <= 200 else "kll_req")
    counters = (agg.total, agg.successful, agg.client_errors, agg.server_errors, agg.duration_sum)
    back = DayAggregate.restore(CONFIG, counters, kind, blob)
    assert back.to_blob() == (kind, blob)
    assert back.stats(extra=[0.1, 0.9]) == agg.stats(extra=[0.1, 0.9])
    again = DayAggregate.restore(CONFIG, counters, *back.to_blob())
    assert again.stats(extra=[0.1, 0.9]) == agg.stats(extra=[0.1, 0.9])
    assert again.to_blob() == back.to_blob()


def test_snapshots_from_before_req_still_load() -> None:
    """Rows written with KLL alone load: small days exactly, busy days from their KLL."""
    small, busy = lognormal(150, 1), lognormal(20_000, 2)
    for values, exact in ((small, True), (busy, False)):
        kll = kll_doubles_sketch(200)
        kll.update(values)
        counters = (len(values), len(values), 0, 0, float(values.sum()))
        agg = DayAggregate.restore(CONFIG, counters, "kll_doubles", bytes(kll.serialize()))
        s = agg.stats()
        assert agg.is_exact is exact
        assert s.total_requests == len(values)
        if exact:
            assert s.median_latency_ms == round(nearest_rank(values, 0.5) * 1000, 3)
        else:
            assert s.median_latency_ms == round(kll.get_quantile(0.5, True) * 1000, 3)
            assert s.quantile_error["p50"] > 0
        agg.add(1, 1, 0, 0, 0.5, np.array([0.5]))  # and it keeps taking requests
        assert agg.stats().total_requests == len(values) + 1


def pairs(values: np.ndarray, weights: np.ndarray) -> list[tuple[float, float]]:
    return sorted(zip(values.tolist(), weights.tolist(), strict=True))


@pytest.mark.parametrize("n", [1, 3, 4, 5, 201, 1_000, 60_000])
@pytest.mark.parametrize("restored", [False, True])
def test_items_read_from_a_sketch_s_bytes_are_its_own(n: int, restored: bool) -> None:
    """The items and weights read from a sketch's serialized form are those the sketch itself
    yields, for KLL and REQ, small (REQ keeps up to 4 raw) or compacted, restored or not."""
    values = lognormal(n, n).round(3)  # with ties
    kll, req = kll_doubles_sketch(200), req_floats_sketch(48, True)
    for part in np.array_split(values, 3):
        kll.update(part)
        req.update(part.astype(np.float32))
    if restored:
        kll = kll_doubles_sketch.deserialize(bytes(kll.serialize()))
        req = req_floats_sketch.deserialize(bytes(req.serialize()))
        kll.update(values[:7])
        req.update(values[:7].astype(np.float32))
    for sketch, read in ((kll, _kll_items), (req, _req_items)):
        got = read(bytes(sketch.serialize()))  # not through _sketch_items: no fallback
        assert got is not None
        assert pairs(*got) == sorted((float(v), float(w)) for v, w in sketch)
        assert got[1].sum() == sketch.n
        assert pairs(*_sketch_items(sketch)) == pairs(*got)


def test_a_sketched_day_reads_like_its_sketches() -> None:
    """One busy day's median, p99 and p90 are REQ's nearest-rank answers, and p10 KLL's."""
    values = lognormal(30_000, 9)
    agg = build(np.full(len(values), 200), values, parts=4)
    assert agg._req is not None and agg._kll is not None
    s = agg.stats(extra=[0.1, 0.9])
    assert s.median_latency_ms == round(agg._req.get_quantile(0.5, True) * 1000, 3)
    assert s.p99_latency_ms == round(agg._req.get_quantile(0.99, True) * 1000, 3)
    assert s.quantiles_ms == {
        "p10": round(agg._kll.get_quantile(0.1, True) * 1000, 3),
        "p90": round(agg._req.get_quantile(0.9, True) * 1000, 3),
    }


def test_unknown_sketch_layouts_are_not_read() -> None:
    """Bytes of another family are not read, and bytes cut short raise (_sketch_items then
    falls back on the sketch's own iteration)."""
    req = req_floats_sketch(48, True)
    req.update(lognormal(1_000, 3).astype(np.float32))
    assert _kll_items(bytes(req.serialize())) is None
    kll = kll_doubles_sketch(200)
    kll.update(lognormal(1_000, 4))
    blob = bytes(kll.serialize())
    assert _kll_items(blob) is not None
    assert _kll_items(blob[:1] + b"\x09" + blob[2:]) is None  # a serial version it does not know
    assert _req_items(b"\x06" + bytes(req.serialize())[1:]) is None  # nor a preamble
    with pytest.raises((struct.error, ValueError)):
        _req_items(bytes(req.serialize())[:40])


def test_unknown_sketch_kind_is_refused() -> None:
    """A row written by an unknown sketch family is not silently misread."""
    with pytest.raises(ValueError, match="unknown sketch kind"):
        DayAggregate.restore(CONFIG, (1, 1, 0, 0, 1.0), "tdigest", b"")


def test_quantile_names() -> None:
    """Quantile keys read like percentiles."""
    assert [quantile_name(q) for q in (0.5, 0.99, 0.999, 0.9, 0.001, 0.12345)] == [
        "p50",
        "p99",
        "p99.9",
        "p90",
        "p0.1",
        "p12.345",
    ]


@pytest.mark.parametrize("n", [0, 1, 200, 201, 5_000])
def test_an_aggregate_made_with_its_first_group_equals_one_added_to(n: int) -> None:
    """Folding in makes a new day's aggregate in one call; it holds the same state as an
    empty aggregate that was then added to, exact at up to k requests, sketched past k, and
    keeps no view of the caller's durations."""
    rng = np.random.default_rng(n)
    statuses = rng.choice([200, 404, 500], size=n)
    durations = rng.lognormal(-2.0, 1.0, size=n)
    added = build(statuses, durations)
    made = DayAggregate(
        CONFIG,
        n,
        int(np.count_nonzero(statuses < 400)),
        int(np.count_nonzero((statuses >= 400) & (statuses < 500))),
        int(np.count_nonzero(statuses >= 500)),
        float(durations.sum()),
        durations,
        lsn=7,
    )
    durations[:] = 0.0  # the caller's batch is reused or freed: the aggregate must not care
    assert made.lsn == 7
    assert made.is_exact == added.is_exact == (n <= CONFIG.kll_k)
    counters = ("total", "successful", "client_errors", "server_errors", "duration_sum")
    assert [getattr(made, c) for c in counters] == [getattr(added, c) for c in counters]
    if made.is_exact:
        assert made.to_blob() == added.to_blob()
        assert made.stats(extra=[0.9]) == added.stats(extra=[0.9])
    else:  # compaction is random: the same requests, not the same bytes
        assert made._kll is not None and made._req is not None
        assert made._kll.n == made._req.n == n
