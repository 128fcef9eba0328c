"""Give freed heap memory back to the operating system after ingest bursts, and keep the
garbage collector's full passes short.

Parsing a chunk allocates tens of megabytes of numpy temporaries; glibc keeps much of that
freed memory in its heap, so a shard's RSS would stay at its peak (measured: 150 MB after a
2M-line load, 101 MB after trimming). `malloc_trim` is glibc-only; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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


def freeze_startup_objects() -> None:
    """Leave the objects a process holds once started (modules, functions, settings, a
    restored store) out of every later garbage collection.

    A full collection walks every tracked object, and these never go away: some 35k after
    the imports alone, a full pass over them 5-11 ms on the development VM, and every
    request waits for a pass. Objects freed later are freed as usual (reference counting);
    only a reference cycle among them would never be collected, so what startup left
    behind is collected first.
    """
    gc.collect()
    gc.freeze()


def collect_before_exit() -> None:
    """Collect what freeze_startup_objects() kept out of collections, before the interpreter
    exits: a reference cycle frozen there (a shard's worker and its store) would outlive the
    process's last collection, and nanobind reports every sketch still alive at exit as
    leaked, a line each."""
    gc.unfreeze()
    gc.collect()
