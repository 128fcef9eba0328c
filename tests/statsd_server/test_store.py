"""ShardStore: queued batches are seen by the next query; cached answers never go stale."""

from __future__ import annotations

import json

import numpy as np

from sketches import SketchConfig
from statsd_server.parse import Batch
from statsd_server.routing import customer_key
from statsd_server.store import _DENSE_BINS, MAX_PENDING_LINES, ShardStore, _stable_order

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
    assert sum(len(a.summaries) for a in store._answers.values()) <= 64


def test_a_query_encodes_only_the_days_it_answers_with() -> None:
    """A sketched day takes about 1.5 ms to encode: asking for the last day must not pay for
    the customer's other days, and asking for all of them later still gets every day."""
    store = ShardStore(SketchConfig(), retention_days=30)
    for d in range(5):
        put(store, "c", DAY + d, [0.1 * (d + 1)])
    assert [day["date"] for day in ask(store, "c", DAY + 4)["days"]] == ["2024-10-08"]
    assert set(store._json) == {("c", DAY + 4)}
    answer = ask(store, "c", DAY + 1, DAY + 3)
    assert [day["median_latency_ms"] for day in answer["days"]] == [200.0, 300.0, 400.0]
    assert answer["summary"]["total_requests"] == 3
    assert len(ask(store, "c", DAY)["days"]) == 5
    assert set(store._json) == {("c", DAY + d) for d in range(5)}


def batch_of(rows: list[tuple[str, int, int, float]]) -> Batch:
    """A batch of (customer, day, status, seconds) requests."""
    customers = sorted({r[0] for r in rows})
    return Batch(
        customers,
        np.array([customers.index(r[0]) for r in rows], np.int32),
        np.array([r[1] for r in rows], np.int32),
        np.array([r[2] for r in rows], np.int16),
        np.array([r[3] for r in rows], np.float64),
    )


def test_folding_in_steps_answers_every_query_in_full() -> None:
    """Grouped batches are folded in a few customers per step; a query in between first
    folds in its own customer, so each answer counts every request taken, none twice, and
    equals the answer of a store that folded everything at once."""
    rng = np.random.default_rng(7)
    customers = [f"c{i}" for i in range(40)]
    rows = [
        (
            customers[rng.integers(40)],
            DAY - int(rng.integers(4)),
            int(rng.choice([200, 404, 503])),
            float(rng.uniform(0.01, 2.0)),
        )
        for _ in range(3000)
    ]
    batches = [batch_of(rows[i : i + 750]) for i in range(0, 3000, 750)]
    totals = {c: sum(r[0] == c for r in rows) for c in customers}
    server_errors = {c: sum(r[0] == c and r[2] == 503 for r in rows) for c in customers}

    stepped, at_once = (ShardStore(SketchConfig(), retention_days=30) for _ in range(2))
    stepped.admitted(customers)  # as the shard does when it caps customers
    for store in (stepped, at_once):
        for batch in batches:
            store.enqueue(batch, newest_day=DAY)
    at_once.flush()
    stepped.group_queued()
    assert stepped.folds_pending == 1 and not stepped.customers
    steps = 0
    while stepped.fold_some(5):
        steps += 1
        assert stepped.customers_held == 40
        customer = customers[rng.integers(40)]
        summary = ask(stepped, customer, DAY - 30)["summary"]
        assert summary["total_requests"] == totals[customer]
        assert summary["server_errors"] == server_errors[customer]
    assert steps >= 5  # it did fold in steps
    assert stepped.folds_pending == 0 and stepped.customers_held == 40
    for customer in customers:
        assert stepped.query(customer, DAY - 30, None) == at_once.query(customer, DAY - 30, None)


def test_days_that_expire_while_grouped_are_not_folded_in() -> None:
    """Retention moving on between grouping and folding drops the expired day's requests."""
    store = ShardStore(SketchConfig(), retention_days=30)
    rows = [("c", DAY - 20, 200, 0.1), ("c", DAY, 200, 0.2), ("gone", DAY - 20, 200, 0.3)]
    store.enqueue(batch_of(rows), newest_day=DAY)
    store.group_queued()
    store.advance(DAY + 15)  # keeps DAY - 15 and later
    while store.fold_some(1):
        pass
    assert store.customer_days == 1
    assert ask(store, "c", DAY - 40)["summary"]["total_requests"] == 1
    assert list(store.customers) == ["c"]  # a customer whose every day expired is not held
    assert store.query("gone", DAY - 40, None) is None


def test_grouping_past_the_pending_limit_folds_in_the_oldest() -> None:
    """At most MAX_PENDING_LINES requests wait grouped, so folding in steps cannot fall
    behind ingest; small groupings (a query groups what is queued) fold nothing at once."""
    store = ShardStore(SketchConfig(), retention_days=30)
    lines = MAX_PENDING_LINES * 2 // 5
    for i in range(3):
        store.admitted([f"c{i}"])
        put(store, f"c{i}", DAY, np.linspace(0.01, 1.0, lines).tolist())
        store.group_queued()
    assert store.folds_pending == 2
    assert list(store.customers) == ["c0"]
    assert store.customers_held == 3
    for _ in range(5):  # a query after each small batch groups it, and leaves c1 and c2 waiting
        put(store, "small", DAY, [0.1])
        assert ask(store, "small", DAY)["summary"]["total_requests"] >= 1
    assert list(store.customers) == ["c0", "small"]
    assert ask(store, "c2", DAY)["summary"]["total_requests"] == lines


