"""Hostile input against the real server: garbage lines, huge lines, connection floods, absurd HTTP.

Every test checks what the hostile input gets, and that the server stays up and keeps
answering exact figures for good lines sent alongside or afterwards. Good lines come from
records generated here first, so the expected figures never depend on the server's parser.
"""

from __future__ import annotations

import datetime as dt
import errno
import http.client
import json
import math
import os
import random
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statsd_server.framing import LineFramer
from statsd_server.line_rules import Request, parse_line
from statsd_server.parse import apply_time_rules, parse_chunk
from tests.conftest import Server
from tests.statsd_server.test_durability import DAY, lines_for

TODAY = dt.datetime.now(dt.UTC).date()
GOOD_DAYS = [TODAY - dt.timedelta(days=i) for i in (1, 2, 3)]
FIRST = (TODAY - dt.timedelta(days=10)).isoformat()
# Ids that are awkward in a URL, in JSON or in a log line, all valid.
ODD_IDS = [
    "kunde_müller",
    "tenant:7/prod",
    "rocket_🚀",
    "x" * 128,
    "100%off",
    "q?x=1&y=2",
    "o'neil",
    'say"hi"',
    "back\\slash",
    "{brace}",
    "Ωmega",
]
MB = 1024 * 1024


# -- good records, their lines and their expected figures -------------------------------------


