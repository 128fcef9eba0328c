"""The ingest summary: the one-line answer to a TCP connection, a POST, or `load`; and the
line that opens a `load` piece on a TCP connection (see pieces.py).

Kept apart from the inter-process messages and the pieces' bookkeeping so the `load` client
imports no numpy (which would add about 80 ms to every `load`).
"""

from __future__ import annotations

import msgspec

PIECE_HEADER = b"#load-piece "


class IngestSummary(msgspec.Struct):
    """The one-line answer to an ingest connection or POST."""

    accepted: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = msgspec.field(default_factory=dict)

    def __add__(self, other: IngestSummary) -> IngestSummary:
        reasons = dict(self.rejected_by_reason)
        for reason, count in other.rejected_by_reason.items():
            reasons[reason] = reasons.get(reason, 0) + count
        return IngestSummary(
            self.accepted + other.accepted,
            self.rejected + other.rejected,
            dict(sorted(reasons.items())),
        )


class LoadSummary(IngestSummary):
    """`statsd-server load`'s answer: also the lines of pieces the server already had (a
    re-run after an interruption), which are not counted again."""

    already_loaded: int = 0

    def add(self, part: IngestSummary, already_loaded: int) -> LoadSummary:
        total = self + part
        return LoadSummary(
            total.accepted,
            total.rejected,
            total.rejected_by_reason,
            self.already_loaded + already_loaded,
        )
