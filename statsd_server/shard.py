"""A shard process: owns a hash-slice of the customers, ingests TCP, snapshots to SQLite.

Every shard accepts ingest connections on the shared TCP port (each has its own
SO_REUSEPORT socket, so the kernel spreads connections), parses what it receives, applies
its own customers' requests in-process and sends the rest to their owners. The kernel's
spread is uneven, so a shard hands `load` pieces to the other shards to parse, in turn.
Queries, batches and pieces from other processes arrive on the shard's Unix socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

import msgspec
import uvloop

from persistence.snapshot import SnapshotDB
from persistence.wal import WAL_DIRNAME, WriteAheadLog, layouts
from sketches import SketchConfig
from statsd_server import logs, metrics
from statsd_server.changes import ChangeCounters
from statsd_server.config import LISTEN_BACKLOG, Settings
from statsd_server.errors import IdleStream, PieceError, ShardUnavailable, SnapshotError
from statsd_server.ingest import APPLY_TIMEOUT, Dispatcher, IngestSession
from statsd_server.memory import (
    collect_before_exit,
    freeze_startup_objects,
    release_free_memory,
)
from statsd_server.messages import (
    Applied,
    ApplyBatch,
    Body,
    Codec,
    Drain,
    Drained,
    ErrorReply,
    IngestPiece,
    PieceIngested,
    PieceRefused,
    Ping,
    Pong,
    Shutdown,
    ShutdownDone,
    StatsQuery,
    StatsReply,
)
from statsd_server.newest_day import NO_DAY, NewestDay
from statsd_server.parse import Batch
from statsd_server.pieces import (
    KEEP_SECONDS,
    MAX_NAME_BYTES,
    MAX_PIECE_BYTES,
    LoadedPieces,
    PieceBudget,
)
from statsd_server.routing import Router
from statsd_server.rpc import ShardClient, serve_connection, socket_path
from statsd_server.shard_counts import ShardCounts
from statsd_server.store import ShardStore
from statsd_server.summary import PIECE_HEADER, IngestSummary

log = logging.getLogger(__name__)

READ_SIZE = 4 * 1024 * 1024
# Ingest is parsed a slice of about this size at a time (15 ms on the development VM), and a
# shard's connections take turns, a slice each, with a pass of the event loop after each:
# batches from other shards, write-ahead log acknowledgements and queries wait for one slice,
# not for a read of every open connection.
PARSE_SLICE = 1024 * 1024
# Queued batches are grouped once, for this long, no new one arrived and this shard parsed
# nothing (so the first query after an ingest burst does not pay for it), and at the latest
# this long after the first. Not mid-burst: folding in costs mostly per customer-day, so a
# grouping of a few requests per customer-day costs about as much as one of many.
QUIET_DELAY = 0.05
MAX_QUEUE_AGE = 1.0
# Customer-days folded in per event-loop pass (about 5 us each), so that queries are answered
# between the steps of folding in a large ingest; a query first folds in its own customer.
FOLD_STEP = 400
SNAPSHOT_SLICE = 500
# A periodic snapshot builds its rows about a quarter of the time: after each slice it waits
# three times as long as the slice took. The first snapshot after a large load (15k
# customer-days a shard, 5-15 ms a slice while queries run) then takes the shard's loop and
# a core in short, spaced turns rather than in a burst of a few hundred ms while queries
# arrive. Writing the rows is not paced: it holds the file's write lock, which the other
# shards wait for. The final snapshot goes at full speed, and hurries one under way.
SNAPSHOT_PACE = 3.0
# How long open ingest connections may take to finish when the server stops.
DRAIN_GRACE = 10.0
# A shard parsing a piece handed over sends its parts to the owners, each send with up to
# APPLY_TIMEOUT; this leaves the parse and its turns as much again.
HAND_OVER_TIMEOUT = 2 * APPLY_TIMEOUT


def run(
    settings: Settings,
    index: int,
    tcp_sock: socket.socket,
    runtime_dir: Path,
    parent: Connection,
    restarted: bool = False,
) -> None:
    """Process entry point (spawned by the supervisor)."""
    if restarted:
        metrics.RESTARTS.labels(f"shard-{index}").inc()
    # Signals to the whole process group (Ctrl-C, systemd, `timeout`) reach every process;
    # only the supervisor acts on them, so the shutdown keeps its order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.configure(settings.log_level, f"shard-{index}", settings.log_format)
    worker = ShardWorker(settings, index, tcp_sock, runtime_dir, parent)
    try:
        uvloop.run(worker.run())
        code = worker.exit_code
    except SnapshotError as exc:
        parent.send(("error", str(exc)))
        code = 1
    del worker
    collect_before_exit()
    raise SystemExit(code)


class ShardWorker:
    def __init__(
        self,
        settings: Settings,
        index: int,
        tcp_sock: socket.socket,
        runtime_dir: Path,
        parent: Connection,
    ) -> None:
        self.settings = settings
        self.index = index
        self._tcp_sock = tcp_sock
        self._runtime_dir = runtime_dir
        self._parent = parent
        self.store = ShardStore(
            SketchConfig(kll_k=settings.kll_k, req_k=settings.req_k), settings.retention_days
        )
        self._codec = Codec()
        self._newest_day = NewestDay(runtime_dir / "newest_day", index)
        self._router = Router(settings.shards)
        self._changes = ChangeCounters(runtime_dir / "changes", settings.shards)
        self._clients = [
            ShardClient(i, socket_path(runtime_dir, i), self._codec) for i in range(settings.shards)
        ]
        self._dispatcher = Dispatcher(self._clients, local=(index, self._accept))
        self._wal: WriteAheadLog | None = None
        self._counts = ShardCounts(runtime_dir / "shard_counts", index)
        self._pieces = LoadedPieces(index, settings.shards)
        self._piece_budget = PieceBudget()
        # Bytes of load pieces this shard received and gave each shard to parse.
        self._handed = [0] * settings.shards
        self._handover_files = itertools.count()
        self._draining = False
        label = str(index)
        self._m_accepted = metrics.LINES_ACCEPTED.labels(label)
        self._m_batches = metrics.BATCHES.labels(label)
        self._m_handed = metrics.LOAD_PIECES_HANDED.labels(label)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sqlite-{index}")
        self._db: SnapshotDB | None = None
        self._ingest_tasks: set[asyncio.Task[None]] = set()
        self._tcp_server: asyncio.Server | None = None
        self._snapshot_lock = asyncio.Lock()
        self._hurry = False  # set by the final snapshot: see SNAPSHOT_PACE
        self._stopped = asyncio.Event()
        self.exit_code = 0
        self._background: set[asyncio.Task[None]] = set()
        self._peers: set[asyncio.StreamWriter] = set()
        self._folding = False
        self._parsed_at = 0.0  # loop time this shard last parsed ingest bytes
        self._parse_turn = asyncio.Lock()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._db = await loop.run_in_executor(self._executor, SnapshotDB, self.settings.data_dir)
        rows, newest = await loop.run_in_executor(
            self._executor, self._db.load, self.index, self.settings.shards
        )
        last_lsn = self.store.restore(rows, NO_DAY if newest is None else newest)
        del rows  # the aggregates are built: the rows' blobs are not needed
        self._pieces.restore(await loop.run_in_executor(self._executor, self._db.load_pieces))
        log.info(
            "pid %d: restored %d customer-days of %d customers from %s",
            os.getpid(),
            self.store.customer_days,
            len(self.store.customers),
            self._db.path,
        )
        if self.settings.wal:
            self._wal = WriteAheadLog(
                self.settings.data_dir / WAL_DIRNAME,
                self.index,
                self.settings.shards,
                on_fsync=metrics.WAL_FSYNC.labels(str(self.index)).observe,
                on_failure=self._wal_failed,
            )
            replayed = await loop.run_in_executor(
                self._executor, replay_wal, self.store, self._pieces, self._wal, self._codec
            )
            self._wal.open(last_lsn)
            if replayed:
                log.info("replayed %d batches from the write-ahead log", replayed)
        self._newest_day.publish(self.store.newest_day)
        self._counts.publish(self.store.customers_held)
        self._publish_sizes()
        # What the fronts cached from an earlier process of this shard is not trusted.
        self._changes.bump_generation(self.index)

        # Pieces an earlier process of this shard died handing over.
        for stale in self._runtime_dir.glob(f"piece-{self.index}-*"):
            stale.unlink(missing_ok=True)
        path = socket_path(self._runtime_dir, self.index)
        path.unlink(missing_ok=True)
        # Reads are not paused every 128 KB (the default limit's): a batch of megabytes
        # arrives in one pass of the event loop, not one per 128 KB.
        unix_server = await asyncio.start_unix_server(
            self._serve_peer, path=str(path), limit=READ_SIZE
        )
        self._tcp_server = await asyncio.start_server(
            self._serve_ingest, sock=self._tcp_sock, limit=READ_SIZE, backlog=LISTEN_BACKLOG
        )
        # The supervisor holds the other end of this pipe; EOF means it is gone.
        loop.add_reader(self._parent.fileno(), self._on_parent_message)
        self.store.on_queued = self._schedule_grouping
        self.store.on_grouped = self._fold_in_steps
        snapshots = asyncio.create_task(self._snapshot_loop())
        freeze_startup_objects()
        self._parent.send(("ready", None))

        await self._stopped.wait()
        snapshots.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await snapshots
        # Close the peers' connections so their handlers end before the loop does.
        unix_server.close()
        for peer in list(self._peers):
            peer.close()
        for _ in range(100):
            if not self._peers:
                break
            await asyncio.sleep(0.01)
        for client in self._clients:
            await client.close()
        loop.remove_reader(self._parent.fileno())
        if self._wal is not None:
            await loop.run_in_executor(self._executor, self._wal.close)
        await loop.run_in_executor(self._executor, self._db.close)
        self._executor.shutdown()
        log.info("stopped")

    # -- lifecycle ---------------------------------------------------------------------------

    def _on_parent_message(self) -> None:
        try:
            self._parent.recv()
        except (EOFError, OSError):
            log.warning("supervisor is gone; stopping")
            asyncio.get_running_loop().remove_reader(self._parent.fileno())
            self._spawn(self._stop_alone())

    def _schedule_grouping(self) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(QUIET_DELAY, self._group_when_quiet, loop.time(), self.store.queued_batches)

    def _group_when_quiet(self, first_queued: float, seen: int) -> None:
        queued = self.store.queued_batches
        if not queued:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        quiet = queued == seen and now - self._parsed_at >= QUIET_DELAY
        if not quiet and now - first_queued < MAX_QUEUE_AGE:
            loop.call_later(QUIET_DELAY, self._group_when_quiet, first_queued, queued)
            return
        self.store.group_queued()

    def _fold_in_steps(self) -> None:
        if not self._folding:
            self._folding = True
            asyncio.get_running_loop().call_soon(self._fold_step)

    def _fold_step(self) -> None:
        self._folding = False
        more = True
        try:
            more = self.store.fold_some(FOLD_STEP)
        finally:  # a failure lost the customer being folded in; go on with the others
            if more:
                self._fold_in_steps()

    def _spawn(self, coro: Coroutine[None, None, None]) -> None:
        """Run a task from a callback, holding a reference until it is done."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop_alone(self) -> None:
        try:
            await self._drain()
            await self._final_snapshot()
        finally:
            self._stopped.set()

    async def _drain(self) -> None:
        """Stop accepting ingest connections; give open ones a grace period to finish."""
        self._draining = True  # and pieces handed over (the other shard parses them itself)
        if self._tcp_server is not None:
            self._tcp_server.close()
        if self._ingest_tasks:
            _, pending = await asyncio.wait(set(self._ingest_tasks), timeout=DRAIN_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                log.warning(
                    "closed %d ingest connections still open after %ss", len(pending), DRAIN_GRACE
                )
                await asyncio.wait(pending)

    async def _final_snapshot(self) -> None:
        self._hurry = True  # a paced snapshot under way stops pausing
        try:
            await self._snapshot()
        except Exception:
            self.exit_code = 1
            log.exception(
                "final snapshot failed; the next start replays the write-ahead log"
                if self._wal is not None
                else "final snapshot failed; changes since the last snapshot are lost"
            )
            raise
        log.info("final snapshot written")

    # -- snapshots ---------------------------------------------------------------------------

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.snapshot_interval)
            try:
                await self._snapshot(paced=True)
            except Exception:
                log.exception("snapshot failed; will retry")

    async def _snapshot(self, paced: bool = False) -> None:
        """Write changed customer-days (and drop expired ones) in one transaction; `paced`
        spaces out building the rows (see SNAPSHOT_PACE)."""
        loop = asyncio.get_running_loop()
        async with self._snapshot_lock:
            started = time.perf_counter()
            self.store.advance(self._newest_day.get())
            self._counts.publish(self.store.customers_held)
            if self.store.newest_day == NO_DAY:
                return
            # Every record of the segments before this one is in the store now (queued or
            # applied), so the snapshot below covers them.
            covered_seq = self._wal.rotate() if self._wal is not None else 0
            keys = self.store.take_dirty()
            pieces = self._pieces.take_unsaved()
            rows = []
            assert self._db is not None
            try:
                # Serializing tens of thousands of days takes a while: let queries in between.
                took = 0.0
                for start in range(0, len(keys), SNAPSHOT_SLICE):
                    if start:
                        pause = took * SNAPSHOT_PACE if paced and not self._hurry else 0.0
                        await asyncio.sleep(pause)
                    began = time.perf_counter()
                    rows += self.store.rows(keys[start : start + SNAPSHOT_SLICE])
                    took = time.perf_counter() - began
                await loop.run_in_executor(
                    self._executor,
                    self._db.write,
                    rows,
                    self.store.cutoff_day,
                    self.store.newest_day,
                    pieces,
                    max(KEEP_SECONDS, (self.settings.retention_days + 10) * 86400),
                )
            except BaseException:
                self.store.mark_dirty(keys)
                self._pieces.unsaved_again(pieces)
                raise
            if self._wal is not None:
                await self._wal.discard_before(covered_seq)
            label = str(self.index)
            metrics.SNAPSHOT_SECONDS.labels(label).observe(time.perf_counter() - started)
            metrics.SNAPSHOT_ROWS.labels(label).inc(len(rows))
            with contextlib.suppress(OSError):
                metrics.SNAPSHOT_BYTES.set(self._db.path.stat().st_size)
            self._publish_sizes()
            if rows:
                log.debug("snapshot: %d customer-days", len(rows))
                # After an ingest burst, not per batch: it takes a few ms (off the loop thread;
                # ctypes releases the GIL during the call).
                await loop.run_in_executor(self._executor, release_free_memory)

    def _publish_sizes(self) -> None:
        label = str(self.index)
        metrics.CUSTOMERS.labels(label).set(len(self.store.customers))
        metrics.CUSTOMER_DAYS.labels(label).set(self.store.customer_days)

    # -- ingest over TCP ---------------------------------------------------------------------

    async def _serve_ingest(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._ingest_tasks.add(task)
        try:
            try:
                data, piece = await self._read_piece_header(reader)
            except TimeoutError:
                answer: dict[str, object] = msgspec.structs.asdict(IngestSummary())
                answer["error"] = self._idle_message()
            except PieceError as exc:
                answer = {"error": str(exc)}
            else:
                name, size = piece or ("", 0)
                # A piece waits, unread, until its whole size fits in this process's budget.
                async with self._piece_budget.reserved(size):
                    parser = self._piece_parser(size) if piece else self.index
                    if parser == self.index:
                        received = self._received(reader, data, bool(piece))
                        async with contextlib.aclosing(received) as chunks:
                            answer = await self._ingest_stream(chunks, name, size)
                    else:
                        answer = await self._hand_over(reader, data, name, size, parser)
            writer.write(msgspec.json.encode(answer) + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._ingest_tasks.discard(task)
            writer.close()

    def _idle_message(self) -> str:
        return f"idle timeout: nothing received for {self.settings.idle_timeout:g}s"

    def _piece_parser(self, size: int) -> int:
        """The shard to parse a load piece this shard received: the one it has given the
        fewest bytes so far, itself on a tie.

        The kernel spreads a load's connections over the shards by a hash, often 17 to 11;
        this way each shard parses an even share of every shard's pieces, and no shard is left
        parsing alone at the end of a load.
        """
        handed = self._handed
        parser = min(range(len(handed)), key=lambda shard: (handed[shard], shard != self.index))
        handed[parser] += size
        return parser

    async def _received(
        self, reader: asyncio.StreamReader, data: bytes, piece: bool
    ) -> AsyncGenerator[bytes, None]:
        """A connection's bytes until its end. IdleStream when nothing came for the idle
        timeout; PieceError instead for a load piece, as it is applied whole or not at all."""
        idle = self.settings.idle_timeout
        try:
            if data:
                yield data
            while data := await asyncio.wait_for(reader.read(READ_SIZE), idle):
                yield data
        except TimeoutError:
            if piece:
                raise PieceError(self._idle_message() + "; none of the piece applied") from None
            raise IdleStream from None

    async def _hand_over(
        self, reader: asyncio.StreamReader, data: bytes, piece: str, size: int, parser: int
    ) -> dict[str, object]:
        """Have shard `parser` parse and apply a load piece, through a file in the runtime
        directory; the client's answer.

        If that shard refuses it before starting (stopping, no room), this one parses it from
        the file. If that shard fails or does not answer, the client gets an error: the
        other shard may have applied part of the piece, and a re-run of the load is safe
        (the owners drop what they already took of a piece), while parsing it here would
        report that part as already loaded.
        """
        name = f"piece-{self.index}-{os.getpid()}-{next(self._handover_files)}"
        path = self._runtime_dir / name
        try:
            with open(path, "xb") as file:
                held = 0
                async with contextlib.aclosing(self._received(reader, data, True)) as chunks:
                    async for chunk in chunks:
                        file.write(chunk)
                        held += len(chunk)
                        if held > size:  # the parser refuses it, saying why
                            break
            message = IngestPiece(piece, size, str(path))
            reply = await self._clients[parser].request(message, HAND_OVER_TIMEOUT)
            if isinstance(reply, PieceRefused):
                log.info(
                    "shard %d refused a load piece (%s); parsing it here", parser, reply.reason
                )
                self._handed[parser] -= size
                self._handed[self.index] += size
                return await self._ingest_file(path, piece, size)
            if not isinstance(reply, PieceIngested):
                raise ShardUnavailable(parser, f"unexpected reply {type(reply).__name__}")
            self._m_handed.inc()
            return reply.answer
        except PieceError as exc:
            return {"error": str(exc)}
        except ShardUnavailable as exc:
            log.error("ingest connection failed: %s", exc)
            return {"error": str(exc)}
        except ConnectionError:  # the client went away
            raise
        except OSError as exc:  # writing or reading the file
            log.error("ingest connection failed: %s", exc)
            return {"error": f"cannot hold the load piece: {exc}"}
        finally:
            path.unlink(missing_ok=True)

    async def _parse_handed(self, body: IngestPiece) -> Body:
        """Parse and apply a load piece another shard received (see _hand_over). Refused,
        for that shard to parse it itself, while this one stops or has no room for it."""
        if self._draining:
            return PieceRefused("stopping")
        if not self._piece_budget.try_reserve(body.size):
            return PieceRefused("no room for another load piece")
        task = asyncio.current_task()
        assert task is not None
        self._ingest_tasks.add(task)  # drained like this shard's own connections
        try:
            return PieceIngested(await self._ingest_file(Path(body.path), body.piece, body.size))
        finally:
            self._ingest_tasks.discard(task)
            self._piece_budget.release(body.size)

    async def _ingest_file(self, path: Path, piece: str, size: int) -> dict[str, object]:
        """Parse and apply a load piece held in a file (see _hand_over); the answer."""
        # A page-cache read, about 1 ms per 4 MB (the loader's piece size): no thread.
        return await self._ingest_stream(_one(path.read_bytes()), piece, size)

    async def _ingest_stream(
        self, chunks: AsyncIterator[bytes], piece: str, piece_bytes: int
    ) -> dict[str, object]:
        """Feed a stream's bytes through a session; the answer: summary or error."""
        session = IngestSession(
            self._router,
            self._dispatcher,
            self._newest_day,
            self.settings.retention_days,
            process=str(self.index),
            piece=piece,
            piece_bytes=piece_bytes,
        )
        closing: dict[str, object] = {}
        try:
            try:
                async for data in chunks:
                    await self._feed(session, data)
                    del data  # a whole piece, handed over: not held while it is sent on
            except IdleStream:
                # Like an end of stream: what was sent is applied and summarised.
                closing = {"error": self._idle_message()}
            summary = await session.finish()
        except ConnectionError:  # the client went away
            await session.abort()
            raise
        except (PieceError, ShardUnavailable, OSError) as exc:
            if not isinstance(exc, PieceError):  # a shard down, or this one's disk failing
                log.error("ingest connection failed: %s", exc)
            await session.abort()
            return {"error": str(exc)}
        except BaseException:  # the connection failed, or the server is stopping
            await session.abort()
            raise
        answer = msgspec.structs.asdict(summary) | closing
        if piece:
            answer["already_loaded"] = session.duplicates
        return answer

    async def _feed(self, session: IngestSession, data: bytes) -> None:
        """Parse bytes a slice per turn (see PARSE_SLICE); full batches are sent on between
        turns (a send can wait for the owners, and other connections go on parsing)."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(data), PARSE_SLICE):
            async with self._parse_turn:
                session.take(data[start : start + PARSE_SLICE])
                self._parsed_at = loop.time()
                # The turn ends after a pass of the event loop: no other slice in that pass.
                await asyncio.sleep(0)
            await session.send_full()

    async def _read_piece_header(
        self, reader: asyncio.StreamReader
    ) -> tuple[bytes, tuple[str, int] | None]:
        """The first bytes of a connection, and the load piece it announces: name and size."""
        idle = self.settings.idle_timeout
        data = await asyncio.wait_for(reader.read(READ_SIZE), idle)
        if not data.startswith(PIECE_HEADER[: len(data)]) or not data:
            return data, None
        while b"\n" not in data and len(data) < len(PIECE_HEADER) + MAX_NAME_BYTES + 1:
            more = await asyncio.wait_for(reader.read(READ_SIZE), idle)
            if not more:
                break
            data += more
        line, newline, rest = data.partition(b"\n")
        if not line.startswith(PIECE_HEADER):
            return data, None
        name, _, size = line[len(PIECE_HEADER) :].strip().partition(b" ")
        if (
            not newline
            or not 0 < len(name) <= MAX_NAME_BYTES
            or not name.isascii()
            or not size.isdigit()
        ):
            raise PieceError(f"invalid load piece header {line[:64]!r}")
        if int(size) > MAX_PIECE_BYTES:
            raise PieceError(f"a load piece may hold at most {MAX_PIECE_BYTES} bytes")
        return rest, (name.decode(), int(size))

    # -- requests from the front, other shards and the supervisor ----------------------------

    async def _serve_peer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._peers.add(writer)
        try:
            await serve_connection(
                reader, writer, self._handle_now, self._handle_later, self._codec
            )
        finally:
            self._peers.discard(writer)

    async def _accept(
        self, batch: Batch, message: ApplyBatch | None = None, piece: str = ""
    ) -> Applied:
        """Take a batch this shard owns; acknowledged once its log record is on disk.

        The log append comes before any change in memory: if it fails (disk full), the
        batch is refused with nothing to undo. A failed fsync stops the shard (see
        _wal_failed).
        """
        cap = self.settings.max_customers
        if cap and self.store.has_new_customers(batch):
            # After a start, wait for every shard's restored count, or the cap could be
            # overshot by a shard that is quicker to start.
            await self._counts.wait_published()
            with self._counts.locked():  # released before the fsync wait
                room = cap - self._counts.others() - self.store.customers_held
                applied, lsn = self._take(batch, message, piece, room)
        else:
            applied, lsn = self._take(batch, message, piece, None)
        if lsn:
            assert self._wal is not None
            await self._wal.durable(lsn)
        return applied

    def _take(
        self, batch: Batch, message: ApplyBatch | None, piece: str, room: int | None
    ) -> tuple[Applied, int]:
        """Log the batch (LSN 0 without a log), then count it in: the reply and the LSN."""
        newest = self._newest_day.get()
        duplicate = refused = 0
        admitted: list[str] = []
        if piece:
            batch, duplicate = self._pieces.drop_held(piece, batch)
        if room is not None:
            batch, refused, admitted = self.store.plan_admission(batch, room)
        lsn = 0
        if self._wal is not None and (len(batch.day) or piece):
            if refused or duplicate or message is None:
                message = ApplyBatch.from_batch(batch, piece)
            lsn = self._wal.append(self._codec.wal_record(message, newest))
        # From here on nothing fails: the batch is this shard's.
        if admitted:
            self.store.admitted(admitted)
            self._counts.publish(self.store.customers_held)
        if piece:
            self._pieces.mark(piece)
        if len(batch.day):
            # In the same event-loop step as the enqueue, so no query sees the batch before
            # the bump; before it, so a failure while folding the batch in still bumps.
            self._changes.bump_customers([self._router.place(c) for c in batch.customers])
        self.store.enqueue(batch, newest, lsn)
        self._m_accepted.inc(len(batch.day))
        self._m_batches.inc()
        return Applied(len(batch.day), refused, duplicate), lsn

    def _wal_failed(self, exc: BaseException) -> None:
        """An fsync failed: what the kernel kept of the log is unknown (and a later fsync
        could succeed without it), so batches waiting on it can never be acknowledged. Stop
        at once, like a crash: the supervisor restarts the shard from its snapshot and log,
        whose tail past the last good fsync was cut off."""
        log.critical("write-ahead log fsync failed (%s); stopping this shard", exc)
        logging.shutdown()
        os._exit(70)

    def _handle_now(self, body: Body) -> Body | None:
        """Requests answered at once; None for those that must wait (batches, drain...)."""
        if isinstance(body, StatsQuery):
            self.store.advance(self._newest_day.get())
            self._counts.publish(self.store.customers_held)
            answer = self.store.query(
                body.customer_id, body.first_day, body.last_day, body.quantiles
            )
            return StatsReply(known=answer is not None, body=answer or b"")
        if isinstance(body, Ping):
            return Pong(self.index, len(self.store.customers), self.store.customer_days)
        if isinstance(body, ApplyBatch | IngestPiece | Drain | Shutdown):
            return None
        return ErrorReply(message=f"unexpected request {type(body).__name__}")

    async def _handle_later(self, body: Body) -> Body:
        if isinstance(body, ApplyBatch):
            batch = Batch(body.customers, *body.columns())
            return await self._accept(batch, body, body.piece)
        if isinstance(body, IngestPiece):
            return await self._parse_handed(body)
        if isinstance(body, Drain):
            await self._drain()
            return Drained()
        assert isinstance(body, Shutdown), body
        try:
            await self._final_snapshot()
        finally:
            # Stop after the reply is on its way, whether or not the snapshot worked.
            asyncio.get_running_loop().call_later(0.05, self._stopped.set)
        return ShutdownDone()


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


# -- the write-ahead log at start ------------------------------------------------------------


def replay_wal(store: ShardStore, pieces: LoadedPieces, wal: WriteAheadLog, codec: Codec) -> int:
    """Apply the batches a log holds beyond the snapshot; how many records were read."""
    count = 0
    for lsn, payload in wal.replay():
        try:
            record = codec.read_wal_record(payload)
        except msgspec.DecodeError as exc:  # a CRC-valid record we cannot read: keep going
            log.warning("write-ahead log record %d is unreadable (%s); skipped", lsn, exc)
            continue
        batch = record.batch
        store.apply(Batch(batch.customers, *batch.columns()), record.newest_day, lsn)
        if batch.piece:
            pieces.mark(batch.piece)
        count += 1
    return count


def recover_other_layouts(settings: Settings) -> None:
    """Fold in logs the shards will not replay themselves, before they start.

    A shard replays the segments of its own index under the current shard count. Segments
    written under another count (or any, with the log now off) are replayed here, one old
    shard at a time, into the snapshot; then they are deleted.
    """
    directory = settings.data_dir / WAL_DIRNAME
    current = {settings.shards} if settings.wal else set()
    codec = Codec()
    for shards in sorted(layouts(directory) - current):
        db = SnapshotDB(settings.data_dir)
        try:
            for index in range(shards):
                store = ShardStore(
                    SketchConfig(kll_k=settings.kll_k, req_k=settings.req_k),
                    settings.retention_days,
                )
                rows, newest = db.load(index, shards)
                store.restore(rows, NO_DAY if newest is None else newest)
                wal = WriteAheadLog(directory, index, shards)
                pieces = LoadedPieces(index, shards)
                replayed = replay_wal(store, pieces, wal, codec)
                if store.newest_day != NO_DAY:
                    db.write(
                        store.rows(store.take_dirty()),
                        store.cutoff_day,
                        store.newest_day,
                        pieces.take_unsaved(),
                    )
                wal.discard_all()
                wal.close()
                log.info(
                    "recovered %d batches from the write-ahead log of shard %d of %d",
                    replayed,
                    index,
                    shards,
                )
        finally:
            db.close()