@dataclass(frozen=True)
class Rec:
    customer: str
    day: dt.date
    second_of_day: int
    status: int
    millis: int

    @property
    def clock(self) -> dt.time:
        s = self.second_of_day
        return dt.time(s // 3600, s // 60 % 60, s % 60)

    def text(self) -> bytes:
        seconds = f"{self.millis // 1000}.{self.millis % 1000:03d}"
        return f"{self.day} {self.clock} {self.customer} /api/v1/x {self.status} {seconds}".encode()

    def json(self) -> bytes:
        record = {
            "timestamp": f"{self.day}T{self.clock}Z",
            "customer_id": self.customer,
            "request_path": "/api/v1/x",
            "status_code": self.status,
            "duration": self.millis / 1000,
        }
        return json.dumps(record, ensure_ascii=False).encode()


def make_recs(rng: random.Random, customers: list[str], n: int) -> list[Rec]:
    """`n` requests over the good days; at most 200 per customer-day, so every figure is exact."""
    per_day: Counter[tuple[str, dt.date]] = Counter()
    recs = []
    while len(recs) < n:
        customer, day = rng.choice(customers), rng.choice(GOOD_DAYS)
        if per_day[customer, day] == 200:
            continue
        per_day[customer, day] += 1
        status = rng.choice([200, 201, 204, 301, 400, 404, 429, 500, 503])
        recs.append(Rec(customer, day, rng.randrange(86400), status, rng.randint(0, 5000)))
    return recs


def render(recs: Iterable[Rec], rng: random.Random) -> list[bytes]:
    return [r.json() if rng.random() < 0.2 else r.text() for r in recs]


def expected_figures(recs: list[Rec]) -> dict[str, Any]:
    """A day's or a summary's figures, computed here: counters and nearest-rank quantiles."""
    ms = sorted(r.millis for r in recs)
    n = len(ms)
    statuses = [r.status for r in recs]
    server_errors = sum(s >= 500 for s in statuses)
    return {
        "total_requests": n,
        "successful_requests": sum(s < 400 for s in statuses),
        "failed_requests": sum(s >= 400 for s in statuses),
        "client_errors": sum(400 <= s < 500 for s in statuses),
        "server_errors": server_errors,
        "uptime_pct": pytest.approx(100 * (n - server_errors) / n, abs=5.01e-4),
        "avg_latency_ms": pytest.approx(sum(ms) / n, abs=5.01e-4),
        "median_latency_ms": float(ms[math.ceil(0.5 * n) - 1]),
        "p99_latency_ms": float(ms[math.ceil(0.99 * n) - 1]),
        "quantile_error": {"p50": 0.0, "p99": 0.0},
    }


def stats_path(customer: str, first: str = FIRST, last: str | None = None) -> str:
    path = f"/customers/{urllib.parse.quote(customer, safe='')}/stats?from={first}"
    return path + (f"&to={last}" if last else "")


def assert_stats(server: Server, recs: list[Rec]) -> None:
    """Every customer of `recs` is answered with exactly their figures, day by day."""
    by_customer: dict[str, list[Rec]] = defaultdict(list)
    for r in recs:
        by_customer[r.customer].append(r)
    for customer, crecs in by_customer.items():
        status, got = server.get(stats_path(customer))
        assert status == 200, (customer, got)
        assert got["customer_id"] == customer
        per_day: dict[str, list[Rec]] = defaultdict(list)
        for r in crecs:
            per_day[r.day.isoformat()].append(r)
        assert [d["date"] for d in got["days"]] == sorted(per_day), customer
        for d in got["days"]:
            assert d == {"date": d["date"], **expected_figures(per_day[d["date"]])}, customer
        assert got["summary"] == expected_figures(crecs), customer


def summary_of(accepted: int, reasons: Counter[str]) -> dict[str, Any]:
    by_reason = {k: v for k, v in sorted(reasons.items()) if v}
    return {
        "accepted": accepted,
        "rejected": sum(by_reason.values()),
        "rejected_by_reason": by_reason,
    }


def assert_up_and_exact(server: Server, tag: str, n: int = 600) -> None:
    """The server is up, no process of it died, and new good lines are counted and answered exactly."""
    assert server.proc is not None and server.proc.poll() is None
    assert server.get("/health") == (200, {"status": "ok"})
    assert server.get("/ready") == (200, {"status": "ready", "shards": server.shards})
    rng = random.Random(tag)
    recs = make_recs(
        rng, [f"{tag}_{i}" for i in range(8)] + [f"{tag}_{c}" for c in ODD_IDS if len(c) < 100], n
    )
    data = b"\n".join(render(recs, rng)) + b"\n"
    assert server.send_tcp(data) == summary_of(n, Counter())
    assert_stats(server, recs)
    assert "died" not in server.log(), server.log()


def post_ingest(
    server: Server, body: bytes | Iterable[bytes], content_type: str = "text/plain"
) -> tuple[int, Any]:
    """POST /ingest; an iterable body is sent chunked, never held whole."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
    try:
        chunked = not isinstance(body, bytes)
        conn.request(
            "POST",
            "/ingest",
            body=body,
            headers={"Content-Type": content_type},
            encode_chunked=chunked,
        )
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def raw_http(server: Server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes (whatever a client library would refuse) and read the answer."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(request)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


def get_request(target: bytes, headers: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"


# -- garbage lines ------------------------------------------------------------------------------

BAD_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xe2\x82",
    b"\x80",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
]


def valid_fields(day: dt.date) -> list[bytes]:
    return [day.isoformat().encode(), b"12:00:00", b"cust_bad", b"/a", b"200", b"0.5"]


def json_bytes(**override: bytes) -> bytes:
    values = {
        "timestamp": f'"{GOOD_DAYS[0]}T12:00:00Z"'.encode(),
        "customer_id": b'"cust_bad"',
        "request_path": b'"/a"',
        "status_code": b"200",
        "duration": b"0.5",
    }
    values.update(override)
    return b"{" + b", ".join(b'"%s": %s' % (k.encode(), v) for k, v in values.items()) + b"}"


def garbage_lines(rng: random.Random) -> list[tuple[bytes, str]]:
    """Bad lines, each with the reason the README's grammar gives it by construction."""
    day = GOOD_DAYS[0]
    bad: list[tuple[bytes, str]] = []
    field_reasons = ["date", "time", "customer_id", "path", "status", "duration"]

    # Random bytes with one byte that is never UTF-8: `encoding`, whatever else they hold.
    for _ in range(200):
        raw = bytearray(os.urandom(rng.randint(0, 300)).replace(b"\n", b"?"))
        raw.insert(rng.randint(0, len(raw)), 0xFF)
        bad.append((bytes(raw), "encoding"))
    # Malformed UTF-8 of every kind, in every field of a text line and in a JSON string.
    for seq in BAD_UTF8:
        for i in range(6):
            fields = valid_fields(day)
            fields[i] = fields[i][:1] + seq + fields[i][1:]
            bad.append((b" ".join(fields), "encoding"))
        bad.append((json_bytes(customer_id=b'"c' + seq + b'"'), "encoding"))

    # NUL bytes: alone, as a separator, inside each field, raw and escaped in JSON.
    bad += [(b"\x00", "fields"), (b"\x00" * 1000, "fields"), (b"\x00 " * 7, "fields")]
    fields = valid_fields(day)
    bad.append((fields[0] + b"\x00" + b" ".join(fields[1:]), "fields"))
    for i, reason in enumerate(field_reasons):
        fields = valid_fields(day)
        fields[i] = fields[i][:1] + b"\x00" + fields[i][1:]
        bad.append((b" ".join(fields), reason))
    bad.append((json_bytes(customer_id=b'"a\x00b"'), "json"))  # raw control bytes: not JSON
    bad.append((json_bytes(customer_id=b'"a\\u0000b"'), "customer_id"))
    bad.append((json_bytes(request_path=b'"/a\\u0000"'), "path"))

    # Random UTF-8 text (controls, NBSP, emoji, CJK...) in a number of fields other than six.
    pool = [
        chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x21, 0x7F)]
    ]
    pool += ["\x7f", "\x85", "\xa0", "\u2003", "\u3000", "\ufeff", "é", "ß", "中", "🚀", "\u0301"]
    for _ in range(200):
        k = rng.choice([1, 2, 3, 4, 5, 7, 8, 12])
        tokens = ["".join(rng.choices(pool, k=rng.randint(1, 20))) for _ in range(k)]
        if tokens[0][0] == "{":
            tokens[0] = "x" + tokens[0]
        bad.append((rng.choice([" ", "\t", " \t "]).join(tokens).encode(), "fields"))

    # One or more of every other reason.
    for n in (4097, 5000, 70_000):
        bad.append(
            (bytes(rng.choice(b"x \x00\xff{") for _ in range(n)).replace(b"\n", b"?"), "too_long")
        )
    old, ahead = TODAY - dt.timedelta(days=45), TODAY + dt.timedelta(days=3)
    bad += [
        (b"{not json", "json"),
        (b'{"customer_id": "c"', "json"),
        (b"[1, 2, 3]", "fields"),
        (b"%s 12:00:00 c /a 200" % day.isoformat().encode(), "fields"),
        (b"9999-99-99 12:00:00 c /a 200 1", "date"),
        (b"%s 24:00:00 c /a 200 1" % day.isoformat().encode(), "time"),
        (json_bytes(timestamp=b'"9999-99-99T00:00:00Z"'), "timestamp"),
        (json_bytes(timestamp=b"1700000000"), "timestamp"),
        (b"%s 12:00:00 %s /a 200 1" % (day.isoformat().encode(), b"y" * 129), "customer_id"),
        (json_bytes(customer_id=b'"x\'); DROP TABLE days;--"'), "customer_id"),
        (b"%s 12:00:00 c a/b 200 1" % day.isoformat().encode(), "path"),
        (b"%s 12:00:00 c /a 600 1" % day.isoformat().encode(), "status"),
        (b"%s 12:00:00 c /a 200 -1" % day.isoformat().encode(), "duration"),
        (b"%s 12:00:00 c /a 200 %s" % (day.isoformat().encode(), b"9" * 400), "duration"),
        (b"%s 00:00:00 c /a 200 1" % ahead.isoformat().encode(), "future"),
        (b"%s 12:00:00 c /a 200 1" % old.isoformat().encode(), "expired"),
    ]
    return bad


