"""Write-ahead log of the batches a shard accepted, so a crash loses nothing acknowledged.

Each shard appends every batch it takes to its own segment file and acknowledges the batch
only once the file is fsynced. Fsyncs are shared (group commit): one fsync covers every
record appended before it started, so many batches in flight cost one disk flush.

A snapshot starts a new segment, and once the snapshot is committed the older segments are
deleted. Records carry a sequence number (LSN); the snapshot stores, per customer-day, the
LSN of the last record folded into it, so a record that is both in a segment and in the
snapshot is not counted twice on replay.

Segment files are `shard-<i>-of-<n>.<seq>.wal`: the shard count is part of the name,
because which customers a segment holds depends on it. Each record is
`length (u32) | crc32 (u32) | lsn (u64) | payload`, little-endian, the CRC covering the LSN
and the payload. A torn or corrupt record ends the replay of its segment with a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

WAL_DIRNAME = "wal"
RECORD = struct.Struct("<IIQ")
_LSN = struct.Struct("<Q")
MAX_RECORD_BYTES = 1 << 30
_SEGMENT = re.compile(r"shard-(\d+)-of-(\d+)\.(\d+)\.wal")


def segments(directory: Path, shard: int, shards: int) -> list[tuple[int, Path]]:
    """(seq, path) of a shard's segments, oldest first."""
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = _SEGMENT.fullmatch(path.name)
            if match and (int(match[1]), int(match[2])) == (shard, shards):
                found.append((int(match[3]), path))
    return sorted(found)


def layouts(directory: Path) -> set[int]:
    """The shard counts that left segments in the directory."""
    if not directory.is_dir():
        return set()
    return {int(m[2]) for p in directory.iterdir() if (m := _SEGMENT.fullmatch(p.name))}


def read_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """(lsn, payload) of a segment's records; stops with a warning at a torn or bad record."""
    with open(path, "rb") as f:
        offset = 0
        while header := f.read(RECORD.size):
            problem = None
            if len(header) < RECORD.size:
                problem = "a truncated record header"
            else:
                size, crc, lsn = RECORD.unpack(header)
                payload = f.read(size) if size <= MAX_RECORD_BYTES else b""
                if size > MAX_RECORD_BYTES or len(payload) < size:
                    problem = "a truncated record"
                elif zlib.crc32(payload, zlib.crc32(header[8:])) != crc:
                    problem = "a record whose checksum does not match"
            if problem:
                log.warning(
                    "write-ahead log %s: %s at byte %d; skipping the rest of this file",
                    path,
                    problem,
                    offset,
                )
                return
            yield lsn, payload
            offset += RECORD.size + size


class _SyncJob(NamedTuple):
    future: asyncio.Future[None]
    target: int  # the newest record the fsync covers


class WriteAheadLog:
    """One shard's log: append on the event loop, fsync in a thread, many records per fsync."""

    def __init__(
        self,
        directory: Path,
        shard: int,
        shards: int,
        on_fsync: Callable[[float], None] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.directory = directory
        self._on_fsync = on_fsync
        self._on_failure = on_failure
        self._durable_size: dict[int, int] = {}  # fd -> bytes known on disk (WAL thread)
        self._shard = shard
        self._shards = shards
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"wal-{shard}")
        self._fd = -1
        self._seq = 0
        self._segment_empty = True
        self.last_lsn = 0  # the newest record appended
        self._synced_lsn = 0  # every record up to this one is on disk
        self._syncing: _SyncJob | None = None

    def replay(self) -> Iterator[tuple[int, bytes]]:
        """The records left by earlier runs, oldest first."""
        for seq, path in segments(self.directory, self._shard, self._shards):
            self._seq = max(self._seq, seq)
            for lsn, payload in read_records(path):
                self.last_lsn = max(self.last_lsn, lsn)
                yield lsn, payload

    def open(self, after_lsn: int) -> None:
        """Start a new segment; new records are numbered after `after_lsn` (and the replay)."""
        self.last_lsn = self._synced_lsn = max(self.last_lsn, after_lsn)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fd = self._open_segment()

    def _open_segment(self) -> int:
        self._seq += 1
        path = self.directory / f"shard-{self._shard}-of-{self._shards}.{self._seq:010d}.wal"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fsync_dir(self.directory)  # so the new file itself survives a crash
        self._segment_empty = True
        return fd

    def append(self, payload: bytes) -> int:
        """Write a record (not yet durable: see durable()); its LSN."""
        lsn = self.last_lsn + 1
        crc = zlib.crc32(payload, zlib.crc32(_LSN.pack(lsn)))
        size = RECORD.size + len(payload)
        written = os.writev(self._fd, [RECORD.pack(len(payload), crc, lsn), payload])
        if written != size:
            # A disk full mid-record: cut it off, so later records are not hidden behind it.
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - written)
            raise OSError(errno.ENOSPC, f"write-ahead log: wrote {written} of {size} bytes")
        self.last_lsn = lsn
        self._segment_empty = False
        return lsn

    async def durable(self, lsn: int) -> None:
        """Return once the record `lsn` (and every one before it) is on disk."""
        while self._synced_lsn < lsn:
            job = self._syncing or self._start_sync(self._fd, close=False)
            # Shielded: a waiter that is cancelled leaves the fsync to the others.
            await asyncio.shield(job.future)
            # Here, not only in the done callback: awaiting a future that is already done
            # does not yield, so the callback may not have run yet.
            self._finished(job)

    def _start_sync(self, fd: int, close: bool) -> _SyncJob:
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._sync, fd, close)
        job = self._syncing = _SyncJob(future, self.last_lsn)

        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._finished(job)
                return
            if self._syncing is job:
                self._syncing = None
            exc = f.exception() if not f.cancelled() else None
            if exc is not None and self._on_failure is not None:
                self._on_failure(exc)

        future.add_done_callback(done)
        return job

    def _finished(self, job: _SyncJob) -> None:
        self._synced_lsn = max(self._synced_lsn, job.target)
        if self._syncing is job:
            self._syncing = None

    def rotate(self) -> int:
        """Start a new segment; segments before the returned seq may go once a snapshot
        taken from now on is committed. An empty current segment is kept instead."""
        if self._segment_empty:
            return self._seq
        old = self._fd
        self._fd = self._open_segment()
        # The thread runs jobs in order: this fsync follows any in flight on the old file.
        self._start_sync(old, close=True)
        return self._seq

    async def discard_before(self, seq: int) -> None:
        """Delete the segments older than `seq` (a committed snapshot covers them)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._discard, seq)

    def _discard(self, seq: int) -> None:
        for old_seq, path in segments(self.directory, self._shard, self._shards):
            if old_seq < seq:
                path.unlink(missing_ok=True)

    def discard_all(self) -> None:
        """Delete every segment of this layout (offline recovery, after its snapshot)."""
        self._discard(self._seq + 1)

    def _sync(self, fd: int, close: bool) -> None:
        """fdatasync (in the WAL thread). On failure, cut the file back to what an earlier
        fsync made durable: records past it were never acknowledged, and must not come back
        at replay if the kernel still holds them."""
        try:
            size = os.fstat(fd).st_size
            started = time.perf_counter()
            try:
                os.fdatasync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, self._durable_size.get(fd, 0))
                raise
            self._durable_size[fd] = size
            if self._on_fsync is not None:
                self._on_fsync(time.perf_counter() - started)
        finally:
            if close:
                self._durable_size.pop(fd, None)
                os.close(fd)

    def close(self) -> None:
        if self._fd >= 0:
            self._executor.submit(self._sync, self._fd, True).result()
            self._fd = -1
        self._executor.shutdown()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
