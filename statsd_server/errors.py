"""The exceptions entry points turn into exit codes or HTTP responses."""

from __future__ import annotations


class StatsServerError(Exception):
    """Base class for errors with a message meant for the user."""


class ConfigError(StatsServerError):
    """An invalid setting; the message names the variable."""


class SnapshotError(StatsServerError):
    """The snapshot database cannot be opened, read or written."""


class PieceError(StatsServerError):
    """A resumable-load piece that cannot be taken (bad header, too large)."""


class IdleStream(StatsServerError):
    """Nothing came on an ingest connection for the idle timeout (the stream's end, for a
    plain stream of lines)."""


class ShardUnavailable(StatsServerError):
    """A shard process did not answer."""

    def __init__(self, shard: int, reason: str) -> None:
        super().__init__(f"shard {shard} is unavailable: {reason}")
        self.shard = shard
