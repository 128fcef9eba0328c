"""`statsd-server load`: send log files to a running server over parallel TCP connections.

Each file is cut at line boundaries into parts sent with sendfile() on their own
connections; the server's per-connection summaries are added up.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def _send_part(
    host: str, port: int, path: Path, offset: int, length: int, progress: tqdm
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
                sent += n
                progress.update(n)
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
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="load",
            disable=not sys.stderr.isatty(),
        ) as progress,
        ThreadPoolExecutor(connections) as pool,
    ):
        futures = [pool.submit(_send_part, host, port, Path(p), o, n, progress) for p, o, n in jobs]
        for future in futures:
            summary = summary + future.result()
    return summary
