"""The line grammar: a table of valid and invalid lines, both formats, both parser paths."""

from __future__ import annotations

import datetime as dt
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from statsd_server.framing import LineFramer
from statsd_server.line_rules import parse_line
from statsd_server.parse import apply_time_rules, parse_chunk

EPOCH = dt.date(1970, 1, 1)


def day(iso: str) -> int:
    return (dt.date.fromisoformat(iso) - EPOCH).days


# (line, expected): expected is a reason, None for a blank line, or
# (customer_id, date, status, duration).
VALID = [
    (
        "2024-09-03 12:00:01 cust_1 /api/v1/resource1 200 0.316",
        ("cust_1", "2024-09-03", 200, 0.316),
    ),
    ("2024-09-03\t12:00:01\t\tcust_1  /a   500\t12", ("cust_1", "2024-09-03", 500, 12.0)),
    ("   2024-09-03 12:00:01 cust_1 /a 404 0.5   ", ("cust_1", "2024-09-03", 404, 0.5)),
    ("2024-09-03 12:00:01 cust_1 /a 404 0.5\r", ("cust_1", "2024-09-03", 404, 0.5)),
    ("2024-09-03 23:59:59.999999 c /a 100 0.000123", ("c", "2024-09-03", 100, 0.000123)),
    ("2024-02-29 00:00:00 c /a 599 0", ("c", "2024-02-29", 599, 0.0)),
    ("2000-02-29 00:00:00 c /a 301 0", ("c", "2000-02-29", 301, 0.0)),
    (
        "2024-09-03 12:00:01 550e8400-e29b-41d4-a716-446655440000 / 201 1.0",
        ("550e8400-e29b-41d4-a716-446655440000", "2024-09-03", 201, 1.0),
    ),
    ("2024-09-03 12:00:01 acme-corp.eu /x?y=1 200 1", ("acme-corp.eu", "2024-09-03", 200, 1.0)),
    ("2024-09-03 12:00:01 kunde_müller /x 200 1", ("kunde_müller", "2024-09-03", 200, 1.0)),
    ("2024-09-03 12:00:01 tenant:7/prod /x 200 1", ("tenant:7/prod", "2024-09-03", 200, 1.0)),
    ("2024-09-03 12:00:01 " + "x" * 128 + " /x 200 1", ("x" * 128, "2024-09-03", 200, 1.0)),
    ("2024-09-03 12:00:01 " + "ü" * 64 + " /x 200 1", ("ü" * 64, "2024-09-03", 200, 1.0)),
    (
        "2024-09-03 12:00:01 c /x 200 123456789012.123456789",
        ("c", "2024-09-03", 200, 123456789012.123456789),
    ),
    ("2024-09-03 12:00:01 c /x 200 0.1000000000000000000001", ("c", "2024-09-03", 200, 0.1)),
    (
        '{"timestamp": "2024-09-03T12:00:01Z", "customer_id": "cust_1", "request_path": "/a",'
        ' "status_code": 200, "duration": 0.316}',
        ("cust_1", "2024-09-03", 200, 0.316),
    ),
    (
        '{"timestamp": "2024-09-03T23:30:00-02:00", "customer_id": "c", "request_path": "/a",'
        ' "status_code": 503, "duration": 2, "extra": [1, {"x": null}]}',
        ("c", "2024-09-04", 503, 2.0),
    ),
    (
        '  {"timestamp": "2024-09-03T00:30:00+02:00", "customer_id": "kunde_müller",'
        ' "request_path": "/a", "status_code": 100, "duration": 0}',
        ("kunde_müller", "2024-09-02", 100, 0.0),
    ),
    (
        '{"timestamp": "2024-09-03T12:00:01.5", "customer_id": "c", "request_path": "/a",'
        ' "status_code": 200, "duration": 1e-3}',
        ("c", "2024-09-03", 200, 0.001),
    ),
]

J = '{"timestamp": %s, "customer_id": %s, "request_path": %s, "status_code": %s, "duration": %s}'
GOOD = ('"2024-09-03T12:00:01Z"', '"c"', '"/a"', "200", "0.5")


