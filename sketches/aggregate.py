"""One customer-day of requests: exact counters and a KLL sketch of durations."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import numpy as np
from datasketches import kll_doubles_sketch

# Stored next to every serialized sketch so a later sketch family can still read old snapshots.
SKETCH_KIND = "kll_doubles"


class LatencyStats(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The figures the stats endpoint reports for one day or for a range of days."""

    date: str | None = None
    total_requests: int
    successful_requests: int
    failed_requests: int
    client_errors: int
    server_errors: int
    uptime_pct: float | None
    avg_latency_ms: float | None
    median_latency_ms: float | None
    p99_latency_ms: float | None


class DayAggregate:
    """Exact request counters and a duration sketch for one (customer, UTC day)."""

    __slots__ = ("client_errors", "duration_sum", "server_errors", "sketch", "successful", "total")

    def __init__(self, k: int) -> None:
        self.total = 0
        self.successful = 0
        self.client_errors = 0
        self.server_errors = 0
        self.duration_sum = 0.0
        self.sketch = kll_doubles_sketch(k)

    def add(
        self,
        total: int,
        successful: int,
        client_errors: int,
        server_errors: int,
        duration_sum: float,
        durations: np.ndarray,
    ) -> None:
        """Fold in a group of requests whose counters were already summed by the caller."""
        self.total += total
        self.successful += successful
        self.client_errors += client_errors
        self.server_errors += server_errors
        self.duration_sum += duration_sum
        self.sketch.update(durations)

    def sketch_bytes(self) -> bytes:
        """The sketch in DataSketches' portable binary form."""
        return bytes(self.sketch.serialize())

    @classmethod
    def restore(
        cls,
        total: int,
        successful: int,
        client_errors: int,
        server_errors: int,
        duration_sum: float,
        sketch: bytes,
        sketch_kind: str,
    ) -> DayAggregate:
        """Rebuild an aggregate from its stored counters and serialized sketch."""
        if sketch_kind != SKETCH_KIND:
            raise ValueError(f"unknown sketch kind {sketch_kind!r}")
        agg = cls.__new__(cls)
        agg.total = total
        agg.successful = successful
        agg.client_errors = client_errors
        agg.server_errors = server_errors
        agg.duration_sum = duration_sum
        agg.sketch = kll_doubles_sketch.deserialize(sketch)
        return agg

    def stats(self, date: str | None = None) -> LatencyStats:
        """Counts, uptime and latencies in milliseconds, rounded to 3 decimals."""
        if self.total == 0:
            return self.stats_with(None, None, date)
        # inclusive=True is nearest-rank: the smallest value whose rank reaches q * n.
        return self.stats_with(
            self.sketch.get_quantile(0.5, True), self.sketch.get_quantile(0.99, True), date
        )

    def stats_with(
        self, median: float | None, p99: float | None, date: str | None = None
    ) -> LatencyStats:
        """The reported figures, given the median and p99 in seconds."""
        total = self.total
        if total == 0:
            return LatencyStats(
                date=date,
                total_requests=0,
                successful_requests=0,
                failed_requests=0,
                client_errors=0,
                server_errors=0,
                uptime_pct=None,
                avg_latency_ms=None,
                median_latency_ms=None,
                p99_latency_ms=None,
            )
        return LatencyStats(
            date=date,
            total_requests=total,
            successful_requests=self.successful,
            failed_requests=total - self.successful,
            client_errors=self.client_errors,
            server_errors=self.server_errors,
            uptime_pct=round(100.0 * (total - self.server_errors) / total, 3),
            avg_latency_ms=round(self.duration_sum / total * 1000.0, 3),
            median_latency_ms=None if median is None else round(median * 1000.0, 3),
            p99_latency_ms=None if p99 is None else round(p99 * 1000.0, 3),
        )


def summarize(aggregates: Sequence[DayAggregate]) -> LatencyStats:
    """The stats of several days together: counters summed, quantiles over all their requests.

    Quantiles come from the union of the days' retained sketch items with their weights,
    using the same inclusive nearest-rank rule as `get_quantile(q, True)`. Unlike a KLL merge,
    which compacts at random, this is deterministic (the same answer every time, also after
    a restart) and adds no error of its own: exact whenever every day is exact.
    """
    if len(aggregates) == 1:
        return aggregates[0].stats()
    # Counters only: the quantiles come from the days' own sketches below.
    combined = DayAggregate.__new__(DayAggregate)
    combined.total = sum(a.total for a in aggregates)
    combined.successful = sum(a.successful for a in aggregates)
    combined.client_errors = sum(a.client_errors for a in aggregates)
    combined.server_errors = sum(a.server_errors for a in aggregates)
    combined.duration_sum = sum(a.duration_sum for a in aggregates)
    if combined.total == 0:
        return combined.stats_with(None, None)
    pairs = np.array([pair for a in aggregates for pair in a.sketch], dtype=np.float64)
    order = np.argsort(pairs[:, 0], kind="stable")
    values = pairs[order, 0]
    cumulative = np.cumsum(pairs[order, 1])

    def quantile(q: float) -> float:
        return float(values[np.searchsorted(cumulative, math.ceil(q * combined.total), "left")])

    return combined.stats_with(quantile(0.5), quantile(0.99))
