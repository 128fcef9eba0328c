"""Quantile accuracy, size and speed of a customer-day, before (KLL alone) and now.

    python bench/accuracy.py [--seeds 10] [--quick]

For uniform, lognormal and 2%-slow-mixture latencies at 1k, 100k and 1M requests per day,
and for 30-day summaries: the worst relative error of p50 and p99 against the exact
nearest-rank value over the seeds, how often the stated `quantile_error` bound held, the
serialized size, and update cost per request. Then RSS per customer-day for days of 10, 1k
and 1M requests and for a realistic mix, each measured in a fresh process.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from datasketches import kll_doubles_sketch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sketches import DayAggregate, SketchConfig, summarize

CONFIG = SketchConfig()
BATCH = 2_000  # requests per update, like a busy customer's share of an ingest chunk


def latencies(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return rng.uniform(0.1, 2.0, n)
    if kind == "lognormal":
        return rng.lognormal(np.log(0.3), 1.0, n)
    x = rng.lognormal(np.log(0.3), 0.5, n)  # mixture: 2% of requests 10x slower
    x[rng.random(n) < 0.02] *= 10
    return x


def exact(values: np.ndarray, q: float) -> float:
    return float(np.sort(values)[max(1, math.ceil(q * len(values))) - 1])


def build(values: np.ndarray) -> DayAggregate:
    agg = DayAggregate(CONFIG)
    for part in np.array_split(values, max(1, len(values) // BATCH)):
        agg.add(len(part), len(part), 0, 0, float(part.sum()), part)
    return agg


def kll_only(values: np.ndarray) -> kll_doubles_sketch:
    sketch = kll_doubles_sketch(CONFIG.kll_k)
    for part in np.array_split(values, max(1, len(values) // BATCH)):
        sketch.update(part)
    return sketch


def accuracy(kind: str, n: int, days: int, seeds: int) -> str:
    worst_before = {0.5: 0.0, 0.99: 0.0}
    worst_now = {0.5: 0.0, 0.99: 0.0}
    held = checks = 0
    size_before = size_now = 0
    ns_before = ns_now = 0.0
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        per_day = [latencies(kind, n // days, rng) for _ in range(days)]
        everything = np.concatenate(per_day)
        t = time.perf_counter()
        aggs = [build(v) for v in per_day]
        ns_now += (time.perf_counter() - t) / len(everything) * 1e9
        t = time.perf_counter()
        klls = [kll_only(v) for v in per_day]
        ns_before += (time.perf_counter() - t) / len(everything) * 1e9
        stats = summarize(aggs)
        merged = klls[0]
        for other in klls[1:]:
            merged.merge(other)
        for q, got_ms in ((0.5, stats.median_latency_ms), (0.99, stats.p99_latency_ms)):
            truth = exact(everything, q)
            assert got_ms is not None
            error = abs(got_ms / 1000 - truth) / truth
            worst_now[q] = max(worst_now[q], error)
            bound = stats.quantile_error["p50" if q == 0.5 else "p99"]
            held += error <= bound + 5e-4 / truth / 1000  # rounding to 3 decimals in ms
            checks += 1
            before = abs(merged.get_quantile(q, True) - truth) / truth
            worst_before[q] = max(worst_before[q], before)
        size_now = max(size_now, max(len(a.to_blob()[1]) for a in aggs))
        size_before = max(size_before, max(len(k.serialize()) for k in klls))
    label = f"{n // days:,}/day" + (f" x {days} days" if days > 1 else "")
    return (
        f"| {kind} | {label} | {worst_before[0.5]:.2%} / {worst_before[0.99]:.2%} "
        f"| {worst_now[0.5]:.2%} / {worst_now[0.99]:.2%} | {held}/{checks} "
        f"| {size_before / 1024:.1f} / {size_now / 1024:.1f} KB "
        f"| {ns_before / seeds:.0f} / {ns_now / seeds:.0f} |"
    )


RSS_SCRIPT = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from sketches import DayAggregate, SketchConfig
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) * 1024
sizes = np.array({sizes!r}, dtype=np.int64)
rng = np.random.default_rng(0)
keep = {{}}
before = rss()
for i, n in enumerate(sizes.tolist()):
    agg = DayAggregate(SketchConfig())
    left = n
    while left:
        part = rng.lognormal(-1.2, 1.0, min(left, 5000))
        agg.add(len(part), len(part), 0, 0, float(part.sum()), part)
        left -= len(part)
    keep[("cust_%d" % i, 20000)] = agg
print((rss() - before) / len(sizes))
"""


def rss_per_day(sizes: list[int]) -> float:
    root = str(Path(__file__).resolve().parent.parent)
    script = RSS_SCRIPT.format(root=root, sizes=sizes)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="skip the 1M-request cases")
    args = p.parse_args()
    print(
        f"KLL k={CONFIG.kll_k} alone (before) vs now (exact up to k, then KLL + REQ HRA "
        f"k={CONFIG.req_k}); worst over {args.seeds} seeds\n"
    )
    print(
        "| latencies | requests | before p50 / p99 error | now p50 / p99 error "
        "| bound held | size before / now | ns/request before / now |"
    )
    print("|---|---|---|---|---|---|---|")
    sizes = [1_000, 100_000] + ([] if args.quick else [1_000_000])
    for kind in ("uniform", "lognormal", "mixture"):
        for n in sizes:
            print(accuracy(kind, n, 1, args.seeds), flush=True)
        per_day = 3_000 if args.quick else 30_000
        print(accuracy(kind, 30 * per_day, 30, args.seeds), flush=True)

    print("\n| customer-days of | RSS per customer-day |")
    print("|---|---|")
    for n, count in ((10, 20_000), (1_000, 2_000), (1_000_000, 10)):
        print(f"| {n:,} requests | {rss_per_day([n] * count) / 1024:.1f} KB |", flush=True)
    rng = np.random.default_rng(1)
    mix = np.clip(np.exp(rng.normal(np.log(60), 1.5, 20_000)), 1, 1_000_000).astype(int)
    print(
        f"| a realistic mix: median {int(np.median(mix))}, mean {mix.mean():.0f}, "
        f"max {mix.max():,} requests | {rss_per_day(mix.tolist()) / 1024:.1f} KB |"
    )


if __name__ == "__main__":
    main()
