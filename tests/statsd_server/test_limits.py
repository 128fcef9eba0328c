"""Limits that keep one client from hurting the rest: the customer cap and idle timeouts."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.statsd_server.test_durability import lines_for, totals


@pytest.mark.slow
def test_customer_cap_rejects_new_customers_and_keeps_existing_ones(server_factory: Any) -> None:
    """With STATS_MAX_CUSTOMERS=50 over 2 shards, exactly 50 of 80 customers get in; their
    later lines are accepted, the others' rejected as customer_limit."""
    server: Server = server_factory(shards=2, STATS_MAX_CUSTOMERS="50")
    customers = [f"cap_{k}" for k in range(80)]
    first = server.send_tcp(b"".join(lines_for(c, 3) for c in customers))
    assert first["accepted"] == 50 * 3
    assert first["rejected_by_reason"] == {"customer_limit": 30 * 3}
    admitted = [c for c, n in totals(server, customers).items() if n]
    assert len(admitted) == 50

    # Existing customers keep working, over TCP and POST; the cap still holds for new ones.
    again = server.send_tcp(b"".join(lines_for(c, 2, start=100) for c in customers))
    assert again["accepted"] == 50 * 2 and again["rejected"] == 30 * 2
    status, posted = server.request(
        "POST",
        "/ingest",
        lines_for(admitted[0], 4, start=200) + lines_for("cap_new", 4),
        {"Content-Type": "text/plain"},
    )
    assert status == 200 and posted["accepted"] == 4
    assert posted["rejected_by_reason"] == {"customer_limit": 4}
    counts = totals(server, customers)
    assert sum(counts.values()) == 50 * 5 + 4
    assert {c for c, n in counts.items() if n} == set(admitted)

    # The cap holds across a restart: the restored customers count against it.
    server.stop()
    restarted = Server(data_dir=server.data_dir, shards=2, env_extra=server.env_extra).start()
    try:
        late = restarted.send_tcp(lines_for("cap_late", 5) + lines_for(admitted[1], 5))
        assert late["accepted"] == 5 and late["rejected_by_reason"] == {"customer_limit": 5}
    finally:
        restarted.stop()


def read_reply(sock: socket.socket) -> bytes:
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
    return reply


@pytest.mark.slow
def test_idle_tcp_connection_is_summarised_and_closed(server_factory: Any) -> None:
    """A client that sends lines and then neither sends nor closes gets its summary, with the
    reason, after STATS_IDLE_TIMEOUT; its lines count."""
    server: Server = server_factory(shards=2, STATS_IDLE_TIMEOUT="1")
    with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=30) as sock:
        sock.sendall(lines_for("idle", 10))
        started = time.monotonic()
        reply = json.loads(read_reply(sock))
        waited = time.monotonic() - started
    assert reply["accepted"] == 10
    assert reply["error"] == "idle timeout: nothing received for 1s"
    assert 0.9 < waited < 10
    assert totals(server, ["idle"]) == {"idle": 10}


@pytest.mark.slow
def test_slow_client_does_not_hold_up_others(server_factory: Any) -> None:
    """One byte every 0.2 s on one connection, while other clients ingest and query at once;
    the trickle is kept whole when it ends."""
    server: Server = server_factory(shards=2, STATS_IDLE_TIMEOUT="5")
    trickle = lines_for("slow", 3)
    result: dict[str, Any] = {}

    def slow_client() -> None:
        with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=60) as sock:
            for i in range(0, len(trickle), 8):
                sock.sendall(trickle[i : i + 8])
                time.sleep(0.2)
            sock.shutdown(socket.SHUT_WR)
            result["slow"] = json.loads(read_reply(sock))

    thread = threading.Thread(target=slow_client)
    thread.start()
    time.sleep(0.5)
    for k in range(5):
        started = time.monotonic()
        assert server.send_tcp(lines_for(f"fast_{k}", 1_000))["accepted"] == 1_000
        assert time.monotonic() - started < 5, "a fast client waited on the slow one"
    assert totals(server, [f"fast_{k}" for k in range(5)]) == {f"fast_{k}": 1_000 for k in range(5)}
    assert thread.is_alive(), "the trickle should still be going"
    thread.join(60)
    assert result["slow"]["accepted"] == 3
    assert totals(server, ["slow"]) == {"slow": 3}


@pytest.mark.slow
def test_idle_post_body_gets_408(server_factory: Any) -> None:
    """A POST whose body stops arriving is answered 408 after STATS_IDLE_TIMEOUT."""
    server: Server = server_factory(shards=1, STATS_IDLE_TIMEOUT="1")
    body = lines_for("post_idle", 5)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        head = (
            f"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body) + 1000}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        response = sock.recv(65536).decode()
    assert response.startswith("HTTP/1.1 408"), response
    assert '"error":"idle timeout: no body data for 1s"' in response


def server_rss_mb(server: Server) -> float:
    """Resident memory of the supervisor and its children."""
    assert server.proc is not None
    pid = server.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total_kb = 0
    for p in [pid, *map(int, children)]:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kb += int(line.split()[1])
    return total_kb / 1024


@pytest.mark.slow
def test_a_fast_client_flooding_for_seconds_keeps_memory_bounded(server_factory: Any) -> None:
    """Two connections sending as fast as they can for 8 s: the server reads only as fast as
    it applies (TCP pushes back), its memory levels off, and every line is counted."""
    server: Server = server_factory(shards=2)
    block = b"".join(lines_for(f"flood_{k}", 5_000, start=k) for k in range(40))
    sent = [0, 0]

    def flood(i: int) -> None:
        with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=120) as sock:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                sock.sendall(block)
                sent[i] += 1
            sock.shutdown(socket.SHUT_WR)
            assert json.loads(read_reply(sock))["accepted"] == sent[i] * 200_000

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    early = server_rss_mb(server)
    for t in threads:
        t.join(120)
    late = server_rss_mb(server)
    assert late - early < 200, f"RSS grew from {early:.0f} to {late:.0f} MB"
    counted = totals(server, [f"flood_{k}" for k in range(40)])
    assert sum(counted.values()) == sum(sent) * 200_000


def test_admission_waits_until_every_shard_published_its_count(tmp_path: Path) -> None:
    """After a start, a shard does not admit new customers before the slower shards have
    restored theirs: otherwise the cap could be overshot."""
    import asyncio

    from statsd_server import shard_counts
    from statsd_server.shard_counts import ShardCounts

    path = tmp_path / "counts"
    shard_counts.create(path, 2)
    fast, slow = ShardCounts(path, 0), ShardCounts(path, 1)

    async def run() -> tuple[bool, int]:
        fast.publish(3)
        waiter = asyncio.create_task(fast.wait_published())
        await asyncio.sleep(0.2)
        blocked = not waiter.done()
        slow.publish(4)
        await asyncio.wait_for(waiter, 5)
        return blocked, fast.others()

    try:
        assert asyncio.run(run()) == (True, 4)
    finally:
        fast.close()
        slow.close()
