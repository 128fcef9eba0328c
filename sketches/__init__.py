"""The per-customer-day aggregate: exact counters plus exact or sketched durations."""

from sketches.aggregate import DayAggregate, LatencyStats, SketchConfig, quantile_name, summarize

__all__ = ["DayAggregate", "LatencyStats", "SketchConfig", "quantile_name", "summarize"]
