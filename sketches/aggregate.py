"""One customer-day of requests: exact counters, and its durations kept exactly or sketched.

A day keeps its durations as an exact array while it has at most `k` requests (`STATS_KLL_K`),
so small days answer every quantile exactly. Past `k` it moves them into two Apache
DataSketches sketches: KLL (uniform rank error; the distribution below the median) and REQ
in high-rank-accuracy mode (rank error shrinking towards the top; the median and the tail),
because KLL's rank error at p99 is a large value error on heavy-tailed latencies.

All quantiles, of one day or of many days together, come from one rule: the weighted
nearest rank over the retained items (exact values have weight 1), which is what
DataSketches' `get_quantile(q, inclusive=True)` does for one sketch. Over several days the
items are pooled instead of merged, so a summary is deterministic and adds no error of its
own.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
import numpy as np
from datasketches import kll_doubles_sketch, req_floats_sketch

# Values of the snapshot column `sketch_kind`.
EXACT_KIND = "exact_f64"  # little-endian float64 durations
SKETCH_KIND = "kll_req"  # u32 length of the KLL bytes, KLL bytes, REQ bytes
LEGACY_KLL_KIND = "kll_doubles"  # KLL alone, written before REQ was added
# Standard deviations behind the stated error bounds (3: about 99.7% two-sided).
ERROR_STD_DEVS = 3
TAIL_FROM = 0.5  # quantiles at or above this come from REQ, below from KLL
_LENGTH = struct.Struct(">I")
_NO_DURATIONS = np.zeros(0, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class SketchConfig:
    """Sizes shared by every aggregate of a shard."""

    kll_k: int = 200
    req_k: int = 48

    @property
    def kll_rank_error(self) -> float:
        # DataSketches' single-quantile rank error at 99% confidence.
        return float(kll_doubles_sketch.get_normalized_rank_error(self.kll_k, False))


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
    # Bound on |reported - exact nearest-rank value| / reported value, per quantile, at about
    # 99.7% confidence (3 standard deviations); 0 where the figure is exact.
    quantile_error: dict[str, float]
    # Extra quantiles asked for with ?quantiles=, keyed like "p90", "p99.9".
    quantiles_ms: dict[str, float | None] | None = None


@functools.lru_cache(maxsize=1024)
def quantile_name(q: float) -> str:
    """0.5 -> "p50", 0.999 -> "p99.9"."""
    return "p" + f"{q * 100:.10f}".rstrip("0").rstrip(".")


class _Items:
    """Sorted values with their weights: a distribution to read quantiles from.

    Exact durations have no weights (each counts once) and come sorted by the caller (sorted
    in place, they stay cheap to sort again), so reading them is an index.
    """

    __slots__ = ("cumulative", "total", "values")

    def __init__(self, values: np.ndarray, weights: np.ndarray | None) -> None:
        self.cumulative: np.ndarray | None
        if weights is None:
            self.values = values
            self.cumulative = None
            self.total = float(len(values))
        else:
            order = np.argsort(values, kind="stable")
            self.values = values[order]
            self.cumulative = np.cumsum(weights[order])
            self.total = float(self.cumulative[-1]) if len(values) else 0.0

    def quantile(self, q: float) -> float:
        """Nearest rank: the smallest value with at least q * total weight at or below it."""
        target = max(1.0, math.ceil(q * self.total))
        if self.cumulative is None:
            i = int(target) - 1
        else:
            i = int(np.searchsorted(self.cumulative, target, "left"))
        return float(self.values[min(i, len(self.values) - 1)])


def _sketch_items(sketch: kll_doubles_sketch | req_floats_sketch) -> tuple[np.ndarray, np.ndarray]:
    """The items a sketch retains and their weights, in no particular order.

    Read from the sketch's serialized form: iterating the sketch from Python costs about
    0.3 us an item (0.1-1.4 ms a sketch), its serialization about 1 us. The iteration stays
    as the fallback for bytes of a serial version or preamble this code does not know, or
    whose item count or total weight disagree with the sketch's own.
    """
    blob = sketch.serialize()
    try:
        items = _kll_items(blob) if isinstance(sketch, kll_doubles_sketch) else _req_items(blob)
    except (struct.error, ValueError):  # shorter than its header says
        items = None
    if items is None or len(items[0]) != sketch.num_retained or items[1].sum() != sketch.n:
        pairs = np.array(list(sketch), dtype=np.float64).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]
    return items


# The serialized layouts (little-endian) of DataSketches' KLL and REQ sketches, as
# datasketches-cpp writes them. KLL: an 8-byte header (preamble ints, serial version,
# family 15, flags, k, m); an empty sketch ends there, a single item follows it alone; else
# n (u64), min_k (u16), the level count (u8), a spare byte, each level's start (u32, offsets
# into an array whose end is the capacity), min and max, then the retained items from the
# first level up. An item of level h stands for 2**h requests.
_KLL_FAMILY, _KLL_EMPTY, _KLL_SINGLE = 15, 1 << 0, 1 << 2
_KLL_HEADS = {(2, 1), (2, 2), (5, 1)}  # (preamble ints, serial version): short forms, full
# REQ: an 8-byte header (preamble ints, serial version, family 17, flags, k, the compactor
# count, the raw item count); in estimation mode (4 preamble ints) n (u64), min and max
# (f32); then either up to 4 raw items, or each compactor: state (u64), section size (f32),
# lg weight (u8), section count (u8), 2 spare bytes, item count (u32), its items (f32).
_REQ_FAMILY, _REQ_EMPTY, _REQ_RAW = 17, 1 << 2, 1 << 4
_REQ_HEADS = {(2, 1), (4, 1)}  # (preamble ints, serial version): exact mode, estimation mode
_KLL_LEVELS = struct.Struct("<QHB")
_REQ_COMPACTOR = struct.Struct("<QfBBHI")


def _kll_items(blob: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """A KLL sketch's items and weights; None for another family or layout."""
    if len(blob) < 8 or blob[2] != _KLL_FAMILY or (blob[0], blob[1]) not in _KLL_HEADS:
        return None
    flags = blob[3]
    if flags & _KLL_EMPTY:
        return _NO_DURATIONS, _NO_DURATIONS
    if flags & _KLL_SINGLE:
        values = np.frombuffer(blob, "<f8", 1, 8).astype(np.float64)
        return values, np.ones(1)
    _, _, num_levels = _KLL_LEVELS.unpack_from(blob, 8)
    starts = np.frombuffer(blob, "<u4", num_levels, 20).astype(np.int64)
    first = 20 + 4 * num_levels + 16  # after the levels, min and max
    values = np.frombuffer(blob, "<f8", offset=first).astype(np.float64)
    ends = np.append(starts[1:], starts[0] + len(values))
    sizes = ends - starts
    if (sizes < 0).any():
        return None
    weights = np.repeat(np.ldexp(1.0, np.arange(num_levels)), sizes)
    return values, weights


