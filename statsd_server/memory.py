"""Give freed heap memory back to the operating system after ingest bursts.

Parsing a chunk allocates tens of megabytes of numpy temporaries; glibc keeps much of that
freed memory in its heap, so a shard's RSS would stay at its peak (measured: 150 MB after a
2M-line load, 101 MB after trimming). `malloc_trim` is glibc-only; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
except (OSError, AttributeError):
    _trim = None


def release_free_memory() -> None:
    """Return free heap pages to the OS, where the C library can."""
    if _trim is not None:
        _trim(0)
