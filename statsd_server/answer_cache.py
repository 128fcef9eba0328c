"""A front's cache of stats answers, served again only while they are still the shard's.

Answers are kept by request target (path and query string exactly as sent), so a hit costs
one dict lookup and three counter reads: no parsing, no trip to the shard. Each answer
carries what its validity depends on, read before the shard was asked (see changes.py):
the owning shard's generation, the customer's change counter and the server's newest day
(retention moves with it). Answers of different spellings of one query are cached apart.

The cache holds at most `budget` bytes (bodies, targets and a fixed overhead per answer);
past it, the oldest answers go first.

A front that got an answer from a shard also offers it, stamp and all, to the other fronts
(AnswerSharing: a datagram each, dropped if a peer is busy or down), so each query goes to a
shard about once per server rather than once per front. The stamp was read before the shard
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
# slot, the tuples, the stamp's ints, two object headers (measured: about 450).
ENTRY_OVERHEAD = 450
# Answers larger than this are not offered to the other fronts (a datagram must fit the
# socket buffer).
MAX_SHARED_BYTES = 64 * 1024

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


_Shared = tuple[str, tuple[int, int, int, int, int], int, bytes]


class AnswerSharing:
    """Offers this front's answers from shards to the other fronts' caches, and takes
    theirs, as datagrams on `front-<i>.answers` sockets in the runtime directory."""

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

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._receive)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def offer(self, target: str, stamp: Stamp, status: int, body: bytes) -> None:
        if not self._peers or len(body) > MAX_SHARED_BYTES:
            return
        datagram = self._encode((target, tuple(stamp), status, body))
        for peer in self._peers:
            # A peer that is starting, restarting or behind just misses this one.
            with contextlib.suppress(OSError):
                self._sock.sendto(datagram, peer)

    def _receive(self) -> None:
        for _ in range(32):  # then let the loop serve requests again
            try:
                datagram = self._sock.recv(MAX_SHARED_BYTES + 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("answer from another front lost: %s", exc)
                return
            try:
                target, stamp, status, body = self._decode(datagram)
            except msgspec.DecodeError:
                continue
            if self._cache.get(target) is None:  # keep an answer of our own that is valid
                self._cache.put(target, Stamp(*stamp), status, body)
