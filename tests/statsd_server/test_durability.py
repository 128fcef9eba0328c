"""Crashes lose nothing acknowledged: SIGKILL the real server, restart it, count again."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.statsd_server.test_processes import kill_shard_and_wait_for_restart

TODAY = dt.datetime.now(dt.UTC).date()
DAY = TODAY - dt.timedelta(days=1)


def lines_for(customer: str, n: int, start: int = 0) -> bytes:
    """n valid lines of one customer on DAY, every tenth one a server error."""
    out = []
    for i in range(start, start + n):
        ts = f"{DAY.isoformat()} {(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:{i % 60:02d}"
        status = 500 if i % 10 == 0 else 200
        out.append(f"{ts} {customer} /v1/items {status} 0.{(i % 900) + 100:03d}\n")
    return "".join(out).encode()


def totals(server: Server, customers: list[str], since: dt.date = DAY) -> dict[str, int]:
    """Requests counted per customer from `since` on (0 for unknown ones)."""
    counts = {}
    for customer in customers:
        status, body = server.get(f"/customers/{customer}/stats?from={since.isoformat()}")
        assert status in (200, 404), body
        counts[customer] = body["summary"]["total_requests"] if status == 200 else 0
    return counts


def kill_everything(server: Server) -> None:
    """SIGKILL the supervisor, the front and every shard at once, as a power cut would."""
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait()


def restart(server: Server, shards: int | None = None, **env: str) -> Server:
    again = Server(
        data_dir=server.data_dir,
        shards=shards or server.shards,
        env_extra={**server.env_extra, **env},
    )
    return again.start()


def segment_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "wal").glob("*.wal"))


@pytest.mark.slow
def test_sigkill_after_acknowledgement_loses_nothing(server_factory: Any) -> None:
    """Lines acknowledged over TCP and POST survive a SIGKILL of every process."""
    server: Server = server_factory(shards=2)  # snapshots every 60 s: none happens here
    sent: Counter[str] = Counter()
    for k in range(6):
        customer = f"tcp_{k}"
        summary = server.send_tcp(lines_for(customer, 2_000 + k))
        assert summary["accepted"] == 2_000 + k
        sent[customer] = 2_000 + k
    status, summary = server.request(
        "POST", "/ingest", lines_for("posted", 777), {"Content-Type": "text/plain"}
    )
    assert status == 200 and summary["accepted"] == 777
    sent["posted"] = 777
    kill_everything(server)

    again = restart(server)
    try:
        assert totals(again, list(sent)) == dict(sent)
        assert "replayed" in again.log()
    finally:
        again.stop()


@pytest.mark.slow
def test_sigkill_mid_ingest_keeps_every_acknowledged_connection(server_factory: Any) -> None:
    """Killed while 4 clients stream: every connection that got its summary is there in full,
    and no connection counts more lines than it sent."""
    server: Server = server_factory(shards=2, STATS_SNAPSHOT_INTERVAL="0.3")
    acked: dict[str, int] = {}
    sent: dict[str, int] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def client(worker: int) -> None:
        k = 0
        while not stop.is_set():
            customer, n = f"w{worker}_{k}", 3_000 + 7 * k
            with lock:
                sent[customer] = n
            try:
                with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=30) as s:
                    s.sendall(lines_for(customer, n))
                    s.shutdown(socket.SHUT_WR)
                    reply = b""
                    while chunk := s.recv(4096):
                        reply += chunk
            except OSError:
                return
            if reply.endswith(b"\n") and b'"accepted"' in reply:
                with lock:
                    acked[customer] = n
            k += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # several snapshots (and log truncations) happen meanwhile
    kill_everything(server)
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) > 20, "the clients should have had many connections acknowledged"

    again = restart(server)
    try:
        found = totals(again, list(sent))
        lost = {c: (n, found[c]) for c, n in acked.items() if found[c] != n}
        assert not lost, f"acknowledged connections not kept in full: {lost}"
        over = {c: (n, found[c]) for c, n in sent.items() if found[c] > n}
        assert not over, f"counted more than sent: {over}"
    finally:
        again.stop()


@pytest.mark.slow
def test_log_is_truncated_by_snapshots_and_never_double_counts(server_factory: Any) -> None:
    """After snapshots cover the log it is deleted; a crash then replays only what is newer."""
    server: Server = server_factory(shards=2, STATS_SNAPSHOT_INTERVAL="0.3")
    customers = [f"t{k}" for k in range(8)]
    for k, customer in enumerate(customers):
        server.send_tcp(lines_for(customer, 1_000 + k))
    time.sleep(1.5)  # snapshots commit the first part and delete the segments holding it
    size_after_snapshots = sum(p.stat().st_size for p in segment_files(server.data_dir))
    assert size_after_snapshots == 0, segment_files(server.data_dir)
    for k, customer in enumerate(customers):
        # more for the same customer-days, so days are in both the snapshot and the log
        server.send_tcp(lines_for(customer, 500, start=5_000 + k))
    kill_everything(server)

    again = restart(server)
    try:
        assert totals(again, customers) == {c: 1_500 + k for k, c in enumerate(customers)}
    finally:
        again.stop()
    # A second run of the same log cannot happen: the graceful stop covered and deleted it.
    third = restart(server)
    try:
        assert totals(third, customers) == {c: 1_500 + k for k, c in enumerate(customers)}
    finally:
        third.stop()


@pytest.mark.slow
def test_torn_and_corrupt_log_tails_are_skipped_with_a_warning(server_factory: Any) -> None:
    """Garbage after the last record, and a record with a bad checksum, never stop the start."""
    server: Server = server_factory(shards=1)
    server.send_tcp(lines_for("torn", 1_000))
    server.send_tcp(lines_for("torn2", 10))
    kill_everything(server)
    (segment,) = [p for p in segment_files(server.data_dir) if p.stat().st_size]
    data = segment.read_bytes()
    # Flip a payload byte of the last record (torn2's), then leave half a header after it.
    corrupt = bytearray(data)
    corrupt[-5] ^= 0xFF
    segment.write_bytes(bytes(corrupt) + b"\x10\x00\x00")

    again = restart(server)
    try:
        assert totals(again, ["torn", "torn2"]) == {"torn": 1_000, "torn2": 0}
        assert "checksum does not match" in again.log()
    finally:
        again.stop()


@pytest.mark.slow
def test_log_written_under_another_shard_count_is_recovered(server_factory: Any) -> None:
    """Crash with 2 shards, restart with 3: the old layout's log is folded in, then removed."""
    server: Server = server_factory(shards=2)
    customers = [f"m{k}" for k in range(12)]
    for k, customer in enumerate(customers):
        server.send_tcp(lines_for(customer, 200 + k))
    kill_everything(server)
    assert any("-of-2." in p.name for p in segment_files(server.data_dir))

    again = restart(server, shards=3)
    try:
        assert totals(again, customers) == {c: 200 + k for k, c in enumerate(customers)}
        assert not any("-of-2." in p.name for p in segment_files(server.data_dir))
    finally:
        again.stop()


@pytest.mark.slow
def test_killed_shard_replays_its_log(server_factory: Any) -> None:
    """SIGKILL of one shard (no snapshot yet): restarted, it answers with every acked line."""
    server: Server = server_factory(shards=2)
    customers = [f"k{k}" for k in range(10)]
    for k, customer in enumerate(customers):
        server.send_tcp(lines_for(customer, 300 + k))
    kill_shard_and_wait_for_restart(server, 0)
    assert totals(server, customers) == {c: 300 + k for k, c in enumerate(customers)}


@pytest.mark.slow
def test_without_the_log_a_crash_loses_unsnapshotted_data(server_factory: Any) -> None:
    """STATS_WAL=false really turns it off: the documented trade-off, shown."""
    server: Server = server_factory(shards=1, STATS_WAL="false")
    server.send_tcp(lines_for("volatile", 100))
    kill_everything(server)
    assert not segment_files(server.data_dir)
    again = restart(server)
    try:
        assert totals(again, ["volatile"]) == {"volatile": 0}
    finally:
        again.stop()
