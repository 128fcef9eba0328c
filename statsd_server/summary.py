"""The ingest summary: the one-line answer to a TCP connection, a POST, or `load`.

Kept apart from the inter-process messages so the `load` client imports no numpy.
"""

from __future__ import annotations

import msgspec


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
