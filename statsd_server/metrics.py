"""Prometheus metrics, written by every process and exposed together by the front.

prometheus-client's multi-process mode: each process writes its samples to files in
PROMETHEUS_MULTIPROC_DIR (set by the supervisor, for the library, before it spawns the
shards and the front), and `GET /metrics` merges them. The metric objects are module-level
because the library's registry is; nothing else here holds state.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

LINES_ACCEPTED = Counter(
    "statsd_lines_accepted_total", "Requests accepted, by owning shard.", ["shard"]
)
LINES_REJECTED = Counter(
    "statsd_lines_rejected_total",
    "Lines rejected, by reason and by the process that judged them (a shard or the front).",
    ["reason", "process"],
)
BATCHES = Counter("statsd_ingest_batches_total", "Batches taken by the owning shard.", ["shard"])
WAL_FSYNC = Histogram(
    "statsd_wal_fsync_seconds", "Write-ahead log fsync latency.", ["shard"], buckets=_SECONDS
)
SNAPSHOT_SECONDS = Histogram(
    "statsd_snapshot_seconds",
    "Snapshot duration (build rows and commit).",
    ["shard"],
    buckets=_SECONDS,
)
SNAPSHOT_ROWS = Counter(
    "statsd_snapshot_rows_total", "Customer-day rows written by snapshots.", ["shard"]
)
SNAPSHOT_BYTES = Gauge(
    "statsd_snapshot_file_bytes",
    "Size of the snapshot database after the latest snapshot.",
    multiprocess_mode="mostrecent",
)
QUERY_SECONDS = Histogram(
    "statsd_query_seconds",
    "Stats query latency in the front, by status.",
    ["status"],
    buckets=_SECONDS,
)
CUSTOMERS = Gauge(
    "statsd_customers", "Customers held, by shard.", ["shard"], multiprocess_mode="livesum"
)
CUSTOMER_DAYS = Gauge(
    "statsd_customer_days",
    "Customer-days held, by shard.",
    ["shard"],
    multiprocess_mode="livesum",
)
RESTARTS = Counter(
    "statsd_process_restarts_total",
    "Shard or front processes restarted by the supervisor after dying.",
    ["process"],
)


def exposition() -> tuple[bytes, str]:
    """Every process's metrics in the text format, and its content type."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def process_dead(pid: int) -> None:
    """Drop a dead process's live gauges (its counters stay: they keep counting)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
