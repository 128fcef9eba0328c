"""`statsd-server load` can be re-run after an interruption and never counts a line twice."""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from statsd_server.loader import PIECE_BYTES, split_at_lines
from statsd_server.summary import PIECE_HEADER
from tests.conftest import ROOT, Server
from tests.statsd_server.test_durability import kill_everything, lines_for, totals

TODAY = dt.datetime.now(dt.UTC).date()
FIRST = TODAY - dt.timedelta(days=3)


@pytest.fixture(scope="module")
def log_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Counter[str]]:
    """A generated log of several pieces, and its lines per customer counted here."""
    path = tmp_path_factory.mktemp("resume") / "big.log"
    subprocess.run(
        [
            *(sys.executable, str(ROOT / "tools" / "generator.py"), str(path), "400000"),
            *("--customers", "40", "--days", "3", "--seed", "11"),
        ],
        check=True,
    )
    counts = Counter(line.split(b" ")[2].decode() for line in path.read_bytes().splitlines())
    assert len(split_at_lines(path)) >= 5, "the test needs a file of several pieces"
    return path, counts


def load(server: Server, path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "statsd_server", "load", str(path)),
            *("--tcp-port", str(server.tcp_port), *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def counts_of(server: Server, customers: list[str]) -> dict[str, int]:
    return totals(server, customers, since=FIRST)


@pytest.mark.slow
def test_rerun_of_a_complete_load_counts_nothing_again(
    server_factory: Any, log_file: tuple[Path, Counter[str]]
) -> None:
    """The second run reports every line as already loaded and changes no figure."""
    path, expected = log_file
    server: Server = server_factory(shards=2)
    first = load(server, path)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert json.loads(out)["accepted"] == expected.total()
    second = load(server, path, "--connections", "3")  # other parallelism, same pieces
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert json.loads(out) == {
        "accepted": 0,
        "rejected": 0,
        "rejected_by_reason": {},
        "already_loaded": expected.total(),
    }
    assert counts_of(server, list(expected)) == dict(expected)


@pytest.mark.slow
def test_interrupted_load_then_rerun_counts_each_line_once(
    server_factory: Any, log_file: tuple[Path, Counter[str]]
) -> None:
    """`load` killed part-way, then run again: the figures are those of one full load."""
    path, expected = log_file
    server: Server = server_factory(shards=2)
    first = load(server, path, "--connections", "1")
    time.sleep(0.4)
    first.kill()
    first.communicate()
    # A piece whose bytes all left before the kill is still applied: wait until it is.
    partial = -1
    while partial != (partial := sum(counts_of(server, list(expected)).values())):
        time.sleep(0.5)
    assert partial < expected.total(), "the load should have been interrupted part-way"
    rerun = load(server, path)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    summary = json.loads(out)
    assert summary["accepted"] + summary["already_loaded"] == expected.total()
    assert summary["already_loaded"] == partial
    assert counts_of(server, list(expected)) == dict(expected)


@pytest.mark.slow
def test_server_crash_mid_load_then_rerun_counts_each_line_once(
    server_factory: Any, log_file: tuple[Path, Counter[str]]
) -> None:
    """SIGKILL of the whole server mid-load, restart with another shard count, re-run the
    load: exactly one full load is counted (pieces are logged with their requests)."""
    path, expected = log_file
    server: Server = server_factory(shards=2, STATS_SNAPSHOT_INTERVAL="0.2")
    first = load(server, path, "--connections", "1")
    # Crash as soon as the first pieces are in (and snapshots have started to cover them).
    while not sum(counts_of(server, list(expected)[:5]).values()):
        time.sleep(0.02)
    time.sleep(0.25)
    kill_everything(server)
    first.communicate(timeout=60)
    assert first.returncode != 0, "the load should have been cut off by the crash"

    again = Server(data_dir=server.data_dir, shards=3).start()
    try:
        rerun = load(again, path)
        out, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        summary = json.loads(out)
        assert summary["accepted"] + summary["already_loaded"] == expected.total()
        assert counts_of(again, list(expected)) == dict(expected)
    finally:
        again.stop()


def test_pieces_depend_on_the_file_only(tmp_path: Path) -> None:
    """Cuts fall just after a newline at or past each multiple of the piece size."""
    path = tmp_path / "f.log"
    line = b"x" * 99 + b"\n"
    path.write_bytes(line * (3 * PIECE_BYTES // 100 + 7))
    pieces = split_at_lines(path)
    cuts = [(k * PIECE_BYTES // 100 + 1) * 100 for k in range(1, 4)]
    assert [o for o, _ in pieces] == [0, *cuts]
    assert sum(n for _, n in pieces) == path.stat().st_size
    assert all(path.read_bytes()[o - 1 : o] == b"\n" for o, _ in pieces[1:])


@pytest.mark.slow
def test_a_piece_cut_short_or_too_long_is_not_applied(server_factory: Any) -> None:
    """A piece must arrive exactly as announced; otherwise none of it counts, and the same
    name can still be sent whole later."""

    server: Server = server_factory(shards=2)
    body = lines_for("pc", 100)

    def send(announced: int, data: bytes) -> dict[str, Any]:
        header = f"#load-piece test:0 {announced}\n".encode()
        return server.send_tcp(header + data)

    # Three of each: on 2 shards, at least one of the three is handed to the other shard to
    # parse (statsd_server.shard: _piece_parser), so both paths give the reason.
    for _ in range(3):
        short = send(len(body), body[: len(body) // 2])
        assert "ended after" in short["error"]
    for _ in range(3):
        long = send(len(body) - 10, body)
        assert "longer than announced" in long["error"]
    assert totals(server, ["pc"]) == {"pc": 0}
    whole = send(len(body), body)
    assert whole["accepted"] == 100 and whole["already_loaded"] == 0
    assert send(len(body), body)["already_loaded"] == 100
    assert totals(server, ["pc"]) == {"pc": 100}


@pytest.mark.slow
def test_pieces_arriving_as_the_server_stops_are_applied_whole(server_factory: Any) -> None:
    """Pieces still arriving when a graceful stop begins are finished and answered, those
    handed to a shard that is already stopping too: it refuses them, and the shard that
    received them parses them itself. After a restart every line is there once."""
    server: Server = server_factory(shards=2)
    customers = [f"stop_{i}" for i in range(3)]
    bodies = [lines_for(customer, 200) for customer in customers]
    # On 2 shards one of them receives two of the three: it hands the second one over.
    socks = []
    for i, body in enumerate(bodies):
        sock = socket.create_connection(("127.0.0.1", server.tcp_port), timeout=60)
        sock.sendall(PIECE_HEADER + f"stop{i}:0 {len(body)}\n".encode() + body[:1000])
        socks.append(sock)
    time.sleep(1)  # the shards have read the headers and chosen who parses each piece
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:  # the shards stop accepting connections as they start to drain
        try:
            socket.create_connection(("127.0.0.1", server.tcp_port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "the shards did not start to drain"
        time.sleep(0.05)
    answers = []
    for sock, body in zip(socks, bodies, strict=True):
        with sock:
            sock.sendall(body[1000:])
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        answers.append(json.loads(reply))
    assert server.proc.wait(60) == 0
    assert [answer["accepted"] for answer in answers] == [200, 200, 200], answers
    assert "refused a load piece (stopping); parsing it here" in server.log()
    server.start()
    assert totals(server, customers) == dict.fromkeys(customers, 200)


@pytest.mark.slow
def test_a_piece_whose_log_write_fails_is_not_marked_loaded(server_factory: Any) -> None:
    """Disk full while logging a piece: the client gets an error, nothing is counted, and
    sending the piece again later applies it (it was not marked as loaded)."""
    import resource

    from tests.statsd_server.test_processes import shard_pids

    server: Server = server_factory(shards=1)
    body = lines_for("full", 300)
    piece = f"#load-piece disk:0 {len(body)}\n".encode() + body
    (pid,) = shard_pids(server).values()
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
    failed = server.send_tcp(piece)
    assert "write-ahead log: wrote 1000 of" in failed["error"]
    assert totals(server, ["full"]) == {"full": 0}
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    again = server.send_tcp(piece)
    assert again["accepted"] == 300 and again["already_loaded"] == 0
    assert totals(server, ["full"]) == {"full": 300}