def json_line(**override: str) -> str:
    values = dict(
        zip(
            ("timestamp", "customer_id", "request_path", "status_code", "duration"),
            GOOD,
            strict=True,
        )
    )
    values.update(override)
    return J % tuple(values.values())


INVALID = [
    ("2024-09-03 12:00:01 c /a 200", "fields"),
    ("2024-09-03 12:00:01 c /a 200 0.5 extra", "fields"),
    ("garbage", "fields"),
    ("2024-09-03T12:00:01 c /a 200 0.5", "fields"),
    ("2024-09-03\u00a012:00:01 c /a 200 0.5", "fields"),
    ("2024-13-03 12:00:01 c /a 200 0.5", "date"),
    ("2023-02-29 12:00:01 c /a 200 0.5", "date"),
    ("1900-02-29 12:00:01 c /a 200 0.5", "date"),
    ("2024-04-31 12:00:01 c /a 200 0.5", "date"),
    ("0000-01-01 12:00:01 c /a 200 0.5", "date"),
    ("2024-9-03 12:00:01 c /a 200 0.5", "date"),
    ("2024/09/03 12:00:01 c /a 200 0.5", "date"),
    ("２０２４-09-03 12:00:01 c /a 200 0.5", "date"),
    ("2024-09-03 24:00:00 c /a 200 0.5", "time"),
    ("2024-09-03 12:60:00 c /a 200 0.5", "time"),
    ("2024-09-03 12:00:60 c /a 200 0.5", "time"),
    ("2024-09-03 12:00 c /a 200 0.5", "time"),
    ("2024-09-03 12:00:01. c /a 200 0.5", "time"),
    ("2024-09-03 12:00:01.5Z c /a 200 0.5", "time"),
    ("2024-09-03 1:00:01 c /a 200 0.5", "time"),
    ("2024-09-03 12:00:01 " + "x" * 129 + " /a 200 0.5", "customer_id"),
    ("2024-09-03 12:00:01 " + "ü" * 65 + " /a 200 0.5", "customer_id"),
    ("2024-09-03 12:00:01 c\x00d /a 200 0.5", "customer_id"),
    ("2024-09-03 12:00:01 c\x0bd /a 200 0.5", "customer_id"),
    ("2024-09-03 12:00:01 c\u2003d /a 200 0.5", "customer_id"),
    ("2024-09-03 12:00:01 c a/b 200 0.5", "path"),
    ("2024-09-03 12:00:01 c /a\x7f 200 0.5", "path"),
    ("2024-09-03 12:00:01 c /a 99 0.5", "status"),
    ("2024-09-03 12:00:01 c /a 600 0.5", "status"),
    ("2024-09-03 12:00:01 c /a 2000 0.5", "status"),
    ("2024-09-03 12:00:01 c /a 20x 0.5", "status"),
    ("2024-09-03 12:00:01 c /a 099 0.5", "status"),
    ("2024-09-03 12:00:01 c /a 200 -1", "duration"),
    ("2024-09-03 12:00:01 c /a 200 nan", "duration"),
    ("2024-09-03 12:00:01 c /a 200 inf", "duration"),
    ("2024-09-03 12:00:01 c /a 200 1e3", "duration"),
    ("2024-09-03 12:00:01 c /a 200 0.1.2", "duration"),
    ("2024-09-03 12:00:01 c /a 200 .5", "duration"),
    ("2024-09-03 12:00:01 c /a 200 5.", "duration"),
    ("2024-09-03 12:00:01 c /a 200 +5", "duration"),
    ("2024-09-03 12:00:01 c /a 200 1_000", "duration"),
    ("2024-09-03 12:00:01 c /a 200 ١", "duration"),
    ("2024-09-03 12:00:01 c /a 200 " + "9" * 400, "duration"),
    ("2024-09-03 12:00:01 c /a 200 0.316\r\r", "duration"),
    ("{not json", "json"),
    ('{"timestamp": "2024-09-03T12:00:01Z"} trailing', "json"),
    (json_line()[:-1], "json"),
    ('{"customer_id": "c", "request_path": "/a", "status_code": 200, "duration": 0.5}', "fields"),
    (json_line(duration="null"), "fields"),
    (json_line(customer_id="null"), "fields"),
    (json_line(timestamp='"2024-09-03"'), "timestamp"),
    (json_line(timestamp='"2024-02-30T00:00:00Z"'), "timestamp"),
    (json_line(timestamp="1725364801"), "timestamp"),
    (json_line(timestamp='"0001-01-01T00:30:00+01:00"'), "timestamp"),
    (json_line(customer_id='""'), "customer_id"),
    (json_line(customer_id='"a b"'), "customer_id"),
    (json_line(customer_id="7"), "customer_id"),
    (json_line(customer_id='"' + "x" * 129 + '"'), "customer_id"),
    (json_line(request_path='"a"'), "path"),
    (json_line(status_code="200.0"), "status"),
    (json_line(status_code='"200"'), "status"),
    (json_line(status_code="true"), "status"),
    (json_line(status_code="600"), "status"),
    (json_line(status_code="99999999999999999999999"), "status"),
    (json_line(duration="-0.5"), "duration"),
    (json_line(duration='"0.5"'), "duration"),
    (json_line(duration="1e400"), "duration"),
    (json_line(duration="false"), "duration"),
]


