"""Several HTTP fronts on one port, and their answer caches: never a stale answer."""

from __future__ import annotations

import datetime as dt
import email.utils
import http.client
import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from statsd_server import changes, newest_day
from statsd_server.answer_cache import ENTRY_OVERHEAD, AnswerCache
from statsd_server.changes import ChangeCounters
from statsd_server.newest_day import NewestDay
from statsd_server.routing import Router
from tests.conftest import Server, read_http_responses
from tests.statsd_server.test_durability import DAY, lines_for
from tests.statsd_server.test_observability import scrape, total
from tests.statsd_server.test_processes import kill_shard_and_wait_for_restart, owned_customers

# Each urllib request opens a new connection, which either front may accept: asking a few
# times reaches both (and both caches) with near certainty.
ASKS = 8


def answers(server: Server, path: str) -> list[tuple[int, Any]]:
    return [server.get(path) for _ in range(ASKS)]


def front_pids(server: Server) -> dict[int, int]:
    """Front index -> pid of its latest start, from the server log."""
    pids = {}
    for m in re.finditer(r"\[front-(\d+)\] statsd_server\.front: pid (\d+):", server.log()):
        pids[int(m[1])] = int(m[2])
    return pids


def test_answers_change_as_soon_as_lines_arrive(server_factory: Any) -> None:
    """Cached answers are dropped by new lines of their customer, and only of their customer."""
    server: Server = server_factory(shards=2, STATS_FRONTS="2")
    owners = owned_customers(2)
    path = {c: f"/customers/{c}/stats?from={DAY.isoformat()}" for c in owners.values()}
    sent = dict.fromkeys(owners.values(), 0)
    for round_ in range(4):
        for customer in owners.values():
            n = 10 + round_
            assert server.send_tcp(lines_for(customer, n, start=sent[customer]))["accepted"] == n
            sent[customer] += n
            for other in owners.values():  # every answer, cached or not, is the current one
                for status, body in answers(server, path[other]):
                    if not sent[other]:
                        assert status == 404
                        continue
                    assert status == 200
                    assert body["summary"]["total_requests"] == sent[other], (round_, other)
    # The same query spelled differently is cached apart and agrees.
    customer = owners[0]
    status, body = server.get(f"/customers/{customer}/stats?from={DAY.isoformat()}&to=")
    assert status == 400  # an empty 'to' is not a date
    status, body = server.get(
        f"/customers/{customer}/stats?to={DAY.isoformat()}&from={DAY.isoformat()}"
    )
    assert status == 200 and body["summary"]["total_requests"] == sent[customer]


def test_unknown_customer_answer_changes_when_it_appears(server_factory: Any) -> None:
    """A cached 404 goes as soon as the customer has lines."""
    server: Server = server_factory(shards=2, STATS_FRONTS="2")
    server.send_tcp(lines_for("oldtimer", 1))  # so the newcomer's lines move no newest day
    path = f"/customers/newcomer/stats?from={DAY.isoformat()}"
    assert {status for status, _ in answers(server, path)} == {404}
    server.send_tcp(lines_for("newcomer", 3))
    assert [(s, b["summary"]["total_requests"]) for s, b in answers(server, path)] == [
        (200, 3)
    ] * ASKS


def test_retention_moving_on_drops_cached_days(server_factory: Any) -> None:
    """A newer day elsewhere expires a customer's old days: its cached answer goes too."""
    server: Server = server_factory(shards=2, STATS_FRONTS="2", STATS_RETENTION_DAYS="2")
    owners = owned_customers(2)
    old = DAY - dt.timedelta(days=5)
    line = f"{old.isoformat()} 10:00:00 {owners[0]} /a 200 0.1\n"
    assert server.send_tcp(line.encode())["accepted"] == 1
    path = f"/customers/{owners[0]}/stats?from={old.isoformat()}"
    assert [s for s, _ in answers(server, path)] == [200] * ASKS
    # A line of the other shard's customer, five days later: the old day leaves retention.
    assert server.send_tcp(lines_for(owners[1], 1))["accepted"] == 1
    assert [s for s, _ in answers(server, path)] == [404] * ASKS


