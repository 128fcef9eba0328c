"""A shard's in-memory aggregates: customer -> UTC day -> DayAggregate."""

from __future__ import annotations

import datetime as dt
import functools
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable

import msgspec
import numpy as np

from persistence.snapshot import SnapshotRow
from sketches import DayAggregate, SketchConfig, summarize
from statsd_server.messages import Applied
from statsd_server.newest_day import NO_DAY
from statsd_server.parse import Batch, concat_batches
from statsd_server.routing import customer_key

_EPOCH = dt.date(1970, 1, 1)


@functools.lru_cache(maxsize=4096)
def day_to_date(day: int) -> str:
    return (_EPOCH + dt.timedelta(days=day)).isoformat()


def date_to_day(date: dt.date) -> int:
    return (date - _EPOCH).days


# Requests queued before they are folded in: one apply costs a Python step per
# (customer, day) in it, so batches this large make applying several times cheaper per line.
APPLY_BATCH = 524_288
# Summaries of ranges kept per customer (each ~300 bytes); past this the customer's are dropped.
MAX_CACHED_RANGES = 64
# Requests grouped and waiting to be folded in; grouping more first folds the oldest
# groupings in at once, so folding in steps cannot fall behind ingest by more than this.
MAX_PENDING_LINES = 2 * APPLY_BATCH
# Grouping counts by customer-day key in an array of (customers x days) bins while there are
# at most twice as many bins as requests grouped, plus this many; sparser keys (a small fold
# whose batches name many customers) are numbered first, by a sort.
_DENSE_BINS = 1 << 16


class _Fold:
    """Requests grouped by customer-day, sorted by customer, waiting to be folded in.

    Folded a customer at a time (all its days together), in table order by fold_some() or
    out of order when a query needs that customer now.
    """

    def __init__(
        self,
        customers: list[str],
        lsn: int,
        key: np.ndarray,
        span: int,
        first_day: int,
        status: np.ndarray,
        duration: np.ndarray,
    ) -> None:
        """Group requests by `key`: customer (position in `customers`) * span + day -
        first_day.

        Each group's counts and sum come from counting by key (np.bincount), so only the
        durations are sorted, by a stable radix sort (and sparse keys, to number them).
        Per-group figures stay numpy arrays (a fold may hold 512k groups), made lists a
        customer at a time when folded in.
        """
        bins = len(customers) * span
        used = None
        if bins > 2 * len(key) + _DENSE_BINS:  # sparse: count by the rank among keys used
            used, key = np.unique(key, return_inverse=True)
            bins = len(used)
        # 0: successful (< 400), 1: client error (4xx), 2: server error (5xx)
        kind = (status >= 400).view(np.int8) + (status >= 500).view(np.int8)
        by_kind = np.bincount(key * 3 + kind, minlength=3 * bins).reshape(bins, 3)
        counts = by_kind.sum(axis=1)
        present = np.flatnonzero(counts)
        by_kind = by_kind[present]
        group_key = present if used is None else used[present]
        self.lsn = lsn
        self.lines = len(duration)
        self.durations = duration[_stable_order(key)]
        sizes = counts[present]
        self.ends = np.cumsum(sizes)
        self.starts = self.ends - sizes
        self.day = group_key % span + first_day
        self.successful = by_kind[:, 0]
        self.client = by_kind[:, 1]
        self.server = by_kind[:, 2]
        self.sums = np.bincount(key, weights=duration, minlength=bins)[present]
        group_customer = group_key // span
        firsts = np.flatnonzero(np.diff(group_customer, prepend=-1))
        lasts = np.append(firsts[1:], len(present))
        # Customer id -> its groups [first, end), for the customers not folded in yet.
        self.pending: dict[str, tuple[int, int]] = {
            customers[c]: (first, end)
            for c, first, end in zip(
                group_customer[firsts].tolist(), firsts.tolist(), lasts.tolist(), strict=True
            )
        }


