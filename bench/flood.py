"""Server memory under a flood of distinct customer ids, with and without STATS_MAX_CUSTOMERS.

    python bench/flood.py [--ids 1000000] [--cap 100000] [--shards 2]

Sends one line for each of --ids new customer ids (today's date) over `statsd-server load`,
then prints the server's RSS and what the summary accepted and refused, once with no cap
(STATS_MAX_CUSTOMERS=0) and once with --cap.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _server import BenchServer


def write_flood(path: Path, ids: int) -> None:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    with open(path, "w") as f:
        for start in range(0, ids, 100_000):
            f.write(
                "".join(
                    f"{today} 00:00:01 flood_{i:09d} /v1/x 200 0.123\n"
                    for i in range(start, min(ids, start + 100_000))
                )
            )


def run(log: Path, shards: int, cap: int) -> None:
    server = BenchServer(shards, STATS_MAX_CUSTOMERS=str(cap))
    try:
        empty = server.rss_mb()
        took, out = server.load(log)
        time.sleep(6)  # a snapshot, after which shards return freed memory
        loaded = server.rss_mb()
        summary = json.loads(out)
        print(
            f"cap {cap or 'none':>9}: RSS {empty:.0f} MB empty -> {loaded:.0f} MB; "
            f"accepted {summary['accepted']:,}, refused "
            f"{summary['rejected_by_reason'].get('customer_limit', 0):,} ({took:.1f} s)"
        )
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ids", type=int, default=1_000_000)
    p.add_argument("--cap", type=int, default=100_000)
    p.add_argument("--shards", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    log = Path(tempfile.mkdtemp()) / "flood.log"
    write_flood(log, args.ids)
    print(f"{args.ids:,} distinct customer ids, one line each, {args.shards} shards")
    run(log, args.shards, 0)
    run(log, args.shards, args.cap)


if __name__ == "__main__":
    sys.exit(main())
