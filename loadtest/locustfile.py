"""Locust load test of a running statsd-server: stats queries, POST /ingest and raw TCP ingest.

Run it headless against `make run` (a server on 127.0.0.1:8080, TCP 9000, with
api_requests.log loaded), from the repository root:

    make run                                    # one terminal
    .venv/bin/locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s \\
        --host http://127.0.0.1:8080            # another

Without `--headless`, the web UI on http://localhost:8089 takes the same options.

Options of this file (each also read from its environment variable):

  --customers-file PATH  [LOCUST_CUSTOMERS_FILE, default api_requests.log] a log the server
                         was loaded with: its text lines give the customer ids to query and the
                         range of days to pick `from`/`to` in (the first 1M lines are read).
  --tcp-port N           [LOCUST_TCP_PORT, default 9000] the server's TCP ingest port; its host
                         is the one of --host.
  --batch-lines N        [LOCUST_BATCH_LINES, default 1000] lines per ingest batch.

Users, by weight (with -u 50: 40, 5 and 5):

- StatsUser (8): GET /customers/{id}/stats for a random known customer, a random `from` in the
  file's days and a random `to` after it (or none). About one request in seven is a bad one
  expecting its error: an impossible date (400), `to` before `from` (400), an unknown customer
  (404). Each is named by what it expects ("stats 400 bad date"); it counts as a success when
  that status comes back with an error message, and as a failure otherwise.
- HttpIngestUser (1): POST /ingest (text/plain) of a batch of lines.
- TcpIngestUser (1): the same batches over TCP with TcpIngestClient: connect, send, half-close,
  read the one JSON summary line. Each batch is one locust request of type "TCP", timed from
  connect to summary.

Batches are lines for the file's last three days (up to now, so never "future" and never out
of the retention window of a server that loaded the file), for its customers, with one line in
50 malformed in a known way. A batch fails unless its summary counts exactly what was sent:
accepted lines and rejected lines by reason. Ingested lines add to the days StatsUser queries.

Locust exits 1 when any request failed; `--csv PREFIX` writes the tables as CSV.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import logging
import random
import socket
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from locust import FastHttpUser, User, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from locust.event import EventHook

MAX_SCAN_LINES = 1_000_000
BAD_LINE_EVERY = 50
PATHS = ("/api/v1/resource1", "/api/v1/resource2", "/api/v1/resource3", "/api/v1/resource4")
STATUSES = (200, 200, 200, 201, 400, 401, 404, 500)
# Malformed lines and the reason the server gives for each (README: line grammar).
BAD_LINES = (
    ("{day} 25:00:00 {customer} /api/v1/resource1 200 0.100", "time"),
    ("{day} 12:00:00 {customer} /api/v1/resource1 700 0.100", "status"),
    ("{day} 12:00:00 {customer} /api/v1/resource1 200 -1", "duration"),
    ("{day} 12:00:00 {customer} /api/v1/resource1 200", "fields"),
    ("not a log line", "fields"),
)


@events.init_command_line_parser.add_listener
def add_arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument(
        "--customers-file",
        default="api_requests.log",
        env_var="LOCUST_CUSTOMERS_FILE",
        help="A log the server was loaded with: customer ids and days to query",
    )
    parser.add_argument(
        "--tcp-port",
        type=int,
        default=9000,
        env_var="LOCUST_TCP_PORT",
        help="The server's TCP ingest port (on the host of --host)",
    )
    parser.add_argument(
        "--batch-lines",
        type=int,
        default=1000,
        env_var="LOCUST_BATCH_LINES",
        help="Lines per ingest batch (POST /ingest and TCP)",
    )


@dataclass(frozen=True)
class Dataset:
    """What the users know of the loaded data: its customers and its first and last day."""

    customers: tuple[str, ...]
    first_day: dt.date
    last_day: dt.date

    def random_day(self, rng: random.Random, after: dt.date | None = None) -> dt.date:
        first = after or self.first_day
        return first + dt.timedelta(days=rng.randint(0, (self.last_day - first).days))


@functools.cache
def dataset(path: str) -> Dataset:
    """Customers and days of the text lines of a log (the first MAX_SCAN_LINES lines)."""
    customers: set[str] = set()
    days: set[dt.date] = set()
    with open(path, "rb") as f:
        for raw in itertools.islice(f, MAX_SCAN_LINES):
            fields = raw.split()
            if len(fields) != 6:
                continue
            try:
                days.add(dt.date.fromisoformat(fields[0].decode()))
                customers.add(fields[2].decode())
            except ValueError:
                continue
    if not customers:
        raise ValueError(f"{path}: no log lines in the text format")
    return Dataset(tuple(sorted(customers)), min(days), max(days))


def options(environment: Environment) -> Any:
    assert environment.parsed_options is not None, "run this file with the locust command"
    return environment.parsed_options


@events.init.add_listener
def check_customers_file(environment: Environment, **_: Any) -> None:
    """Read the customers file once at start, so a missing one stops locust with its reason."""
    if environment.parsed_options is None:
        return
    try:
        dataset(environment.parsed_options.customers_file)
    except (OSError, ValueError) as exc:
        logging.error("--customers-file: %s", exc)
        raise SystemExit(1) from None


@dataclass
class Batch:
    """Lines to ingest, and the summary the server must answer for them."""

    data: bytes
    accepted: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    def problem(self, summary: Any) -> str | None:
        """Why a summary does not count what was sent; None when it does.

        The message names only the counts that differ, so that locust's error report groups
        batches that failed the same way.
        """
        if not isinstance(summary, dict) or not isinstance(summary.get("rejected_by_reason"), dict):
            return f"not an ingest summary: {json.dumps(summary)[:200]}"
        want = {"accepted": self.accepted, "rejected": sum(self.rejected_by_reason.values())}
        got = {k: summary.get(k) for k in want}
        for reason in {*self.rejected_by_reason, *summary["rejected_by_reason"]}:
            want[f"rejected as {reason}"] = self.rejected_by_reason.get(reason, 0)
            got[f"rejected as {reason}"] = summary["rejected_by_reason"].get(reason, 0)
        wrong = [f"{k} {got[k]} (expected {want[k]})" for k in sorted(want) if got[k] != want[k]]
        return "summary miscounts the batch: " + ", ".join(wrong) if wrong else None


def make_batch(data: Dataset, lines: int, rng: random.Random) -> Batch:
    """Lines for the data's last three days up to now, for its customers; 1 in 50 malformed."""
    end = min(
        dt.datetime.now(dt.UTC),
        dt.datetime.combine(data.last_day, dt.time(23, 59, 59), dt.UTC),
    )
    start = dt.datetime.combine(data.last_day - dt.timedelta(days=2), dt.time(), dt.UTC)
    span = max(0, int((end - start).total_seconds()))
    out: list[str] = []
    rejected: Counter[str] = Counter()
    for i in range(lines):
        stamp = start + dt.timedelta(seconds=rng.randint(0, span))
        customer = rng.choice(data.customers)
        if i % BAD_LINE_EVERY == BAD_LINE_EVERY - 1:
            template, reason = rng.choice(BAD_LINES)
            out.append(template.format(day=stamp.date(), customer=customer))
            rejected[reason] += 1
            continue
        ms = rng.randint(1, 2000)
        out.append(
            f"{stamp:%Y-%m-%d %H:%M:%S} {customer} {rng.choice(PATHS)} {rng.choice(STATUSES)}"
            f" {ms // 1000}.{ms % 1000:03d}"
        )
    return Batch(
        ("\n".join(out) + "\n").encode(), lines - rejected.total(), dict(sorted(rejected.items()))
    )


