"""A front's cache of stats answers, served again only while they are still the shard's.

Answers are kept by request target (path and query string exactly as sent), so a hit costs
one dict lookup and three counter reads: no parsing, no trip to the shard. Each answer
carries what its validity depends on, read before the shard was asked (see changes.py):
the owning shard's generation, the customer's change counter and the server's newest day
(retention moves with it). Answers of different spellings of one query are cached apart.

The cache holds at most `budget` bytes (bodies, targets and a fixed overhead per answer);
past it, the oldest answers go first.

A front that got an answer from a shard also offers it, stamp and all, to the other fronts
(AnswerSharing: datagrams, each carrying the answers of one event-loop pass, dropped if a
peer is busy or down), so each query goes to a shard about once per server rather than once
per front. The stamp was read before the shard
was asked, so it is as valid in every front.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import msgspec

from statsd_server.changes import ChangeCounters
from statsd_server.newest_day import NewestDay

# Bytes of bookkeeping per answer besides its body and target: the ordered dict's node and
# slot, the entry's tuple and ints, two object headers (measured: about 450 with the stamp a
# tuple of its own; some 60 less since it is part of the entry, so this errs high).
ENTRY_OVERHEAD = 450
# Datagrams of shared answers stay under this (they must fit the sockets' buffers); an
# answer that alone would not fit is not shared.
MAX_DATAGRAM_BYTES = 64 * 1024

log = logging.getLogger(__name__)


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
        # Each answer as one plain tuple of ints and bytes: the garbage collector stops
        # tracking those, so a full cache costs its collections nothing (a NamedTuple inside
        # would keep both tracked: two objects per answer to traverse in every full pass).
        self._answers: OrderedDict[str, _Entry] = OrderedDict()

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
        generation_index, generation, customer_index, version, newest_day, status, body = cached
        if not self._current(generation_index, generation, customer_index, version, newest_day):
            self._remove(target)
            return None
        return status, body

    def current(self, stamp: Stamp) -> bool:
        """Whether nothing the stamp was read from has changed since."""
        return self._current(*stamp)

    def _current(
        self, generation_index: int, generation: int, customer_index: int, version: int, day: int
    ) -> bool:
        read = self._changes.read
        return (
            read(customer_index) == version
            and read(generation_index) == generation
            and self._newest_day.get() == day
        )

    def well_formed(self, stamp: Stamp) -> bool:
        """Whether a stamp from elsewhere points at real counters (see AnswerSharing)."""
        return self._changes.holds(stamp.generation_index) and self._changes.holds(
            stamp.customer_index
        )

    def put(self, target: str, stamp: Stamp, status: int, body: bytes) -> None:
        cost = _cost(target, body)
        if cost > self.budget:
            return
        if target in self._answers:
            self._remove(target)
        while self.size + cost > self.budget:
            self._remove(next(iter(self._answers)))
        self._answers[target] = (*stamp, status, body)
        self.size += cost

    def _remove(self, target: str) -> None:
        body = self._answers.pop(target)[-1]
        self.size -= _cost(target, body)


def _cost(target: str, body: bytes) -> int:
    """The bytes an answer counts against the budget."""
    return len(body) + len(target) + ENTRY_OVERHEAD


_Entry = tuple[int, int, int, int, int, int, bytes]  # a Stamp's fields, status, body
_Shared = list[tuple[str, tuple[int, int, int, int, int], int, bytes]]
SHAREABLE_STATUSES = (200, 404)


class AnswerSharing:
    """Offers this front's answers from shards to the other fronts' caches, and takes
    theirs, as datagrams on `front-<i>.answers` sockets in the runtime directory.

    The answers a front gets during one pass of its event loop go out together, in as few
    datagrams as fit: the kernel queues only a few datagrams per socket
    (net.unix.max_dgram_qlen, often 10), and what does not fit is dropped.
    """

    def __init__(self, runtime_dir: Path, index: int, fronts: int, cache: AnswerCache) -> None:
        self._cache = cache
        path = runtime_dir / f"front-{index}.answers"
        path.unlink(missing_ok=True)  # left by an earlier process of this front
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._peers = [str(runtime_dir / f"front-{i}.answers") for i in range(fronts) if i != index]
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(_Shared).decode
        self._loop: asyncio.AbstractEventLoop | None = None
        self._offers: _Shared = []
        self._offered_bytes = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._receive)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def offer(self, target: str, stamp: Stamp, status: int, body: bytes) -> None:
        size = len(body) + len(target) + 64  # about, encoded
        if not self._peers or size > MAX_DATAGRAM_BYTES or self._loop is None:
            return
        if self._offered_bytes + size > MAX_DATAGRAM_BYTES:
            self._send()
        if not self._offers:
            self._loop.call_soon(self._send)
        self._offers.append((target, tuple(stamp), status, body))  # type: ignore[arg-type]
        self._offered_bytes += size

    def _send(self) -> None:
        if not self._offers:
            return
        datagram = self._encode(self._offers)
        self._offers, self._offered_bytes = [], 0
        for peer in self._peers:
            # A peer that is starting, restarting or behind just misses these.
            with contextlib.suppress(OSError):
                self._sock.sendto(datagram, peer)

    def _receive(self) -> None:
        cache = self._cache
        for _ in range(16):  # then let the loop serve requests again
            try:
                datagram = self._sock.recv(MAX_DATAGRAM_BYTES + 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("answers from another front lost: %s", exc)
                return
            try:
                answers = self._decode(datagram)
            except msgspec.DecodeError:
                continue
            for target, fields, status, body in answers:
                stamp = Stamp(*fields)
                if (
                    status in SHAREABLE_STATUSES
                    and cache.well_formed(stamp)
                    and cache.current(stamp)  # not already out of date: it would only evict
                    and cache.get(target) is None  # keep an answer of our own that is valid
                ):
                    cache.put(target, stamp, status, body)