def outcome(chunk_bytes: bytes) -> object:
    """The single outcome of parsing one line through the chunk parser."""
    chunk = parse_chunk(chunk_bytes)
    if len(chunk) == 1:
        d = int(chunk.day[0])
        return (
            chunk.customers[int(chunk.customer[0])],
            (EPOCH + dt.timedelta(days=d)).isoformat(),
            int(chunk.status[0]),
            float(chunk.duration[0]),
        )
    assert len(chunk) == 0
    if not chunk.rejected:
        return None
    (reason,) = chunk.rejected.elements()
    return reason


@pytest.mark.parametrize(("line", "expected"), VALID + INVALID)
def test_each_line_alone(line: str, expected: object) -> None:
    """A line on its own is accepted with these values, or rejected for this reason."""
    assert outcome(line.encode() + b"\n") == expected


def test_whole_table_in_one_chunk_in_random_order() -> None:
    """Bad lines never disturb the good lines around them, whatever the order."""
    rows = (VALID + INVALID) * 3
    random.Random(7).shuffle(rows)
    data = "\n".join(line for line, _ in rows).encode() + b"\n\n   \n\t\r\n"
    chunk = parse_chunk(data)
    expected_valid = sorted(e for _, e in rows if isinstance(e, tuple))
    got = sorted(
        (chunk.customers[c], (EPOCH + dt.timedelta(days=d)).isoformat(), s, u)
        for c, d, s, u in zip(
            chunk.customer.tolist(),
            chunk.day.tolist(),
            chunk.status.tolist(),
            chunk.duration.tolist(),
            strict=True,
        )
    )
    assert got == expected_valid
    reasons: dict[str, int] = {}
    for _, e in rows:
        if isinstance(e, str):
            reasons[e] = reasons.get(e, 0) + 1
    assert dict(chunk.rejected) == reasons


def test_blank_lines_are_neither_accepted_nor_rejected() -> None:
    """Empty and whitespace-only lines are ignored."""
    chunk = parse_chunk(b"\n \n\t\t\n\r\n  \r\n")
    assert len(chunk) == 0 and not chunk.rejected


def test_invalid_utf8_is_rejected_as_encoding() -> None:
    """Bytes that are not UTF-8 are rejected as `encoding`, also in JSON lines."""
    lines = [
        b"2024-09-03 12:00:01 c\xff /a 200 1",
        b"2024-09-03 12:00:01 c /a\xc3 200 1",
        b'{"timestamp": "2024-09-03T12:00:01Z", "customer_id": "\xfe"}',
    ]
    for line in lines:
        assert dict(parse_chunk(line + b"\n").rejected) == {"encoding": 1}


