"""Shard ownership is a stable hash: the same in every process, run and Python hash seed."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

from statsd_server.parse import parse_chunk
from statsd_server.routing import Router, customer_key, shard_for

# Fixed forever: changing them would move customers between shards after an upgrade.
GOLDEN = {
    "cust_1": 1027931566186603914,
    "kunde_müller": 8045684035607676412,
    "tenant:7/prod": 3578479782078340252,
}


def test_keys_are_golden_values() -> None:
    """The key of an id never changes (BLAKE2b, not Python's salted hash())."""
    assert {c: customer_key(c) for c in GOLDEN} == GOLDEN


def test_same_shards_under_other_hash_seeds() -> None:
    """A fresh interpreter with a different PYTHONHASHSEED assigns the same shards."""
    ids = [f"cust_{i}" for i in range(200)] + ["kunde_müller", "tenant:7/prod"]
    code = "import sys; from statsd_server.routing import shard_for; print([shard_for(c, 7) for c in sys.argv[1:]])"
    for seed in ("1", "12345"):
        out = subprocess.run(
            [sys.executable, "-c", code, *ids],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.strip() == str([shard_for(c, 7) for c in ids])


def test_shards_are_balanced() -> None:
    """10,000 ids spread over 4 shards within 10% of even."""
    counts = np.bincount([shard_for(f"cust_{i}", 4) for i in range(10_000)], minlength=4)
    assert counts.min() > 2250 and counts.max() < 2750


def test_split_keeps_every_request_with_its_owner() -> None:
    """Splitting a chunk by shard loses nothing and sends each customer to its owner only."""
    ids = [f"c{i % 37}" for i in range(500)]
    chunk = parse_chunk(
        "".join(f"2024-09-03 12:00:01 {c} /a 200 {i}\n" for i, c in enumerate(ids)).encode()
    )
    parts = Router(3).split(chunk)
    seen = []
    for shard, part in parts.items():
        for c, u in zip(part.customer.tolist(), part.duration.tolist(), strict=True):
            assert shard_for(part.customers[c], 3) == shard
            seen.append((part.customers[c], u))
    assert sorted(seen) == sorted((c, float(i)) for i, c in enumerate(ids))
