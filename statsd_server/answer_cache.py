"""A front's cache of stats answers, served again only while they are still the shard's.

Answers are kept by request target (path and query string exactly as sent), so a hit costs
one dict lookup and three counter reads: no parsing, no trip to the shard. Each answer
carries what its validity depends on, read before the shard was asked (see changes.py):
the owning shard's generation, the customer's change counter and the server's newest day
(retention moves with it). Answers of different spellings of one query are cached apart.

The cache holds at most `budget` bytes (bodies, targets and a fixed overhead per answer);
past it, the oldest answers go first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

from statsd_server.changes import ChangeCounters
from statsd_server.newest_day import NewestDay

# Bytes of bookkeeping per answer besides its body and target: the ordered dict's node and
# slot, the tuples, the stamp's ints, two object headers (measured: about 450).
ENTRY_OVERHEAD = 450


class Stamp(NamedTuple):
    """What an answer's validity depends on, read before the shard is asked."""

    generation_index: int
    generation: int
    customer_index: int
    version: int
    newest_day: int


class AnswerCache:
    def __init__(self, changes: ChangeCounters, newest_day: NewestDay, budget: int) -> None:
        self._changes = changes
        self._newest_day = newest_day
        self.budget = budget
        self.size = 0
        self._answers: OrderedDict[str, tuple[Stamp, int, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def stamp(self, place: int) -> Stamp:
        """Read the counters of the customer at `place` (Router.place) before asking."""
        changes = self._changes
        generation_index = changes.generation_index(place)
        customer_index = changes.customer_index(place)
        return Stamp(
            generation_index,
            changes.read(generation_index),
            customer_index,
            changes.read(customer_index),
            self._newest_day.get(),
        )

    def get(self, target: str) -> tuple[int, bytes] | None:
        """(status, body) cached for `target` if nothing it depends on changed since."""
        cached = self._answers.get(target)
        if cached is None:
            return None
        stamp, status, body = cached
        read = self._changes.read
        if (
            read(stamp.customer_index) != stamp.version
            or read(stamp.generation_index) != stamp.generation
            or self._newest_day.get() != stamp.newest_day
        ):
            self._remove(target)
            return None
        return status, body

    def put(self, target: str, stamp: Stamp, status: int, body: bytes) -> None:
        cost = len(body) + len(target) + ENTRY_OVERHEAD
        if cost > self.budget:
            return
        if target in self._answers:
            self._remove(target)
        while self.size + cost > self.budget:
            self._remove(next(iter(self._answers)))
        self._answers[target] = (stamp, status, body)
        self.size += cost

    def _remove(self, target: str) -> None:
        _, _, body = self._answers.pop(target)
        self.size -= len(body) + len(target) + ENTRY_OVERHEAD
