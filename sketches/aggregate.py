"""One customer-day of requests: exact counters and a KLL sketch of durations."""

from __future__ import annotations

from collections.abc import Iterable

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

    def merge(self, other: DayAggregate) -> None:
        """Add another aggregate's requests to this one."""
        self.total += other.total
        self.successful += other.successful
        self.client_errors += other.client_errors
        self.server_errors += other.server_errors
        self.duration_sum += other.duration_sum
        self.sketch.merge(other.sketch)

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
            # inclusive=True is nearest-rank: the smallest value whose rank reaches q * n.
            median_latency_ms=round(self.sketch.get_quantile(0.5, True) * 1000.0, 3),
            p99_latency_ms=round(self.sketch.get_quantile(0.99, True) * 1000.0, 3),
        )


def merge_all(aggregates: Iterable[DayAggregate], k: int) -> DayAggregate:
    """A new aggregate holding the requests of all the given ones."""
    merged = DayAggregate(k)
    for agg in aggregates:
        merged.merge(agg)
    return merged