def test_customers_held_while_their_requests_wait() -> None:
    """A customer admitted for the customer cap counts as held while any of its requests
    waits, and stops counting once all it had were dropped for retention."""
    store = ShardStore(SketchConfig(), retention_days=30)
    store.admitted(["c"])
    store.enqueue(batch_of([("c", DAY - 30, 200, 0.1)]), newest_day=DAY)  # the oldest day kept
    store.group_queued()
    store.enqueue(batch_of([("c", DAY, 200, 0.1)]), newest_day=DAY)  # c is admitted already
    store.advance(DAY + 1)  # its first day expires before it is folded in
    while store.fold_some(400):
        pass
    assert store.customers_held == 1  # its second request still waits in the queue
    assert ask(store, "c", DAY - 40)["summary"]["total_requests"] == 1

    store.admitted(["gone"])
    store.enqueue(batch_of([("gone", DAY - 29, 200, 0.1)]), newest_day=DAY + 1)
    store.advance(DAY + 2)
    for _ in range(3):  # ingest goes on: the queue never stays empty
        store.enqueue(batch_of([("c", DAY + 2, 200, 0.1)]), newest_day=DAY + 2)
        store.group_queued()
        store.enqueue(batch_of([("c", DAY + 2, 200, 0.1)]), newest_day=DAY + 2)
        while store.fold_some(400):
            pass
    assert store.customers_held == 1


def test_radix_order_is_the_stable_sort_order() -> None:
    """Grouping's radix sort orders keys exactly as numpy's stable sort, in all key ranges."""
    rng = np.random.default_rng(3)
    for top in (1_000, 1 << 16, 5_000_000, 1 << 40):
        key = rng.integers(0, top, 100_000).astype(np.int64)
        assert (_stable_order(key) == np.argsort(key, kind="stable")).all(), top


def test_grouping_counts_every_customer_day_whether_keys_are_dense_or_sparse() -> None:
    """Grouping counts by customer-day key: in an array of every (customer, day) while that
    is small, else by the keys in use. Both give each customer-day its exact counters, sum
    and durations, checked against a count in plain Python."""
    rng = np.random.default_rng(11)
    for n_customers, n_requests in ((40, 5_000), (40_000, 60_000)):
        customers = [f"c{i}" for i in range(n_customers)]
        who = rng.integers(n_customers, size=n_requests)
        day = DAY - rng.integers(31, size=n_requests)
        status = rng.choice([200, 302, 404, 429, 500, 503], size=n_requests)
        duration = rng.uniform(0.001, 3.0, size=n_requests).round(6)
        sparse = n_customers * 31 > 2 * n_requests + _DENSE_BINS
        assert sparse == (n_customers == 40_000)  # each way of counting is taken once
        expected: dict[tuple[str, int], list[tuple[int, float]]] = {}
        for c, d, st, du in zip(
            who.tolist(), day.tolist(), status.tolist(), duration.tolist(), strict=True
        ):
            expected.setdefault((customers[c], d), []).append((st, du))

        store = ShardStore(SketchConfig(), retention_days=30)
        store.apply(
            Batch(
                customers,
                who.astype(np.int32),
                day.astype(np.int32),
                status.astype(np.int16),
                duration.astype(np.float64),
            ),
            newest_day=DAY,
        )
        assert store.customer_days == len(expected)
        for (customer, d), requests in expected.items():
            agg = store.customers[customer][d]
            assert agg.total == len(requests)
            assert agg.successful == sum(st < 400 for st, _ in requests)
            assert agg.client_errors == sum(400 <= st < 500 for st, _ in requests)
            assert agg.server_errors == sum(st >= 500 for st, _ in requests)
            assert abs(agg.duration_sum - sum(du for _, du in requests)) < 1e-9
            assert agg._exact is not None
            assert sorted(agg._exact.tolist()) == sorted(du for _, du in requests)


def test_snapshot_rows_carry_each_customers_own_key_in_key_order() -> None:
    """take_dirty() sorts the changed customer-days, and rows() hashes each customer once: a
    row never carries the key of the customer before it, also across slices of the keys."""
    store = ShardStore(SketchConfig(), retention_days=30)
    store.apply(
        batch_of([(c, DAY - d, 200, 0.1) for d in range(3) for c in ("b", "a", "c", "é")]),
        newest_day=DAY,
    )
    keys = store.take_dirty()
    assert keys == sorted(keys) and len(keys) == 12
    rows = store.rows(keys[:4]) + store.rows(keys[4:])  # a slice boundary inside customer "b"
    assert [(r.customer_id, r.day) for r in rows] == keys
    assert all(r.customer_key == customer_key(r.customer_id) for r in rows)
