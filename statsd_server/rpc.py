"""Request/reply over Unix sockets between the front, the shards and the supervisor.

Each frame is a 4-byte length and a msgpack `Envelope`. One connection carries many
requests at once; replies are matched to requests by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Protocol, cast

from statsd_server.errors import ShardUnavailable
from statsd_server.messages import FRAME_HEADER, MAX_FRAME_BYTES, Body, Codec, Envelope, ErrorReply

log = logging.getLogger(__name__)

SEND_BUFFER = 4 * 1024 * 1024


def socket_path(runtime_dir: Path, shard: int) -> Path:
    return runtime_dir / f"shard-{shard}.sock"


def frame_size(buffer: bytes | bytearray, offset: int = 0) -> int:
    """The payload size a frame header at `offset` announces; ValueError past the limit."""
    (size,) = FRAME_HEADER.unpack_from(buffer, offset)
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes exceeds the limit")
    return int(size)


async def read_frame(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's payload, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(FRAME_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    return await reader.readexactly(frame_size(header))


def widen_send_buffer(transport: asyncio.BaseTransport) -> None:
    """Let a Unix socket hold a whole batch frame (megabytes) in one write.

    With the default buffer (about 200 KB) a frame crosses a few hundred KB per event-loop
    pass of the sender and of the receiver, and during a load a pass includes a parse: a
    batch took hundreds of ms to arrive. The kernel caps the size at net.core.wmem_max.
    """
    with contextlib.suppress(OSError):
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


class _Writer(Protocol):
    def is_closing(self) -> bool: ...

    def writelines(self, data: Iterable[bytes]) -> None: ...


class FrameBatcher:
    """Frames written during one pass of the event loop go out in one write: one system call
    and one wake-up of the peer for a burst of requests or replies, not one each."""

    def __init__(self, writer: _Writer) -> None:
        self.writer = writer
        self._frames: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, frame: bytes) -> None:
        if not self._frames:
            self._loop.call_soon(self.flush)
        self._frames.append(frame)

    def flush(self) -> None:
        """Write what is waiting now (also called before closing the writer)."""
        frames, self._frames = self._frames, []
        if frames and not self.writer.is_closing():
            self.writer.writelines(frames)  # uvloop: one writev, no copy


class _Replies(asyncio.Protocol):
    """One connection of a ShardClient: replies resolve their requests' futures in the
    callback that reads them (a reader task would take one more pass of the event loop)."""

    def __init__(self, codec: Codec) -> None:
        self._codec = codec
        self._buffer = bytearray()
        self.pending: dict[int, asyncio.Future[Body]] = {}  # requests sent on this connection
        self.transport: asyncio.Transport | None = None
        self.batcher: FrameBatcher | None = None
        self._problem: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses).
        self.transport = cast(asyncio.Transport, transport)
        widen_send_buffer(transport)
        self.batcher = FrameBatcher(self.transport)

    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, header = 0, FRAME_HEADER.size
        envelopes = []
        problem = None
        with memoryview(buffer) as view:
            while len(buffer) - offset >= header:
                try:
                    end = offset + header + frame_size(buffer, offset)
                    if len(buffer) < end:
                        break
                    envelopes.append(self._codec.decode(view[offset + header : end]))
                except ValueError as exc:  # too large, or msgspec.DecodeError
                    problem = f"unreadable reply: {exc}"
                    break
                offset = end
        del buffer[:offset]
        for envelope in envelopes:  # the replies read before any problem still count
            future = self.pending.get(envelope.id)
            if future is not None and not future.done():
                future.set_result(envelope.body)
        if problem is not None and self.transport is not None:
            self._problem = problem
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._problem or exc or "closed by the shard"
        error = ConnectionError(f"connection lost: {reason}")
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)


class ShardClient:
    """A multiplexed connection to one shard, reconnected on demand."""

    def __init__(self, shard: int, path: Path, codec: Codec) -> None:
        self.shard = shard
        self._path = path
        self._codec = codec
        self._ids = itertools.count(1)
        self._connection: _Replies | None = None
        self._connecting = asyncio.Lock()

    async def request(self, body: Body, timeout: float) -> Body:
        """Send one request and wait for its reply."""
        connection = self._connection
        if connection is None or not connection.is_open():
            try:
                connection = await asyncio.wait_for(self._connect(), timeout)
            except (OSError, TimeoutError) as exc:
                raise ShardUnavailable(self.shard, f"cannot connect: {exc or 'timeout'}") from exc
        if not connection.is_open():
            # Lost while this request waited for it to open: nothing would ever answer.
            raise ShardUnavailable(self.shard, "connection lost as it opened")
        assert connection.batcher is not None
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        future: asyncio.Future[Body] = loop.create_future()
        connection.pending[request_id] = future
        # A timer, not wait_for(): wait_for wraps every request in a task of its own.
        timer = loop.call_later(timeout, _expire, future, self.shard, timeout)
        try:
            connection.batcher.write(self._codec.frame(Envelope(request_id, body)))
            reply = await future
        except ConnectionError as exc:
            raise ShardUnavailable(self.shard, str(exc)) from exc
        finally:
            timer.cancel()
            connection.pending.pop(request_id, None)
        if isinstance(reply, ErrorReply):
            raise ShardUnavailable(self.shard, reply.message)
        return reply

    async def _connect(self) -> _Replies:
        async with self._connecting:
            if self._connection is not None and self._connection.is_open():
                return self._connection
            loop = asyncio.get_running_loop()
            _, connection = await loop.create_unix_connection(
                lambda: _Replies(self._codec), str(self._path)
            )
            self._connection = connection
            return connection

    async def close(self) -> None:
        if self._connection is not None and self._connection.transport is not None:
            self._connection.transport.close()


def _expire(future: asyncio.Future[Body], shard: int, timeout: float) -> None:
    if not future.done():
        future.set_exception(ShardUnavailable(shard, f"no reply within {timeout:g}s"))


Handler = Callable[[Body], Awaitable[Body]]
QuickHandler = Callable[[Body], Body | None]


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    quick: QuickHandler,
    slow: Handler,
    codec: Codec,
) -> None:
    """Answer the requests on one connection.

    `quick` answers at once (or returns None); the rest go to `slow`, each in its own task so
    a long request (a drain) does not hold up the others.
    """
    tasks: set[asyncio.Task[None]] = set()
    widen_send_buffer(writer.transport)
    batcher = FrameBatcher(writer)

    def send(request_id: int, reply: Body) -> None:
        if not writer.is_closing():
            batcher.write(codec.frame(Envelope(request_id, reply)))

    def failed(envelope: Envelope, exc: Exception) -> ErrorReply:
        log.error("request %s failed", type(envelope.body).__name__, exc_info=exc)
        return ErrorReply(message=f"{type(exc).__name__}: {exc}")

    async def answer_later(envelope: Envelope) -> None:
        try:
            reply = await slow(envelope.body)
        except Exception as exc:  # the peer gets the error; this process keeps serving
            reply = failed(envelope, exc)
        send(envelope.id, reply)

    try:
        while (payload := await read_frame(reader)) is not None:
            envelope = codec.decode(payload)
            try:
                reply = quick(envelope.body)
            except Exception as exc:  # as above
                reply = failed(envelope, exc)
            if reply is not None:
                send(envelope.id, reply)
            else:
                task = asyncio.create_task(answer_later(envelope))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if writer.transport.get_write_buffer_size() > 64 * 1024 * 1024:
                await writer.drain()
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        log.debug("peer connection ended: %s", exc)
    finally:
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        batcher.flush()
        writer.close()


def blocking_request(path: Path, body: Body, timeout: float) -> Body:
    """One request on a fresh connection, for the supervisor's synchronous control loop."""
    codec = Codec()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(codec.frame(Envelope(0, body)))
        header = _recv_exactly(sock, FRAME_HEADER.size)
        (size,) = FRAME_HEADER.unpack(header)
        return codec.decode(_recv_exactly(sock, size)).body


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        part = sock.recv(size - len(data))
        if not part:
            raise ConnectionError("connection closed before the reply")
        data += part
    return bytes(data)