def test_lines_over_4kb_are_too_long() -> None:
    """A line of 4096 bytes is fine, 4097 is rejected; the \\r\\n terminator does not count."""
    base = b"2024-09-03 12:00:01 c /"
    tail = b" 200 1"
    fits = base + b"a" * (4096 - len(base) - len(tail)) + tail
    assert len(fits) == 4096
    assert len(parse_chunk(fits + b"\r\n")) == 1
    too = base + b"a" * (4097 - len(base) - len(tail)) + tail
    assert dict(parse_chunk(too + b"\n").rejected) == {"too_long": 1}
    assert dict(parse_chunk(b" " * 5000 + b"\n").rejected) == {"too_long": 1}


def test_framer_drops_overlong_lines_without_buffering_them() -> None:
    """A 10 MB line arriving in pieces is counted once and never held in memory."""
    framer = LineFramer()
    good = b"2024-09-03 12:00:01 c /a 200 1\n"
    out = framer.feed(good + b"x" * 3000)
    for _ in range(1000):
        out += framer.feed(b"y" * 10_000)
        assert len(framer._partial) <= 4097
    out += framer.feed(b"zz\n" + good + b"2024-09-03")
    out += framer.feed(b" 12:00:01 c /a 200 1")
    out += framer.finish()
    assert framer.too_long == 1
    assert out == good + good + b"2024-09-03 12:00:01 c /a 200 1\n"


def test_future_and_expired_rules() -> None:
    """More than a day ahead of the clock is `future`; older than newest - retention is `expired`."""
    now = dt.datetime(2024, 9, 10, 12, 0, tzinfo=dt.UTC).timestamp()
    lines = [
        "2024-09-11 11:59:59 c /a 200 1",  # within a day ahead: fine, becomes newest
        "2024-09-11 12:00:01 c /a 200 1",  # more than a day ahead
        "2024-08-12 00:00:00 c /a 200 1",  # newest (09-11) - 30 days = 08-12: kept
        "2024-08-11 23:59:59 c /a 200 1",  # one day older: expired
    ]
    chunk = parse_chunk(("\n".join(lines) + "\n").encode())
    kept, newest = apply_time_rules(chunk, now, day("2024-09-01"), 30)
    assert newest == day("2024-09-11")
    assert dict(kept.rejected) == {"future": 1, "expired": 1}
    assert sorted(kept.day.tolist()) == [day("2024-08-12"), day("2024-09-11")]


# -- the vectorised path and the exact path agree ---------------------------------------------

_field_chars = st.sampled_from(list('0123456789-:./ \tabcxyz_{}"éü\x00\r+e'))


@st.composite
def almost_valid_lines(draw: st.DrawFn) -> bytes:
    """Valid lines with random small corruptions, to probe both paths' edges."""
    fields = [
        f"{draw(st.integers(1, 9999)):04d}-{draw(st.integers(0, 13)):02d}-{draw(st.integers(0, 32)):02d}",
        f"{draw(st.integers(0, 25)):02d}:{draw(st.integers(0, 61)):02d}:{draw(st.integers(0, 61)):02d}"
        + draw(st.sampled_from(["", ".5", ".123456789", ".", ".x"])),
        draw(st.text(st.sampled_from(list("abc_-:/.éü")), min_size=1, max_size=130)),
        draw(st.sampled_from(["/", "/a/b", "a", "/ü"])),
        str(draw(st.integers(0, 1000))),
        draw(
            st.sampled_from(
                [
                    "0",
                    "1.5",
                    "0.000123",
                    "12",
                    "1.",
                    ".5",
                    "1e3",
                    "123456789012345",
                    "1234567890123456",
                    "0.1234567890123456789",
                ]
            )
        ),
    ]
    line = draw(st.sampled_from([" ", "\t", "  "])).join(fields)
    if draw(st.booleans()):
        pos = draw(st.integers(0, len(line)))
        line = line[:pos] + draw(_field_chars) + line[pos:]
    return line.encode()


