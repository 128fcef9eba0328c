"""The real server, end to end: subprocess, real sockets, real SQLite, expectations computed here.

Records are generated in the test first and rendered as lines afterwards, so the expected
statistics never depend on the server's parser.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import re
import signal
import subprocess
import sys
import urllib.parse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from statsd_server.summary import PIECE_HEADER
from tests.conftest import ROOT, Server
from tests.statsd_server.test_durability import lines_for, totals
from tests.statsd_server.test_observability import scrape, total

CUSTOMERS = [
    "cust_1",
    "cust_2",
    "a",
    "550e8400-e29b-41d4-a716-446655440000",
    "acme-corp.eu",
    "kunde_müller",
    "tenant:7/prod",
    "x" * 128,
    "ü" * 64,
    "user@example.com",
    "100%off",
    "a+b",
    "rocket_🚀",
    "q?x=1",
    "hash#1",
    "Ωmega",
]
STATUSES = [100, 200, 201, 204, 301, 304, 400, 401, 403, 404, 429, 500, 502, 503]
TODAY = dt.datetime.now(dt.UTC).date()
DAYS = [TODAY - dt.timedelta(days=i) for i in range(1, 11)]  # the ten days before today
BUSY = ("cust_1", DAYS[3], 30_000)  # one customer-day far above k


@dataclass(frozen=True)
class Rec:
    customer: str
    second: int  # UTC epoch seconds
    status: int
    duration: str  # as written in the line

    @property
    def date(self) -> str:
        return dt.datetime.fromtimestamp(self.second, dt.UTC).date().isoformat()


def make_records(rng: random.Random) -> list[Rec]:
    recs = []
    for customer in CUSTOMERS:
        for day in rng.sample(DAYS, 6):
            base = int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp())
            for _ in range(rng.randint(1, 60)):
                duration = rng.choice(
                    [
                        f"{rng.randint(0, 3)}.{rng.randint(0, 999):03d}",
                        str(rng.randint(0, 5)),
                        f"0.{rng.randint(0, 10**9):09d}",
                    ]
                )
                recs.append(
                    Rec(customer, base + rng.randint(0, 86399), rng.choice(STATUSES), duration)
                )
    customer, day, n = BUSY
    base = int(dt.datetime.combine(day, dt.time(), dt.UTC).timestamp())
    np_rng = np.random.default_rng(5)
    millis = np.maximum(1, np.rint(np_rng.lognormal(np.log(250), 0.7, n))).astype(int)
    statuses = np_rng.choice(STATUSES, n)
    for ms, st, sec in zip(
        millis.tolist(), statuses.tolist(), np_rng.integers(0, 86400, n).tolist(), strict=True
    ):
        recs.append(Rec(customer, base + sec, st, f"{ms // 1000}.{ms % 1000:03d}"))
    rng.shuffle(recs)
    return recs


def render(rec: Rec, rng: random.Random) -> str:
    """A text line with random separators, or a JSON line in some UTC offset."""
    if rng.random() < 0.2:
        offset = rng.choice([0, 60, -300, 330, 840])
        local = dt.datetime.fromtimestamp(rec.second, dt.timezone(dt.timedelta(minutes=offset)))
        ts = local.isoformat() if offset else local.strftime("%Y-%m-%dT%H:%M:%SZ")
        dur = float(rec.duration)
        return (
            f'{{"customer_id": "{rec.customer}", "request_path": "/v1/x", "timestamp": "{ts}",'
            f' "status_code": {rec.status}, "duration": {dur!r}, "region": "eu"}}'
        )
    when = dt.datetime.fromtimestamp(rec.second, dt.UTC)
    sep = lambda: rng.choice([" ", "  ", "\t", " \t "])  # noqa: E731
    frac = rng.choice(["", ".25", ".000001"])
    line = sep().join(
        [
            when.strftime("%Y-%m-%d"),
            when.strftime("%H:%M:%S") + frac,
            rec.customer,
            "/api/v1/resource1",
            str(rec.status),
            rec.duration,
        ]
    )
    return rng.choice(["", " ", "\t"]) + line + rng.choice(["", "", " ", "\r"])


BAD_LINES = [
    ("2024-13-40 12:00:00 cust_1 /a 200 0.1", "date"),
    (f"{DAYS[0]} 12:61:00 cust_1 /a 200 0.1", "time"),
    (f"{DAYS[0]} 12:00:00 cust_1 /a 200", "fields"),
    (f"{DAYS[0]} 12:00:00 {'y' * 129} /a 200 0.1", "customer_id"),
    (f"{DAYS[0]} 12:00:00 cust_1 a 200 0.1", "path"),
    (f"{DAYS[0]} 12:00:00 cust_1 /a 600 0.1", "status"),
    (f"{DAYS[0]} 12:00:00 cust_1 /a 200 1e3", "duration"),
    (
        '{"timestamp": "nope", "customer_id": "c", "request_path": "/a", "status_code": 200, "duration": 1}',
        "timestamp",
    ),
    ('{"timestamp": "2024-09-03T12:00:00Z"', "json"),
    ("x" * 5000, "too_long"),
]


EMPTY_SUMMARY = {
    "quantile_error": {},
    "total_requests": 0,
    "successful_requests": 0,
    "failed_requests": 0,
    "client_errors": 0,
    "server_errors": 0,
    "uptime_pct": None,
    "avg_latency_ms": None,
    "median_latency_ms": None,
    "p99_latency_ms": None,
}


def expected_stats(recs: list[Rec]) -> dict[str, Any]:
    """Counters and exact figures of a set of records, computed with numpy."""
    statuses = np.array([r.status for r in recs])
    durations = np.array([float(r.duration) for r in recs])
    n = len(recs)
    server = int(np.sum(statuses >= 500))
    ordered = np.sort(durations)
    return {
        "total_requests": n,
        "successful_requests": int(np.sum(statuses < 400)),
        "failed_requests": int(np.sum(statuses >= 400)),
        "client_errors": int(np.sum((statuses >= 400) & (statuses < 500))),
        "server_errors": server,
        "uptime_pct": round(100 * (n - server) / n, 3),
        "avg_latency_ms": durations.mean() * 1000,
        "median": ordered[max(1, math.ceil(0.5 * n)) - 1] * 1000,
        "p99": ordered[max(1, math.ceil(0.99 * n)) - 1] * 1000,
        "ordered": ordered,
    }


def check(got: dict[str, Any], recs: list[Rec]) -> None:
    """A day or summary from the server matches the records: exact, or within rank error."""
    if not recs:
        assert got == EMPTY_SUMMARY
        return
    exp = expected_stats(recs)
    for key in (
        "total_requests",
        "successful_requests",
        "failed_requests",
        "client_errors",
        "server_errors",
        "uptime_pct",
    ):
        assert got[key] == exp[key], key
    assert got["avg_latency_ms"] == pytest.approx(exp["avg_latency_ms"], abs=5.01e-4)
    for q, key in ((0.5, "median_latency_ms"), (0.99, "p99_latency_ms")):
        exact = exp["median" if q == 0.5 else "p99"]
        bound = got["quantile_error"]["p50" if q == 0.5 else "p99"]
        if len(recs) <= 200:
            assert bound == 0
        if bound == 0:
            assert got[key] == pytest.approx(exact, abs=5.01e-4), key
        else:
            error = abs(got[key] - exact) / exact
            assert error < 0.01 and within_stated_bound(error, bound), (key, error, bound)


def within_stated_bound(error: float, bound: float) -> bool:
    """The stated bound is a ~99.7% statement about randomised sketches (their compaction cannot
    be seeded from Python); a factor of 2 fails only when a bound is clearly wrong, not in
    one run out of a few hundred."""
    return error <= 2 * bound + 1e-6


def stats_path(customer: str, first: str, last: str | None = None) -> str:
    path = f"/customers/{urllib.parse.quote(customer, safe='')}/stats?from={first}"
    return path + (f"&to={last}" if last else "")


@pytest.mark.slow
def test_end_to_end_ingest_query_restart(server_factory: Any) -> None:
    """TCP and HTTP ingest, every customer's stats, identical after SIGTERM and a restart."""
    rng = random.Random(42)
    recs = make_records(rng)
    http_part, tcp_part = recs[:3000], recs[3000:]
    server: Server = server_factory(shards=2)

    lines = [render(r, rng) for r in tcp_part]
    for bad, _ in BAD_LINES:
        lines.insert(rng.randrange(len(lines)), bad)
    lines.insert(rng.randrange(len(lines)), "")
    lines.insert(rng.randrange(len(lines)), "   \t ")
    summary = server.send_tcp(("\n".join(lines) + "\n").encode())
    reasons: dict[str, int] = defaultdict(int)
    for _, reason in BAD_LINES:
        reasons[reason] += 1
    assert summary == {
        "accepted": len(tcp_part),
        "rejected": len(BAD_LINES),
        "rejected_by_reason": dict(sorted(reasons.items())),
    }

    body = "\n".join(render(r, rng) for r in http_part).encode()
    status, reply = server.request(
        "POST", "/ingest", body, {"Content-Type": "application/x-ndjson"}
    )
    assert (status, reply) == (
        200,
        {"accepted": len(http_part), "rejected": 0, "rejected_by_reason": {}},
    )

    # future and expired lines, against the newest day now known (yesterday)
    newest = DAYS[0]
    late = [
        (f"{TODAY + dt.timedelta(days=3)} 00:00:00 cust_1 /a 200 1", "future"),
        (f"{newest - dt.timedelta(days=31)} 12:00:00 cust_1 /a 200 1", "expired"),
        (f"{newest - dt.timedelta(days=30)} 12:00:00 cust_old /a 200 1.5", None),
    ]
    summary = server.send_tcp("\n".join(line for line, _ in late).encode())
    assert summary == {
        "accepted": 1,
        "rejected": 2,
        "rejected_by_reason": {"expired": 1, "future": 1},
    }
    recs.append(
        Rec(
            "cust_old",
            int(
                dt.datetime.combine(newest - dt.timedelta(days=30), dt.time(12), dt.UTC).timestamp()
            ),
            200,
            "1.5",
        )
    )

    by_customer: dict[str, list[Rec]] = defaultdict(list)
    for r in recs:
        by_customer[r.customer].append(r)
    answers = {}
    mid_from, mid_to = DAYS[7].isoformat(), DAYS[2].isoformat()
    for customer, crecs in by_customer.items():
        for q_from, q_to in (
            ((DAYS[-1] - dt.timedelta(days=40)).isoformat(), None),
            (mid_from, mid_to),
        ):
            path = stats_path(customer, q_from, q_to)
            status, got = server.get(path)
            assert status == 200, got
            answers[path] = got
            assert (got["customer_id"], got["from"], got["to"]) == (customer, q_from, q_to)
            in_range = [r for r in crecs if r.date >= q_from and (q_to is None or r.date <= q_to)]
            per_day: dict[str, list[Rec]] = defaultdict(list)
            for r in in_range:
                per_day[r.date].append(r)
            assert [d["date"] for d in got["days"]] == sorted(per_day)
            for d in got["days"]:
                check(d, per_day[d["date"]])
            check(got["summary"], in_range)
            assert "date" not in got["summary"]

    # a known customer with no days in range
    status, got = server.get(stats_path("cust_2", TODAY.isoformat()))
    assert status == 200 and got["days"] == []
    assert got["summary"] == EMPTY_SUMMARY
    assert len(answers) == 2 * len(by_customer)

    assert server.stop(signal.SIGTERM) == 0
    restarted: Server = server_factory(shards=3)
    for path, before in answers.items():
        assert restarted.get(path) == (200, before), path


