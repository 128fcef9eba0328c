"""Change counters: how the fronts know a cached stats answer is still the shard's answer.

A memory-mapped file holds one row of uint64 counters per shard: the row's first counter is
the shard's generation, the others are SLOTS per-customer counters (a customer's slot comes
from the hash that also picks its shard; customers sharing a slot only cost each other
cache misses). Only the owning shard writes its row:

- it bumps a customer's counter right after it takes a batch with lines of that customer,
  in the same step of its event loop, so no query can see the batch before the bump;
- it bumps its generation once it has restored its snapshot and log, before it serves.

The supervisor bumps a dead shard's generation before starting it again (the old process is
gone, the new one not yet running, so there is still one writer at a time).

A front reads the counters (and the newest day) before it asks a shard; an answer is served
again only while all of them are unchanged. A change after the read moves a counter past
the value stored with the answer, so a stale answer is never served.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import TypeVar

import numpy as np

SLOTS = 1 << 18  # per shard: 2 MiB of counters
_ROW = SLOTS + 1
_Places = TypeVar("_Places", int, np.ndarray)


def create(path: Path, shards: int) -> None:
    """Create the counter file, every counter zero."""
    with open(path, "wb") as f:
        f.truncate(shards * _ROW * 8)


class ChangeCounters:
    """A process's view of the counter file; `place` values come from Router.place."""

    def __init__(self, path: Path, shards: int) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self._shards = shards
        self._flat = memoryview(self._map).cast("Q")  # fast single reads
        self._array = np.frombuffer(self._map, dtype=np.uint64)  # vectorised bumps

    def generation_index(self, place: int) -> int:
        """Where the generation of the shard owning `place` is."""
        return (place % self._shards) * _ROW

    def customer_index(self, place: _Places) -> _Places:
        """Where the counter of the customer at `place` is (or of each of an array of them)."""
        return (place % self._shards) * _ROW + 1 + place // self._shards

    def read(self, index: int) -> int:
        return self._flat[index]

    def holds(self, index: int) -> bool:
        """Whether `index` is a counter of this file."""
        return 0 <= index < len(self._flat)

    def bump_customers(self, places: list[int]) -> None:
        """Count a change of each customer (by their `place`), in their shard's row."""
        self._array[self.customer_index(np.array(places, dtype=np.int64))] += np.uint64(1)

    def bump_generation(self, shard: int) -> None:
        self._flat[shard * _ROW] += 1
