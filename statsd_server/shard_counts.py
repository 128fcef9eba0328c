"""How many customers each shard holds, shared between processes for the server-wide cap.

Every shard owns one int64 slot in a small memory-mapped file and writes only its own; the
server's count is the sum. Admitting new customers happens under an flock on the file, so
two shards cannot both take the last room; the kernel releases the lock if a shard dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np

UNKNOWN = -1  # a shard that has not restored its data yet


def create(path: Path, slots: int) -> None:
    np.full(slots, UNKNOWN, dtype=np.int64).tofile(path)


class ShardCounts:
    """This process's view of the shared per-shard customer counts."""

    def __init__(self, path: Path, slot: int) -> None:
        self._file = open(path, "r+b")  # noqa: SIM115 (held for the lock)
        self._map = mmap.mmap(self._file.fileno(), 0)
        self._slots = np.frombuffer(self._map, dtype=np.int64)
        self._slot = slot

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes: held for microseconds, while admitting a batch."""
        fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)

    async def wait_published(self) -> None:
        """Until every shard has published its count (after its restore, at start)."""
        while (self._slots == UNKNOWN).any():
            await asyncio.sleep(0.05)

    def others(self) -> int:
        """Customers held by the other shards."""
        return int(self._slots.sum() - self._slots[self._slot])

    def publish(self, customers: int) -> None:
        self._slots[self._slot] = customers

    def close(self) -> None:
        del self._slots
        self._map.close()
        self._file.close()