@pytest.mark.slow
def test_errors_are_json_with_the_right_codes(server_factory: Any) -> None:
    """Bad parameters are 400, unknown customers 404, other mistakes their HTTP code, all JSON."""
    server: Server = server_factory(shards=2)
    day = DAYS[0].isoformat()
    server.send_tcp(f"{day} 12:00:00 known /a 200 0.5\n".encode())
    cases = [
        (stats_path("known", day), 200),
        ("/customers/known/stats", 400),
        ("/customers/known/stats?from=", 400),
        ("/customers/known/stats?from=2024-13-01", 400),
        ("/customers/known/stats?from=yesterday", 400),
        ("/customers/known/stats?from=2024-02-30", 400),
        (stats_path("known", day, "2024-01-01"), 400),
        (f"/customers/known/stats?from={day}&to=soon", 400),
        (f"/customers/known/stats?from={day}&to=", 400),
        (stats_path("unknown", day), 404),
        (stats_path("a b", day), 400),
        (stats_path("x" * 129, day), 400),
        ("/customers//stats?from=2024-01-01", 404),
        ("/nothing/here", 404),
    ]
    for path, code in cases:
        status, body = server.get(path)
        assert status == code, (path, body)
        if code != 200:
            assert isinstance(body["error"], str) and body["error"], path
    status, body = server.request("DELETE", stats_path("known", day))
    assert status == 405 and "error" in body
    status, body = server.request("POST", "/ingest", b"x", {"Content-Type": "application/json"})
    assert status == 415 and "text/plain" in body["error"]
    assert server.get("/health") == (200, {"status": "ok"})
    assert server.get("/ready") == (200, {"status": "ready", "shards": 2})


