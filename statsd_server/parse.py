"""Parse chunks of log lines into columnar batches, vectorised with numpy.

A chunk is whole lines. Most lines have the generator's shape (six printable ASCII fields);
those are validated and converted column-wise without a Python object per line. Any line the
vectorised checks cannot prove valid goes through the exact grammar in `line_rules`, which
either accepts it or names the reason it is rejected, so both paths agree by construction.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.ma  # np.unique imports it on first use (13-85 ms): at start instead

from statsd_server.line_rules import (
    MAX_CUSTOMER_ID_BYTES,
    MAX_LINE_BYTES,
    SECONDS_PER_DAY,
    Request,
    parse_line,
)

_SPACE, _TAB, _NL, _CR = 32, 9, 10, 13
_DIGIT0, _DOT, _DASH, _COLON, _SLASH, _BRACE = 48, 46, 45, 58, 47, 123
# Widths the fast path handles; longer time or duration tokens take the exact path.
_TIME_WIDTH = 24
_DURATION_WIDTH = 16
_MAX_EXACT_DIGITS = 15  # integers below 10**15 are exact in float64
_DAYS_IN_MONTH = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)
_POW10 = 10.0 ** np.arange(_DURATION_WIDTH + 1)
# Bytes of zero padding after a chunk: the widest gather (a 128-byte customer id, rounded up).
_PAD = 160


@dataclass(slots=True)
class ParsedChunk:
    """Accepted requests as columns, plus rejected-line counts by reason."""

    customers: list[str]  # distinct customer ids; `customer` indexes into this list
    customer: np.ndarray  # int32 per request
    day: np.ndarray  # int32 days since 1970-01-01 (UTC)
    second: np.ndarray  # int64 seconds since the epoch (UTC)
    status: np.ndarray  # int16
    duration: np.ndarray  # float64 seconds
    rejected: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.customer)

    def batch(self) -> Batch:
        """The columns a shard needs (the timestamps served the time rules only)."""
        return Batch(self.customers, self.customer, self.day, self.status, self.duration)

    def take(self, mask_or_index: np.ndarray) -> ParsedChunk:
        """The requests selected by a mask or index array, customer list compacted."""
        customer = self.customer[mask_or_index]
        used, remapped = np.unique(customer, return_inverse=True)
        return ParsedChunk(
            customers=[self.customers[i] for i in used.tolist()],
            customer=remapped.astype(np.int32),
            day=self.day[mask_or_index],
            second=self.second[mask_or_index],
            status=self.status[mask_or_index],
            duration=self.duration[mask_or_index],
        )


class Batch(NamedTuple):
    """Accepted requests for one shard, as columns; `customer` indexes into `customers`."""

    customers: list[str]
    customer: np.ndarray  # int32
    day: np.ndarray  # int32
    status: np.ndarray  # int16
    duration: np.ndarray  # float64

    def where(self, keep: np.ndarray) -> Batch:
        """The requests selected by a boolean mask (the customer list is kept as it is)."""
        return Batch(
            self.customers,
            self.customer[keep],
            self.day[keep],
            self.status[keep],
            self.duration[keep],
        )


def concat_batches(batches: list[Batch]) -> Batch:
    """One batch holding the requests of several, their customer lists merged."""
    if len(batches) == 1:
        return batches[0]
    index: dict[str, int] = {}  # customer id -> position in the merged list, in first-seen order
    remapped = []
    for batch in batches:
        lookup = [index.setdefault(customer_id, len(index)) for customer_id in batch.customers]
        remapped.append(np.array(lookup, dtype=np.int32)[batch.customer])
    return Batch(
        list(index),
        np.concatenate(remapped),
        np.concatenate([b.day for b in batches]),
        np.concatenate([b.status for b in batches]),
        np.concatenate([b.duration for b in batches]),
    )


def empty_chunk() -> ParsedChunk:
    return ParsedChunk(
        customers=[],
        customer=np.zeros(0, np.int32),
        day=np.zeros(0, np.int32),
        second=np.zeros(0, np.int64),
        status=np.zeros(0, np.int16),
        duration=np.zeros(0, np.float64),
    )


def parse_chunk(data: bytes) -> ParsedChunk:
    """Parse whole lines (`data` ends with a newline, or is empty)."""
    if not data:
        return empty_chunk()
    if data[-1] != _NL:
        data += b"\n"
    # Zero padding lets fixed-width gathers read past the last token without bounds checks.
    padded = np.frombuffer(data + bytes(_PAD), dtype=np.uint8)
    buf = padded[: len(data)]
    line_end = np.flatnonzero(buf == _NL)
    line_start = np.empty_like(line_end)
    line_start[0] = 0
    line_start[1:] = line_end[:-1] + 1

    # A single trailing \r belongs to the line terminator.
    has_cr = np.zeros(len(line_end), dtype=bool)
    nonempty = line_end > line_start
    has_cr[nonempty] = buf[line_end[nonempty] - 1] == _CR
    content_end = line_end - has_cr

    # Byte classes: separators (space, tab, newline, the terminating \r) and bytes that force
    # the exact path (control characters and anything non-ASCII).
    sep = (buf == _SPACE) | (buf == _TAB) | (buf == _NL)
    sep[line_end[has_cr] - 1] = True
    unusual = (buf < _SPACE) | (buf > 126)
    unusual &= ~sep

    nonsep = ~sep
    edges = np.diff(nonsep.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    tok_start = np.flatnonzero(edges == 1)
    tok_end = np.flatnonzero(edges == -1)
    # A token's line is the first line that ends after the token starts.
    tok_line = np.searchsorted(line_end, tok_start)
    tokens_per_line = np.bincount(tok_line, minlength=len(line_end))
    first_token = np.cumsum(tokens_per_line) - tokens_per_line

    line_unusual = np.logical_or.reduceat(unusual, line_start)
    too_long = (content_end - line_start) > MAX_LINE_BYTES
    blank = tokens_per_line == 0
    candidate = (tokens_per_line == 6) & ~line_unusual & ~too_long
    cand_lines = np.flatnonzero(candidate)
    # JSON lines start with '{' and always take the exact path.
    first_byte = buf[tok_start[first_token[cand_lines]]]
    cand_lines = cand_lines[first_byte != _BRACE]

    fast = _parse_fast(padded, tok_start, tok_end, first_token[cand_lines])
    fast_lines = cand_lines[fast.ok]

    rejected: Counter[str] = Counter()
    # Length comes first: an overlong line is rejected even if it is only whitespace.
    n_too_long = int(np.count_nonzero(too_long))
    if n_too_long:
        rejected["too_long"] = n_too_long
    slow_mask = ~blank & ~too_long
    slow_mask[fast_lines] = False
    slow_requests: list[Request] = []
    slow_lines: list[int] = []
    slow_index = np.flatnonzero(slow_mask)
    # The exact path gets the line with its \r, if any, and strips it itself.
    for i, start, end in zip(
        slow_index.tolist(),
        line_start[slow_index].tolist(),
        line_end[slow_index].tolist(),
        strict=True,
    ):
        result = parse_line(data[start:end])
        if result is None:
            continue
        if isinstance(result, str):
            rejected[result] += 1
        else:
            slow_requests.append(result)
            slow_lines.append(i)

    chunk = _fast_columns(data, padded, fast, fast_lines, tok_start, tok_end, first_token)
    if slow_requests:
        chunk = _append_requests(chunk, slow_requests)
        # Back into line order: the expiry rule reads the stream in order.
        order = np.argsort(np.concatenate([fast_lines, slow_lines]), kind="stable")
        chunk = chunk.take(order)
    chunk.rejected = rejected
    return chunk


@dataclass(slots=True)
class _FastFields:
    ok: np.ndarray  # per candidate line: proven valid
    day: np.ndarray
    second: np.ndarray
    status: np.ndarray
    duration: np.ndarray


def _gather(buf: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    """A (lines, width) matrix of the bytes from each start (`buf` is padded past its end)."""
    return buf[start[:, None] + np.arange(width)]


def _gather_token(
    buf: np.ndarray, start: np.ndarray, length: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each token's bytes, zero past its end, and the in-token mask."""
    inside = np.arange(width) < length[:, None]
    return _gather(buf, start, width) * inside, inside


