"""Inter-process messages: msgspec Structs sent as length-prefixed msgpack frames.

Columns travel as raw little-endian array bytes; sketches never leave their shard.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec
import numpy as np

from statsd_server.parse import Batch

FRAME_HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 256 * 1024 * 1024


class ApplyBatch(msgspec.Struct, tag="apply", array_like=True):
    """Requests for customers the receiving shard owns."""

    customers: list[str]
    customer: bytes  # int32
    day: bytes  # int32
    status: bytes  # int16
    duration: bytes  # float64
    piece: str = ""  # the resumable-load piece the batch belongs to (statsd_server.pieces)

    @classmethod
    def from_batch(cls, batch: Batch, piece: str = "") -> ApplyBatch:
        return cls(
            customers=batch.customers,
            customer=batch.customer.astype("<i4").tobytes(),
            day=batch.day.astype("<i4").tobytes(),
            status=batch.status.astype("<i2").tobytes(),
            duration=batch.duration.astype("<f8").tobytes(),
            piece=piece,
        )

    def columns(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (
            np.frombuffer(self.customer, "<i4"),
            np.frombuffer(self.day, "<i4"),
            np.frombuffer(self.status, "<i2"),
            np.frombuffer(self.duration, "<f8"),
        )


class WalRecord(msgspec.Struct, array_like=True):
    """A batch as the owning shard's write-ahead log keeps it (see persistence.wal)."""

    newest_day: int
    batch: ApplyBatch


class Applied(msgspec.Struct, tag="applied", array_like=True):
    """The owner took `stored` requests of a batch (queued; applied before anything reads);
    `refused` were of new customers beyond STATS_MAX_CUSTOMERS, `duplicate` already held."""

    stored: int
    refused: int = 0
    duplicate: int = 0  # of a load piece this server already applied


class IngestPiece(msgspec.Struct, tag="ingest_piece", array_like=True):
    """A load piece (statsd_server.pieces) another shard received: parse it, send its
    requests to their owners and answer as the client is to be answered. Its bytes are in a
    file the sender removes once answered (through the socket, megabytes would take many
    event-loop passes of both shards)."""

    piece: str
    size: int  # as the piece's header announced it
    path: str


class PieceIngested(msgspec.Struct, tag="piece_ingested", array_like=True):
    """The answer to an IngestPiece: the client's one-line answer (a summary, or an error)."""

    answer: dict[str, Any]


class PieceRefused(msgspec.Struct, tag="piece_refused", array_like=True):
    """The answer to an IngestPiece not even started (the shard is stopping, or has no room
    for it): the sender parses the piece itself."""

    reason: str


class StatsQuery(msgspec.Struct, tag="stats", array_like=True):
    customer_id: str
    first_day: int
    last_day: int | None
    quantiles: list[float] = []


class StatsReply(msgspec.Struct, tag="stats_reply", array_like=True):
    """The response body, JSON-encoded by the shard; empty if the customer is unknown."""

    known: bool
    body: bytes


class Ping(msgspec.Struct, tag="ping", array_like=True):
    pass


class Pong(msgspec.Struct, tag="pong", array_like=True):
    shard: int
    customers: int
    customer_days: int


class Drain(msgspec.Struct, tag="drain", array_like=True):
    """Stop accepting ingest connections and wait for the open ones to finish."""


class Drained(msgspec.Struct, tag="drained", array_like=True):
    pass


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """Write the final snapshot and exit."""


class ShutdownDone(msgspec.Struct, tag="shutdown_done", array_like=True):
    pass


class ErrorReply(msgspec.Struct, tag="error", array_like=True):
    message: str


Body = (
    ApplyBatch
    | Applied
    | IngestPiece
    | PieceIngested
    | PieceRefused
    | StatsQuery
    | StatsReply
    | Ping
    | Pong
    | Drain
    | Drained
    | Shutdown
    | ShutdownDone
    | ErrorReply
)


class Envelope(msgspec.Struct, array_like=True):
    """A request or its reply; replies carry the request's id."""

    id: int
    body: Body


class Codec:
    """Frame encoder and decoder, built once per process."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Envelope)
        self._wal_decoder = msgspec.msgpack.Decoder(WalRecord)

    def wal_record(self, batch: ApplyBatch, newest_day: int) -> bytes:
        return self._encoder.encode(WalRecord(newest_day, batch))

    def read_wal_record(self, payload: bytes) -> WalRecord:
        return self._wal_decoder.decode(payload)

    def frame(self, envelope: Envelope) -> bytes:
        payload = self._encoder.encode(envelope)
        return FRAME_HEADER.pack(len(payload)) + payload

    def decode(self, payload: bytes | memoryview) -> Envelope:
        return self._decoder.decode(payload)
