"""The supervisor: binds the ports, runs the shard and front processes, restarts the dead.

Signal handlers only wake the main loop; the loop decides. Shutdown has two phases so no
batch is lost between shards: every shard first drains its ingest connections (still
accepting batches from its peers), then every shard writes its final snapshot and exits.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import multiprocessing as mp
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import msgspec

from persistence.snapshot import SnapshotDB
from statsd_server import (
    changes,
    front,
    idempotency,
    metrics,
    newest_day,
    shard,
    shard_counts,
)
from statsd_server.config import LISTEN_BACKLOG, Settings
from statsd_server.errors import ConfigError, StatsServerError
from statsd_server.loader import load_files
from statsd_server.messages import Drain, ErrorReply, Shutdown
from statsd_server.rpc import blocking_request, socket_path

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0
# More restarts than this within the window means something is badly wrong: give up.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StatsServerError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


class _Child:
    """A supervised process and how to start it again."""

    def __init__(self, name: str, target: Callable[..., None], args: tuple[object, ...]) -> None:
        self.name = name
        self.target = target
        self.args = args
        self.process: BaseProcess | None = None
        self.conn: Connection | None = None
        self.starts = 0


class Supervisor:
    def __init__(self, settings: Settings, load: tuple[Path, ...] = ()) -> None:
        self.settings = settings
        self.load = load
        self._ctx = mp.get_context("spawn")
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop_requested = False
        self._restarts: deque[float] = deque()
        self._children: list[_Child] = []
        self._runtime_dir = Path()
        self._sockets: list[socket.socket] = []
        self._changes: changes.ChangeCounters | None = None

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; the exit code."""
        s = self.settings
        try:
            s.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"STATS_DATA_DIR={str(s.data_dir)!r} is invalid: {exc.strerror}"
            ) from None
        SnapshotDB(s.data_dir).close()  # a broken database stops the start here, named
        idempotency.prepare(s.data_dir)
        shard.recover_other_layouts(s)
        runtime_dir = self._runtime_dir = Path(tempfile.mkdtemp(prefix="statsd-server-"))
        newest_day.create(runtime_dir / "newest_day", s.shards + s.fronts)
        shard_counts.create(runtime_dir / "shard_counts", s.shards)
        changes.create(runtime_dir / "changes", s.shards)
        self._changes = changes.ChangeCounters(runtime_dir / "changes", s.shards)
        # For prometheus-client, which reads it at import: the children are spawned with it.
        (runtime_dir / "metrics").mkdir()
        os.environ[metrics.MULTIPROC_ENV] = str(runtime_dir / "metrics")
        sockets = self._sockets
        try:
            sockets.append(_listen(s.host, s.http_port, reuse_port=False))
            for _ in range(s.shards):
                sockets.append(_listen(s.host, s.tcp_port, reuse_port=True))
            for i in range(s.shards):
                self._children.append(
                    _Child(f"shard-{i}", shard.run, (s, i, sockets[1 + i], runtime_dir))
                )
            self._install_signals()
            for child in self._children:
                self._start(child)
            if not self._await_ready(self._children):
                self._stop_all()
                return 1
            # The fronts share one listening socket: the kernel hands each new connection to
            # whichever is accepting, so a dead front's share goes to the others.
            fronts = [
                _Child(f"front-{i}", front.run, (s, sockets[0], runtime_dir, i))
                for i in range(s.fronts)
            ]
            self._children.extend(fronts)
            for child in fronts:
                self._start(child)
            if not self._await_ready(fronts):
                self._stop_all()
                return 1
            log.info(
                "serving: http://%s:%d  tcp %s:%d  %d shards  %d fronts  data %s",
                s.host,
                s.http_port,
                s.host,
                s.tcp_port,
                s.shards,
                s.fronts,
                s.data_dir,
            )
            if self.load:
                threading.Thread(target=self._load_files, daemon=True).start()
            code = self._supervise()
            if not self._stop_all():
                code = code or 1
            return code
        finally:
            for sock in sockets:
                sock.close()
            shutil.rmtree(runtime_dir, ignore_errors=True)

    # -- processes ---------------------------------------------------------------------------

    def _start(self, child: _Child) -> None:
        parent_end, child_end = self._ctx.Pipe()
        process = self._ctx.Process(
            target=child.target,
            args=(*child.args, child_end),
            kwargs={"restarted": child.starts > 0},
            name=child.name,
            daemon=False,
        )
        child.starts += 1
        process.start()
        child_end.close()
        child.process, child.conn = process, parent_end

    def _await_ready(self, children: list[_Child]) -> bool:
        """Wait for each child's ready message; log the reason of any that fails."""
        deadline = time.monotonic() + START_TIMEOUT
        for child in children:
            assert child.conn is not None and child.process is not None
            while True:
                if self._stop_requested:
                    return False
                if child.conn.poll(0.1):
                    try:
                        kind, message = child.conn.recv()
                    except EOFError:
                        child.process.join(5)
                        kind, message = "error", f"exited with code {child.process.exitcode}"
                    if kind == "ready":
                        break
                    log.error("%s failed to start: %s", child.name, message)
                    return False
                if not child.process.is_alive():
                    log.error(
                        "%s exited during start (code %s)", child.name, child.process.exitcode
                    )
                    return False
                if time.monotonic() > deadline:
                    log.error("%s did not start within %ss", child.name, START_TIMEOUT)
                    return False
        return True

    def _supervise(self) -> int:
        while not self._stop_requested:
            sentinels = {c.process.sentinel: c for c in self._children if c.process is not None}
            ready = wait([*sentinels, self._wake_r], timeout=1.0)
            for item in ready:
                if item is self._wake_r:
                    self._wake_r.recv(64)
                    continue
                child = sentinels[item]  # type: ignore[index]
                if self._stop_requested:
                    break
                assert child.process is not None
                child.process.join()
                if child.process.pid is not None:
                    metrics.process_dead(child.process.pid)
                log.error(
                    "%s died (exit code %s); restarting it", child.name, child.process.exitcode
                )
                if child.name.startswith("shard-") and self._changes is not None:
                    # The fronts stop serving answers cached from the dead process.
                    self._changes.bump_generation(int(child.name.split("-")[1]))
                if not self._may_restart():
                    log.error(
                        "more than %d restarts in %ss; stopping", MAX_RESTARTS, RESTART_WINDOW
                    )
                    return 1
                self._start(child)
                if not self._await_ready([child]):
                    return 1
        return 0

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW:
            self._restarts.popleft()
        return len(self._restarts) <= MAX_RESTARTS

    def _stop_all(self) -> bool:
        """Front first, then drain every shard, then final snapshots."""
        log.info("stopping")
        # Our copies of the listening sockets would keep accepting into a backlog nobody reads.
        for sock in self._sockets:
            sock.close()
        shards = [c for c in self._children if c.name.startswith("shard-") and _alive(c)]
        fronts = [c for c in self._children if c.name.startswith("front-") and _alive(c)]
        for child in fronts:  # all at once: they drain their POSTs in parallel
            assert child.conn is not None
            with contextlib.suppress(OSError):
                child.conn.send("stop")
        deadline = time.monotonic() + STOP_TIMEOUT  # shared: hung fronts do not add up
        for child in fronts:
            assert child.process is not None
            child.process.join(max(0.0, deadline - time.monotonic()))
        ok = True
        with ThreadPoolExecutor(max(1, len(shards))) as pool:
            for phase in (Drain(), Shutdown()):
                # list() first: all() would stop at the first failure and skip the rest.
                results = list(pool.map(functools.partial(self._control, body=phase), shards))
                ok &= all(results)
        for child in self._children:
            if child.process is None:
                continue
            child.process.join(STOP_TIMEOUT)
            if child.process.is_alive():
                log.error("%s did not stop; killing it", child.name)
                child.process.kill()
                child.process.join()
                ok = False
            elif child.process.exitcode not in (0, None) and child in shards:
                ok = False
        log.info("stopped" if ok else "stopped with errors")
        return ok

    def _control(self, child: _Child, body: Drain | Shutdown) -> bool:
        """Send a shutdown-phase request; False if the shard failed it."""
        index = int(child.name.split("-")[1])
        try:
            reply = blocking_request(socket_path(self._runtime_dir, index), body, STOP_TIMEOUT)
        except OSError as exc:
            log.error("%s did not answer %s: %s", child.name, type(body).__name__, exc)
            return False
        if isinstance(reply, ErrorReply):
            log.error("%s failed %s: %s", child.name, type(body).__name__, reply.message)
            return False
        return True

    # -- signals and loading -----------------------------------------------------------------

    def _install_signals(self) -> None:
        def request_stop(signum: int, frame: object) -> None:
            self._stop_requested = True
            self._wake_w.send(b"x")

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _load_files(self) -> None:
        s = self.settings
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
        try:
            summary = load_files(host, s.tcp_port, self.load)
        except StatsServerError as exc:
            log.error("--load failed: %s", exc)
            return
        log.info("--load done: %s", msgspec.json.encode(summary).decode())


def _alive(child: _Child) -> bool:
    return child.process is not None and child.process.is_alive()
