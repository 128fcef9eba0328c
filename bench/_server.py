"""Start and stop a real server for the benchmarks (free ports, temporary data dir)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchServer:
    def __init__(self, shards: int, **settings: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="statsd-bench-"))
        self.http_port, self.tcp_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("STATS_")}
        env.update(
            STATS_HTTP_PORT=str(self.http_port),
            STATS_TCP_PORT=str(self.tcp_port),
            STATS_SHARDS=str(shards),
            STATS_DATA_DIR=str(self.dir / "data"),
            STATS_LOG_LEVEL="warning",
        )
        env.update(settings)
        self.proc = subprocess.Popen([sys.executable, "-m", "statsd_server", "serve"], env=env)
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ready") as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def _pids(self) -> list[int]:
        """The supervisor and all its children."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [self.proc.pid, *(int(p) for p in children)]

    def cpu_seconds(self) -> dict[int, float]:
        """CPU time (user + system) used so far by the supervisor and each child, by pid."""
        tick = os.sysconf("SC_CLK_TCK")
        used = {}
        for pid in self._pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            used[pid] = (int(fields[11]) + int(fields[12])) / tick
        return used

    def rss_mb(self) -> float:
        """Resident memory of the supervisor and all its children, in MB."""
        total = 0
        for pid in self._pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        return total / 1024

    def load(self, path: Path, connections: int | None = None) -> tuple[float, str]:
        """Run `statsd-server load` on a file: seconds taken and the summary line."""
        extra = ["--connections", str(connections)] if connections else []
        start = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "statsd_server",
                "load",
                str(path),
                "--tcp-port",
                str(self.tcp_port),
                *extra,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return time.perf_counter() - start, out.strip()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def generate(path: Path, lines: int, customers: int, days: int, *extra: str) -> None:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "generator.py"),
            str(path),
            str(lines),
            "--customers",
            str(customers),
            "--days",
            str(days),
            "--seed",
            "3",
            *extra,
        ],
        check=True,
    )
