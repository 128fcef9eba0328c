"""`statsd-server load`: send log files to a running server over parallel TCP connections.

Each file is cut into pieces of about PIECE_BYTES, just after a newline, at offsets that
depend only on the file, and each piece goes with sendfile() on its own connection,
announced by a first line `#load-piece <hash of its bytes>:<offset> <length>`. The server
applies a named piece whole and at most once (statsd_server.pieces), so re-running an
interrupted load sends everything again but counts only what the server did not have: no
double counting. The server's per-piece summaries are added up. On a terminal a progress
bar shows the bytes sent, the lines in them, both rates and the time left.
"""

from __future__ import annotations

import hashlib
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
from statsd_server.summary import PIECE_HEADER, IngestSummary, LoadSummary

PIECE_BYTES = 4 * 1024 * 1024
_HASH_BLOCK = 4 * 1024 * 1024
_SEND_PIECE = 1024 * 1024
_REPLY_LIMIT = 1024 * 1024


class LoadError(StatsServerError):
    pass


def default_connections() -> int:
    # Enough pieces in flight that every shard has one to parse while others wait for their
    # owners' write-ahead log fsyncs. The shards even out the parsing between them (they hand
    # pieces to each other), so the count no longer has to average out the kernel's uneven
    # spread: 8, 16 and 32 measured alike on 2 CPUs (0.94-1.37M lines/s, 2M lines).
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


def split_at_lines(path: Path, piece_bytes: int = PIECE_BYTES) -> list[tuple[int, int]]:
    """(offset, length) pieces of a file, each cut just after the first newline at or past
    a multiple of `piece_bytes`: the same pieces for the same file, every time."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        for target in range(piece_bytes, size, piece_bytes):
            if target <= cuts[-1]:
                continue
            f.seek(target - 1)
            f.readline()
            pos = f.tell()
            if pos >= size:
                break
            cuts.append(pos)
    cuts.append(size)
    return [(a, b - a) for a, b in itertools.pairwise(cuts) if b > a] or [(0, 0)]


def piece_name(f: BinaryIO, offset: int, length: int) -> str:
    """A piece's name: the same bytes at the same offset get the same name, in any run.

    Hashed by the thread that sends the piece (hashlib releases the GIL), so the names of a
    big file cost no pass of their own.
    """
    digest = hashlib.blake2b(digest_size=16)
    for start in range(offset, offset + length, _HASH_BLOCK):
        digest.update(os.pread(f.fileno(), min(_HASH_BLOCK, offset + length - start), start))
    return f"{digest.hexdigest()}:{offset}"


def _lines_in(f: BinaryIO, offset: int, length: int, last_piece: bool) -> int:
    """Lines in a piece of a file just sent, read back from the page cache."""
    data = os.pread(f.fileno(), length, offset)
    return data.count(b"\n") + (last_piece and not data.endswith(b"\n"))


def _send_part(
    host: str,
    port: int,
    path: Path,
    offset: int,
    length: int,
    progress: LoadProgress,
) -> tuple[IngestSummary, int]:
    try:
        sock = socket.create_connection((host, port))
    except OSError as exc:
        raise LoadError(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
    with sock, open(path, "rb") as f:
        try:
            name = piece_name(f, offset, length)
            sock.sendall(PIECE_HEADER + f"{name} {length}\n".encode())
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
    return msgspec.convert(decoded, IngestSummary), int(decoded.get("already_loaded", 0))


def load_files(
    host: str, port: int, files: tuple[Path, ...] | list[Path], connections: int | None = None
) -> LoadSummary:
    """Send every file and return the summed summary; a progress bar shows on a terminal.

    Safe to re-run after an interruption: pieces the server already has are not counted
    again (`already_loaded` says how many of their lines it skipped).
    """
    connections = connections or default_connections()
    jobs = [(Path(path), off, ln) for path in files for off, ln in split_at_lines(Path(path))]
    total = sum(ln for *_, ln in jobs)
    summary = LoadSummary()
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
        futures = [pool.submit(_send_part, host, port, p, o, n, progress) for p, o, n in jobs]
        for future in futures:
            summary = summary.add(*future.result())
    return summary
