"""Idempotency-Key for POST /ingest: a retried batch is answered again, not counted twice.

The front keeps each key with the body's SHA-256 and the summary it answered in
`idempotency.db` (next to the snapshots, so keys survive restarts) for KEEP_SECONDS. The key
is stored once every shard has acknowledged the batch (written to its log) and before the
200 goes out; a crash in that gap, between two local writes, is the one case a retry counts
again.

Requests with the same key are serialised across all the fronts by a POSIX record lock on
one byte of a lock file, at an offset of 62 bits of the key's BLAKE2b hash (so distinct keys
practically never share one; unheld locks cost nothing). The kernel drops a dead front's
locks, so a crash never leaves a key claimed.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
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
LOCK_FILENAME = "idempotency.lock"
# How often a request polls for the lock a request with the same key holds in another front.
LOCK_POLL_SECONDS = 0.005
_KEY = re.compile(r"[\x21-\x7e]{1,255}")


def key_problem(key: str) -> str | None:
    """Why a header value cannot be a key, or None."""
    if not _KEY.fullmatch(key):
        return "Idempotency-Key must be 1-255 visible ASCII characters"
    return None


def prepare(data_dir: Path) -> None:
    """Create the database and its table before the fronts start: several fronts switching
    it to WAL mode at once would fail with "database is locked"."""
    _connect(data_dir / DB_FILENAME).close()


def _connect(path: Path) -> sqlite_utils.Database:
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db = sqlite_utils.Database(conn)
        db.enable_wal()  # a no-op once the database is in WAL mode
        table = db.table("keys")
        table.create(
            {"key": str, "body_sha256": str, "summary": bytes, "created": float},
            pk="key",
            if_not_exists=True,
        )
        table.create_index(["created"], if_not_exists=True)
    except sqlite3.DatabaseError as exc:
        raise SnapshotError(f"cannot open {path}: {exc}") from exc
    return db


class IdempotencyKeys:
    """A front's view of the remembered keys; SQLite runs in one thread off the event loop.

    The lock file lives in `runtime_dir`, which the server's fronts share.
    """

    def __init__(self, data_dir: Path, runtime_dir: Path) -> None:
        self.path = data_dir / DB_FILENAME
        self._lock_path = runtime_dir / LOCK_FILENAME
        self._lock_fd = -1
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="idempotency")
        # Record locks belong to the process, so this front's requests queue here first.
        self._locks: dict[int, tuple[asyncio.Lock, list[int]]] = {}
        self._db: sqlite_utils.Database | None = None

    async def open(self) -> None:
        self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    def _open(self) -> None:
        self._db = _connect(self.path)

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        self._executor.shutdown()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    @asynccontextmanager
    async def claimed(self, key: str) -> AsyncIterator[None]:
        """Serialise requests carrying the same key (a retry while the first is running), in
        every front."""
        slot = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") >> 2
        lock, users = self._locks.setdefault(slot, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                await self._lock_slot(slot)
                try:
                    yield
                finally:
                    fcntl.lockf(self._lock_fd, fcntl.LOCK_UN, 1, slot)
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[slot]

    async def _lock_slot(self, slot: int) -> None:
        """Take the record lock on byte `slot`, polling while another front holds it (a
        blocking wait in a thread could not be cancelled with its request)."""
        while True:
            try:
                fcntl.lockf(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, slot)
                return
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    raise
            await asyncio.sleep(LOCK_POLL_SECONDS)

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