def garbage_stream(rng: random.Random, recs: list[Rec]) -> tuple[bytes, Counter[str]]:
    """Good and bad lines (and blank ones) shuffled; starts with a good line, so `expired` is decided."""
    bad = garbage_lines(rng)
    good = render(recs, rng)
    # Blank lines are neither accepted nor rejected (one \r at most: it ends the line).
    blanks = [b"\n", b"   \n", b"\t\n", b"\r\n", b" \t\r\n"] * 5
    lines = [line + rng.choice([b"\n", b"\r\n"]) for line in good[1:] + [b for b, _ in bad]]
    lines += blanks
    rng.shuffle(lines)
    data = good[0] + b"\n" + b"".join(lines)
    return data, Counter(reason for _, reason in bad)


@pytest.mark.slow
def test_garbage_lines_get_their_reasons_and_good_lines_count_exactly(server_factory: Any) -> None:
    """Random bytes, NULs, bad UTF-8 and every rejection reason, mixed with good lines, TCP and POST."""
    server: Server = server_factory(shards=2)
    rng = random.Random(5)
    recs = make_recs(rng, [f"g_{i}" for i in range(6)] + ODD_IDS, 3000)
    data, reasons = garbage_stream(rng, recs)
    assert set(reasons) == {
        "too_long", "encoding", "json", "fields", "date", "time", "timestamp",
        "customer_id", "path", "status", "duration", "future", "expired",
    }  # fmt: skip
    assert server.send_tcp(data) == summary_of(len(recs), reasons)
    assert_stats(server, recs)
    # The same stream posted: judged the same, counted again.
    assert post_ingest(server, data) == (200, summary_of(len(recs), reasons))
    assert_stats(server, recs + recs)
    assert_up_and_exact(server, "after_garbage")


