"""The write-ahead log file format, on real files: round trip, rotation, torn and bad tails."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from persistence.wal import WriteAheadLog, layouts, read_records, segments


def write(directory: Path, payloads: list[bytes], shard: int = 0, shards: int = 1) -> None:
    async def run() -> None:
        wal = WriteAheadLog(directory, shard, shards)
        list(wal.replay())
        wal.open(0)
        last = 0
        for payload in payloads:
            last = wal.append(payload)
        await wal.durable(last)
        wal.close()

    asyncio.run(run())


def test_records_come_back_in_order_with_increasing_lsns(tmp_path: Path) -> None:
    """Appended payloads replay byte for byte, numbered 1, 2, 3 ..."""
    payloads = [b"", b"a", b"\x00" * 70_000, "ü".encode()]
    write(tmp_path, payloads)
    wal = WriteAheadLog(tmp_path, 0, 1)
    assert list(wal.replay()) == list(enumerate(payloads, start=1))
    assert wal.last_lsn == 4


def test_numbering_continues_after_a_restart_and_after_the_snapshot(tmp_path: Path) -> None:
    """A new run numbers after the replayed records, or after the snapshot's LSN if higher."""
    write(tmp_path, [b"x", b"y"])

    async def run() -> tuple[int, int]:
        wal = WriteAheadLog(tmp_path, 0, 1)
        list(wal.replay())
        wal.open(0)
        first = wal.append(b"z")
        wal.close()
        wal = WriteAheadLog(tmp_path, 0, 1)
        list(wal.replay())
        wal.open(100)
        second = wal.append(b"w")
        wal.close()
        return first, second

    assert asyncio.run(run()) == (3, 101)


def test_rotation_and_discard_keep_only_uncovered_segments(tmp_path: Path) -> None:
    """Segments before the rotation point go; the current one stays; empty ones are reused."""

    async def run() -> list[tuple[int, bytes]]:
        wal = WriteAheadLog(tmp_path, 0, 1)
        wal.open(0)
        wal.append(b"old")
        seq = wal.rotate()
        assert wal.rotate() == seq  # nothing appended since: no new, empty segment
        await wal.durable(wal.append(b"new"))
        await wal.discard_before(seq)
        wal.close()
        return list(WriteAheadLog(tmp_path, 0, 1).replay())

    assert asyncio.run(run()) == [(2, b"new")]
    assert len(segments(tmp_path, 0, 1)) == 1


def test_segments_are_told_apart_by_shard_and_shard_count(tmp_path: Path) -> None:
    """Each shard replays only its own layout's files."""
    write(tmp_path, [b"a"], shard=0, shards=2)
    write(tmp_path, [b"b"], shard=1, shards=2)
    write(tmp_path, [b"c"], shard=0, shards=3)
    assert layouts(tmp_path) == {2, 3}
    assert [p for _, p in WriteAheadLog(tmp_path, 1, 2).replay()] == [b"b"]
    assert [p for _, p in WriteAheadLog(tmp_path, 0, 3).replay()] == [b"c"]


@settings(max_examples=60, deadline=None)
@given(
    payloads=st.lists(st.binary(max_size=64), min_size=1, max_size=8),
    cut=st.integers(min_value=0),
    flip=st.integers(min_value=0),
)
def test_any_torn_or_flipped_file_replays_an_intact_prefix(
    tmp_path_factory: pytest.TempPathFactory, payloads: list[bytes], cut: int, flip: int
) -> None:
    """Cut the file anywhere or flip any byte: replay yields a prefix of what was written."""
    directory = tmp_path_factory.mktemp("wal")
    write(directory, payloads)
    ((_, path),) = segments(directory, 0, 1)
    data = bytearray(path.read_bytes())
    data = data[: cut % (len(data) + 1)]
    if data and flip % 2:
        data[flip % len(data)] ^= 0x5A
    path.write_bytes(bytes(data))
    replayed = [payload for _, payload in read_records(path)]
    assert replayed == payloads[: len(replayed)]


def test_a_bad_tail_is_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The warning says which file, what was wrong, and where."""
    write(tmp_path, [b"first", b"second"])
    ((_, path),) = segments(tmp_path, 0, 1)
    path.write_bytes(path.read_bytes()[:-3])
    with caplog.at_level(logging.WARNING):
        assert [p for _, p in read_records(path)] == [b"first"]
    assert f"{path}: a truncated record at byte 21" in caplog.text


def test_many_concurrent_waiters_and_rotations_all_complete(tmp_path: Path) -> None:
    """Hundreds of batches waiting on shared fsyncs while segments rotate: each returns,
    and every record is replayed once."""
    import faulthandler

    async def run() -> int:
        wal = WriteAheadLog(tmp_path, 0, 1)
        wal.open(0)
        waiters = []
        for i in range(600):
            waiters.append(asyncio.create_task(wal.durable(wal.append(b"%d" % i))))
            if i % 7 == 0:
                await asyncio.sleep(0)
            if i % 50 == 0:
                wal.rotate()
        await asyncio.gather(*waiters)
        synced = wal._synced_lsn
        wal.close()
        return synced

    # A waiter that spins without yielding would hang the loop: fail loudly instead.
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        assert asyncio.run(run()) == 600
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert [p for _, p in WriteAheadLog(tmp_path, 0, 1).replay()] == [b"%d" % i for i in range(600)]


def test_a_failed_fsync_is_reported_and_cuts_the_unsynced_tail(tmp_path: Path) -> None:
    """When fdatasync fails, waiters get the error, the failure callback is told, and the
    file is cut back to what the last good fsync covered (never acknowledged past it)."""
    import os

    failures: list[BaseException] = []

    async def run() -> None:
        wal = WriteAheadLog(tmp_path, 0, 1, on_failure=failures.append)
        wal.open(0)
        await wal.durable(wal.append(b"kept"))
        ((_, path),) = segments(tmp_path, 0, 1)
        good_size = path.stat().st_size
        lsn = wal.append(b"never acknowledged")
        real = os.fdatasync

        def failing(fd: int) -> None:
            raise OSError(5, "Input/output error")

        os.fdatasync = failing  # type: ignore[assignment]
        try:
            with pytest.raises(OSError, match="Input/output"):
                await wal.durable(lsn)
        finally:
            os.fdatasync = real
        await asyncio.sleep(0)  # the done callback
        assert path.stat().st_size == good_size
        wal.close()

    asyncio.run(run())
    assert len(failures) == 1 and isinstance(failures[0], OSError)
    assert [p for _, p in WriteAheadLog(tmp_path, 0, 1).replay()] == [b"kept"]
