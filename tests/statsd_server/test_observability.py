"""GET /metrics (merged over processes) and structured logs, from the real server."""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tests.statsd_server.test_durability import DAY, lines_for
from tests.statsd_server.test_processes import kill_shard_and_wait_for_restart


def scrape(server: Server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    url = f"http://127.0.0.1:{server.http_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        value
        for (n, lbls), value in samples.items()
        if n == name and all(dict(lbls).get(k) == v for k, v in labels.items())
    )


@pytest.mark.slow
def test_metrics_count_what_happened(server_factory: Any) -> None:
    """Accepted and rejected lines, batches, fsyncs, snapshots, queries, customers and a
    shard restart all show up in /metrics with the right values."""
    server: Server = server_factory(
        shards=2, STATS_FRONTS="2", STATS_SNAPSHOT_INTERVAL="0.3", STATS_MAX_CUSTOMERS="7"
    )
    good = b"".join(lines_for(f"mc_{k}", 100 + k) for k in range(6))
    bad = b"not a line\nneither\n" + lines_for("mc_0", 1).replace(b" 500 ", b" 999 ")
    summary = server.send_tcp(good + bad)
    assert summary["accepted"] == sum(100 + k for k in range(6))
    over_cap = server.send_tcp(lines_for("mc_new_1", 3) + lines_for("mc_new_2", 4))
    # Room for one more customer: which of the two gets it depends on which shard asks first.
    refused = over_cap["rejected_by_reason"]["customer_limit"]
    assert (over_cap["accepted"], refused) in ((3, 4), (4, 3))
    for _ in range(3):  # each front asks a shard once per query at most, then has it cached
        for k in range(5):
            assert server.get(f"/customers/mc_{k}/stats?from={DAY.isoformat()}")[0] == 200
    assert server.get(f"/customers/nobody/stats?from={DAY.isoformat()}")[0] == 404
    time.sleep(1.0)  # snapshots run

    samples = scrape(server)
    assert total(samples, "statsd_lines_accepted_total") == summary["accepted"] + 7 - refused
    assert total(samples, "statsd_lines_rejected_total", reason="fields") == 2
    assert total(samples, "statsd_lines_rejected_total", reason="status") == 1
    assert total(samples, "statsd_lines_rejected_total", reason="customer_limit") == refused
    assert total(samples, "statsd_ingest_batches_total") >= 3
    assert total(samples, "statsd_wal_fsync_seconds_count") >= 2
    assert total(samples, "statsd_snapshot_seconds_count") >= 2
    assert total(samples, "statsd_snapshot_rows_total") >= 7
    assert total(samples, "statsd_snapshot_file_bytes") > 0
    assert total(samples, "statsd_query_seconds_count", status="200") == 15
    assert 5 <= total(samples, "statsd_query_seconds_count", status="200", cache="miss") <= 10
    assert total(samples, "statsd_query_seconds_count", status="200", cache="hit") >= 5
    assert total(samples, "statsd_query_seconds_count", status="404") == 1
    assert total(samples, "statsd_customers") == 7
    assert total(samples, "statsd_customer_days") == 7

    kill_shard_and_wait_for_restart(server, 1)
    time.sleep(1.0)
    samples = scrape(server)
    assert total(samples, "statsd_process_restarts_total", process="shard-1") == 1
    # Counters keep the dead process's counts; gauges show only the live ones, once each.
    assert total(samples, "statsd_lines_accepted_total") == summary["accepted"] + 7 - refused
    assert total(samples, "statsd_customers") == 7


@pytest.mark.slow
def test_json_logs_one_object_per_line_and_none_per_request(server_factory: Any) -> None:
    """STATS_LOG_FORMAT=json: every log line parses, names its process; requests log nothing."""
    server: Server = server_factory(shards=2, STATS_LOG_FORMAT="json")
    server.send_tcp(lines_for("jl", 50))
    before = server.log().count("\n")
    for _ in range(50):
        assert server.get(f"/customers/jl/stats?from={DAY.isoformat()}")[0] == 200
        server.send_tcp(lines_for("jl", 2))
    assert server.log().count("\n") == before, "a log line per request at info level"
    server.stop()
    entries = [json.loads(line) for line in server.log().splitlines()]
    assert {e["process"] for e in entries} >= {"supervisor", "shard-0", "shard-1"}
    assert all({"time", "level", "logger", "message", "pid"} <= e.keys() for e in entries)
    assert any(e["message"] == "final snapshot written" for e in entries)


@pytest.mark.slow
def test_malformed_http_requests_do_not_flood_the_log(server_factory: Any) -> None:
    """A client sending bad request lines and huge headers gets 400s; the log stays quiet."""
    import socket

    server: Server = server_factory(shards=1)
    before = server.log()
    bad_requests = [
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header Line\r\n\r\n",
    ]
    for _ in range(10):
        for request in bad_requests:
            with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
                sock.sendall(request)
                assert sock.recv(1024).split(b" ")[1] == b"400"
    assert server.get("/health")[0] == 200
    assert server.log() == before
