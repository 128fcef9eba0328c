"""`statsd-server load`: send log files to a running server over parallel TCP connections.

Each file is cut at line boundaries into parts sent with sendfile() on their own
connections; the server's per-connection summaries are added up. On a terminal a progress bar
shows the bytes sent, the lines in them, both rates and the time left.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import msgspec
from tqdm import tqdm

from statsd_server.errors import StatsServerError
from statsd_server.summary import IngestSummary

# Parts smaller than this are not worth a connection of their own.
MIN_PART_BYTES = 4 * 1024 * 1024
_SEND_PIECE = 1024 * 1024
_REPLY_LIMIT = 1024 * 1024


class LoadError(StatsServerError):
    pass


def default_connections() -> int:
    # The kernel spreads connections over the shards at random (SO_REUSEPORT); with 16 on
    # 2 CPUs the parse work comes out even enough (2M lines: 4 -> 645k, 8 -> 821k,
    # 16 -> 938k, 32 -> 824k lines/s).
    return 8 * (os.cpu_count() or 1)


class LoadProgress(tqdm):
    """tqdm over bytes sent that also counts the lines sent: `lines` and `lines_rate` fields."""

    BAR_FORMAT = (
        "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B, {lines:,} lines"
        " [{elapsed}<{remaining}, {rate_fmt}, {lines_rate} lines/s]"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.lines_sent = 0
        self._sent_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def sent(self, nbytes: int, nlines: int) -> None:
        """Count bytes and lines sent by one of the sending threads."""
        with self._sent_lock:
            self.lines_sent += nlines
            self.update(nbytes)

    @property
    def format_dict(self) -> dict[str, Any]:
        d = dict(super().format_dict)
        n, elapsed = d.get("n") or 0, d.get("elapsed") or 0
        # Lines per byte so far times tqdm's smoothed byte rate: lines/s moves with bytes/s.
        rate = d.get("rate") or (n / elapsed if elapsed else 0)
        lines_rate = rate * self.lines_sent / n if n else 0
        d["lines"] = self.lines_sent
        d["lines_rate"] = self.format_sizeof(lines_rate) if lines_rate else "?"
        return d


def split_at_lines(path: Path, parts: int) -> list[tuple[int, int]]:
    """(offset, length) ranges of a file, cut just after newlines, about equal in size."""
    size = path.stat().st_size
    parts = max(1, min(parts, size // MIN_PART_BYTES or 1))
    cuts = [0]
    with open(path, "rb") as f:
        for i in range(1, parts):
            f.seek(max(cuts[-1], size * i // parts))
            f.readline()
            pos = f.tell()
            if pos >= size:
                break
            if pos > cuts[-1]:
                cuts.append(pos)
    cuts.append(size)
    return [(a, b - a) for a, b in itertools.pairwise(cuts) if b > a] or [(0, 0)]


def _lines_in(f: BinaryIO, offset: int, length: int, last_piece: bool) -> int:
    """Lines in a piece of a file just sent, read back from the page cache."""
    data = os.pread(f.fileno(), length, offset)
    return data.count(b"\n") + (last_piece and not data.endswith(b"\n"))


def _send_part(
    host: str, port: int, path: Path, offset: int, length: int, progress: LoadProgress
) -> IngestSummary:
    try:
        sock = socket.create_connection((host, port))
    except OSError as exc:
        raise LoadError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    with sock, open(path, "rb") as f:
        try:
            sent = 0
            while sent < length:
                n = sock.sendfile(f, offset + sent, min(_SEND_PIECE, length - sent))
                if n == 0:
                    raise LoadError(f"{path}: the server closed the connection")
                if not progress.disable:
                    progress.sent(n, _lines_in(f, offset + sent, n, sent + n == length))
                sent += n
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < _REPLY_LIMIT:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except OSError as exc:
            raise LoadError(f"{path}: connection to {host}:{port} failed: {exc}") from None
    try:
        decoded = msgspec.json.decode(reply)
    except msgspec.DecodeError:
        raise LoadError(f"{path}: unexpected reply from the server: {reply[:200]!r}") from None
    if isinstance(decoded, dict) and "error" in decoded:
        raise LoadError(f"{path}: the server failed: {decoded['error']}")
    return msgspec.convert(decoded, IngestSummary)


def load_files(
    host: str, port: int, files: tuple[Path, ...] | list[Path], connections: int | None = None
) -> IngestSummary:
    """Send every file and return the summed summary; a progress bar shows on a terminal."""
    connections = connections or default_connections()
    jobs = [
        (path, off, ln) for path in files for off, ln in split_at_lines(Path(path), connections)
    ]
    total = sum(ln for _, _, ln in jobs)
    summary = IngestSummary()
    with (
        LoadProgress(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="load",
            bar_format=LoadProgress.BAR_FORMAT,
            disable=not sys.stderr.isatty(),
        ) as progress,
        ThreadPoolExecutor(connections) as pool,
    ):
        futures = [pool.submit(_send_part, host, port, Path(p), o, n, progress) for p, o, n in jobs]
        for future in futures:
            summary = summary + future.result()
    return summary
