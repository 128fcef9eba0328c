"""tools/generator.py keeps the brief's interface and writes lines the server accepts."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

GENERATOR = ROOT / "tools" / "generator.py"


def run(*args: str) -> str:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args], capture_output=True, text=True, check=True
    ).stdout


def test_brief_interface_writes_the_file(tmp_path: Path) -> None:
    """`generator.py FILE N` writes N lines in the brief's format and value ranges."""
    out = tmp_path / "api_requests.log"
    run(str(out), "2000")
    lines = out.read_text().splitlines()
    assert len(lines) == 2000
    now = dt.datetime.now(dt.UTC)
    for line in lines:
        date, time, cust, path, status, duration = line.split(" ")
        ts = dt.datetime.fromisoformat(f"{date}T{time}+00:00")
        assert now - dt.timedelta(days=30, minutes=5) <= ts <= now + dt.timedelta(minutes=5)
        assert cust.startswith("cust_") and 1 <= int(cust[5:]) <= 50
        assert path in {f"/api/v1/resource{i}" for i in range(1, 5)}
        assert int(status) in {200, 201, 400, 401, 403, 404, 500}
        assert 0.1 <= float(duration) <= 2.0 and len(duration.split(".")[1]) == 3


def test_seed_makes_output_reproducible() -> None:
    """The same seed and end date give the same bytes; another seed does not."""
    args = ("-", "500", "--end-date", "2024-09-30")
    assert run(*args, "--seed", "3") == run(*args, "--seed", "3")
    assert run(*args, "--seed", "3") != run(*args, "--seed", "4")


def test_json_format_and_options() -> None:
    """--format json writes one object per line with the five fields, within the options."""
    out = run(
        "-",
        "300",
        "--format",
        "json",
        "--customers",
        "3",
        "--days",
        "2",
        "--end-date",
        "2024-09-30",
        "--latency",
        "lognormal",
    )
    for line in out.splitlines():
        rec = json.loads(line)
        assert set(rec) == {"timestamp", "customer_id", "request_path", "status_code", "duration"}
        assert rec["customer_id"] in {"cust_1", "cust_2", "cust_3"}
        assert "2024-09-28" <= rec["timestamp"][:10] <= "2024-09-30"
        assert rec["duration"] > 0


def test_bad_rate_inserts_malformed_lines() -> None:
    """--bad-rate 0.5 makes about half the lines malformed."""
    lines = run("-", "2000", "--bad-rate", "0.5", "--end-date", "2024-09-30").splitlines()
    valid = re.compile(
        r"2024-09-(0[1-9]|[12][0-9]|30) ([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9] cust_[0-9]+"
        r" /api/v1/resource[1-4] (200|201|400|401|403|404|500) [0-9]\.[0-9]{3}"
    )
    good = sum(1 for ln in lines if valid.fullmatch(ln))
    assert 800 < good < 1200
