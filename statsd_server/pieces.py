"""Pieces of resumable loads a shard has applied, so a re-run load never counts twice.

`statsd-server load` cuts each file into pieces at fixed line-aligned offsets and names each
piece by the file's content hash and its offset. A connection that starts with
`#load-piece NAME` is held whole and applied at its end, by each owning shard at most once:
the shard records the name in the same write-ahead log record as the piece's requests (and
in the snapshot), and drops the requests of a piece it already holds.

Records are per shard layout (shard index, shard count). After a change of shard count a
piece is judged per customer: its requests are dropped where the customer's owner under the
recorded layout holds the piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import NamedTuple

import numpy as np

from statsd_server.parse import Batch
from statsd_server.routing import customer_key

MAX_NAME_BYTES = 200
KEEP_SECONDS = 40 * 86400  # beyond any retention a re-run could still matter for
MAX_PIECE_BYTES = 64 * 1024 * 1024
PROCESS_PIECE_BYTES = 256 * 1024 * 1024  # held at once by one process


class PieceRow(NamedTuple):
    """One piece held by one shard of one layout, as stored."""

    piece: str
    shards: int
    shard: int
    created: float


class PieceBudget:
    """Bytes of pieces one process holds at once. A piece reserves its announced size before
    its bytes are read, and waits, unread (TCP pushes back on the client), until there is
    room; a reservation is always for a whole piece, so held pieces can always complete.
    A piece handed over by another shard does not wait (that shard holds its own
    reservation, and two shards waiting on each other would never go on): it is taken only
    if there is room at once."""

    def __init__(self, capacity: int = PROCESS_PIECE_BYTES) -> None:
        self._free = capacity
        self._changed = asyncio.Condition()
        self._waking: set[asyncio.Future[None]] = set()

    @contextlib.asynccontextmanager
    async def reserved(self, size: int) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._free >= size)
            self._free -= size
        try:
            yield
        finally:
            self.release(size)

    def try_reserve(self, size: int) -> bool:
        """Reserve `size` if there is room now, without waiting; release() it after."""
        if self._free < size:
            return False
        self._free -= size
        return True

    def release(self, size: int) -> None:
        """Give room back at once (so a cancelled holder cannot lose it); the waiters are
        woken on a following pass of the event loop."""
        self._free += size
        waking = asyncio.ensure_future(self._wake_waiters())
        self._waking.add(waking)
        waking.add_done_callback(self._waking.discard)

    async def _wake_waiters(self) -> None:
        async with self._changed:
            self._changed.notify_all()


class LoadedPieces:
    """This shard's view of every layout's applied pieces."""

    def __init__(self, shard: int, shards: int) -> None:
        self._shard = shard
        self._shards = shards
        self._held: dict[str, set[tuple[int, int]]] = {}
        self._unsaved: list[PieceRow] = []

    def restore(self, rows: list[PieceRow]) -> None:
        for row in rows:
            self._held.setdefault(row.piece, set()).add((row.shards, row.shard))

    def drop_held(self, piece: str, batch: Batch) -> tuple[Batch, int]:
        """The batch without the requests this server already applied for `piece`."""
        layouts = self._held.get(piece)
        if not layouts:
            return batch, 0
        if (self._shards, self._shard) in layouts:
            return batch.where(np.zeros(len(batch.day), dtype=bool)), len(batch.day)
        keys = np.array([customer_key(c) for c in batch.customers], dtype=np.int64)
        held = np.zeros(len(batch.customers), dtype=bool)
        for shards, shard in layouts:
            held |= keys % shards == shard
        drop = held[batch.customer]
        if not drop.any():
            return batch, 0
        return batch.where(~drop), int(drop.sum())

    def mark(self, piece: str) -> None:
        layouts = self._held.setdefault(piece, set())
        if (self._shards, self._shard) not in layouts:
            layouts.add((self._shards, self._shard))
            self._unsaved.append(PieceRow(piece, self._shards, self._shard, time.time()))

    def take_unsaved(self) -> list[PieceRow]:
        rows, self._unsaved = self._unsaved, []
        return rows

    def unsaved_again(self, rows: list[PieceRow]) -> None:
        """Rows whose snapshot failed: written with the next one."""
        self._unsaved = rows + self._unsaved
