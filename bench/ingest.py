"""Ingest throughput of the real server, against a naive single-process parser.

    python bench/ingest.py [--lines 2000000] [--customers 1000] [--days 30] [--shards 2]
                           [--wal on|off]

Prints lines/s end to end (command start to the server's summary) for `statsd-server load`
and for one raw TCP connection, the server's RSS per customer-day, and the textbook Python
approach measured in the same run (read lines, split, group in dicts) with the ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from _server import BenchServer, generate

SNAPSHOT_INTERVAL = 5  # the server's default


def raw_connection(port: int, path: Path) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as f:
        sock.sendfile(f)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    return time.perf_counter() - start


def naive(path: Path) -> float:
    """The textbook single-process parser: one Python object per line, dicts per day."""
    start = time.perf_counter()
    days: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0, 0, 0.0, []])
    with open(path) as f:
        for line in f:
            date, _time, customer, _path, status, duration = line.split()
            agg = days[customer, date]
            code, seconds = int(status), float(duration)
            agg[0] += 1
            agg[1] += code < 400
            agg[2] += code >= 500
            agg[3] += seconds
            agg[4].append(seconds)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=2_000_000)
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--shards", type=int, default=os.cpu_count() or 2)
    p.add_argument("--connections", type=int, default=None, help="for load (its default)")
    p.add_argument("--wal", choices=("on", "off"), default="on", help="the write-ahead log")
    args = p.parse_args()
    wal = {"STATS_WAL": "true" if args.wal == "on" else "false"}
    log = Path(tempfile.mkdtemp()) / "bench.log"
    generate(log, args.lines, args.customers, args.days)
    size_mb = log.stat().st_size / 1e6
    customer_days = args.customers * (args.days + 1)
    print(
        f"{args.lines:,} lines ({size_mb:.0f} MB), {args.customers} customers x "
        f"{args.days + 1} days, {args.shards} shards, {os.cpu_count()} CPUs, "
        f"write-ahead log {args.wal}"
    )

    server = BenchServer(args.shards, **wal)
    try:
        empty = server.rss_mb()
        before = server.cpu_seconds()
        took, out = server.load(log, args.connections)
        used = sorted((t - before.get(pid, 0.0) for pid, t in server.cpu_seconds().items()))
        load_rate = args.lines / took
        print(f"statsd-server load: {load_rate:,.0f} lines/s ({took:.2f} s) {out}")
        # The busiest process sets the time: the shards even out their parsing (they hand
        # load pieces to each other), and an uneven split shows here.
        print(
            f"server CPU during the load: {sum(used):.2f} s, the busiest process "
            f"{used[-1]:.2f} s, the next {used[-2] if len(used) > 1 else 0:.2f} s"
        )
        time.sleep(SNAPSHOT_INTERVAL + 1)  # a snapshot, after which shards return freed memory
        loaded = server.rss_mb()
        print(
            f"server RSS: {empty:.0f} MB empty, {loaded:.0f} MB loaded: "
            f"{(loaded - empty) * 1024 / min(customer_days, args.lines):.1f} KB per customer-day"
        )
    finally:
        server.stop()
    server = BenchServer(args.shards, **wal)
    try:
        took = raw_connection(server.tcp_port, log)
        print(f"one raw connection: {args.lines / took:,.0f} lines/s ({took:.2f} s)")
    finally:
        server.stop()
    took = naive(log)
    print(
        f"naive single-process parser: {args.lines / took:,.0f} lines/s ({took:.2f} s); "
        f"load is {load_rate * took / args.lines:.1f}x that"
    )


if __name__ == "__main__":
    sys.exit(main())
