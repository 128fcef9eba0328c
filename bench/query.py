"""Stats query throughput of the real server, against a minimal aiohttp endpoint.

    python bench/query.py [--lines 1000000] [--connections 64] [--seconds 10]

Loads generated data (1,000 customers x 31 days), then drives random customers and `from`
days with wrk (bench/query.lua) if it is installed, else with an aiohttp client (which
costs more CPU and reads lower). Prints requests/s, p50/p99 latency and errors for a cold
and a warm run, and for a one-process aiohttp + uvloop endpoint returning a constant JSON
body (bench/minimal_app.py), measured the same way in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
from _server import BenchServer, free_port, generate

HERE = Path(__file__).resolve().parent


def wrk(port: int, customers: int, first_day: str, conns: int, seconds: float) -> str:
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{conns}",
            f"-d{seconds:g}s",
            "--latency",
            "-s",
            str(HERE / "query.lua"),
            f"http://127.0.0.1:{port}",
            "--",
            str(customers),
            first_day,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    p50 = re.search(r"50%\s+([\d.]+\w+)", out)[1]
    p99 = re.search(r"99%\s+([\d.]+\w+)", out)[1]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return (
        f"{rate:,.0f} requests/s, p50 {p50}, p99 {p99}, "
        f"{errors[1] if errors else 0} non-2xx"
        + (f", socket errors: {socket_errors[1]}" if socket_errors else "")
    ), rate


async def aiohttp_client(port: int, customers: int, days: list[str], conns: int, seconds: float):
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

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
                errors += resp.status != 200
            latencies.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session, random.Random(i)) for i in range(conns)))
        took = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    rate = len(lat) / took
    return (
        f"{rate:,.0f} requests/s, p50 {np.percentile(lat, 50):.1f}ms, "
        f"p99 {np.percentile(lat, 99):.1f}ms, {errors} non-2xx"
    ), rate


def measure(port: int, args: argparse.Namespace, days: list[str]) -> tuple[str, float]:
    if shutil.which("wrk"):
        return wrk(port, args.customers, days[0], args.connections, args.seconds)
    return asyncio.run(aiohttp_client(port, args.customers, days, args.connections, args.seconds))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lines", type=int, default=1_000_000)
    p.add_argument("--customers", type=int, default=1000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--shards", type=int, default=os.cpu_count() or 2)
    p.add_argument("--fronts", type=int, default=os.cpu_count() or 2)
    p.add_argument("--answer-cache-mb", default="512", help="the server's STATS_ANSWER_CACHE_MB")
    p.add_argument("--snapshot-interval", default="5", help="the server's STATS_SNAPSHOT_INTERVAL")
    args = p.parse_args()
    log = Path(tempfile.mkdtemp()) / "bench.log"
    generate(log, args.lines, args.customers, 30)
    today = dt.datetime.now(dt.UTC).date()
    days = [(today - dt.timedelta(days=30 - i)).isoformat() for i in range(31)]
    client = "wrk -t2" if shutil.which("wrk") else "aiohttp client"
    print(
        f"{args.lines:,} lines loaded, {args.customers} customers x 31 days, {args.shards} "
        f"shards, {args.fronts} fronts (answer cache {args.answer_cache_mb} MiB), {client}, "
        f"{args.connections} connections, {args.seconds:g} s per run"
    )
    server = BenchServer(
        args.shards,
        STATS_SNAPSHOT_INTERVAL=args.snapshot_interval,
        STATS_FRONTS=str(args.fronts),
        STATS_ANSWER_CACHE_MB=args.answer_cache_mb,
    )
    try:
        server.load(log)
        before = query_counts(server.http_port)
        text, _ = measure(server.http_port, args, days)
        after = query_counts(server.http_port)
        print(f"stats, first run (cold caches): {text}; {hit_share(before, after)}")
        text, ours = measure(server.http_port, args, days)
        share = hit_share(after, query_counts(server.http_port))
        print(f"stats, second run:              {text}; {share}")
        size = mean_body_bytes(server.http_port, args.customers, days)
    finally:
        server.stop()
    text, theirs = minimal(args, days)
    print(f"minimal aiohttp endpoint:       {text}")
    print(f"stats / minimal: {ours / theirs:.2f}")
    # The stats answers are bigger than the constant one (a day's figures each): the same
    # endpoint with a body of their mean size tells how much of the gap is bytes to write.
    text, same_size = minimal(args, days, size)
    print(f"minimal endpoint, {size:,}-byte body: {text}")
    print(f"stats / minimal with the same body size: {ours / same_size:.2f}")


def query_counts(port: int) -> dict[str, float]:
    """Stats queries answered so far, by the `cache` label ("hit" or "miss") of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
        text = resp.read().decode()
    counts = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "statsd_query_seconds_count":
                counts[sample.labels["cache"]] += sample.value
    return counts


def hit_share(before: dict[str, float], after: dict[str, float]) -> str:
    hits = after["hit"] - before["hit"]
    total = hits + after["miss"] - before["miss"]
    return f"{hits / total:.0%} from the fronts' caches" if total else "no queries counted"


def mean_body_bytes(port: int, customers: int, days: list[str], samples: int = 200) -> int:
    """The mean size of stats answers for the random requests the runs send."""
    rng = random.Random(1)
    total = 0
    for _ in range(samples):
        url = (
            f"http://127.0.0.1:{port}/customers/cust_{rng.randint(1, customers)}"
            f"/stats?from={rng.choice(days)}"
        )
        with urllib.request.urlopen(url) as resp:
            total += len(resp.read())
    return total // samples


def minimal(
    args: argparse.Namespace, days: list[str], size: int | None = None
) -> tuple[str, float]:
    """The baseline endpoint's run (a constant body of `size` bytes, or a small one)."""
    port = free_port()
    extra = [str(size)] if size is not None else []
    baseline = subprocess.Popen([sys.executable, str(HERE / "minimal_app.py"), str(port), *extra])
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/x").read()
                break
            except OSError:
                time.sleep(0.1)
        return measure(port, args, days)
    finally:
        baseline.terminate()
        baseline.wait()


if __name__ == "__main__":
    sys.exit(main())