def _digits(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = m.astype(np.int32) - _DIGIT0
    return d, (d >= 0) & (d <= 9)


def _parse_fast(
    buf: np.ndarray, tok_start: np.ndarray, tok_end: np.ndarray, first: np.ndarray
) -> _FastFields:
    """Validate and convert the six fields of candidate lines column-wise."""
    t = first[:, None] + np.arange(6)
    starts, ends = tok_start[t], tok_end[t]
    lens = ends - starts
    n = len(first)
    if n == 0:
        nothing = np.zeros(0, dtype=np.int64)
        return _FastFields(np.zeros(0, bool), nothing, nothing, nothing, nothing.astype(float))

    # DATE: YYYY-MM-DD, a real calendar date (the length check makes masking unneeded).
    m = _gather(buf, starts[:, 0], 10)
    d, isdig = _digits(m)
    digit_cols = [0, 1, 2, 3, 5, 6, 8, 9]
    ok = (lens[:, 0] == 10) & (m[:, 4] == _DASH) & (m[:, 7] == _DASH)
    ok &= isdig[:, digit_cols].all(axis=1)
    year = d[:, 0] * 1000 + d[:, 1] * 100 + d[:, 2] * 10 + d[:, 3]
    month = d[:, 5] * 10 + d[:, 6]
    dom = d[:, 8] * 10 + d[:, 9]
    month_ok = (month >= 1) & (month <= 12)
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    dim = _DAYS_IN_MONTH[np.where(month_ok, month, 1)] + ((month == 2) & leap)
    ok &= (year >= 1) & month_ok & (dom >= 1) & (dom <= dim)
    day = _days_from_civil(year.astype(np.int64), np.where(month_ok, month, 1), dom)

    # TIME: HH:MM:SS with an optional .fraction of at least one digit.
    tlen = lens[:, 1]
    width = max(8, min(int(tlen.max()), _TIME_WIDTH))
    m, inside = _gather_token(buf, starts[:, 1], np.minimum(tlen, width), width)
    d, isdig = _digits(m)
    dot_ok = (m[:, 8] == _DOT) if width > 8 else np.zeros(n, dtype=bool)
    ok &= (tlen == 8) | ((tlen >= 10) & (tlen <= _TIME_WIDTH) & dot_ok)
    ok &= (m[:, 2] == _COLON) & (m[:, 5] == _COLON) & isdig[:, [0, 1, 3, 4, 6, 7]].all(axis=1)
    if width > 9:
        ok &= ~(inside[:, 9:] & ~isdig[:, 9:]).any(axis=1)
    hour = d[:, 0] * 10 + d[:, 1]
    minute = d[:, 3] * 10 + d[:, 4]
    sec = d[:, 6] * 10 + d[:, 7]
    ok &= (hour <= 23) & (minute <= 59) & (sec <= 59)
    second = day * SECONDS_PER_DAY + (hour * 3600 + minute * 60 + sec)

    # CUSTOMER_ID: printable ASCII without spaces is guaranteed here; only the length is left.
    ok &= lens[:, 2] <= MAX_CUSTOMER_ID_BYTES

    # REQUEST_PATH starts with '/'.
    ok &= buf[starts[:, 3]] == _SLASH

    # STATUS_CODE: three digits, 100-599.
    m = _gather(buf, starts[:, 4], 3)
    d, isdig = _digits(m)
    status = d[:, 0] * 100 + d[:, 1] * 10 + d[:, 2]
    ok &= (lens[:, 4] == 3) & isdig.all(axis=1) & (status >= 100) & (status <= 599)

    # DURATION: [0-9]+(\.[0-9]+)? with at most 15 digits, so N / 10**f is correctly rounded.
    dlen = lens[:, 5]
    width = min(int(dlen.max()), _DURATION_WIDTH)
    m, inside = _gather_token(buf, starts[:, 5], np.minimum(dlen, width), width)
    d, isdig = _digits(m)
    isdig &= inside
    isdot = (m == _DOT) & inside
    ndots = isdot.sum(axis=1)
    ok &= (dlen <= width) & ((isdig | isdot) == inside).all(axis=1) & (ndots <= 1)
    dot_pos = np.where(ndots == 1, isdot.argmax(axis=1), dlen)
    ok &= (ndots == 0) | ((dot_pos > 0) & (dot_pos < dlen - 1))
    ndigits = isdig.sum(axis=1)
    ok &= ndigits <= _MAX_EXACT_DIGITS
    mantissa = np.zeros(n, dtype=np.int64)
    for col in range(width):
        use = isdig[:, col]
        mantissa = np.where(use, mantissa * 10 + d[:, col], mantissa)
    frac_digits = np.where(ndots == 1, dlen - dot_pos - 1, 0)
    duration = mantissa / _POW10[np.clip(frac_digits, 0, width)]

    return _FastFields(ok=ok, day=day, second=second, status=status, duration=duration)


def _days_from_civil(year: np.ndarray, month: np.ndarray, dom: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of proleptic Gregorian dates (H. Hinnant's algorithm)."""
    y = year - (month <= 2)
    era = y // 400
    yoe = y - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5 + dom - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_HASH_MULT = np.uint64(0x9E3779B97F4A7C15)


def _fast_columns(
    data: bytes,
    padded: np.ndarray,
    fast: _FastFields,
    fast_lines: np.ndarray,
    tok_start: np.ndarray,
    tok_end: np.ndarray,
    first_token: np.ndarray,
) -> ParsedChunk:
    """Columns for the lines the fast path accepted, with customers made distinct."""
    ok = fast.ok
    n = len(fast_lines)
    if n == 0:
        return empty_chunk()
    cust_tok = first_token[fast_lines] + 2
    c_start = tok_start[cust_tok]
    c_len = tok_end[cust_tok] - c_start
    customers, customer = _distinct_customers(data, padded, c_start, c_len)
    return ParsedChunk(
        customers=customers,
        customer=customer,
        day=fast.day[ok].astype(np.int32),
        second=fast.second[ok].astype(np.int64),
        status=fast.status[ok].astype(np.int16),
        duration=fast.duration[ok].astype(np.float64),
    )


def _distinct_customers(
    data: bytes, padded: np.ndarray, start: np.ndarray, length: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """Distinct customer ids and each line's index into them.

    Ids are grouped by a 64-bit hash of their bytes, then every line is compared byte for
    byte with its group's representative, so a hash collision can never merge two customers.
    """
    width = int(-(-int(length.max()) // 8) * 8)
    m, _ = _gather_token(padded, start, length, width)
    m = np.ascontiguousarray(m, dtype=np.uint8)
    words = m.view(np.uint64)
    h = length.astype(np.uint64) * _HASH_MULT
    for col in range(words.shape[1]):
        h = (h ^ words[:, col]) * _HASH_MULT
        h ^= h >> np.uint64(29)
    _, first, inverse = np.unique(h, return_index=True, return_inverse=True)
    rep = first[inverse]
    if not ((words == words[rep]).all() and (length == length[rep]).all()):
        # A collision: fall back to exact grouping on the raw bytes.
        keyed = np.concatenate([m, length.astype(np.uint8)[:, None]], axis=1)
        keys = np.ascontiguousarray(keyed).view(np.dtype((np.void, keyed.shape[1]))).ravel()
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    customers = [
        data[s : s + ln].decode("ascii")
        for s, ln in zip(start[first].tolist(), length[first].tolist(), strict=True)
    ]
    return customers, inverse.astype(np.int32).ravel()


def _append_requests(chunk: ParsedChunk, requests: list[Request]) -> ParsedChunk:
    index = {c: i for i, c in enumerate(chunk.customers)}
    customers = list(chunk.customers)
    extra = np.empty(len(requests), dtype=np.int32)
    for i, r in enumerate(requests):
        j = index.get(r.customer_id)
        if j is None:
            j = index[r.customer_id] = len(customers)
            customers.append(r.customer_id)
        extra[i] = j
    return ParsedChunk(
        customers=customers,
        customer=np.concatenate([chunk.customer, extra]),
        day=np.concatenate([chunk.day, np.array([r.day for r in requests], np.int32)]),
        second=np.concatenate([chunk.second, np.array([r.second for r in requests], np.int64)]),
        status=np.concatenate([chunk.status, np.array([r.status for r in requests], np.int16)]),
        duration=np.concatenate(
            [chunk.duration, np.array([r.duration for r in requests], np.float64)]
        ),
    )


def apply_time_rules(
    chunk: ParsedChunk, now: float, newest_day: int, retention_days: int
) -> tuple[ParsedChunk, int]:
    """Reject `future` and `expired` requests; return the kept ones and the newest day seen.

    Each line is judged against the newest day seen before it: `newest_day` (known before
    this chunk) and the days of the chunk's earlier lines. This is what a line-by-line
    reader would do, so the outcome does not depend on how the stream was cut into chunks.
    A kept line whose day a later line pushes out of retention is dropped with its day.
    """
    rejected = chunk.rejected
    future = chunk.second > int(now) + SECONDS_PER_DAY
    n_future = int(np.count_nonzero(future))
    if n_future:
        rejected["future"] += n_future
        chunk = chunk.take(~future)
        chunk.rejected = rejected
    if not len(chunk):
        return chunk, newest_day
    # NO_DAY is int64's minimum; clamp so "newest - retention" cannot wrap around.
    known = max(newest_day, _DAY_FLOOR)
    running = np.maximum.accumulate(chunk.day.astype(np.int64))
    newest_before = np.empty_like(running)
    newest_before[0] = known
    np.maximum(running[:-1], known, out=newest_before[1:])
    expired = chunk.day < newest_before - retention_days
    n_expired = int(np.count_nonzero(expired))
    if n_expired:
        rejected["expired"] += n_expired
        chunk = chunk.take(~expired)
        chunk.rejected = rejected
    return chunk, max(newest_day, int(running[-1]))


_DAY_FLOOR = -(2**40)
