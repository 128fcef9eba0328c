"""Snapshots of customer-day aggregates in one SQLite file shared by all shards.

Rows carry a stable hash of the customer id, so a shard can restore the customers it owns
under any shard count (`customer_key % shards == index`). The file is in WAL mode so shards
can write their snapshots without blocking each other's readers.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import NamedTuple

import sqlite_utils

from sketches import DayAggregate, SketchConfig
from statsd_server.errors import SnapshotError
from statsd_server.pieces import KEEP_SECONDS, PieceRow
from statsd_server.routing import customer_key

DB_FILENAME = "stats.db"
_BUSY_TIMEOUT_MS = 30_000


class SnapshotRow(NamedTuple):
    """One customer-day as stored, fields in column order (it binds as the INSERT's parameters)."""

    customer_id: str
    day: int
    customer_key: int  # stable hash of the id: restore picks rows by customer_key % shards
    total: int
    successful: int
    client_errors: int
    server_errors: int
    duration_sum: float
    sketch_kind: str
    sketch: bytes
    wal_lsn: int  # the last write-ahead log record folded in (see persistence.wal)

    @classmethod
    def from_aggregate(
        cls, customer_id: str, day: int, agg: DayAggregate, key: int | None = None
    ) -> SnapshotRow:
        """The row of one customer-day; `key` is customer_key(customer_id) if known."""
        kind, blob = agg.to_blob()
        return cls(
            customer_id,
            day,
            customer_key(customer_id) if key is None else key,
            agg.total,
            agg.successful,
            agg.client_errors,
            agg.server_errors,
            agg.duration_sum,
            kind,
            blob,
            agg.lsn,
        )

    def aggregate(self, config: SketchConfig) -> DayAggregate:
        counters = (
            self.total,
            self.successful,
            self.client_errors,
            self.server_errors,
            self.duration_sum,
        )
        agg = DayAggregate.restore(config, counters, self.sketch_kind, self.sketch)
        agg.lsn = self.wal_lsn
        return agg


_COLUMNS = {
    "customer_id": str,
    "day": int,
    "customer_key": int,
    "total": int,
    "successful": int,
    "client_errors": int,
    "server_errors": int,
    "duration_sum": float,
    "sketch_kind": str,
    "sketch": bytes,
    "wal_lsn": int,
}


class SnapshotDB:
    """One process's connection to the snapshot file; use it from a single thread."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DB_FILENAME
        try:
            # Autocommit mode: transactions are explicit (see write()).
            conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self.db = sqlite_utils.Database(conn)
            self.db.enable_wal()
            days = self.db.table("days")
            days.create(_COLUMNS, pk=("customer_id", "day"), if_not_exists=True)
            if "wal_lsn" not in days.columns_dict:  # a file from before the write-ahead log
                days.add_column("wal_lsn", int, not_null_default=0)
            self.db.table("meta").create({"key": str, "value": int}, pk="key", if_not_exists=True)
            self.db.table("loaded_pieces").create(
                {"piece": str, "shards": int, "shard": int, "created": float},
                pk=("piece", "shards", "shard"),
                if_not_exists=True,
            )
        except sqlite3.DatabaseError as exc:
            raise SnapshotError(f"cannot open snapshot database {self.path}: {exc}") from exc
        # (cutoff_day, newest_day) of this connection's last write: see write().
        self._written: tuple[int, int] | None = None

    def write(
        self,
        rows: list[SnapshotRow],
        cutoff_day: int,
        newest_day: int,
        pieces: list[PieceRow] | None = None,
        keep_pieces_seconds: float = KEEP_SECONDS,
    ) -> None:
        """Upsert changed rows and newly applied load pieces, drop days older than the
        cutoff (and pieces older than KEEP_SECONDS), in one transaction.

        Days are dropped when the cutoff moved since this connection's last committed write
        (a full scan): rows another shard wrote below it meanwhile stay until the next move,
        and restore skips them. Nothing new (no rows, no pieces, the same days as the last
        committed write) writes nothing: an idle shard's periodic snapshot neither scans the
        table nor syncs the file.
        """
        written = (cutoff_day, newest_day)
        if not rows and not pieces and written == self._written:
            return
        conn = self.db.conn
        # IMMEDIATE takes the write lock up front, so a concurrent writer (another shard) makes
        # this wait for the busy timeout; a deferred transaction could fail at once instead.
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Rows are built by the caller: this thread only runs SQLite (which releases the
            # GIL), so a snapshot does not hold up the shard's event loop.
            conn.executemany(
                "INSERT OR REPLACE INTO days (customer_id, day, customer_key, total, successful,"
                " client_errors, server_errors, duration_sum, sketch_kind, sketch, wal_lsn)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            if self._written is None or cutoff_day != self._written[0]:
                conn.execute("DELETE FROM days WHERE day < ?", [cutoff_day])  # a full scan
            if pieces:
                conn.executemany(
                    "INSERT OR REPLACE INTO loaded_pieces (piece, shards, shard, created)"
                    " VALUES (?, ?, ?, ?)",
                    pieces,
                )
                conn.execute(
                    "DELETE FROM loaded_pieces WHERE created < ?",
                    [pieces[-1].created - keep_pieces_seconds],
                )
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('newest_day', ?)"
                " ON CONFLICT(key) DO UPDATE SET value = max(value, excluded.value)",
                [newest_day],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._written = written

    def load(self, shard: int, shards: int) -> tuple[list[SnapshotRow], int | None]:
        """The rows a shard owns under `shards` shards, and the newest day ever stored."""
        rows = [
            SnapshotRow(*r)
            for r in self.db.execute(
                "SELECT customer_id, day, customer_key, total, successful, client_errors,"
                " server_errors, duration_sum, sketch_kind, sketch, wal_lsn FROM days"
                " WHERE customer_key % ? = ?",
                [shards, shard],
            ).fetchall()
        ]
        meta = self.db.execute("SELECT value FROM meta WHERE key = 'newest_day'").fetchone()
        return rows, (meta[0] if meta else None)

    def load_pieces(self) -> list[PieceRow]:
        """Every layout's applied load pieces (see statsd_server.pieces)."""
        return [
            PieceRow(*r)
            for r in self.db.execute(
                "SELECT piece, shards, shard, created FROM loaded_pieces"
            ).fetchall()
        ]

    def close(self) -> None:
        self.db.close()
