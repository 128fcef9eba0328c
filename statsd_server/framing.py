"""Cut a byte stream into chunks of whole lines, with bounded memory for overlong lines."""

from __future__ import annotations

from statsd_server.line_rules import MAX_LINE_BYTES

# A partial line may also hold its terminating \r before the \n arrives.
_MAX_PARTIAL = MAX_LINE_BYTES + 1


class LineFramer:
    """Buffers the unfinished last line of a stream; drops lines longer than the limit.

    An overlong line is never held in memory: once its unfinished part passes the limit the
    framer discards bytes until the next newline and counts one `too_long` line.
    """

    def __init__(self) -> None:
        self._partial = b""
        self._skipping = False
        self.too_long = 0

    def feed(self, data: bytes) -> bytes:
        """Whole lines completed by `data` (possibly empty)."""
        if self._skipping:
            nl = data.find(b"\n")
            if nl < 0:
                return b""
            self._skipping = False
            self.too_long += 1
            data = data[nl + 1 :]
        last_nl = data.rfind(b"\n")
        if last_nl < 0:
            self._partial += data
            self._check_partial()
            return b""
        chunk = self._partial + data[: last_nl + 1] if self._partial else data[: last_nl + 1]
        self._partial = data[last_nl + 1 :]
        self._check_partial()
        return chunk

    def finish(self) -> bytes:
        """The last line if the stream did not end with a newline."""
        if self._skipping:
            self._skipping = False
            self.too_long += 1
        rest, self._partial = self._partial, b""
        return rest + b"\n" if rest else b""

    def _check_partial(self) -> None:
        if len(self._partial) > _MAX_PARTIAL:
            self._partial = b""
            self._skipping = True
