"""The `statsd-server` command as a user runs it: help with defaults, `stats`, `load` progress.

Commands run as subprocesses against a real server; expected figures are computed here from
the records before they are rendered as lines.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import pty
import random
import re
import signal
import struct
import subprocess
import sys
import termios
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from statsd_server.routing import shard_for
from tests.conftest import Server, free_port

TODAY = dt.datetime.now(dt.UTC).date()
DAYS = [TODAY - dt.timedelta(days=i) for i in (3, 2, 1)]
CUSTOMERS = ["cust_1", "tenant:7/prod"]
BUSY_DAY = DAYS[1]  # cust_1 gets more requests than STATS_KLL_K that day: sketched quantiles


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STATS_")}
    return subprocess.run(
        [sys.executable, "-m", "statsd_server", *args],
        env=clean,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records(seed: int = 5) -> list[tuple[str, dt.date, int, int]]:
    """(customer, day, status, duration in ms) records, a few per customer-day, one busy day."""
    rng = random.Random(seed)
    out = []
    for customer in CUSTOMERS:
        for day in DAYS:
            n = 450 if (customer, day) == ("cust_1", BUSY_DAY) else rng.randint(1, 30)
            for _ in range(n):
                status = rng.choice([200, 201, 301, 400, 404, 429, 500, 503])
                out.append((customer, day, status, rng.randint(1, 2500)))
    return out


def as_lines(recs: list[tuple[str, dt.date, int, int]]) -> bytes:
    rng = random.Random(1)
    return "".join(
        f"{day} {rng.randrange(24):02d}:{rng.randrange(60):02d}:00 {customer} /a {status}"
        f" {ms // 1000}.{ms % 1000:03d}\n"
        for customer, day, status, ms in recs
    ).encode()


def expected(statuses: list[int], millis: list[int]) -> dict[str, Any]:
    """The table's figures for one row, from the records (nearest-rank quantiles)."""
    n = len(statuses)
    ordered = sorted(millis)
    return {
        "requests": n,
        "successful": sum(s < 400 for s in statuses),
        "failed": sum(s >= 400 for s in statuses),
        "uptime": 100 * sum(s < 500 for s in statuses) / n,
        "avg": sum(millis) / n,
        "p50": ordered[-(-n // 2) - 1],
        "p99": ordered[-(-99 * n // 100) - 1],
    }


def table_rows(out: str) -> dict[str, list[str]]:
    """Row label (a date, or 'total') -> its cells, from the printed table."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and (re.fullmatch(r"\d{4}-\d\d-\d\d", cells[0]) or cells[0] == "total"):
            rows[cells[0]] = cells[1:]
    return rows


def number(cell: str) -> float:
    return float(cell.lstrip("~").replace(",", ""))


def test_help_lists_every_command_and_the_defaults() -> None:
    """`--help` names every command; each command's help shows its options' defaults."""
    top = cli("--help")
    assert top.returncode == 0
    commands = top.stdout.split("Commands:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[0] for line in commands] == ["load", "serve", "stats"]
    assert not any(line.endswith("...") for line in commands)  # summaries not cut short

    def help_text(command: str) -> str:
        result = cli(command, "--help")
        assert result.returncode == 0, result.stderr
        return " ".join(result.stdout.split())  # undo click's wrapping

    serve = help_text("serve")
    for text in (
        "--http-port INT",
        "default 127.0.0.1]",
        "default 8080]",
        "default 9000]",
        "default 5.0]",
        "default 30]",
        "default 200]",
        "default 48]",
        "default info]",
        "[default: none]",
    ):
        assert text in serve, text
    load = help_text("load")
    assert "[env STATS_TCP_PORT; default 9000]" in load
    assert f"[default: {8 * (os.cpu_count() or 1)};" in load
    stats = help_text("stats")
    for text in (
        "CUSTOMER",
        "--from YYYY-MM-DD",
        "[required]",
        "[default: the newest day]",
        "[env STATS_HOST; default 127.0.0.1]",
        "[env STATS_HTTP_PORT; default 8080]",
    ):
        assert text in stats, text


@pytest.mark.slow
def test_stats_prints_each_day_and_the_total(server_factory: Any) -> None:
    """`stats` shows per-day and total counts, uptime and latencies equal to the records'."""
    recs = records()
    server: Server = server_factory(shards=2)
    summary = server.send_tcp(as_lines(recs))
    assert summary["accepted"] == len(recs) and summary["rejected"] == 0

    for customer in CUSTOMERS:
        result = cli(
            "stats", customer, "--from", str(DAYS[0]), "--http-port", str(server.http_port)
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"customer {customer}, {DAYS[0]} to the newest day")
        rows = table_rows(result.stdout)
        assert list(rows) == [*map(str, DAYS), "total"]

        groups: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
        for c, day, status, ms in recs:
            if c == customer:
                for label in (str(day), "total"):
                    groups[label][0].append(status)
                    groups[label][1].append(ms)
        for label, (statuses, millis) in groups.items():
            want = expected(statuses, millis)
            requests, successful, failed, uptime, avg, p50, p99 = rows[label]
            assert number(requests) == want["requests"]
            assert number(successful) == want["successful"]
            assert number(failed) == want["failed"]
            assert number(uptime) == pytest.approx(want["uptime"], abs=0.0051)
            assert number(avg) == pytest.approx(want["avg"], abs=0.051)
            busy = customer == "cust_1" and label in (str(BUSY_DAY), "total")
            if busy:  # sketched: marked, and within 2% (the server states its own bound)
                assert p50.startswith("~")
                assert number(p50) == pytest.approx(want["p50"], rel=0.02)
                assert number(p99) == pytest.approx(want["p99"], rel=0.02)
            else:
                assert number(p50) == want["p50"] and not p50.startswith("~")
                assert number(p99) == want["p99"] and not p99.startswith("~")
        assert ("estimated from sketches" in result.stdout) == (customer == "cust_1")

    result = cli(
        "stats",
        "cust_1",
        "--from",
        str(DAYS[2]),
        "--to",
        str(DAYS[2]),
        "--http-port",
        str(server.http_port),
    )
    assert result.returncode == 0
    assert list(table_rows(result.stdout)) == [str(DAYS[2]), "total"]

    result = cli("stats", "cust_1", "--from", str(TODAY), "--http-port", str(server.http_port))
    assert result.returncode == 0
    assert "(no requests in this range)" in result.stdout
    assert table_rows(result.stdout)["total"] == ["0", "0", "0", "-", "-", "-", "-"]


@pytest.mark.slow
def test_stats_errors_are_one_line_and_exit_1(server_factory: Any) -> None:
    """Unknown customer, bad dates and a refused connection: one line on stderr, exit 1."""
    server: Server = server_factory(shards=2)
    assert server.send_tcp(as_lines(records()[:5]))["accepted"] == 5
    port = str(server.http_port)
    cases = [
        (["nobody", "--from", str(DAYS[0])], "error: unknown customer 'nobody'", "(HTTP 404)"),
        (["cust_1", "--from", "2026-13-01"], "error: invalid 'from'", "(HTTP 400)"),
        (
            ["cust_1", "--from", str(DAYS[1]), "--to", str(DAYS[0])],
            f"error: 'to' ({DAYS[0]}) is before 'from' ({DAYS[1]})",
            "(HTTP 400)",
        ),
        (["a b", "--from", str(DAYS[0])], "error: invalid customer id", "(HTTP 400)"),
    ]
    for args, start, end in cases:
        result = cli("stats", *args, "--http-port", port)
        assert result.returncode == 1, args
        assert result.stdout == ""
        assert result.stderr.startswith(start) and result.stderr.endswith(f"{end}\n"), args
        assert result.stderr.count("\n") == 1

    closed = str(free_port())
    result = cli("stats", "cust_1", "--from", str(DAYS[0]), "--http-port", closed)
    assert result.returncode == 1
    assert result.stderr == f"error: cannot connect to 127.0.0.1:{closed}: Connection refused\n"

    result = cli("stats", "cust_1", "--from", str(DAYS[0]), "--http-port", "nope")
    assert result.returncode == 2
    assert result.stderr.startswith("error: STATS_HTTP_PORT='nope' is invalid")


@pytest.mark.slow
def test_stats_of_a_frozen_shard_is_a_503_line(server_factory: Any) -> None:
    """A customer whose shard stops answering gets the server's 503 message, exit 1."""
    server: Server = server_factory(shards=2)
    assert server.send_tcp(as_lines(records()[:5]))["accepted"] == 5
    owner = shard_for("cust_1", 2)
    pids = dict(
        (int(m[1]), int(m[2]))
        for m in re.finditer(r"\[shard-(\d+)\] statsd_server\.shard: pid (\d+):", server.log())
    )
    os.kill(pids[owner], signal.SIGSTOP)
    try:
        result = cli(
            "stats", "cust_1", "--from", str(DAYS[0]), "--http-port", str(server.http_port)
        )
    finally:
        os.kill(pids[owner], signal.SIGCONT)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: shard {owner} is unavailable")
    assert result.stderr.endswith("(HTTP 503)\n") and result.stderr.count("\n") == 1


def run_on_terminal(args: list[str]) -> tuple[int, str, str]:
    """Run a command with stderr on a pseudo-terminal (120 columns); return code, out, err."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STATS_")}
    with subprocess.Popen(
        args, env=clean, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    ) as proc:
        os.close(slave)
        err = b""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command closed the terminal
                break
            if not data:
                break
            err += data
        os.close(master)
        assert proc.stdout is not None
        out = proc.stdout.read()
        code = proc.wait(60)
    return code, out.decode(), err.decode()


@pytest.mark.slow
def test_load_shows_bytes_lines_rates_and_time_left_on_a_terminal(
    server_factory: Any, tmp_path: Path
) -> None:
    """On a terminal, `load` draws a bar with bytes, the exact line count, rates and the ETA."""
    log = tmp_path / "few.log"
    data = as_lines(records())
    log.write_bytes(data + b"garbage without a newline")
    lines = data.count(b"\n") + 1
    server: Server = server_factory(shards=2)
    code, out, err = run_on_terminal(
        [
            sys.executable,
            "-m",
            "statsd_server",
            "load",
            str(log),
            "--tcp-port",
            str(server.tcp_port),
        ]
    )
    assert code == 0, err
    assert out.startswith(f'{{"accepted":{lines - 1},"rejected":1,')
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("load: 100%|"), final
    assert f", {lines:,} lines [" in final
    assert re.search(r"\[\d\d:\d\d<\d\d:\d\d, [0-9.]+[kMG]?B/s, [0-9.]+[kMG]? lines/s\]$", final), (
        final
    )


def test_load_off_a_terminal_prints_only_its_error(tmp_path: Path) -> None:
    """Without a terminal there is no bar: a failed `load` leaves one error line on stderr."""
    log = tmp_path / "one.log"
    log.write_text(f"{DAYS[0]} 12:00:00 cust_1 /a 200 0.1\n")
    result = cli("load", str(log), "--tcp-port", str(free_port()))
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot connect to 127.0.0.1:")
    assert result.stderr.count("\n") == 1


def test_the_command_line_imports_no_numpy() -> None:
    """`load` is timed from the command's start: the CLI and the load client leave numpy
    (about 80 ms of imports) to the server."""
    probe = "import sys, statsd_server.cli; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