class StatsUser(FastHttpUser):
    """Queries the stats of known customers; a share of bad requests expects 400 and 404."""

    weight = 8
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.data = dataset(options(self.environment).customers_file)
        self.rng = random.Random()

    def _stats_path(self, customer: str, query: dict[str, str]) -> str:
        quoted = urllib.parse.quote(customer, safe="")
        return f"/customers/{quoted}/stats?{urllib.parse.urlencode(query)}"

    def _expect(self, path: str, name: str, status: int, customer: str | None = None) -> None:
        with self.client.get(path, name=name, catch_response=True) as resp:
            try:
                body = resp.json()
            except ValueError:
                body = None
            if resp.status_code != status:
                resp.failure(
                    f"expected {status}, got {resp.status_code}: {(resp.text or '')[:200]}"
                )
            elif not isinstance(body, dict):
                resp.failure(f"not a JSON object: {(resp.text or '')[:200]}")
            elif status != 200:
                if "error" in body:
                    resp.success()
                else:
                    resp.failure(f"no error message: {(resp.text or '')[:200]}")
            elif body.get("customer_id") != customer:
                resp.failure(f"answer for {body.get('customer_id')!r}, asked for {customer!r}")
            elif body["summary"]["total_requests"] != sum(
                d["total_requests"] for d in body["days"]
            ):
                resp.failure("summary total is not the sum of the days")
            else:
                resp.success()

    @task(18)
    def stats(self) -> None:
        customer = self.rng.choice(self.data.customers)
        first = self.data.random_day(self.rng)
        query = {"from": str(first)}
        if self.rng.random() < 0.5:
            query["to"] = str(self.data.random_day(self.rng, after=first))
        self._expect(self._stats_path(customer, query), "stats", 200, customer)

    @task(1)
    def bad_date(self) -> None:
        customer = self.rng.choice(self.data.customers)
        path = self._stats_path(customer, {"from": f"{self.data.last_day.year}-02-30"})
        self._expect(path, "stats 400 bad date", 400)

    @task(1)
    def to_before_from(self) -> None:
        customer = self.rng.choice(self.data.customers)
        first = self.data.last_day
        query = {"from": str(first), "to": str(first - dt.timedelta(days=1))}
        self._expect(self._stats_path(customer, query), "stats 400 to before from", 400)

    @task(1)
    def unknown_customer(self) -> None:
        customer = f"locust-nobody-{self.rng.randrange(10**9)}"
        query = {"from": str(self.data.first_day)}
        self._expect(self._stats_path(customer, query), "stats 404 unknown customer", 404)


