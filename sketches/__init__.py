"""The per-customer-day aggregate: exact counters plus a latency sketch."""

from sketches.aggregate import SKETCH_KIND, DayAggregate, LatencyStats, summarize

__all__ = ["SKETCH_KIND", "DayAggregate", "LatencyStats", "summarize"]
