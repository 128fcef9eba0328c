"""The ingest pipeline shared by TCP connections and HTTP POSTs.

bytes -> whole-line chunks -> parsed columns -> time rules -> split by owning shard ->
applied by the owners (in-process for the local shard, over a Unix socket otherwise).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

from statsd_server import metrics
from statsd_server.errors import PieceError
from statsd_server.framing import LineFramer
from statsd_server.messages import Applied, ApplyBatch
from statsd_server.newest_day import NO_DAY, NewestDay
from statsd_server.parse import Batch, apply_time_rules, concat_batches, parse_chunk
from statsd_server.pieces import MAX_PIECE_BYTES
from statsd_server.routing import Router
from statsd_server.rpc import ShardClient
from statsd_server.summary import IngestSummary

APPLY_TIMEOUT = 120.0
# Batches of one session in flight to the shards; past this, the session stops reading.
MAX_IN_FLIGHT = 8
# Requests collected per shard before they are sent (the owner queues them further, see
# ShardStore): fewer, larger messages between processes.
SEND_BATCH = 65_536
# What a stream has sent is sent on to the shards within this long, even mid-stream.
IDLE_FLUSH = 0.2


LocalApply = Callable[[Batch, ApplyBatch | None, str], Awaitable[Applied]]


class Dispatcher:
    """Delivers per-shard batches to their owners: locally if this process owns one."""

    def __init__(
        self,
        clients: list[ShardClient],
        local: tuple[int, LocalApply] | None = None,
    ) -> None:
        self._clients = clients
        self._local = local

    async def apply(self, shard: int, batch: Batch, piece: str = "") -> Applied:
        if self._local is not None and self._local[0] == shard:
            return await self._local[1](batch, None, piece)
        message = ApplyBatch.from_batch(batch, piece)
        reply = await self._clients[shard].request(message, APPLY_TIMEOUT)
        assert isinstance(reply, Applied), reply
        return reply


class IngestSession:
    """One stream of lines (a TCP connection or a POST body) and its running summary."""

    def __init__(
        self,
        router: Router,
        dispatcher: Dispatcher,
        newest_day: NewestDay,
        retention_days: int,
        clock: Callable[[], float] = time.time,
        process: str = "front",
        piece: str = "",
        piece_bytes: int = 0,
    ) -> None:
        # A load piece (statsd_server.pieces) is held whole and sent on at its end, if it
        # arrived whole: a client killed mid-piece also ends its stream.
        self._piece = piece
        self._piece_expected = piece_bytes
        self._piece_bytes = 0
        self.duplicates = 0
        self._label = process
        self._m_parsed = metrics.INGEST_BYTES_PARSED.labels(process)
        self._router = router
        self._dispatcher = dispatcher
        self._newest_day = newest_day
        self._retention_days = retention_days
        self._clock = clock
        self._framer = LineFramer()
        self._accepted = 0
        self._rejected: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._errors: list[BaseException] = []
        self._pending: dict[int, list[Batch]] = {}
        self._pending_lines: dict[int, int] = {}
        self._idle_timer: asyncio.TimerHandle | None = None

    async def feed(self, data: bytes) -> None:
        """Take more bytes; complete lines are parsed and sent on in batches."""
        self.take(data)
        await self.send_full()

    def take(self, data: bytes) -> None:
        """Parse the complete lines of more bytes and hold them for their shards: the CPU
        part of feed(), which waits for nothing."""
        if self._piece:
            self._piece_bytes += len(data)
            if self._piece_bytes > min(MAX_PIECE_BYTES, self._piece_expected):
                raise PieceError(
                    f"load piece longer than announced ({self._piece_expected} bytes; at most"
                    f" {MAX_PIECE_BYTES})"
                )
        self._m_parsed.inc(len(data))
        chunk = self._framer.feed(data)
        if chunk:
            self._process(chunk)

    async def send_full(self) -> None:
        """Send on the requests held for each shard that has a batch's worth (not those of
        a load piece, sent whole at its end); the rest within IDLE_FLUSH."""
        if self._piece:
            return
        for shard, lines in list(self._pending_lines.items()):
            if lines >= SEND_BATCH:
                await self._dispatch(shard)
        if self._pending and self._idle_timer is None:
            # Started once, not pushed back by every read: a stream that never pauses still
            # has its lines sent on within IDLE_FLUSH.
            self._idle_timer = asyncio.get_running_loop().call_later(IDLE_FLUSH, self._on_idle)

    async def finish(self) -> IngestSummary:
        """Apply everything received and return the summary; raises if a shard failed."""
        if self._piece and self._piece_bytes != self._piece_expected:
            raise PieceError(
                f"load piece ended after {self._piece_bytes} of {self._piece_expected} bytes;"
                " nothing of it was applied"
            )
        rest = self._framer.finish()
        if rest:
            self._process(rest)
        await self._flush()
        await self._wait_in_flight()
        if self._errors:
            raise self._errors[0]
        if self._framer.too_long:
            self._reject({"too_long": self._framer.too_long})
        rejected = {reason: n for reason, n in sorted(self._rejected.items()) if n}
        return IngestSummary(self._accepted, sum(rejected.values()), rejected)

    async def abort(self) -> None:
        """Stop without a summary: what was received is still sent on, as far as it goes
        (a load piece's is dropped: it is applied whole or not at all)."""
        if self._piece:
            self._pending.clear()
        await self._flush()
        await self._wait_in_flight()

    def _reject(self, counts: Mapping[str, int]) -> None:
        for reason, n in counts.items():
            if n:
                self._rejected[reason] += n
                metrics.LINES_REJECTED.labels(reason, self._label).inc(n)

    async def _wait_in_flight(self) -> None:
        # An idle flush in flight may start more sends: wait until none is left.
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)

    def _process(self, data: bytes) -> None:
        if self._errors:
            raise self._errors[0]
        parsed = parse_chunk(data)
        newest = self._newest_day.get()
        parsed, newest = apply_time_rules(parsed, self._clock(), newest, self._retention_days)
        if newest != NO_DAY:
            self._newest_day.publish(newest)
        self._reject(parsed.rejected)
        for shard, part in self._router.split(parsed).items():
            self._pending.setdefault(shard, []).append(part.batch())
            self._pending_lines[shard] = self._pending_lines.get(shard, 0) + len(part)

    async def _dispatch(self, shard: int) -> None:
        """Send the requests collected for one shard as one batch."""
        parts = self._pending.pop(shard, None)
        self._pending_lines.pop(shard, None)
        if not parts:
            return
        batch = concat_batches(parts)
        await self._slots.acquire()
        task = asyncio.create_task(self._send(shard, batch))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _flush(self) -> None:
        self._cancel_idle_flush()
        for shard in list(self._pending):
            await self._dispatch(shard)

    def _cancel_idle_flush(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _on_idle(self) -> None:
        self._idle_timer = None
        task = asyncio.create_task(self._flush())
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, shard: int, batch: Batch) -> None:
        try:
            applied = await self._dispatcher.apply(shard, batch, self._piece)
            self._accepted += applied.stored
            self.duplicates += applied.duplicate
            if applied.refused:
                self._reject({"customer_limit": applied.refused})
        except Exception as exc:  # reported by finish(); the session stops taking data
            self._errors.append(exc)
        finally:
            self._slots.release()