class HttpIngestUser(FastHttpUser):
    """POSTs batches of lines to /ingest and checks the summary counts them."""

    weight = 1
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        self.data = dataset(options(self.environment).customers_file)
        self.rng = random.Random()

    @task
    def post_batch(self) -> None:
        batch = make_batch(self.data, options(self.environment).batch_lines, self.rng)
        with self.client.post(
            "/ingest",
            data=batch.data,  # type: ignore[arg-type]  # bytes work; locust's hint says str
            headers={"Content-Type": "text/plain"},
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"expected 200, got {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                problem = batch.problem(resp.json())
            except ValueError:
                problem = f"not JSON: {(resp.text or '')[:200]}"
            if problem:
                resp.failure(problem)
            else:
                resp.success()


class SummaryMismatch(Exception):
    """The server's summary of a TCP batch does not count what was sent."""


class TcpIngestClient:
    """Sends each batch on its own TCP connection and reports it as a locust request."""

    def __init__(self, host: str, port: int, request_event: EventHook) -> None:
        self.host = host
        self.port = port
        self.request_event = request_event

    def send_batch(self, batch: Batch, name: str = "ingest batch") -> None:
        """Connect, send, half-close, read the summary line; fire one "TCP" request event."""
        start_time = time.time()
        start = time.perf_counter()
        reply = b""
        exception: Exception | None = None
        try:
            with socket.create_connection((self.host, self.port), timeout=60) as sock:
                sock.sendall(batch.data)
                sock.shutdown(socket.SHUT_WR)
                while not reply.endswith(b"\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
            elapsed_ms = (time.perf_counter() - start) * 1000
            problem = batch.problem(json.loads(reply))
            if problem:
                exception = SummaryMismatch(problem)
        except (OSError, ValueError) as exc:  # refused, reset, timeout; no or bad JSON line
            elapsed_ms = (time.perf_counter() - start) * 1000
            exception = exc
        self.request_event.fire(
            request_type="TCP",
            name=name,
            start_time=start_time,
            response_time=elapsed_ms,
            response_length=len(reply),
            response=reply,
            context={},
            exception=exception,
        )


class TcpIngestUser(User):
    """Sends batches of lines over raw TCP, each on its own connection."""

    weight = 1
    wait_time = between(0.5, 1.5)

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        host = urllib.parse.urlsplit(self.host or "").hostname or "127.0.0.1"
        self.client = TcpIngestClient(
            host, options(environment).tcp_port, environment.events.request
        )

    def on_start(self) -> None:
        self.data = dataset(options(self.environment).customers_file)
        self.rng = random.Random()

    @task
    def send_batch(self) -> None:
        batch = make_batch(self.data, options(self.environment).batch_lines, self.rng)
        self.client.send_batch(batch)