# -- a 100 MB line ------------------------------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    """The processes of a process group: the server's supervisor and its children."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # Fields after the parenthesised name: state, ppid, pgrp, ...
        if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
            pids.append(int(entry.name))
    return pids


def group_rss(pgid: int) -> int:
    """Resident bytes of every process in a process group."""
    total = 0
    for pid in group_pids(pgid):
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples a process group's RSS in a thread while the block runs."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.baseline = group_rss(pgid)
        self.peak = self.baseline
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, group_rss(self.pgid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, group_rss(self.pgid))


def huge_line(total: int, piece: bytes) -> Iterator[bytes]:
    """`total` bytes without a newline, in pieces of one reused buffer."""
    sent = 0
    while sent < total:
        part = piece[: total - sent]
        sent += len(part)
        yield part


@pytest.mark.slow
def test_100mb_line_is_too_long_and_never_buffered(server_factory: Any) -> None:
    """A 100 MB line without a newline, over TCP and POST: `too_long`, bounded memory, a summary."""
    server: Server = server_factory(shards=2)
    assert server.proc is not None
    rng = random.Random(100)
    piece = bytes(rng.choice(b"abc \t\x00\xff\r{") for _ in range(MB))
    # Below the line's size: a server that buffered the line would fail here.
    growth_limit = 80 * MB
    for transport in ("tcp", "post"):
        recs = make_recs(rng, [f"{transport}_{i}" for i in range(5)], 2000)
        before, after = render(recs[:1000], rng), render(recs[1000:], rng)

        def stream(before: list[bytes] = before, after: list[bytes] = after) -> Iterator[bytes]:
            # good lines, 100 MB and its newline, good lines, 50 MB ended by the end of stream
            yield b"\n".join(before) + b"\n"
            yield from huge_line(100 * MB, piece)
            yield b"\n" + b"\n".join(after) + b"\n"
            yield from huge_line(50 * MB, piece)

        with PeakRss(server.proc.pid) as rss:
            if transport == "tcp":
                with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=120) as sock:
                    for part in stream():
                        sock.sendall(part)
                    sock.shutdown(socket.SHUT_WR)
                    reply = b""
                    while chunk := sock.recv(65536):
                        reply += chunk
                summary = json.loads(reply)
            else:
                status, summary = post_ingest(server, stream())
                assert status == 200, summary
        assert summary == summary_of(len(recs), Counter(too_long=2)), transport
        print("RSS", transport, rss.baseline // MB, rss.peak // MB)
        assert rss.peak - rss.baseline < growth_limit, (transport, rss.baseline, rss.peak)
        assert_stats(server, recs)
    assert_up_and_exact(server, "after_huge")


# -- a connection flood -------------------------------------------------------------------------

FLOOD_TCP = 7000
FLOOD_HTTP = 3000
FLOOD_STEP = 64  # connections between checks that the accept queues are empty
SS = shutil.which("ss")


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's open-file limit to at least `needed` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors needed")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return soft, hard


def accept_backlog(port: int) -> int:
    """Connections waiting in the accept queues of the sockets listening on `port`.

    `ss` asks the kernel for just those sockets; /proc/net/tcp lists every socket, which
    takes tens of milliseconds with ten thousand of them open.
    """
    if SS is not None:
        out = subprocess.run(
            [SS, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout
        return sum(int(row.split()[1]) for row in out.splitlines())  # Recv-Q of a listener
    waiting = 0
    for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = row.split()
        # For a listening socket (state 0A), rx_queue is the length of its accept queue.
        if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
            waiting += int(fields[4].partition(":")[2], 16)
    return waiting


def open_connections(port: int, count: int) -> Iterator[socket.socket]:
    """`count` connections, opened in steps the server's accept loop keeps up with.

    Connecting faster than the server accepts overflows its accept queue (100 connections
    per shard today, see the test below); the kernel then drops the SYNs and the client
    retries a second later: only slow, but it would make this test take minutes.
    """
    for i in range(count):
        yield socket.create_connection(("127.0.0.1", port), timeout=30)
        if i % FLOOD_STEP == FLOOD_STEP - 1:
            deadline = time.monotonic() + 30
            while accept_backlog(port) and time.monotonic() < deadline:
                time.sleep(0.005)


def reset(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.slow
def test_10000_connections_at_once(server_factory: Any) -> None:
    """7,000 TCP and 3,000 HTTP connections open at once, then closed: nothing dies, counts exact."""
    soft, hard = raise_nofile(FLOOD_TCP + FLOOD_HTTP + 1000)
    try:
        # Started after the limit is raised: the server inherits it.
        server: Server = server_factory(shards=2)
        rng = random.Random(10_000)
        flood_recs = make_recs(rng, [f"flood_{i}" for i in range(20)], FLOOD_TCP // 3)
        tcp: list[tuple[socket.socket, str]] = []
        http_socks: list[socket.socket] = []
        try:
            for i, sock in enumerate(open_connections(server.tcp_port, FLOOD_TCP)):
                kind = ("silent", "partial", "good")[i % 3]
                tcp.append((sock, kind))
                if kind == "partial":
                    sock.sendall(f"{GOOD_DAYS[0]} 12:00:00 half_a_li".encode())
                elif kind == "good":
                    sock.sendall(flood_recs[i // 3].text() + b"\n")
            for i, sock in enumerate(open_connections(server.http_port, FLOOD_HTTP)):
                http_socks.append(sock)
                if i % 2:
                    sock.sendall(b"GET /heal")

            # All 10,000 are open: good traffic alongside is still counted and answered.
            assert_up_and_exact(server, "during_flood", n=300)

            for sock, kind in tcp:
                if kind == "good":
                    sock.shutdown(socket.SHUT_WR)
            for sock, kind in tcp:
                if kind == "good":
                    reply = b""
                    while chunk := sock.recv(65536):
                        reply += chunk
                    assert json.loads(reply) == summary_of(1, Counter())
                    sock.close()
                elif kind == "silent":
                    reset(sock)
                else:  # a partial line, then a plain close: no summary is read
                    sock.close()
            for i, sock in enumerate(http_socks):
                if i % 2:
                    sock.close()
                else:
                    reset(sock)
        finally:
            for sock, _ in tcp:
                sock.close()
            for sock in http_socks:
                sock.close()

        assert_stats(server, flood_recs)
        assert_up_and_exact(server, "after_flood")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def completed_connects(port: int, count: int, wait: float) -> tuple[int, list[socket.socket]]:
    """Start `count` non-blocking connects at once; how many complete within `wait` seconds."""
    socks = []
    poller = selectors.DefaultSelector()
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        assert sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
        poller.register(sock, selectors.EVENT_WRITE)
        socks.append(sock)
    done = 0
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0 and done < count:
        for key, _ in poller.select(left):
            poller.unregister(key.fileobj)
            done += 1
    poller.close()
    return done, socks


LISTEN_BACKLOG = 1024  # what the supervisor asks for in listen()


@pytest.mark.slow
def test_connection_bursts_queue_up_to_the_listen_backlog(server_factory: Any) -> None:
    """While the processes are busy, the kernel queues a burst of connections instead of dropping them."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    if somaxconn < LISTEN_BACKLOG:
        pytest.skip(f"net.core.somaxconn is {somaxconn}, below the backlog of {LISTEN_BACKLOG}")
    server: Server = server_factory(shards=2)
    assert server.proc is not None
    # Freeze the shards and the front (a stand-in for a long pause): nothing is accepted.
    children = [pid for pid in group_pids(server.proc.pid) if pid != server.proc.pid]
    burst = 500  # per port: under the backlog of one listening socket
    socks: list[socket.socket] = []
    for pid in children:
        os.kill(pid, signal.SIGSTOP)
    try:
        tcp_done, tcp_socks = completed_connects(server.tcp_port, burst, 0.5)
        http_done, http_socks = completed_connects(server.http_port, burst, 0.5)
        socks = tcp_socks + http_socks
    finally:
        for pid in children:
            os.kill(pid, signal.SIGCONT)
        for sock in socks:
            sock.close()
    assert_up_and_exact(server, "after_burst", n=100)
    assert (tcp_done, http_done) == (burst, burst)


def test_a_client_that_never_reads_its_answers_does_not_hold_up_a_stop(
    server_factory: Any,
) -> None:
    """A client pipelining queries without reading the answers leaves a front waiting to
    write. SIGTERM still stops the server in seconds (aiohttp's own default is to wait 60 s,
    twice), with its final snapshot: the restarted server, without a log, has every line."""
    server: Server = server_factory(shards=2, STATS_FRONTS="2", STATS_WAL="false")
    assert server.send_tcp(lines_for("unread", 50))["accepted"] == 50
    path = f"/customers/unread/stats?from={DAY.isoformat()}"
    status, answer = server.get(path)
    assert status == 200 and answer["summary"]["total_requests"] == 50
    requests = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 1000
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.setblocking(False)
        deadline = time.monotonic() + 60
        blocked_since = None
        unsent = memoryview(requests)
        # Until the server has stopped reading for a second: every buffer is full.
        while blocked_since is None or time.monotonic() - blocked_since < 1:
            assert time.monotonic() < deadline, "the server kept reading"
            try:
                unsent = unsent[sock.send(unsent) :] or memoryview(requests)
                blocked_since = None
            except BlockingIOError:
                blocked_since = blocked_since or time.monotonic()
                time.sleep(0.05)
        assert server.stop(timeout=20) == 0
    restarted: Server = server_factory(shards=2, STATS_WAL="false")
    assert restarted.get(path) == (200, answer)


# -- absurd HTTP --------------------------------------------------------------------------------


@pytest.mark.slow
def test_absurd_http_requests_get_4xx_and_the_server_stays_up(server_factory: Any) -> None:
    """Huge queries and headers, bad dates, wrong methods and types: 4xx, never a 5xx or a crash."""
    server: Server = server_factory(shards=2)
    rng = random.Random(4)
    recs = make_recs(rng, ["http_cust", "rocket_🚀"], 400)
    server.send_tcp(b"\n".join(render(recs, rng)) + b"\n")
    known = recs[0].customer
    one_customer = [r for r in recs if r.customer == known]

    # Limits of the HTTP parser itself (aiohttp: 8190 bytes a line, a bounded number of headers).
    too_big = [
        get_request(stats_path(known).encode() + b"&pad=" + b"a" * 100_000),
        get_request(
            stats_path(known).encode() + b"&" + b"&".join(b"p%d=1" % i for i in range(10_000))
        ),
        get_request(b"/health", b"X-Big: " + b"a" * 9000 + b"\r\n"),
        get_request(b"/health", b"X-Big: " + b"a" * 1_000_000 + b"\r\n"),
        get_request(b"/health", b"".join(b"X-H%d: 1\r\n" % i for i in range(10_000))),
        get_request(b"/health", b"Cookie: " + b"c=1; " * 5000 + b"\r\n"),
    ]
    for request in too_big:
        status, _, _ = raw_http(server, request)
        assert status in (400, 413, 414, 431), request[:80]
        assert server.get("/health") == (200, {"status": "ok"})

    # Thousands of parameters that fit in a request line: ignored, figures exact.
    many = stats_path(known) + "&x=" * 2400
    assert len(many) < 8190
    status, got = server.get(many)
    assert status == 200 and got["summary"] == expected_figures(one_customer)
    # The widest range there is: everything, exactly.
    status, got = server.get(stats_path(known, "0001-01-01", "9999-12-31"))
    assert status == 200 and (got["from"], got["to"]) == ("0001-01-01", "9999-12-31")
    assert got["summary"] == expected_figures(one_customer)

    bad_dates = [
        "9999-99-99", "0000-01-01", "2026-02-30", "%00", "2026-11-19%00", "%FF%FE",
        "%EF%BC%92%EF%BC%90%EF%BC%92%EF%BC%96-01-01", "-1", "2026-1-1", "+2026-01-01",
        "%202026-01-01", "2026-01-01T00:00:00", "%0A", "9" * 6000, "'%20OR%20'1'='1",
    ]  # fmt: skip
    for value in bad_dates:
        for path in (
            f"/customers/{known}/stats?from={value}",
            f"/customers/{known}/stats?from={FIRST}&to={value}",
        ):
            status, body = server.get(path)
            assert status == 400, (path[:120], body)
            assert isinstance(body["error"], str) and len(body["error"]) < 300, body
    bad_quantiles = [
        "0",
        "1",
        "nan",
        "1e-3",
        "-0.5",
        ",".join(["0.5"] * 11),
        "0.5," * 2000,
        "0.5;0.9",
    ]
    for value in bad_quantiles:
        status, body = server.get(stats_path(known) + f"&quantiles={value}")
        assert status == 400 and len(body["error"]) < 300, (value[:40], body)
    # Raw non-ASCII bytes in the request line are the HTTP parser's to refuse.
    status, _, _ = raw_http(
        server, get_request(f"/customers/x/stats?from={FIRST}&q=２０２６".encode())
    )
    assert status == 400

    # Customer ids in the path: percent-encoded unicode works; NUL and space are invalid ids.
    status, got = server.get(stats_path("rocket_🚀"))
    assert status == 200
    assert got["summary"] == expected_figures([r for r in recs if r.customer == "rocket_🚀"])
    for customer, code in (
        ("a\x00b", 400),
        ("a b", 400),
        ("x" * 129, 400),
        ("nobody\u3000", 400),
        ("%FF", 404),
    ):
        status, body = server.get(stats_path(customer))
        assert status == code and isinstance(body["error"], str), (customer, body)

    for method in ("PUT", "DELETE", "PATCH"):
        for path in (stats_path(known), "/ingest"):
            status, body = server.request(method, path, b"x" if method != "DELETE" else None)
            assert status == 405 and isinstance(body["error"], str), (method, path, body)
    status, body = server.get("/ingest")
    assert status == 405 and isinstance(body["error"], str)
    for path in (
        "/nope",
        "/customers",
        f"/customers/{known}",
        f"/customers/{known}/stats/x",
        "/" + "a" * 5000,
        "/%00",
    ):
        status, body = server.get(path)
        assert status == 404 and isinstance(body["error"], str), (path[:40], body)
    line = recs[0].text() + b"\n"
    for content_type in (
        "application/json",
        "text/html",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "text/plainx",
        "image/png",
    ):
        status, body = server.request("POST", "/ingest", line, {"Content-Type": content_type})
        assert status == 415 and "text/plain" in body["error"], (content_type, body)
    # Not HTTP at all.
    for junk in (
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n",
        b"\x00" * 100 + b"\r\n\r\n",
    ):
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            sock.sendall(junk)
            assert sock.recv(65536).startswith(b"HTTP/1.")

    # Nothing above was ingested: the figures are those of the good lines.
    for customer in ("http_cust", "rocket_🚀"):
        status, got = server.get(stats_path(customer))
        assert status == 200
        assert got["summary"] == expected_figures([r for r in recs if r.customer == customer])
    assert_up_and_exact(server, "after_http")


INJECTIONS = [
    "x');DROP/**/TABLE/**/days;--",
    "x';DELETE/**/FROM/**/days;--",
    "'OR'1'='1",
    '"OR""="',
    "1;SELECT/**/*/**/FROM/**/meta",
    "a%",
    "a_",
    "%",
    "_",
    "\\",
    "'",
    "x')/**/ON/**/CONFLICT/**/DO/**/NOTHING;--",
    "Robert');--",
]


@pytest.mark.slow
def test_sql_injection_ids_are_plain_ids_across_a_restart(server_factory: Any) -> None:
    """Customer ids that look like SQL (and LIKE wildcards) are stored and restored as they are."""
    server: Server = server_factory(shards=2)
    rng = random.Random(7)
    recs = make_recs(rng, [*INJECTIONS, "a", "ab", "x"], 2000)
    # Ids with spaces cannot be ids: rejected in lines, 400 in the path.
    with_spaces = "x'); DROP TABLE days;--"
    lines = render(recs, rng)
    lines.append(f"{GOOD_DAYS[0]} 12:00:00 {with_spaces} /a 200 1".encode())  # nine fields
    lines.append(json_bytes(customer_id=json.dumps(with_spaces).encode()))
    summary = server.send_tcp(b"\n".join(lines) + b"\n")
    assert summary == summary_of(len(recs), Counter(fields=1, customer_id=1))
    status, body = server.get(stats_path(with_spaces))
    assert status == 400 and "invalid customer id" in body["error"]
    assert_stats(server, recs)
    answers = {c: server.get(stats_path(c)) for c in {r.customer for r in recs}}

    assert server.stop() == 0
    restarted: Server = server_factory(shards=3)
    assert_stats(restarted, recs)
    for customer, answer in answers.items():
        assert restarted.get(stats_path(customer)) == answer, customer
    assert_up_and_exact(restarted, "after_restart")


# -- the parser under arbitrary bytes and arbitrary cuts ----------------------------------------

NOW = dt.datetime(2024, 9, 10, 12, tzinfo=dt.UTC).timestamp()
RETENTION = 30

_line_parts = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [b"\n", b"\r\n", b"\r", b" ", b"\t", b"\x00", b"{", b"\xff", b"\xc3", b"\xe2\x82"]
    ),
    st.builds(
        lambda d, c, s, u: (
            f"2024-{9 if d > 0 else 8:02d}-{abs(d) or 1:02d} 12:00:00 {c} /a {s} {u}".encode()
        ),
        st.integers(-31, 12),
        st.sampled_from(["c", "ü", "x" * 128, "x" * 129]),
        st.sampled_from(["200", "503", "99"]),
        st.sampled_from(["0.5", "1", "1e3"]),
    ),
    st.builds(
        lambda ts, c: json_bytes(timestamp=ts, customer_id=c),
        st.sampled_from(
            [
                b'"2024-09-10T00:00:00Z"',
                b'"2024-09-12T00:00:00+00:00"',
                b'"2024-07-01T00:00:00"',
                b'"x"',
            ]
        ),
        st.sampled_from([b'"c"', b'"a\\u0000"', b"null", b"1", b'"\\ud800"']),
    ),
    # Whole lines at and around the 4096-byte limit (the \r of a \r\n does not count), and
    # longer runs, of bytes that matter to the limit and to the parser.
    st.builds(
        lambda n, b, end: b"\n" + b * n + end,
        st.one_of(st.integers(4094, 4099), st.integers(4100, 9000)),
        st.sampled_from([b"x", b" ", b"\r", b"\xff"]),
        st.sampled_from([b"", b"\n", b"\r\n", b"\r"]),
    ),
)


def pipeline(
    stream: bytes, cuts: list[int]
) -> tuple[list[tuple[str, int, int, float]], Counter[str]]:
    """The server's ingest steps in order: framing, chunk parsing, time rules."""
    framer = LineFramer()
    accepted: list[tuple[str, int, int, float]] = []
    rejected: Counter[str] = Counter()
    newest = -(2**63)

    def take(data: bytes) -> None:
        nonlocal newest
        if not data:
            return
        chunk, newest = apply_time_rules(parse_chunk(data), NOW, newest, RETENTION)
        rejected.update(chunk.rejected)
        columns = (
            chunk.customer.tolist(),
            chunk.day.tolist(),
            chunk.status.tolist(),
            chunk.duration.tolist(),
        )
        accepted.extend((chunk.customers[c], d, s, u) for c, d, s, u in zip(*columns, strict=True))

    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        take(framer.feed(stream[start:cut]))
        start = cut
        assert len(framer._partial) <= 4097  # an overlong line is never held
    take(framer.finish())
    rejected["too_long"] += framer.too_long
    return accepted, +rejected


def line_by_line(stream: bytes) -> tuple[list[tuple[str, int, int, float]], Counter[str]]:
    """A reader of one line at a time, with the README's length, blank and time rules."""
    lines = stream.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    accepted = []
    rejected: Counter[str] = Counter()
    newest = -(2**63)
    for line in lines:
        content = line[:-1] if line.endswith(b"\r") else line
        if len(content) > 4096:
            rejected["too_long"] += 1
            continue
        if not content.strip(b" \t"):
            continue
        r = parse_line(line)
        assert isinstance(r, Request | str), line
        if isinstance(r, str):
            rejected[r] += 1
        elif r.second > int(NOW) + 86400:
            rejected["future"] += 1
        elif r.day < newest - RETENTION:
            rejected["expired"] += 1
        else:
            accepted.append((r.customer_id, r.day, r.status, r.duration))
            newest = max(newest, r.day)
    return accepted, rejected


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_bytes_cut_anywhere_parse_like_one_line_at_a_time(data: st.DataObject) -> None:
    """Arbitrary bytes, cut at arbitrary points: never an exception, every line counted once,
    and the same outcome as reading one line at a time."""
    stream = b"".join(data.draw(st.lists(_line_parts, max_size=30)))
    # Cuts anywhere, and right around line ends (between a \r and its \n, say).
    newlines = [i for i, byte in enumerate(stream) if byte == 0x0A] or [0]
    near_newline = st.builds(
        lambda at, off: min(max(at + off, 0), len(stream)),
        st.sampled_from(newlines),
        st.integers(-2, 2),
    )
    cuts = data.draw(st.lists(st.integers(0, len(stream)) | near_newline, max_size=10))
    accepted, rejected = pipeline(stream, cuts)

    # Counted independently of the parser: lines, blank lines, overlong and non-UTF-8 ones.
    lines = stream.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    contents = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    too_long = [c for c in contents if len(c) > 4096]
    counted = [c for c in contents if len(c) > 4096 or c.strip(b" \t")]
    not_utf8 = 0
    for c in contents:
        if len(c) <= 4096 and c.strip(b" \t"):
            try:
                c.decode("utf-8")
            except UnicodeDecodeError:
                not_utf8 += 1
    assert len(accepted) + sum(rejected.values()) == len(counted)
    assert rejected["too_long"] == len(too_long)
    assert rejected["encoding"] == not_utf8

    expected_accepted, expected_rejected = line_by_line(stream)
    assert sorted(accepted) == sorted(expected_accepted)
    assert rejected == +expected_rejected
