"""The process tree: start-up errors, a shard that stops answering, a shard that dies."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from statsd_server.routing import shard_for
from tests.conftest import Server, free_port, read_http_responses


def serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `statsd-server serve` expecting it to stop by itself."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("STATS_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "statsd_server",
            "serve",
            "--data-dir",
            str(tmp_path / "data"),
            "--http-port",
            str(free_port()),
            "--tcp-port",
            str(free_port()),
            *args,
        ],
        env={**clean, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_invalid_setting_stops_the_start_naming_it(tmp_path: Path) -> None:
    """An invalid env var or flag exits 2 with one line naming the variable."""
    for args, env, name in (
        ((), {"STATS_SHARDS": "zero"}, "STATS_SHARDS"),
        (("--kll-k", "3"), {}, "STATS_KLL_K"),
    ):
        result = serve(tmp_path, *args, **env)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and name in result.stderr, result.stderr


def test_dotenv_file_is_read(tmp_path: Path) -> None:
    """A .env file in the working directory counts as configuration."""
    (tmp_path / ".env").write_text("STATS_RETENTION_DAYS=minus one\n")
    result = serve(tmp_path)
    assert result.returncode == 2 and "STATS_RETENTION_DAYS" in result.stderr


def test_data_dir_that_is_a_file_is_named(tmp_path: Path) -> None:
    """STATS_DATA_DIR pointing at a file stops the start with one line naming it."""
    (tmp_path / "afile").write_text("x")
    result = serve(tmp_path, "--data-dir", str(tmp_path / "afile"))  # the last flag wins
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "STATS_DATA_DIR" in result.stderr, result.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """A taken HTTP port stops the start with a message naming it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve(tmp_path, "--http-port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_corrupt_snapshot_is_named_and_kept(tmp_path: Path) -> None:
    """A database file that is not SQLite stops the start; the file is left untouched."""
    data = tmp_path / "data"
    data.mkdir()
    junk = b"not a database at all " * 500
    (data / "stats.db").write_bytes(junk)
    result = serve(tmp_path)
    assert result.returncode == 1
    assert str(data / "stats.db") in result.stderr
    assert (data / "stats.db").read_bytes() == junk


def shard_pids(server: Server) -> dict[int, int]:
    """Shard index -> pid of its latest start, from the server log."""
    pids = {}
    for m in re.finditer(r"\[shard-(\d+)\] statsd_server\.shard: pid (\d+):", server.log()):
        pids[int(m[1])] = int(m[2])
    return pids


def kill_shard_and_wait_for_restart(server: Server, shard: int) -> None:
    """SIGKILL one shard process; return once the supervisor restarted it and /ready is 200."""
    old = shard_pids(server)[shard]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if shard_pids(server).get(shard) not in (None, old) and server.get("/ready")[0] == 200:
            return
        time.sleep(0.1)
    pytest.fail(f"shard {shard} not restarted:\n{server.log()}")


def owned_customers(shards: int) -> dict[int, str]:
    """One customer id per shard."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < shards:
        found.setdefault(shard_for(f"cust_{i}", shards), f"cust_{i}")
        i += 1
    return found


@pytest.mark.slow
def test_unresponsive_shard_gives_503_not_wrong_numbers(server_factory: Any) -> None:
    """A frozen shard makes /ready 503 naming it and its customers 503; others keep answering."""
    server: Server = server_factory(shards=2)
    owners = owned_customers(2)
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    lines = "".join(f"{day} 12:00:00 {c} /a 200 0.5\n" for c in owners.values())
    assert server.send_tcp(lines.encode())["accepted"] == 2
    pid = shard_pids(server)[1]
    os.kill(pid, signal.SIGSTOP)
    try:
        status, body = server.get("/ready")
        assert status == 503 and body["missing_shards"] == [1] and "1" in body["error"]
        status, body = server.get(f"/customers/{owners[1]}/stats?from={day}")
        assert status == 503 and "shard 1" in body["error"]
        status, body = server.get(f"/customers/{owners[0]}/stats?from={day}")
        assert status == 200 and body["summary"]["total_requests"] == 1
    finally:
        os.kill(pid, signal.SIGCONT)
    assert server.get("/ready")[0] == 200
    status, body = server.get(f"/customers/{owners[1]}/stats?from={day}")
    assert status == 200 and body["summary"]["total_requests"] == 1


@pytest.mark.slow
def test_killed_shard_is_restarted_from_its_snapshot(server_factory: Any) -> None:
    """SIGKILL of a shard: the supervisor restarts it and it answers from its last snapshot."""
    server: Server = server_factory(shards=2, STATS_SNAPSHOT_INTERVAL="0.2")
    owners = owned_customers(2)
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    lines = "".join(f"{day} 12:00:00 {c} /a 503 0.25\n" for c in owners.values() for _ in range(3))
    assert server.send_tcp(lines.encode())["accepted"] == 6
    time.sleep(1.0)  # several snapshot intervals
    kill_shard_and_wait_for_restart(server, 0)
    assert "shard-0 died" in server.log()
    status, body = server.get(f"/customers/{owners[0]}/stats?from={day}")
    assert status == 200
    assert (body["summary"]["total_requests"], body["summary"]["server_errors"]) == (3, 3)
    assert server.stop() == 0


@pytest.mark.slow
def test_sigterm_to_the_process_group_still_drains_in_order(server_factory: Any) -> None:
    """SIGTERM to every process at once (systemd, docker): open connections finish, exit 0."""
    server: Server = server_factory(shards=2)
    owners = owned_customers(2)
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    line = "".join(f"{day} 12:00:00 {c} /a 200 0.5\n" for c in owners.values()).encode()
    assert server.proc is not None
    with socket.create_connection(("127.0.0.1", server.tcp_port), timeout=30) as sock:
        sock.sendall(line)
        time.sleep(0.3)
        os.killpg(server.proc.pid, signal.SIGTERM)
        time.sleep(0.5)  # the drain has begun; this connection may still finish
        sock.sendall(line * 3)
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").readline()
    assert json.loads(reply) == {"accepted": 8, "rejected": 0, "rejected_by_reason": {}}
    assert server.proc.wait(60) == 0, server.log()
    restarted: Server = server_factory(shards=2)
    for customer in owners.values():
        status, body = restarted.get(f"/customers/{customer}/stats?from={day}")
        assert status == 200 and body["summary"]["total_requests"] == 4


def test_stopping_with_sketched_days_adds_nothing_to_the_log(server_factory: Any) -> None:
    """A shard holding sketched days (past k requests) stops without native-extension noise:
    nanobind lists every sketch still alive at interpreter exit as leaked, a line each."""
    server: Server = server_factory(shards=2)
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    lines = "".join(
        f"{day} 12:00:00 {customer} /a 200 {(i % 97 + 1) / 100:.2f}\n"
        for customer in owned_customers(2).values()
        for i in range(300)
    ).encode()
    assert server.send_tcp(lines)["accepted"] == 600
    for customer in owned_customers(2).values():
        status, body = server.get(f"/customers/{customer}/stats?from={day}")
        assert status == 200 and body["days"][0]["quantile_error"]["p50"] > 0  # sketched
    assert server.stop() == 0, server.log()
    assert "leaked" not in server.log(), server.log()[-2000:]


@pytest.mark.slow
def test_post_in_flight_at_shutdown_completes(server_factory: Any) -> None:
    """A slow POST /ingest running when SIGTERM arrives gets its full summary; exit 0."""
    server: Server = server_factory(shards=2)
    assert server.proc is not None
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))

    def body() -> Iterator[bytes]:
        yield f"{day} 12:00:00 slowpost /a 200 0.5\n".encode()
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for _ in range(3):
            time.sleep(0.3)
            yield f"{day} 12:00:01 slowpost /a 500 1.5\n".encode()

    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request(
            "POST",
            "/ingest",
            body=body(),
            headers={"Content-Type": "text/plain"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read()) == {"accepted": 4, "rejected": 0, "rejected_by_reason": {}}
    finally:
        conn.close()
    assert server.proc.wait(60) == 0, server.log()
    restarted: Server = server_factory(shards=2)
    status, got = restarted.get(f"/customers/slowpost/stats?from={day}")
    assert status == 200
    assert (got["summary"]["total_requests"], got["summary"]["server_errors"]) == (4, 3)


def post_head(size: int) -> bytes:
    return (
        f"POST /ingest HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()


def read_reply(sock: socket.socket) -> tuple[str, dict[str, Any]]:
    """Status line and JSON body of one HTTP response, and nothing after it."""
    [(head, body)], rest = read_http_responses(sock, ["POST"])
    assert rest == b"", rest
    return head.split(b"\r\n", 1)[0].decode(), json.loads(body)


@pytest.mark.slow
def test_a_post_started_during_the_drain_on_an_open_connection_completes(
    server_factory: Any,
) -> None:
    """After SIGTERM the front stops listening, but a keep-alive connection may still start a
    POST while another is drained: it is waited for as well (within the 10 s grace), even
    when it ends after the one that was open at the signal."""
    server: Server = server_factory(shards=2, STATS_FRONTS="1")
    assert server.proc is not None
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    first = f"{day} 12:00:00 drained /a 200 0.5\n".encode() * 2
    late = f"{day} 12:00:01 latecomer /a 500 1.5\n".encode() * 3
    with (
        socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as open_at_signal,
        socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as kept_alive,
    ):
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_reply(kept_alive)[0] == "HTTP/1.1 200 OK"
        open_at_signal.sendall(post_head(len(first)) + first[:10])
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the front has stopped listening and drains the first POST
        kept_alive.sendall(post_head(len(late)) + late[:10])
        time.sleep(1.0)  # the late POST has begun
        open_at_signal.sendall(first[10:])
        assert read_reply(open_at_signal) == (
            "HTTP/1.1 200 OK",
            {"accepted": 2, "rejected": 0, "rejected_by_reason": {}},
        )
        time.sleep(0.5)
        kept_alive.sendall(late[10:])
        assert read_reply(kept_alive) == (
            "HTTP/1.1 200 OK",
            {"accepted": 3, "rejected": 0, "rejected_by_reason": {}},
        )
    assert server.proc.wait(60) == 0, server.log()
    restarted: Server = server_factory(shards=2)
    for customer, total in (("drained", 2), ("latecomer", 3)):
        status, got = restarted.get(f"/customers/{customer}/stats?from={day}")
        assert status == 200 and got["summary"]["total_requests"] == total, got


@pytest.mark.slow
def test_a_slow_steady_stream_is_visible_mid_stream_and_kept(server_factory: Any) -> None:
    """Lines trickling in without pause are applied within moments, and kept if the client drops."""
    server: Server = server_factory(shards=2)
    owners = owned_customers(2)
    day = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 86400))
    sock = socket.create_connection(("127.0.0.1", server.tcp_port), timeout=30)
    sent = 0
    for _ in range(30):
        for customer in owners.values():
            sock.sendall(f"{day} 12:00:00 {customer} /a 200 0.5\n".encode())
        sent += 1
        time.sleep(0.05)
    time.sleep(1.5)  # the session's batch timer and the owner's queue timer
    for customer in owners.values():
        status, body = server.get(f"/customers/{customer}/stats?from={day}")
        assert status == 200 and body["summary"]["total_requests"] == sent, body
    for customer in owners.values():
        sock.sendall(f"{day} 12:00:00 {customer} /a 200 0.5\n".encode())
    time.sleep(0.05)
    # a reset instead of a half-close: no summary, but nothing received is thrown away
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    time.sleep(1.5)
    for customer in owners.values():
        status, body = server.get(f"/customers/{customer}/stats?from={day}")
        assert status == 200 and body["summary"]["total_requests"] == sent + 1, body