@settings(max_examples=500, deadline=None)
@given(st.lists(almost_valid_lines(), min_size=1, max_size=20))
def test_chunk_parser_matches_line_parser(lines: list[bytes]) -> None:
    """Whatever the vectorised path accepts, the exact path accepts with the same values."""
    chunk = parse_chunk(b"\n".join(lines) + b"\n")
    expected_ok = []
    expected_rejected: dict[str, int] = {}
    for line in lines:
        r = parse_line(line)
        if r is None:
            continue
        if isinstance(r, str):
            expected_rejected[r] = expected_rejected.get(r, 0) + 1
        else:
            expected_ok.append((r.customer_id, r.day, r.second, r.status, r.duration))
    got = [
        (chunk.customers[c], d, s, st_, u)
        for c, d, s, st_, u in zip(
            chunk.customer.tolist(),
            chunk.day.tolist(),
            chunk.second.tolist(),
            chunk.status.tolist(),
            chunk.duration.tolist(),
            strict=True,
        )
    ]
    assert sorted(got) == sorted(expected_ok)
    assert dict(chunk.rejected) == expected_rejected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10**15 - 1), st.integers(0, 15)), min_size=1, max_size=50))
def test_fast_durations_are_correctly_rounded(values: list[tuple[int, int]]) -> None:
    """Durations converted column-wise equal Python's float() of the same text."""
    texts = []
    for mantissa, frac in values:
        s = str(mantissa).rjust(frac + 1, "0")
        texts.append(s[: len(s) - frac] + ("." + s[len(s) - frac :] if frac else ""))
    data = "".join(f"2024-09-03 12:00:01 c{i} /a 200 {t}\n" for i, t in enumerate(texts)).encode()
    chunk = parse_chunk(data)
    got = {
        chunk.customers[c]: u
        for c, u in zip(chunk.customer.tolist(), chunk.duration.tolist(), strict=True)
    }
    assert got == {f"c{i}": float(t) for i, t in enumerate(texts)}


def test_many_customers_hash_grouping_is_exact() -> None:
    """Thousands of similar ids in one chunk map each line to its own id."""
    rng = np.random.default_rng(3)
    ids = [f"cust_{i}" for i in rng.integers(0, 5000, 20000).tolist()]
    chunk = parse_chunk("".join(f"2024-09-03 12:00:01 {c} /a 200 1\n" for c in ids).encode())
    assert [chunk.customers[i] for i in chunk.customer.tolist()] == ids
    assert len(set(chunk.customers)) == len(chunk.customers)


def test_time_rules_do_not_depend_on_chunking() -> None:
    """Cutting the same stream into chunks anywhere gives the same accepted and rejected lines."""
    lines = [
        # JSON lines take the exact path; they keep their place in the stream all the same
        b'{"timestamp": "2024-08-01T00:00:00Z", "customer_id": "a", "request_path": "/x",'
        b' "status_code": 200, "duration": 1}',  # fine at first ...
        b"2024-09-10 00:00:00 b /x 200 1",  # ... then the window moves to 08-11
        b'{"timestamp": "2024-08-05T00:00:00Z", "customer_id": "c", "request_path": "/x",'
        b' "status_code": 200, "duration": 1}',  # expired now
        b"2024-08-20 00:00:00 d /x 200 1",
        b"2024-09-11 00:00:00 e /x 200 1",
        b"2024-08-11 00:00:00 f /x 200 1",  # expired (window starts 08-12)
        b"2024-08-12 00:00:00 g /x 200 1",
    ]
    now = dt.datetime(2024, 9, 11, tzinfo=dt.UTC).timestamp()
    outcomes = set()
    for cut in range(len(lines) + 1):
        for cut2 in range(cut, len(lines) + 1):
            newest, kept, rejected = day("2024-07-20"), [], {}
            for part in (lines[:cut], lines[cut:cut2], lines[cut2:]):
                chunk, newest = apply_time_rules(
                    parse_chunk(b"\n".join(part) + b"\n"), now, newest, 30
                )
                kept += [chunk.customers[i] for i in chunk.customer.tolist()]
                for k, v in chunk.rejected.items():
                    rejected[k] = rejected.get(k, 0) + v
            outcomes.add((tuple(sorted(kept)), tuple(sorted(rejected.items())), newest))
    assert outcomes == {(("a", "b", "d", "e", "g"), (("expired", 2),), day("2024-09-11"))}
