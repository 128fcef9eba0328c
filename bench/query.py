"""Stats query throughput of the real server: random customers and ranges, N connections.

    python bench/query.py [--lines 1000000] [--connections 64] [--seconds 10]

Loads generated data, then runs an aiohttp client from a separate process and prints
requests/s with p50/p99 latency. (wrk gives higher figures, its client costs less CPU.)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from _server import BenchServer, generate


async def hammer(port: int, customers: int, days: list[str], conns: int, seconds: float) -> None:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=conns)

    async def worker(session: aiohttp.ClientSession, rng: random.Random) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            url = (
                f"http://127.0.0.1:{port}/customers/cust_{rng.randint(1, customers)}"
                f"/stats?from={rng.choice(days)}"
            )
            t = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session, random.Random(i)) for i in range(conns)))
        took = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    print(
        f"{len(lat) / took:,.0f} requests/s, p50 {np.percentile(lat, 50):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms, {errors} errors, {conns} connections"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--shards", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    log = Path(tempfile.mkdtemp()) / "bench.log"
    generate(log, args.lines, args.customers, 30)
    server = BenchServer(args.shards)
    try:
        server.load(log)
        today = dt.datetime.now(dt.UTC).date()
        days = [(today - dt.timedelta(days=i)).isoformat() for i in range(31)]
        asyncio.run(hammer(server.http_port, args.customers, days, args.connections, args.seconds))
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
