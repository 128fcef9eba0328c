"""The newest event day seen anywhere in the server, shared between processes.

Every process owns one int64 slot in a small memory-mapped file and only ever raises its
own slot; the server-wide value is the maximum over all slots, so no locking is needed.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

NO_DAY = np.iinfo(np.int64).min


def create(path: Path, slots: int) -> None:
    """Create the slot file with every slot empty."""
    np.full(slots, NO_DAY, dtype=np.int64).tofile(path)


class NewestDay:
    """This process's view of the shared newest-day slots."""

    def __init__(self, path: Path, slot: int) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self._slots = memoryview(self._map).cast("q")
        self._slot = slot

    def get(self) -> int:
        """The newest day over all processes (NO_DAY if none yet)."""
        return max(self._slots)

    def publish(self, day: int) -> None:
        """Raise this process's slot to `day` if it is newer."""
        if day > self._slots[self._slot]:
            self._slots[self._slot] = day
