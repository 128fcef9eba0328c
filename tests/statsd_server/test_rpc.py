"""The Unix-socket request/reply layer between fronts and shards, over real sockets."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from statsd_server.errors import ShardUnavailable
from statsd_server.messages import FRAME_HEADER, Body, Codec, Envelope, Ping, Pong
from statsd_server.rpc import ShardClient, serve_connection

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run_with_server(tmp_path: Path, serve: Serve, client_part: Callable[..., Awaitable[None]]):
    path = tmp_path / "peer.sock"

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path=str(path))
        client = ShardClient(0, path, Codec())
        try:
            await client_part(client)
        finally:
            await client.close()
            server.close()
            await asyncio.sleep(0.05)  # the handlers see the end of their connections

    uvloop.run(main())


def pong(n: int) -> Pong:
    return Pong(shard=0, customers=n, customer_days=n * 2)


async def answer_in_pieces(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers each Ping, writing the replies in random small pieces."""
    codec, rng = Codec(), random.Random(7)
    pending = b""
    while header := await reader.read(FRAME_HEADER.size):
        (size,) = FRAME_HEADER.unpack(header)
        envelope = codec.decode(await reader.readexactly(size))
        pending += codec.frame(Envelope(envelope.id, pong(envelope.id)))
        while len(pending) > 3:
            cut = rng.randint(1, len(pending))
            writer.write(pending[:cut])
            pending = pending[cut:]
            await writer.drain()
            await asyncio.sleep(0)
        writer.write(pending)
        pending = b""
    writer.close()


def test_replies_cut_anywhere_reach_their_requests(tmp_path: Path) -> None:
    async def client_part(client: ShardClient) -> None:
        replies = await asyncio.gather(*(client.request(Ping(), 5) for _ in range(200)))
        # Request ids start at 1 and the server echoes them into the reply.
        assert sorted(r.customers for r in replies) == list(range(1, 201))  # type: ignore[union-attr]

    run_with_server(tmp_path, answer_in_pieces, client_part)


class _LostAsItOpens(ShardClient):
    """A client whose new connections are lost before the request that opened them runs on."""

    async def _connect(self) -> Any:
        connection = await super()._connect()
        connection.transport.close()
        await asyncio.sleep(0.01)  # its connection_lost runs
        return connection


def test_a_connection_lost_as_it_opens_fails_at_once(tmp_path: Path) -> None:
    """The request fails at once, instead of waiting its timeout on a dead connection."""
    path = tmp_path / "peer.sock"

    async def main() -> None:
        server = await asyncio.start_unix_server(answer_in_pieces, path=str(path))
        client = _LostAsItOpens(0, path, Codec())
        try:
            with pytest.raises(ShardUnavailable):  # not TimeoutError: the request's is 10 s
                await asyncio.wait_for(client.request(Ping(), 10), 3)
        finally:
            await client.close()
            server.close()
            await asyncio.sleep(0.05)

    uvloop.run(main())


def test_an_unreadable_reply_fails_its_connection_not_the_replies_before(
    tmp_path: Path,
) -> None:
    async def good_then_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        codec = Codec()
        frames = []
        for _ in range(2):
            (size,) = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
            frames.append(codec.decode(await reader.readexactly(size)))
        garbage = b"\xc1not msgpack"
        writer.write(
            codec.frame(Envelope(frames[0].id, pong(1))) + FRAME_HEADER.pack(len(garbage)) + garbage
        )
        await reader.read()  # until the client closes
        writer.close()

    async def client_part(client: ShardClient) -> None:
        started = time.monotonic()
        first, second = await asyncio.gather(
            client.request(Ping(), 10), client.request(Ping(), 10), return_exceptions=True
        )
        assert first == pong(1)
        assert isinstance(second, ShardUnavailable) and "unreadable reply" in str(second)
        assert time.monotonic() - started < 2

    run_with_server(tmp_path, good_then_garbage, client_part)


def test_replies_still_go_out_when_the_peer_half_closes(tmp_path: Path) -> None:
    """serve_connection batches replies per event-loop pass. When the requests and the end
    of stream are already buffered, it answers them all and meets the end in one pass: the
    replies must still be written before it closes."""
    path = tmp_path / "shard.sock"
    codec = Codec()

    def quick(body: Body) -> Body | None:
        return pong(7)

    async def slow(body: Body) -> Body:
        raise AssertionError("not used")

    async def late_start(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.2)  # the requests and the end of stream arrive meanwhile
        await serve_connection(reader, writer, quick, slow, codec)

    async def main() -> bytes:
        server = await asyncio.start_unix_server(late_start, path=str(path))
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b"".join(codec.frame(Envelope(i, Ping())) for i in range(1, 51)))
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            data = b""
            while chunk := await loop.sock_recv(sock, 65536):
                data += chunk
        server.close()
        return data

    data = uvloop.run(main())
    ids = []
    while data:
        (size,) = FRAME_HEADER.unpack_from(data)
        envelope = codec.decode(data[FRAME_HEADER.size : FRAME_HEADER.size + size])
        assert envelope.body == pong(7)
        ids.append(envelope.id)
        data = data[FRAME_HEADER.size + size :]
    assert ids == list(range(1, 51))