def _req_items(blob: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """A REQ sketch's items and weights; None for another family or an unknown layout."""
    if len(blob) < 8 or blob[2] != _REQ_FAMILY or (blob[0], blob[1]) not in _REQ_HEADS:
        return None
    flags, compactors, raw = blob[3], blob[6], blob[7]
    if flags & _REQ_EMPTY:
        return _NO_DURATIONS, _NO_DURATIONS
    offset = 8 if blob[0] == 2 else 24  # past n, min and max in estimation mode
    if flags & _REQ_RAW:
        return np.frombuffer(blob, "<f4", raw, offset).astype(np.float64), np.ones(raw)
    values, weights = [], []
    for _ in range(compactors):
        _, _, lg_weight, _, _, count = _REQ_COMPACTOR.unpack_from(blob, offset)
        offset += _REQ_COMPACTOR.size
        values.append(np.frombuffer(blob, "<f4", count, offset))
        weights.append(np.full(count, math.ldexp(1.0, lg_weight)))
        offset += 4 * count
    if offset != len(blob) or not values:
        return None
    return np.concatenate(values).astype(np.float64), np.concatenate(weights)


class DayAggregate:
    """Exact request counters and the durations of one (customer, UTC day)."""

    __slots__ = (
        "_config",
        "_exact",
        "_kll",
        "_req",
        "client_errors",
        "duration_sum",
        "lsn",
        "server_errors",
        "successful",
        "total",
    )

    def __init__(
        self,
        config: SketchConfig,
        total: int = 0,
        successful: int = 0,
        client_errors: int = 0,
        server_errors: int = 0,
        duration_sum: float = 0.0,
        durations: np.ndarray = _NO_DURATIONS,
        lsn: int = 0,
    ) -> None:
        """An aggregate holding one group of requests (see add()), or none."""
        self._config = config
        self.total = total
        self.successful = successful
        self.client_errors = client_errors
        self.server_errors = server_errors
        self.duration_sum = duration_sum
        # The last write-ahead log record folded in (0: none): replay skips older records.
        self.lsn = lsn
        self._kll: kll_doubles_sketch | None = None
        self._req: req_floats_sketch | None = None
        self._exact: np.ndarray | None
        if len(durations) <= config.kll_k:
            self._exact = durations.astype(np.float64)  # a copy: no view of the caller's batch
        else:
            self._start_sketches(durations)

    @property
    def is_exact(self) -> bool:
        return self._exact is not None

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
        if self._exact is not None:
            # concatenate copies, so no view into the caller's batch is kept alive
            values = np.concatenate((self._exact, durations))
            if len(values) <= self._config.kll_k:
                self._exact = values
                return
            self._start_sketches(values)
            return
        assert self._kll is not None
        self._kll.update(durations)
        if self._req is not None:  # None for a busy day restored from a KLL-only snapshot
            self._req.update(durations.astype(np.float32))

    def _start_sketches(self, values: np.ndarray) -> None:
        self._kll = kll_doubles_sketch(self._config.kll_k)
        self._kll.update(values)
        self._req = req_floats_sketch(self._config.req_k, True)
        self._req.update(values.astype(np.float32))
        self._exact = None

    # -- serialization -----------------------------------------------------------------------

    def to_blob(self) -> tuple[str, bytes]:
        """(kind, bytes) of the durations' state, for the snapshot."""
        if self._exact is not None:
            self._exact.sort()  # a canonical form, whether or not the day was read
            return EXACT_KIND, self._exact.astype("<f8", copy=False).tobytes()
        assert self._kll is not None
        kll = bytes(self._kll.serialize())
        if self._req is None:
            return LEGACY_KLL_KIND, kll
        return SKETCH_KIND, _LENGTH.pack(len(kll)) + kll + bytes(self._req.serialize())

    @classmethod
    def restore(
        cls,
        config: SketchConfig,
        counters: tuple[int, int, int, int, float],
        kind: str,
        blob: bytes,
    ) -> DayAggregate:
        """Rebuild an aggregate from its stored counters and durations' state."""
        agg = cls(config, *counters)
        if kind == EXACT_KIND:
            agg._exact = np.frombuffer(blob, dtype="<f8").astype(np.float64)
        elif kind == SKETCH_KIND:
            (size,) = _LENGTH.unpack_from(blob)
            agg._kll = kll_doubles_sketch.deserialize(blob[4 : 4 + size])
            agg._req = req_floats_sketch.deserialize(blob[4 + size :])
            agg._exact = None
        elif kind == LEGACY_KLL_KIND:
            kll = kll_doubles_sketch.deserialize(blob)
            if kll.is_estimation_mode():
                # The tail sketch cannot be rebuilt; KLL answers every quantile of this day.
                agg._kll, agg._exact = kll, None
            else:
                agg._exact = _sketch_items(kll)[0]
        else:
            raise ValueError(f"unknown sketch kind {kind!r}")
        return agg

    # -- reading -----------------------------------------------------------------------------

    def _items(self, tail: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """This day's values, unsorted, and their weights (None when exact: one each)."""
        if self._exact is not None:
            return self._exact, None
        return _sketch_items(self._sketch(tail))

    def _sketch(self, tail: bool) -> kll_doubles_sketch | req_floats_sketch:
        """The sketch a sketched day answers a tail (or body) quantile from."""
        sketch = self._req if tail and self._req is not None else self._kll
        assert sketch is not None
        return sketch

    def _rank_error(self, tail: bool, rank: float) -> float:
        """Bound on this day's rank error (a share of its requests) near `rank`."""
        if self._exact is not None:
            return 0.0
        if tail and self._req is not None:
            return max(0.0, self._req.get_rank_upper_bound(rank, ERROR_STD_DEVS) - rank)
        return self._config.kll_rank_error

    def stats(self, date: str | None = None, extra: Sequence[float] = ()) -> LatencyStats:
        """This day's figures (milliseconds and percentages rounded to 3 decimals)."""
        return summarize([self], extra, date)


class _Quantiles:
    """Quantiles of one family (tail or body) of some days, when some day is sketched
    (summarize() reads days that are all exact itself), each with its relative error bound."""

    tail: bool

    def quantile(self, q: float) -> float:
        raise NotImplementedError

    def misplaced(self, value: float) -> float:
        """Requests whose rank the sketched days may misplace near `value`."""
        raise NotImplementedError

    def quantile_with_error(self, q: float, total: int) -> tuple[float, float]:
        """The nearest-rank q-quantile and its relative error bound: the spread of values
        within the misplaced share of ranks either side of it."""
        value = self.quantile(q)
        misplaced = self.misplaced(value)
        if misplaced == 0 or value <= 0:
            return value, 0.0
        spread = misplaced / total
        low = self.quantile(max(0.0, q - spread))
        high = self.quantile(min(1.0, q + spread))
        return value, max(value - low, high - value) / value


class _Pool(_Quantiles):
    """The days' items pooled: exact values weigh 1, a sketch's items their weight.

    Only the pool is sorted: a sketched day's own rank near a quantile, for its error bound,
    is a sum over its unsorted items.
    """

    def __init__(self, days: Sequence[DayAggregate], tail: bool) -> None:
        self.tail = tail
        parts = [day._items(tail) for day in days]
        self.sketched = [
            (day, values, weights, float(weights.sum()))
            for day, (values, weights) in zip(days, parts, strict=True)
            if weights is not None
        ]
        # Exact values first, so one array of ones weighs them all.
        exact = [values for values, weights in parts if weights is None]
        self.pooled = _Items(
            np.concatenate(exact + [values for _, values, _, _ in self.sketched]),
            np.concatenate([np.ones(sum(map(len, exact)))] + [w for _, _, w, _ in self.sketched]),
        )

    def quantile(self, q: float) -> float:
        return self.pooled.quantile(q)

    def misplaced(self, value: float) -> float:
        # Each sketched day may misplace ranks by up to its bound; add them up in requests.
        # (Weights are whole numbers, so these sums are exact in any order.)
        return sum(
            day.total * day._rank_error(self.tail, float(weights[values <= value].sum()) / weight)
            for day, values, weights, weight in self.sketched
        )


class _OneSketch(_Quantiles):
    """One sketched day, read from its sketch itself: the same nearest rank over the same
    items as _Pool's (DataSketches' inclusive get_quantile and get_rank), without copying
    the items out and sorting them in numpy."""

    def __init__(self, day: DayAggregate, tail: bool) -> None:
        self.day = day
        self.tail = tail
        self.sketch = day._sketch(tail)

    def quantile(self, q: float) -> float:
        return self.sketch.get_quantile(q, True)

    def misplaced(self, value: float) -> float:
        return self.day.total * self.day._rank_error(self.tail, self.sketch.get_rank(value, True))


def summarize(
    days: Sequence[DayAggregate], extra: Sequence[float] = (), date: str | None = None
) -> LatencyStats:
    """The figures of several days together: counters summed, quantiles over all requests."""
    total = successful = client = server = 0
    duration_sum = 0.0
    exact = True
    for d in days:
        total += d.total
        successful += d.successful
        client += d.client_errors
        server += d.server_errors
        duration_sum += d.duration_sum
        if d._exact is None:
            exact = False
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
            quantile_error={},
            quantiles_ms={quantile_name(q): None for q in extra} if extra else None,
        )
    quantiles = (0.5, 0.99, *extra)
    if exact:
        # The common case (days of at most k requests): one sort, every figure exact.
        values = days[0]._exact if len(days) == 1 else np.concatenate([d._exact for d in days])
        assert values is not None
        values.sort()  # in place: a day's own values (their order is irrelevant) or a new array
        pooled = _Items(values, None)
        found = [round(pooled.quantile(q) * 1000.0, 3) for q in quantiles]
        errors = dict.fromkeys(map(quantile_name, quantiles), 0.0)
    else:
        days = [d for d in days if d.total]
        found = []  # milliseconds, for 0.5, 0.99 and then each extra quantile
        errors = {}
        pools: dict[bool, _Quantiles] = {}
        for q in quantiles:
            tail = q >= TAIL_FROM
            pool = pools.get(tail)
            if pool is None:
                pool = pools[tail] = (
                    _OneSketch(days[0], tail)
                    if len(days) == 1 and not days[0].is_exact
                    else _Pool(days, tail)
                )
            value, error = pool.quantile_with_error(q, total)
            found.append(round(value * 1000.0, 3))
            errors[quantile_name(q)] = round(error, 6)
    return LatencyStats(
        date=date,
        total_requests=total,
        successful_requests=successful,
        failed_requests=total - successful,
        client_errors=client,
        server_errors=server,
        uptime_pct=round(100.0 * (total - server) / total, 3),
        avg_latency_ms=round(duration_sum / total * 1000.0, 3),
        median_latency_ms=found[0],
        p99_latency_ms=found[1],
        quantile_error=errors,
        quantiles_ms=(
            {quantile_name(q): value for q, value in zip(extra, found[2:], strict=True)}
            if extra
            else None
        ),
    )