def test_a_restarted_shard_is_asked_again(server_factory: Any) -> None:
    """Without the log, a killed shard restarts without its unsnapshotted lines: the fronts
    must not answer from what they cached before."""
    server: Server = server_factory(shards=2, STATS_FRONTS="2", STATS_WAL="false")
    owners = owned_customers(2)
    path = f"/customers/{owners[1]}/stats?from={DAY.isoformat()}"
    server.send_tcp(lines_for(owners[1], 5))
    assert [s for s, _ in answers(server, path)] == [200] * ASKS
    kill_shard_and_wait_for_restart(server, 1)  # no snapshot yet: the lines are gone
    assert [s for s, _ in answers(server, path)] == [404] * ASKS


def test_an_answer_goes_to_a_shard_once_for_all_fronts(server_factory: Any) -> None:
    """The front that asked a shard offers the answer to the other: later asks, at either
    front, are answered from the caches."""
    server: Server = server_factory(shards=2, STATS_FRONTS="2")
    customers = [f"once_{k}" for k in range(5)]
    server.send_tcp(b"".join(lines_for(c, 3) for c in customers))
    for _ in range(4):
        for c in customers:
            status, body = server.get(f"/customers/{c}/stats?from={DAY.isoformat()}")
            assert status == 200 and body["summary"]["total_requests"] == 3
    samples = scrape(server)
    assert total(samples, "statsd_query_seconds_count", cache="miss") == len(customers)
    assert total(samples, "statsd_query_seconds_count", cache="hit") == 3 * len(customers)


