"""Stats queries while lines of today stream in: the case where the fronts' caches cannot help.

    python bench/live.py [--lines 1000000] [--rate 100000] [--connections 64] [--seconds 10]

Loads generated data (1,000 customers x 31 days), then, for the length of a wrk run (random
customers and `from` days, as bench/query.py), streams generated lines of today over one
TCP connection at a steady rate, in tenth-of-a-second slices. Every customer then changes
every few milliseconds, so nearly every query is a miss that its shard answers anew, with
today's day sketched once it passes k requests. Prints the queries' requests/s, p50/p99
and errors, the share answered from the fronts' caches, and the lines the stream sent and
the server accepted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from _server import BenchServer, generate
from query import hit_share, query_counts, wrk


def stream(
    port: int, lines: list[bytes], rate: int, stop: threading.Event, out: dict[str, object]
) -> None:
    """Send `rate` lines a second until `stop`, then half-close and read the summary."""
    step = max(1, rate // 10)
    sent = late = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        start = time.perf_counter()
        while not stop.is_set() and sent + step <= len(lines):
            sock.sendall(b"".join(lines[sent : sent + step]))
            sent += step
            wait = start + sent / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            else:
                late += 1
        took = time.perf_counter() - start
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline()
    out.update(sent=sent, seconds=took, late_slices=late, summary=json.loads(reply))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--rate", type=int, default=100_000, help="lines of today a second")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--shards", type=int, default=os.cpu_count() or 2)
    p.add_argument("--fronts", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench/live.py needs wrk (Debian package `wrk`)")
    folder = Path(tempfile.mkdtemp())
    generate(folder / "load.log", args.lines, args.customers, 30)
    today = dt.datetime.now(dt.UTC).date()
    live_lines = int(args.rate * (args.seconds + 5))
    generate(folder / "live.log", live_lines, args.customers, 1, "--end-date", today.isoformat())
    lines = (folder / "live.log").read_bytes().splitlines(keepends=True)
    first_day = (today - dt.timedelta(days=30)).isoformat()
    print(
        f"{args.lines:,} lines loaded, {args.customers} customers x 31 days; then lines of "
        f"today at {args.rate:,}/s on one TCP connection during {args.seconds:g} s of wrk -t2, "
        f"{args.connections} connections; {args.shards} shards, {args.fronts} fronts"
    )
    server = BenchServer(args.shards, STATS_FRONTS=str(args.fronts))
    try:
        server.load(folder / "load.log")
        stop, fed = threading.Event(), {}
        feeder = threading.Thread(
            target=stream, args=(server.tcp_port, lines, args.rate, stop, fed)
        )
        before = query_counts(server.http_port)
        feeder.start()
        try:
            time.sleep(1)  # today's days fill up (and pass k for the busier customers)
            text, _ = wrk(
                server.http_port, args.customers, first_day, args.connections, args.seconds
            )
            share = hit_share(before, query_counts(server.http_port))
        finally:
            stop.set()
            feeder.join()
    finally:
        server.stop()
    print(f"stats while lines stream in: {text}; {share}")
    if "summary" not in fed:
        sys.exit("the line stream ended without its summary (see the error above)")
    summary = fed["summary"]
    print(
        f"stream: {fed['sent']:,} lines in {fed['seconds']:.1f} s "
        f"({fed['sent'] / fed['seconds']:,.0f}/s, {fed['late_slices']} slices late), "
        f"accepted {summary['accepted']:,}, rejected {summary['rejected']:,}"
    )


if __name__ == "__main__":
    sys.exit(main())