class _Answers:
    """One customer's days in order, with the encoded figures of those asked for so far and
    the encoded summaries of ranges asked for: built by its first query, dropped when its
    data changes or a day of it expires. A query is then two bisections and a join."""

    __slots__ = ("aggs", "days", "fragments", "summaries")

    def __init__(
        self, days: list[int], aggs: list[DayAggregate], fragments: list[bytes | None]
    ) -> None:
        self.days = days
        self.aggs = aggs
        self.fragments = fragments  # None: not encoded yet
        # (first, end) positions in `days` -> encoded summary of those days.
        self.summaries: dict[tuple[int, int], bytes] = {}


class ShardStore:
    """The customer-days one shard owns, with retention and change tracking for snapshots.

    Batches are queued, grouped by customer-day together once enough have arrived (or the
    shard calls group_queued()), and folded in a customer at a time (fold_some()). A query
    first folds in its own customer and a snapshot everything, so what was acknowledged is
    what is seen.
    """

    def __init__(self, config: SketchConfig, retention_days: int) -> None:
        self.config = config
        self.retention_days = retention_days
        self.customers: dict[str, dict[int, DayAggregate]] = {}
        self.newest_day = NO_DAY
        self._dirty: set[tuple[str, int]] = set()
        self._queue: list[Batch] = []
        self._queued_lines = 0
        self._queued_newest = NO_DAY
        self._queued_lsn = 0
        self._queued_new: set[str] = set()  # customers first seen in queued batches
        self._folds: deque[_Fold] = deque()
        # Called when a batch lands in an empty queue (the shard groups it once ingest is
        # quiet), and when queued batches were grouped (the shard folds them in steps).
        self.on_queued: Callable[[], None] | None = None
        self.on_grouped: Callable[[], None] | None = None
        # Encoded figures of days queried since they last changed (kept when another day of
        # the customer changes), and what queries of each customer read (see _Answers).
        # Sketched days take about 1.5 ms each to encode, so only the days asked for are.
        self._json: dict[tuple[str, int], bytes] = {}
        self._answers: dict[str, _Answers] = {}
        self._encode = msgspec.json.Encoder().encode

    @property
    def customer_days(self) -> int:
        return sum(len(days) for days in self.customers.values())

    @property
    def cutoff_day(self) -> int:
        """The oldest day still kept."""
        return NO_DAY if self.newest_day == NO_DAY else self.newest_day - self.retention_days

    def advance(self, newest_day: int) -> None:
        """Move the newest day forward and drop the days that fell out of retention."""
        if newest_day <= self.newest_day:
            return
        self.newest_day = newest_day
        cutoff = self.cutoff_day
        for customer_id in list(self.customers):
            days = self.customers[customer_id]
            for day in [d for d in days if d < cutoff]:
                del days[day]
                self._dirty.discard((customer_id, day))
                self._json.pop((customer_id, day), None)
                self._answers.pop(customer_id, None)
            if not days:
                del self.customers[customer_id]

    @property
    def queued_batches(self) -> int:
        return len(self._queue)

    @property
    def folds_pending(self) -> int:
        return len(self._folds)

    @property
    def customers_held(self) -> int:
        """Customers with data, counting those only queued so far."""
        return len(self.customers) + len(self._queued_new)

    def has_new_customers(self, batch: Batch) -> bool:
        held, queued = self.customers, self._queued_new
        return any(c not in held and c not in queued for c in batch.customers)

    def plan_admission(self, batch: Batch, room: int) -> tuple[Batch, int, list[str]]:
        """The batch without the requests of new customers beyond `room` more, how many
        requests that refused, and the new customers it admits (see admitted()). Changes
        nothing, so a caller whose write-ahead log append fails has nothing to undo."""
        held = self.customers
        queued = self._queued_new
        used = np.unique(batch.customer).tolist()
        new = [
            i for i in used if batch.customers[i] not in held and batch.customers[i] not in queued
        ]
        admitted = [batch.customers[i] for i in new[: max(room, 0)]]
        refused = new[max(room, 0) :]
        if not refused:
            return batch, 0, admitted
        kept = batch.where(~np.isin(batch.customer, refused))
        return kept, len(batch.day) - len(kept.day), admitted

    def admitted(self, customers: list[str]) -> None:
        """Count customers admitted by plan_admission() as held, before their batch is
        applied."""
        self._queued_new.update(customers)

    def enqueue(self, batch: Batch, newest_day: int, lsn: int = 0) -> Applied:
        """Take a batch; it is folded in with others, before anything reads the aggregates.

        `lsn` numbers the batch in the write-ahead log (0 without one).
        """
        if not self._queue and self.on_queued is not None:
            self.on_queued()
        self._queue.append(batch)
        self._queued_lines += len(batch.day)
        self._queued_newest = max(self._queued_newest, newest_day)
        self._queued_lsn = max(self._queued_lsn, lsn)
        if self._queued_lines >= APPLY_BATCH:
            self.group_queued()
        return Applied(stored=len(batch.day))

    def group_queued(self) -> None:
        """Group every queued batch as one fold, to be folded in by fold_some() or flush()."""
        if not self._queue:
            return
        while self._folds and (
            sum(f.lines for f in self._folds) + self._queued_lines > MAX_PENDING_LINES
        ):
            self._fold_all(self._folds[0])
            self._folds.popleft()
        queue, newest, lsn = self._queue, self._queued_newest, self._queued_lsn
        self._queue, self._queued_lines, self._queued_newest = [], 0, NO_DAY
        self._queued_lsn = 0
        fold = self._group(concat_batches(queue), newest, lsn)
        if fold is not None:
            self._folds.append(fold)
            if self.on_grouped is not None:
                self.on_grouped()
        # Admitted customers with nothing left to fold in had every request dropped for
        # retention: they are not held.
        folds = self._folds
        self._queued_new = {c for c in self._queued_new if any(c in f.pending for f in folds)}

    def fold_some(self, groups: int) -> bool:
        """Fold in whole customers of grouped batches, about `groups` customer-days in all;
        whether grouped batches remain."""
        while self._folds and groups > 0:
            pending = self._folds[0].pending
            if not pending:
                self._folds.popleft()
                continue
            customer_id = next(iter(pending))
            # Taken off before folding in: a failure loses it rather than counting it twice.
            first, end = pending.pop(customer_id)
            self._fold_in(self._folds[0], customer_id, first, end)
            groups -= end - first
        while self._folds and not self._folds[0].pending:
            self._folds.popleft()
        self._settle()
        return bool(self._folds)

    def flush(self) -> None:
        """Fold in everything queued or grouped, now."""
        self.group_queued()
        while self._folds:
            self._fold_all(self._folds[0])
            self._folds.popleft()
        self._settle()

    def _catch_up(self, customer_id: str) -> None:
        """Fold in everything queued or grouped for one customer, now."""
        self.group_queued()
        for fold in self._folds:
            groups = fold.pending.pop(customer_id, None)
            if groups is not None:
                self._fold_in(fold, customer_id, *groups)

    def _settle(self) -> None:
        # With nothing left to fold in, customers only ever seen in requests dropped for
        # retention are not held.
        if not self._queue and not self._folds:
            self._queued_new = set()

    def apply(self, batch: Batch, newest_day: int, lsn: int = 0) -> None:
        """Fold a batch of requests into the aggregates, one sketch update per customer-day.

        Requests for days that left retention since they were accepted (a newer line arrived
        meanwhile, possibly on another connection) are dropped, as their day is. A batch
        replayed from the write-ahead log (`lsn` > 0) skips the customer-days that already
        hold it: those restored from a snapshot taken after the batch was applied.
        """
        fold = self._group(batch, newest_day, lsn)
        if fold is not None:
            self._fold_all(fold)

    def _fold_all(self, fold: _Fold) -> None:
        pending = fold.pending
        while pending:
            customer_id = next(iter(pending))
            self._fold_in(fold, customer_id, *pending.pop(customer_id))

    def _group(self, batch: Batch, newest_day: int, lsn: int) -> _Fold | None:
        """The batch's requests within retention grouped by customer-day, with each group's
        counts and sum; None if none is left."""
        self.advance(newest_day)
        customers, customer, day, status, duration = batch
        if len(day) and self.newest_day != NO_DAY:
            keep = day >= self.cutoff_day
            if not keep.all():
                customer, day, status, duration = (
                    customer[keep],
                    day[keep],
                    status[keep],
                    duration[keep],
                )
        n = len(day)
        if n == 0:
            return None
        first_day = int(day.min())
        span = int(day.max()) - first_day + 1
        key = customer.astype(np.int64) * span + (day - first_day)
        return _Fold(customers, lsn, key, span, first_day, status, duration)

    def _fold_in(self, fold: _Fold, customer_id: str, first: int, end: int) -> None:
        """Fold in one customer's groups [first, end): one sketch update per customer-day."""
        days = self.customers.get(customer_id)
        if days is None:
            days = self.customers[customer_id] = {}
        try:
            self._fold_days(fold, customer_id, days, first, end)
        finally:
            # Also after a failure part-way: what changed must not be served from caches.
            self._answers.pop(customer_id, None)
            if days:
                self._queued_new.discard(customer_id)  # held now
            else:  # every day of it expired meanwhile (it may still have requests waiting)
                del self.customers[customer_id]

    def _fold_days(
        self, fold: _Fold, customer_id: str, days: dict[int, DayAggregate], first: int, end: int
    ) -> None:
        config = self.config
        dirty = self._dirty
        encoded = self._json
        cutoff = self.cutoff_day  # retention may have moved on since the batch was grouped
        lsn = fold.lsn
        durations = fold.durations
        groups = slice(first, end)
        for d, start, stop, successful, client, server, duration_sum in zip(
            fold.day[groups].tolist(),
            fold.starts[groups].tolist(),
            fold.ends[groups].tolist(),
            fold.successful[groups].tolist(),
            fold.client[groups].tolist(),
            fold.server[groups].tolist(),
            fold.sums[groups].tolist(),
            strict=True,
        ):
            if d < cutoff:
                continue
            key = (customer_id, d)
            agg = days.get(d)
            # A new day has no encoded figures to drop (they go when a day expires).
            if agg is None:  # most often, after a load: one call makes the aggregate whole
                days[d] = DayAggregate(
                    config,
                    stop - start,
                    successful,
                    client,
                    server,
                    duration_sum,
                    durations[start:stop],
                    lsn,
                )
                dirty.add(key)
                continue
            if agg.lsn >= lsn > 0:
                continue
            agg.lsn = lsn
            dirty.add(key)
            encoded.pop(key, None)
            agg.add(stop - start, successful, client, server, duration_sum, durations[start:stop])

    def query(
        self,
        customer_id: str,
        first_day: int,
        last_day: int | None,
        extra_quantiles: list[float] | None = None,
    ) -> bytes | None:
        """The stats response body (JSON) for days in [first_day, last_day]; None if unknown.

        Without extra quantiles, each day's figures are encoded once and reused until that day
        changes, and each range's summary until the customer's data changes.
        """
        self._catch_up(customer_id)
        days = self.customers.get(customer_id)
        if days is None:
            return None
        encode = self._encode
        if extra_quantiles:
            selected = sorted(
                d for d in days if d >= first_day and (last_day is None or d <= last_day)
            )
            aggs = [days[d] for d in selected]
            fragments = [
                encode(agg.stats(day_to_date(d), extra_quantiles))
                for d, agg in zip(selected, aggs, strict=True)
            ]
            summary = encode(summarize(aggs, extra_quantiles))
        else:
            answers = self._answers.get(customer_id) or self._read_answers(customer_id, days)
            first = bisect_left(answers.days, first_day)
            end = len(answers.days) if last_day is None else bisect_right(answers.days, last_day)
            fragments = self._fragments(customer_id, answers, first, end)
            summary = self._summary_json(answers, first, end)
        head = encode(
            {
                "customer_id": customer_id,
                "from": day_to_date(first_day),
                "to": None if last_day is None else day_to_date(last_day),
            }
        )
        return b"".join(
            (head[:-1], b',"days":[', b",".join(fragments), b'],"summary":', summary, b"}")
        )

    def _read_answers(self, customer_id: str, days: dict[int, DayAggregate]) -> _Answers:
        """A customer's _Answers, holding those of its days' figures that are encoded already
        (the others are encoded when a query asks for them)."""
        order = sorted(days)
        encoded = self._json
        answers = self._answers[customer_id] = _Answers(
            order, [days[d] for d in order], [encoded.get((customer_id, d)) for d in order]
        )
        return answers

    def _fragments(self, customer_id: str, answers: _Answers, first: int, end: int) -> list[bytes]:
        """The encoded figures of the customer's days [first, end), encoding those not yet."""
        fragments = answers.fragments
        part = fragments[first:end]
        if None in part:
            for i in range(first, end):
                if fragments[i] is None:
                    d, agg = answers.days[i], answers.aggs[i]
                    fragments[i] = self._json[customer_id, d] = self._encode(
                        agg.stats(day_to_date(d))
                    )
            part = fragments[first:end]
        return part  # type: ignore[return-value]  # every one encoded now

    def _summary_json(self, answers: _Answers, first: int, end: int) -> bytes:
        # Keyed by the days the range selects (positions in the customer's days), not by the
        # query's dates, so made-up ranges cannot grow the cache.
        if first >= end:
            return self._encode(summarize([]))
        ranges = answers.summaries
        key = (first, end)
        cached = ranges.get(key)
        if cached is None:
            if len(ranges) >= MAX_CACHED_RANGES:
                ranges.clear()
            cached = ranges[key] = self._encode(summarize(answers.aggs[first:end]))
        return cached

    def take_dirty(self) -> list[tuple[str, int]]:
        """The customer-days changed since the last call (queued batches applied first), in
        the snapshot table's key order: a customer's days together, so rows() hashes each
        customer id once, and SQLite inserts them in order."""
        self.flush()
        keys = sorted(self._dirty)
        self._dirty = set()
        return keys

    def rows(self, keys: list[tuple[str, int]]) -> list[SnapshotRow]:
        """Snapshot rows of these customer-days (those expired meanwhile are left out)."""
        rows = []
        last: str | None = None
        days: dict[int, DayAggregate] = {}
        key = 0
        for customer_id, d in keys:
            if customer_id != last:
                last, days = customer_id, self.customers.get(customer_id, {})
                key = customer_key(customer_id)
            agg = days.get(d)
            if agg is not None:
                rows.append(SnapshotRow.from_aggregate(customer_id, d, agg, key))
        return rows

    def mark_dirty(self, keys: list[tuple[str, int]]) -> None:
        """Mark customer-days as changed again after a snapshot that failed to write them."""
        for customer_id, day in keys:
            days = self.customers.get(customer_id)
            if days is not None and day in days:
                self._dirty.add((customer_id, day))

    def restore(self, rows: list[SnapshotRow], newest_day: int) -> int:
        """Load snapshot rows, keeping only days within retention; the newest LSN they hold."""
        for row in rows:
            newest_day = max(newest_day, row.day)
        self.newest_day = max(self.newest_day, newest_day)
        cutoff = self.cutoff_day
        for row in rows:
            if row.day >= cutoff:
                self.customers.setdefault(row.customer_id, {})[row.day] = row.aggregate(self.config)
        return max((row.wal_lsn for row in rows), default=0)


def _stable_order(key: np.ndarray) -> np.ndarray:
    """np.argsort(key, kind="stable") of non-negative keys, by radix sort when they fit in
    32 bits: numpy radix-sorts 16-bit integers only, so two passes of 16 bits (about 10 ms
    for 500k keys, against 45 ms for the int64 sort on the development VM)."""
    top = int(key.max()) if len(key) else 0
    if top < 1 << 16:
        return np.argsort(key.astype(np.uint16), kind="stable")
    if top >= 1 << 32:
        return np.argsort(key, kind="stable")
    order = np.argsort((key & 0xFFFF).astype(np.uint16), kind="stable")
    return order[np.argsort((key[order] >> 16).astype(np.uint16), kind="stable")]