GENERATED = re.compile(
    r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01]) ([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9] (cust_[0-9]+)"
    r" /api/v1/resource[1-4] (200|201|400|401|403|404|500) [0-9]\.[0-9]{3}"
)


@pytest.mark.slow
def test_load_command_sums_parallel_connections(server_factory: Any, tmp_path: Path) -> None:
    """`statsd-server load` of several files over several connections prints one summed
    summary line; a file given twice is counted once (its pieces are already loaded)."""
    logs = [tmp_path / "gen9.log", tmp_path / "gen10.log"]
    for seed, log in zip((9, 10), logs, strict=True):
        subprocess.run(
            [
                *(sys.executable, str(ROOT / "tools" / "generator.py"), str(log), "20000"),
                *("--bad-rate", "0.01", "--seed", str(seed)),
            ],
            check=True,
        )
    lines = [line for log in logs for line in log.read_text().splitlines()]
    good = [m for m in map(GENERATED.fullmatch, lines) if m]
    first_good = sum(1 for line in logs[0].read_text().splitlines() if GENERATED.fullmatch(line))
    server: Server = server_factory(shards=2)
    out = subprocess.run(
        [
            *(sys.executable, "-m", "statsd_server", "load", str(logs[0]), str(logs[1])),
            *(str(logs[0]), "--tcp-port", str(server.tcp_port), "--connections", "3"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.count("\n") == 1
    summary = json.loads(out)
    first_bad = len(logs[0].read_text().splitlines()) - first_good
    assert summary["accepted"] == len(good)
    assert summary["already_loaded"] == first_good
    # Rejections describe what was sent in this run, the repeated file's included.
    assert summary["rejected"] == len(lines) - len(good) + first_bad > first_bad
    status, got = server.get(stats_path("cust_7", "2000-01-01"))
    assert status == 200
    assert got["summary"]["total_requests"] == sum(m[4] == "cust_7" for m in good)


@pytest.mark.slow
def test_load_pieces_are_parsed_evenly_by_the_shards(server_factory: Any) -> None:
    """A shard parses every other load piece it receives and hands the rest, whole, to the
    other shard: 16 pieces of equal size are parsed 8 and 8 however the kernel spreads their
    connections (at least 7 handed over), and every request counts once."""
    server: Server = server_factory(shards=2)
    customers = [f"piece_{i:02d}" for i in range(16)]
    bodies = [lines_for(customer, 300) for customer in customers]
    size = len(bodies[0])
    assert all(len(body) == size for body in bodies)
    for i, body in enumerate(bodies):
        answer = server.send_tcp(PIECE_HEADER + f"even{i}:0 {size}\n".encode() + body)
        assert answer == {
            "accepted": 300,
            "rejected": 0,
            "rejected_by_reason": {},
            "already_loaded": 0,
        }
    samples = scrape(server)
    parsed = [total(samples, "statsd_ingest_bytes_parsed_total", process=p) for p in "01"]
    assert parsed == [8 * size, 8 * size]
    assert total(samples, "statsd_load_pieces_handed_total") >= 7
    assert totals(server, customers) == dict.fromkeys(customers, 300)


@pytest.mark.slow
def test_extra_quantiles_and_their_validation(server_factory: Any) -> None:
    """?quantiles= adds values (within 1%, inside their stated bound) to every day and the summary."""
    server: Server = server_factory(shards=2)
    day = DAYS[1].isoformat()
    rng = np.random.default_rng(8)
    millis = np.maximum(1, np.rint(rng.lognormal(np.log(200), 0.9, 50_000))).astype(int)
    lines = "".join(f"{day} 10:00:00 busy /a 200 {m / 1000:.3f}\n" for m in millis.tolist())
    assert server.send_tcp(lines.encode())["accepted"] == len(millis)
    server.send_tcp(f"{DAYS[2]} 10:00:00 busy /a 200 0.5\n".encode())
    status, got = server.get(stats_path("busy", DAYS[2].isoformat()) + "&quantiles=0.9,0.999,0.1")
    assert status == 200
    durations = np.sort(millis / 1000)
    everything = np.sort(np.append(durations, 0.5))
    small, big = got["days"]
    assert small["quantiles_ms"] == {"p90": 500.0, "p99.9": 500.0, "p10": 500.0}
    assert small["quantile_error"] == {"p50": 0.0, "p99": 0.0, "p90": 0.0, "p99.9": 0.0, "p10": 0.0}
    for stats, values in ((big, durations), (got["summary"], everything)):
        for q, name in ((0.9, "p90"), (0.999, "p99.9"), (0.1, "p10")):
            exact = values[math.ceil(q * len(values)) - 1] * 1000
            error = abs(stats["quantiles_ms"][name] - exact) / exact
            bound = stats["quantile_error"][name]
            assert within_stated_bound(error, bound), (name, error, bound)
            if q >= 0.5:  # the median and above come from REQ: within 1%
                assert error < 0.01, (name, error)
    for bad in ("0", "1", "1.5", "-0.1", "abc", "nan", "0.5,", ",".join(["0.5"] * 11), "1e-3"):
        status, body = server.get(stats_path("busy", day) + f"&quantiles={bad}")
        assert status == 400 and "quantile" in body["error"], bad


@pytest.mark.slow
def test_snapshot_written_before_req_loads(server_factory: Any, tmp_path: Path) -> None:
    """A stats.db whose rows hold KLL alone (the format before REQ) is served after start."""
    import sqlite3

    from datasketches import kll_doubles_sketch

    from statsd_server.routing import customer_key

    data = tmp_path / "data"
    data.mkdir()
    day = (DAYS[0] - dt.date(1970, 1, 1)).days
    values = np.array([0.1, 0.2, 0.3, 0.4])
    kll = kll_doubles_sketch(200)
    kll.update(values)
    db = sqlite3.connect(data / "stats.db")
    db.execute(
        "CREATE TABLE days (customer_id TEXT, day INTEGER, customer_key INTEGER, total INTEGER,"
        " successful INTEGER, client_errors INTEGER, server_errors INTEGER, duration_sum FLOAT,"
        " sketch_kind TEXT, sketch BLOB, PRIMARY KEY (customer_id, day))"
    )
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER)")
    db.execute(
        "INSERT INTO days VALUES (?, ?, ?, 4, 3, 0, 1, 1.0, 'kll_doubles', ?)",
        ("old_cust", day, customer_key("old_cust"), bytes(kll.serialize())),
    )
    db.execute("INSERT INTO meta VALUES ('newest_day', ?)", (day,))
    db.commit()
    db.close()
    server: Server = server_factory(shards=2)
    status, got = server.get(stats_path("old_cust", DAYS[0].isoformat()))
    assert status == 200
    assert got["summary"]["total_requests"] == 4 and got["summary"]["server_errors"] == 1
    assert got["summary"]["median_latency_ms"] == 200.0
    assert got["summary"]["p99_latency_ms"] == 400.0
