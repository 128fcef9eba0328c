"""Which shard owns a customer: a stable hash of the id, the same in every process and run."""

from __future__ import annotations

import hashlib

import numpy as np

from statsd_server.changes import SLOTS
from statsd_server.parse import ParsedChunk

_HASH_MASK = (1 << 63) - 1


def customer_key(customer_id: str) -> int:
    """A stable 63-bit hash of a customer id (BLAKE2b), stored with snapshots."""
    digest = hashlib.blake2b(customer_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _HASH_MASK


def shard_for(customer_id: str, shards: int) -> int:
    """The index of the shard that owns `customer_id`."""
    return customer_key(customer_id) % shards


class Router:
    """Splits parsed chunks by owning shard, remembering recent customers' places."""

    _CACHE_LIMIT = 1_000_000

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self._places = shards * SLOTS
        self._cache: dict[str, int] = {}

    def place(self, customer_id: str) -> int:
        """The customer's shard and change-counter slot in one number (see ChangeCounters):
        `place % shards` is the shard, as shard_for() says."""
        place = self._cache.get(customer_id)
        if place is None:
            if len(self._cache) >= self._CACHE_LIMIT:
                self._cache.clear()
            place = self._cache[customer_id] = customer_key(customer_id) % self._places
        return place

    def shard_of(self, customer_id: str) -> int:
        return self.place(customer_id) % self.shards

    def split(self, chunk: ParsedChunk) -> dict[int, ParsedChunk]:
        """The chunk's requests grouped by owning shard (shards with none are left out)."""
        if not len(chunk):
            return {}
        owner = np.array([self.shard_of(c) for c in chunk.customers], dtype=np.int32)
        line_owner = owner[chunk.customer]
        parts = {}
        for shard in np.unique(owner).tolist():
            if self.shards == 1:
                parts[shard] = chunk
            else:
                parts[shard] = chunk.take(line_owner == shard)
        return parts
