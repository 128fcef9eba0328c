#!/usr/bin/env python3
"""Write realistic API request logs: `python tools/generator.py api_requests.log 10000`.

Lines look like `2024-09-03 12:00:01 cust_1 /api/v1/resource1 200 0.316`: timestamps random
over the last `--days` days (UTC), customers cust_1..cust_N, paths /api/v1/resource1..4,
statuses 200 201 400 401 403 404 500, durations in seconds with 3 decimals. Vectorised with
numpy, so a million lines take a second or two.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

import numpy as np

STATUSES = np.array([200, 201, 400, 401, 403, 404, 500])
PATHS = [f"/api/v1/resource{i}" for i in range(1, 5)]
BAD_LINES = [
    "2024-13-01 12:00:00 cust_1 /api/v1/resource1 200 0.100",  # month 13
    "2024-09-03 25:00:00 cust_1 /api/v1/resource1 200 0.100",  # hour 25
    "2024-09-03 12:00:00 cust_1 /api/v1/resource1 200",  # a field missing
    "2024-09-03 12:00:00 cust_1 /api/v1/resource1 700 0.100",  # status out of range
    "2024-09-03 12:00:00 cust_1 /api/v1/resource1 200 -1",  # negative duration
    "2024-09-03 12:00:00 cust_1 api/v1/resource1 200 0.100",  # path without '/'
    "garbage",
    '{"timestamp": "2024-09-03T12:00:00Z", "customer_id": "cust_1"}',  # JSON, fields missing
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("output", help="file to write, or - for stdout")
    p.add_argument("lines", type=int, help="number of lines")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--customers", type=int, default=50, help="customers cust_1..cust_N (50)")
    p.add_argument("--days", type=int, default=30, help="timestamps over the last N days (30)")
    p.add_argument(
        "--end-date",
        type=dt.date.fromisoformat,
        default=None,
        help="last day of the range, YYYY-MM-DD (default: now)",
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--latency", choices=("uniform", "lognormal"), default="uniform")
    p.add_argument("--bad-rate", type=float, default=0.0, help="share of malformed lines (0)")
    args = p.parse_args(argv)
    if args.lines < 0 or args.customers < 1 or args.days < 0 or not 0 <= args.bad_rate <= 1:
        p.error("lines >= 0, customers >= 1, days >= 0 and 0 <= bad-rate <= 1")
    return args


def generate(args: argparse.Namespace) -> bytes:
    rng = np.random.default_rng(args.seed)
    n = args.lines
    if args.end_date is None:
        end = int(dt.datetime.now(dt.UTC).timestamp())
    else:
        end = int(dt.datetime.combine(args.end_date, dt.time(23, 59, 59), dt.UTC).timestamp())
    seconds = end - rng.integers(0, args.days * 86400 + 1, n)
    stamps = np.datetime_as_string(seconds.astype("datetime64[s]"), unit="s")
    customers = rng.integers(1, args.customers + 1, n)
    paths = rng.integers(0, len(PATHS), n)
    statuses = STATUSES[rng.integers(0, len(STATUSES), n)]
    if args.latency == "uniform":
        millis = rng.integers(100, 2001, n)
    else:
        millis = np.maximum(1, np.rint(rng.lognormal(np.log(300), 0.6, n))).astype(np.int64)
    durations = [f"{m // 1000}.{m % 1000:03d}" for m in millis.tolist()]

    text = args.format == "text"
    lines = [
        f"{ts[:10]} {ts[11:]} cust_{c} {PATHS[p]} {s} {d}"
        if text
        else f'{{"timestamp": "{ts}Z", "customer_id": "cust_{c}", "request_path": "{PATHS[p]}",'
        f' "status_code": {s}, "duration": {d}}}'
        for ts, c, p, s, d in zip(
            stamps.tolist(),
            customers.tolist(),
            paths.tolist(),
            statuses.tolist(),
            durations,
            strict=True,
        )
    ]
    if args.bad_rate > 0:
        bad = np.flatnonzero(rng.random(n) < args.bad_rate)
        choice = rng.integers(0, len(BAD_LINES), len(bad))
        for i, j in zip(bad.tolist(), choice.tolist(), strict=True):
            lines[i] = BAD_LINES[j]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = generate(args)
    if args.output == "-":
        sys.stdout.buffer.write(data)
    else:
        with open(args.output, "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