def raw(server: Server, method: str, path: str) -> tuple[int, str | None, bytes]:
    """Status, Content-Type and body bytes exactly as served."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()


def test_cached_answers_skip_routing_and_only_for_get_and_head(server_factory: Any) -> None:
    """A GET answered from the cache before routing is byte for byte the routed answer, and a
    HEAD gets its headers; other methods on a cached target are still routed to their own
    answers."""
    server: Server = server_factory(shards=2, STATS_FRONTS="2")
    server.send_tcp(lines_for("routed", 4))
    path = f"/customers/routed/stats?from={DAY.isoformat()}"
    first = raw(server, "GET", path)
    assert first[:2] == (200, "application/json")
    assert json.loads(first[2])["summary"]["total_requests"] == 4
    assert [raw(server, "GET", path) for _ in range(ASKS)] == [first] * ASKS
    assert total(scrape(server), "statsd_query_seconds_count", cache="hit") == ASKS
    assert raw(server, "HEAD", path) == (200, "application/json", b"")
    # A cached HEAD sends no body: the next request on the connection reads cleanly.
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    try:
        for method in ("HEAD", "GET"):
            conn.request(method, path)
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"" if method == "HEAD" else first[2])
    finally:
        conn.close()
    status, content_type, body = raw(server, "POST", path)
    assert status == 405 and (content_type or "").startswith("application/json")
    assert "method not allowed" in json.loads(body)["error"].lower(), body


Exchange = tuple[list[tuple[bytes, bytes]], bytes, bool]


def read_responses(sock: socket.socket, methods: list[str]) -> Exchange:
    """(head, body) of one response per request method (read_http_responses), then whatever
    else the server sends until it closes or goes quiet for 0.5 s, and whether it closed."""
    out, data = read_http_responses(sock, methods)
    sock.settimeout(0.5)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return out, data, False
    return out, data, True


def ask(server: Server, requests: list[tuple[str, str, str]]) -> Exchange:
    """Send (method, path, extra header lines) requests pipelined on one connection."""
    raw = b"".join(
        f"{method} {path} HTTP/{'1.0' if 'HTTP/1.0' in extra else '1.1'}\r\n"
        f"Host: x\r\n{extra.replace('HTTP/1.0', '')}\r\n".encode()
        for method, path, extra in requests
    )
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as sock:
        sock.sendall(raw)
        return read_responses(sock, [method for method, _, _ in requests])


def headers(head: bytes) -> tuple[str, dict[str, str]]:
    status, *lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    assert len(fields) == len(lines), head  # no header twice
    return status, fields


HTTP_DATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    r" \d{4} \d\d:\d\d:\d\d GMT"
)


def test_answers_written_in_one_piece_are_aiohttps_own_bytes(server_factory: Any) -> None:
    """Stats answers to HTTP/1.1 keep-alive requests are written prebuilt, cached or not: the
    same status line, headers and body as aiohttp writes for the answer when it builds the
    response itself (as it does for `Connection: close`), less that Connection header;
    pipelined requests get their answers in order, a HEAD its headers alone."""
    server: Server = server_factory(shards=2, STATS_FRONTS="2")
    server.send_tcp(lines_for("prebuilt", 6))
    path = f"/customers/prebuilt/stats?from={DAY.isoformat()}"
    earlier = f"/customers/prebuilt/stats?from={(DAY - dt.timedelta(days=1)).isoformat()}"
    unknown = f"/customers/nobody/stats?from={DAY.isoformat()}"
    for target, status_line, first in (
        (path, "HTTP/1.1 200 OK", "GET"),
        (earlier, "HTTP/1.1 200 OK", "HEAD"),
        (unknown, "HTTP/1.1 404 Not Found", "GET"),
    ):
        # The first request asks a shard (or takes the other front's shared answer); the
        # rest are answered from the cache.
        methods = [first, "GET", "HEAD", "GET", "GET", "HEAD"]
        answers, rest, closed = ask(server, [(method, target, "") for method in methods])
        assert (rest, closed) == (b"", False)  # nothing more written, the connection open
        [(reference_head, reference_body)], rest, closed = ask(
            server, [("GET", target, "Connection: close\r\n")]
        )
        assert (rest, closed) == (b"", True)
        reference_status, reference = headers(reference_head)
        assert reference_status == status_line
        assert reference.pop("Connection") == "close"
        for (head, body), method in zip(answers, methods, strict=True):
            status, got = headers(head)
            assert (status, list(got)) == (status_line, list(reference))
            date = got.pop("Date")
            assert HTTP_DATE.fullmatch(date), date
            assert abs(email.utils.parsedate_to_datetime(date).timestamp() - time.time()) < 5
            assert got == {k: v for k, v in reference.items() if k != "Date"}
            assert body == (b"" if method == "HEAD" else reference_body)
        assert int(reference["Content-Length"]) == len(reference_body)
        document = json.loads(reference_body)
        if target == unknown:
            assert "unknown customer 'nobody'" in document["error"]
        else:
            assert document["summary"]["total_requests"] == 6
    # HTTP/1.0 is answered by aiohttp: the connection closes after it, unless kept alive.
    [(head, body)], rest, closed = ask(server, [("GET", path, "HTTP/1.0")])
    assert head.startswith(b"HTTP/1.0 200 OK\r\n") and b"Connection" not in head
    assert json.loads(body)["summary"]["total_requests"] == 6
    assert (rest, closed) == (b"", True)
    answers, rest, closed = ask(server, [("GET", path, "HTTP/1.0Connection: keep-alive\r\n")] * 2)
    assert (rest, closed) == (b"", False)
    for head, body in answers:
        assert head.startswith(b"HTTP/1.0 200 OK\r\n") and b"\r\nConnection: keep-alive" in head
        assert json.loads(body)["summary"]["total_requests"] == 6


@pytest.mark.slow
def test_killed_front_is_replaced_while_the_other_serves(server_factory: Any) -> None:
    """SIGKILL of one front: queries go on being answered, and the supervisor restarts it."""
    server: Server = server_factory(shards=1, STATS_FRONTS="2")
    server.send_tcp(lines_for("kf", 4))
    pids = front_pids(server)
    assert sorted(pids) == [0, 1]
    os.kill(pids[0], signal.SIGKILL)
    path = f"/customers/kf/stats?from={DAY.isoformat()}"
    for _ in range(20):
        status, body = server.get(path)
        assert status == 200 and body["summary"]["total_requests"] == 4
    deadline = time.monotonic() + 30
    while front_pids(server)[0] == pids[0]:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.1)
    assert "front-0 died" in server.log()
    assert [s for s, _ in answers(server, path)] == [200] * ASKS


# --- the cache on its own ------------------------------------------------------------------


def make_cache(tmp_path: Path, budget: int, shards: int = 2) -> tuple[AnswerCache, Router]:
    changes.create(tmp_path / "changes", shards)
    newest_day.create(tmp_path / "newest_day", shards + 1)
    counters = ChangeCounters(tmp_path / "changes", shards)
    return AnswerCache(counters, NewestDay(tmp_path / "newest_day", shards), budget), Router(shards)


def test_cache_keeps_its_byte_budget_oldest_out_first(tmp_path: Path) -> None:
    body = b"x" * 800
    per_answer = len(body) + len("/t0") + ENTRY_OVERHEAD
    cache, router = make_cache(tmp_path, budget=3 * per_answer)
    stamp = cache.stamp(router.place("c"))
    for i in range(5):
        cache.put(f"/t{i}", stamp, 200, body)
        assert cache.size <= cache.budget
    assert len(cache) == 3
    assert cache.get("/t0") is None and cache.get("/t1") is None
    assert cache.get("/t4") == (200, body)
    cache.put("/huge", stamp, 200, b"y" * (4 * per_answer))  # larger than the whole budget
    assert cache.get("/huge") is None and len(cache) == 3


def test_a_full_cache_adds_nothing_for_the_garbage_collector_to_walk(tmp_path: Path) -> None:
    """Cached answers are plain tuples of ints and bytes, which the collector stops tracking:
    every full collection walks every tracked object, so 30k answers of two tracked objects
    each made a front's full pass some 40 ms."""
    import gc

    cache, router = make_cache(tmp_path, budget=1 << 30)
    stamps = [cache.stamp(router.place(f"c{i}")) for i in range(100)]
    gc.collect()
    tracked = len(gc.get_objects())
    for i in range(5000):
        cache.put(
            f"/customers/c{i % 100}/stats?from=2026-10-{i % 31 + 1:02d}&n={i}",
            stamps[i % 100],
            200,
            b"{}",
        )
    gc.collect()
    assert len(cache) == 5000
    assert len(gc.get_objects()) - tracked < 50
    assert cache.get("/customers/c7/stats?from=2026-10-08&n=7") == (200, b"{}")


