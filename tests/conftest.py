"""Helpers to run the real server as a subprocess on free ports and talk to it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def read_http_responses(
    sock: socket.socket, methods: list[str]
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(head, body) of one response per request method, in order, read from a raw socket by
    Content-Length (a HEAD's has no body), and the bytes received past them."""
    data = b""
    out = []
    for method in methods:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, (method, data)
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        length = re.search(rb"\r\nContent-Length: *(\d+)", head, re.IGNORECASE)
        assert length is not None, head
        size = 0 if method == "HEAD" else int(length[1])
        while len(data) < size:
            chunk = sock.recv(65536)
            assert chunk, (method, head)
            data += chunk
        out.append((head, data[:size]))
        data = data[size:]
    return out, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running `statsd-server serve` subprocess."""

    data_dir: Path
    shards: int = 2
    env_extra: dict[str, str] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    tcp_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def start(self, timeout: float = 30.0) -> Server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STATS_")}
        env.update(
            STATS_HTTP_PORT=str(self.http_port),
            STATS_TCP_PORT=str(self.tcp_port),
            STATS_SHARDS=str(self.shards),
            STATS_DATA_DIR=str(self.data_dir),
            STATS_SNAPSHOT_INTERVAL="60",
        )
        env.update(self.env_extra)
        self.log_path = self.data_dir.parent / f"server-{self.http_port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "statsd_server", "serve"],
                env=env,
                cwd=self.data_dir.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, as under systemd or docker
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                # Every front has started once the supervisor logs "serving".
                if self.get("/ready")[0] == 200 and "serving: " in self.log():
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}",
            data=body,
            method=method,
            headers=headers or {},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def send_tcp(self, data: bytes) -> dict[str, Any]:
        """Send lines on one connection, half-close, and return the summary line."""
        with socket.create_connection(("127.0.0.1", self.tcp_port), timeout=120) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
        return json.loads(reply)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Any]:
    """Start servers on a shared data dir; every one still running is stopped at the end."""
    started: list[Server] = []

    def make(shards: int = 2, **env: str) -> Server:
        server = Server(data_dir=tmp_path / "data", shards=shards, env_extra=env)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()
