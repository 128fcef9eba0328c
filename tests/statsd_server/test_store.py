"""ShardStore: queued batches are seen by the next query; cached answers never go stale."""

from __future__ import annotations

import json

import numpy as np

from sketches import SketchConfig
from statsd_server.parse import Batch
from statsd_server.store import ShardStore

DAY = 20_000  # days since the epoch


def put(
    store: ShardStore, customer: str, day: int, durations: list[float], status: int = 200
) -> None:
    n = len(durations)
    batch = Batch(
        [customer],
        np.zeros(n, np.int32),
        np.full(n, day, np.int32),
        np.full(n, status, np.int16),
        np.array(durations, np.float64),
    )
    store.enqueue(batch, newest_day=day)


def ask(store: ShardStore, customer: str, first: int, last: int | None = None) -> dict:
    body = store.query(customer, first, last)
    assert body is not None
    return json.loads(body)


def test_queued_requests_are_seen_and_cached_answers_follow_changes() -> None:
    """Each query reflects every batch taken before it, through both answer caches."""
    store = ShardStore(SketchConfig(), retention_days=30)
    put(store, "c", DAY, [0.1, 0.2])
    first = ask(store, "c", DAY - 5)
    assert first["summary"]["total_requests"] == 2
    assert ask(store, "c", DAY - 5) == first  # served again from the caches

    put(store, "c", DAY, [0.3], status=503)  # same day changes
    second = ask(store, "c", DAY - 5)
    assert second["days"][0]["total_requests"] == 3
    assert second["summary"]["server_errors"] == 1
    assert second["summary"]["median_latency_ms"] == 200.0

    put(store, "c", DAY - 1, [1.0])  # a new day in the same range
    third = ask(store, "c", DAY - 5)
    assert [d["total_requests"] for d in third["days"]] == [1, 3]
    assert third["summary"]["total_requests"] == 4
    assert ask(store, "c", DAY, DAY)["summary"]["total_requests"] == 3

    put(store, "other", DAY, [5.0])  # another customer leaves this one's answers alone
    assert ask(store, "c", DAY - 5) == third


def test_expired_days_leave_cached_answers() -> None:
    """When the window moves past a day, answers that included it change."""
    store = ShardStore(SketchConfig(), retention_days=30)
    put(store, "c", DAY, [0.1])
    put(store, "c", DAY + 10, [0.2])
    assert ask(store, "c", DAY - 1)["summary"]["total_requests"] == 2
    store.advance(DAY + 31)
    assert ask(store, "c", DAY - 1)["summary"]["total_requests"] == 1
    store.advance(DAY + 41)
    assert store.query("c", DAY - 1, None) is None


def test_large_batches_apply_before_they_are_read() -> None:
    """Past the batch threshold the queue applies itself; below it, reading applies it."""
    store = ShardStore(SketchConfig(), retention_days=30)
    rng = np.random.default_rng(0)
    for _ in range(3):
        put(store, "big", DAY, rng.uniform(0.1, 2.0, 200_000).tolist())
    rows = store.rows(store.take_dirty())
    assert [(r.customer_id, r.day, r.total) for r in rows] == [("big", DAY, 600_000)]
    assert ask(store, "big", DAY)["summary"]["total_requests"] == 600_000


def test_made_up_ranges_do_not_grow_the_summary_cache() -> None:
    """Thousands of different from/to pairs over the same days share cached summaries."""
    store = ShardStore(SketchConfig(), retention_days=30)
    put(store, "c", DAY, [0.1])
    put(store, "c", DAY + 1, [0.2])
    answers = {
        ask(store, "c", DAY - i % 1000, DAY + 1 + i)["summary"]["total_requests"]
        for i in range(2000)
    }
    assert answers == {2}
    assert sum(len(r) for r in store._summaries.values()) <= 64