def test_cache_entry_goes_with_any_counter_it_was_stamped_with(tmp_path: Path) -> None:
    cache, router = make_cache(tmp_path, budget=1 << 20)
    counters = ChangeCounters(tmp_path / "changes", 2)  # as a shard sees them
    day = NewestDay(tmp_path / "newest_day", 0)
    place = router.place("alice")
    other = next(router.place(f"c{i}") for i in range(100) if router.place(f"c{i}") != place)

    def cached_after(change: Any) -> bool:
        cache.put("/a", cache.stamp(place), 200, b"{}")
        change()
        return cache.get("/a") is not None

    assert cached_after(lambda: None)
    assert cached_after(lambda: counters.bump_customers([other]))  # someone else's lines
    assert not cached_after(lambda: counters.bump_customers([place]))
    assert not cached_after(lambda: counters.bump_generation(place % 2))
    assert not cached_after(lambda: day.publish(20_000))
    assert cached_after(lambda: counters.bump_generation(1 - place % 2))


def test_shared_answers_are_checked_before_they_are_kept(tmp_path: Path) -> None:
    """A front keeps another front's answer only if it is current and points at real
    counters; several answers of one event-loop pass travel together."""
    import asyncio
    import socket

    import msgspec
    import uvloop

    from statsd_server.answer_cache import AnswerSharing

    cache_a, router = make_cache(tmp_path, budget=1 << 20)
    cache_b = AnswerCache(
        ChangeCounters(tmp_path / "changes", 2), NewestDay(tmp_path / "newest_day", 2), 1 << 20
    )
    counters = ChangeCounters(tmp_path / "changes", 2)
    fresh, stale = router.place("fresh"), router.place("stale")

    async def main() -> None:
        a = AnswerSharing(tmp_path, 0, 2, cache_a)
        b = AnswerSharing(tmp_path, 1, 2, cache_b)
        a.start()
        b.start()
        try:
            a.offer("/fresh", cache_a.stamp(fresh), 200, b"{}")
            stale_stamp = cache_a.stamp(stale)
            counters.bump_customers([stale])  # changed after the stamp, before it arrives
            a.offer("/stale", stale_stamp, 200, b"{}")
            good = tuple(cache_a.stamp(fresh))
            bogus = (*good[:2], 1 << 40, 0, 0)  # a counter index past the file
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as hostile:
                datagram = msgspec.msgpack.encode(
                    [
                        ("/bogus", bogus, 200, b"{}"),
                        ("/teapot", good, 418, b"{}"),
                        ("/after", good, 404, b"{}"),  # still taken after the bad ones
                    ]
                )
                hostile.sendto(datagram, str(tmp_path / "front-1.answers"))
                hostile.sendto(b"\xc1 not msgpack", str(tmp_path / "front-1.answers"))
            await asyncio.sleep(0.1)
        finally:
            a.close()
            b.close()

    uvloop.run(main())
    assert len(cache_b) == 2  # (before any get, which would drop what is out of date)
    assert cache_b.get("/fresh") == (200, b"{}")
    assert cache_b.get("/after") == (404, b"{}")
    assert cache_b.get("/stale") is None
    assert cache_b.get("/bogus") is None and cache_b.get("/teapot") is None
