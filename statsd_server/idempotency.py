"""Idempotency-Key for POST /ingest: a retried batch is answered again, not counted twice.

The front keeps each key with the body's SHA-256 and the summary it answered in
`idempotency.db` (next to the snapshots, so keys survive restarts) for KEEP_SECONDS. The key
is stored once every shard has acknowledged the batch (written to its log) and before the
200 goes out; a crash in that gap, between two local writes, is the one case a retry counts
again.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import sqlite_utils

from statsd_server.errors import SnapshotError

HEADER = "Idempotency-Key"
KEEP_SECONDS = 24 * 3600
DB_FILENAME = "idempotency.db"
_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def key_problem(key: str) -> str | None:
    """Why a header value cannot be a key, or None."""
    if not _KEY.fullmatch(key):
        return "Idempotency-Key must be 1-255 visible ASCII characters"
    return None


class IdempotencyKeys:
    """The front's remembered keys; SQLite runs in one thread off the event loop."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DB_FILENAME
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="idempotency")
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}
        self._db: sqlite_utils.Database | None = None

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def _open(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db = sqlite_utils.Database(conn)
            db.enable_wal()
            table = db.table("keys")
            table.create(
                {"key": str, "body_sha256": str, "summary": bytes, "created": float},
                pk="key",
                if_not_exists=True,
            )
            table.create_index(["created"], if_not_exists=True)
        except sqlite3.DatabaseError as exc:
            raise SnapshotError(f"cannot open {self.path}: {exc}") from exc
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        self._executor.shutdown()

    @asynccontextmanager
    async def claimed(self, key: str) -> AsyncIterator[None]:
        """Serialise requests carrying the same key (a retry while the first is running)."""
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    async def get(self, key: str) -> tuple[str, bytes] | None:
        """(body SHA-256, summary JSON) stored for a key within KEEP_SECONDS, or None."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._get, key)

    def _get(self, key: str) -> tuple[str, bytes] | None:
        assert self._db is not None
        row = self._db.execute(
            "SELECT body_sha256, summary FROM keys WHERE key = ? AND created >= ?",
            [key, time.time() - KEEP_SECONDS],
        ).fetchone()
        return None if row is None else (row[0], row[1])

    async def put(self, key: str, body_sha256: str, summary: bytes) -> None:
        await asyncio.get_running_loop().run_in_executor(
            self._executor, self._put, key, body_sha256, summary
        )

    def _put(self, key: str, body_sha256: str, summary: bytes) -> None:
        assert self._db is not None
        now = time.time()
        with self._db.conn:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM keys WHERE created < ?", [now - KEEP_SECONDS])
            self._db.execute(
                "INSERT OR REPLACE INTO keys (key, body_sha256, summary, created)"
                " VALUES (?, ?, ?, ?)",
                [key, body_sha256, summary, now],
            )
