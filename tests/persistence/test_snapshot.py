"""Snapshots in a real SQLite file: round trip, one transaction, retention, shard filtering."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from persistence.snapshot import SnapshotDB, SnapshotRow
from sketches import DayAggregate, SketchConfig
from statsd_server.errors import SnapshotError
from statsd_server.routing import shard_for


def row(customer_id: str, day: int, durations: list[float]) -> SnapshotRow:
    agg = DayAggregate(SketchConfig())
    arr = np.array(durations, dtype=np.float64)
    agg.add(len(arr), len(arr), 0, 0, float(arr.sum()), arr)
    return SnapshotRow.from_aggregate(customer_id, day, agg)


customer_ids = st.text(min_size=1, max_size=20).filter(lambda s: not any(c.isspace() for c in s))


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(
        st.tuples(customer_ids, st.integers(19000, 19030)),
        st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=30),
        max_size=30,
    ),
    st.integers(1, 4),
)
def test_round_trip_under_any_shard_count(tmp_path: Path, data: dict, shards: int) -> None:
    """Every written row comes back, once, from exactly the shard that owns it."""
    d = tmp_path / f"rt-{len(data)}-{shards}"
    d.mkdir(exist_ok=True)
    (d / "stats.db").unlink(missing_ok=True)
    rows = [row(c, day, v) for (c, day), v in data.items()]
    db = SnapshotDB(d)
    db.write(rows, cutoff_day=0, newest_day=19030)
    db.close()
    db = SnapshotDB(d)
    loaded = []
    for shard in range(shards):
        part, newest = db.load(shard, shards)
        assert newest == 19030
        assert all(shard_for(r.customer_id, shards) == shard for r in part)
        loaded += part
    db.close()
    assert sorted(loaded, key=lambda r: (r.customer_id, r.day)) == sorted(
        rows, key=lambda r: (r.customer_id, r.day)
    )


def test_upsert_replaces_and_retention_deletes(tmp_path: Path) -> None:
    """A newer row replaces the old one; days before the cutoff are deleted."""
    db = SnapshotDB(tmp_path)
    db.write([row("a", 10, [1.0]), row("a", 20, [1.0]), row("b", 20, [2.0])], 0, 20)
    db.write([row("a", 20, [1.0, 3.0])], cutoff_day=15, newest_day=20)
    rows, newest = db.load(0, 1)
    assert newest == 20
    assert sorted((r.customer_id, r.day, r.total) for r in rows) == [("a", 20, 2), ("b", 20, 1)]


def test_newest_day_never_goes_back(tmp_path: Path) -> None:
    """The stored newest day is the maximum ever written, whichever shard writes last."""
    db = SnapshotDB(tmp_path)
    db.write([], 0, 30)
    db.write([], 0, 25)
    assert db.load(0, 1)[1] == 30


def test_a_write_with_nothing_new_writes_nothing(tmp_path: Path) -> None:
    """An idle shard's periodic snapshot (no rows, no pieces, the same days) changes nothing
    in the file; once the cutoff moves, the expired days go, whichever shard wrote them."""
    db = SnapshotDB(tmp_path)
    db.write([row("a", 10, [1.0]), row("a", 20, [1.0])], 0, 20)
    changes = db.db.conn.total_changes
    db.write([], 0, 20)
    assert db.db.conn.total_changes == changes
    SnapshotDB(tmp_path).write([row("b", 12, [1.0])], 0, 20)  # another shard
    db.write([], cutoff_day=15, newest_day=25)
    rows, newest = db.load(0, 1)
    assert sorted((r.customer_id, r.day) for r in rows) == [("a", 20)]
    assert newest == 25


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    """A snapshot is one transaction: an error mid-way writes no row at all."""
    db = SnapshotDB(tmp_path)
    db.write([row("a", 1, [1.0])], 0, 1)
    bad = SnapshotRow("b", 1, 7, 1, 1, 0, 0, 1.0, "kll_doubles", None, 0)  # type: ignore[arg-type]
    bad_twin = SnapshotRow("c", 1, 7, 1, 1, 0, 0, 1.0, "kll_doubles", b"x", 0)
    db.db.execute(
        "CREATE TRIGGER no_c BEFORE INSERT ON days WHEN NEW.customer_id = 'c' BEGIN SELECT RAISE(ABORT, 'boom'); END"
    )
    with pytest.raises(sqlite3.DatabaseError):
        db.write([bad, bad_twin], cutoff_day=5, newest_day=9)
    rows, newest = db.load(0, 1)
    assert [(r.customer_id, r.day) for r in rows] == [("a", 1)]
    assert newest == 1
    db.write([], cutoff_day=5, newest_day=9)  # the retry is not taken for a write already done
    rows, newest = db.load(0, 1)
    assert rows == [] and newest == 9


def test_corrupt_file_is_named_in_the_error(tmp_path: Path) -> None:
    """A file that is not SQLite stops the open with a message naming it."""
    (tmp_path / "stats.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(SnapshotError, match=str(tmp_path / "stats.db")):
        SnapshotDB(tmp_path)
