"""Ingest throughput of the real server: `statsd-server load` and one raw TCP connection.

    python bench/ingest.py [--lines 1000000] [--customers 1000] [--days 30] [--shards 2]

Prints lines/s end to end (command start to the server's summary) and the server's RSS.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from _server import BenchServer, generate


def raw_connection(port: int, path: Path) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock, open(path, "rb") as f:
        sock.sendfile(f)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--shards", type=int, default=os.cpu_count() or 2)
    p.add_argument("--connections", type=int, default=None, help="for load (its default)")
    args = p.parse_args()
    log = Path(tempfile.mkdtemp()) / "bench.log"
    generate(log, args.lines, args.customers, args.days)
    size_mb = log.stat().st_size / 1e6
    print(
        f"{args.lines:,} lines ({size_mb:.0f} MB), {args.customers} customers, "
        f"{args.days + 1} days, {args.shards} shards, {os.cpu_count()} CPUs"
    )

    server = BenchServer(args.shards)
    try:
        print(f"RSS at start: {server.rss_mb():.0f} MB")
        took, out = server.load(log, args.connections)
        print(f"statsd-server load: {args.lines / took:,.0f} lines/s ({took:.2f} s) {out}")
        print(f"RSS after load: {server.rss_mb():.0f} MB")
        took = raw_connection(server.tcp_port, log)
        print(f"one raw connection: {args.lines / took:,.0f} lines/s ({took:.2f} s)")
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
