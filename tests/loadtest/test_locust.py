"""loadtest/locustfile.py runs headless against a real server without a single failure.

Locust runs as a subprocess: its gevent monkey-patching never touches the pytest process.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Server

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


@pytest.mark.slow
def test_locust_headless_smoke_run_has_no_failures(server_factory: Any, tmp_path: Path) -> None:
    """A 5 s headless run: every user class makes requests, and none fails."""
    log = tmp_path / "loaded.log"
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generator.py"), str(log), "3000", "--days", "10"],
        check=True,
    )
    server: Server = server_factory(shards=2)
    assert server.send_tcp(log.read_bytes())["accepted"] == 3000

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "STATS_"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "-u",
            "10",
            "-r",
            "10",
            "-t",
            "5s",
            "--host",
            f"http://127.0.0.1:{server.http_port}",
            "--tcp-port",
            str(server.tcp_port),
            "--customers-file",
            str(log),
            "--batch-lines",
            "200",
            "--csv",
            str(tmp_path / "run"),
            "--only-summary",
        ],
        cwd=tmp_path,  # no locust.conf or pyproject.toml of ours is picked up
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    with open(tmp_path / "run_stats.csv", newline="") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f) if r["Type"]}
    assert all(int(r["Failure Count"]) == 0 for r in rows.values()), rows
    counts = {key: int(r["Request Count"]) for key, r in rows.items()}
    assert counts[("GET", "stats")] > 0  # StatsUser
    assert sum(n for (kind, name), n in counts.items() if name.startswith("stats 4")) > 0
    assert counts[("POST", "/ingest")] > 0  # HttpIngestUser
    assert counts[("TCP", "ingest batch")] > 0  # TcpIngestUser

    # Every batch counted as a success was applied: 200 lines of which 4 malformed, each.
    customers = {line.split()[2] for line in log.read_text().splitlines()}
    totals = [server.get(f"/customers/{c}/stats?from=2000-01-01")[1] for c in customers]
    applied = sum(t["summary"]["total_requests"] for t in totals)
    batches = counts[("POST", "/ingest")] + counts[("TCP", "ingest batch")]
    # At least: a batch cut short by the end of the run may be applied but not counted.
    assert applied >= 3000 + 196 * batches
