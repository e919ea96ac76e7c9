"""Give freed memory back to the operating system between the phases of a long job.

glibc keeps freed blocks in its heaps (one per thread that allocated) for reuse; after a phase that
allocated and freed gigabytes (the hyper-merge's sketch bases and cores, its rounds' state) the process's
resident memory stays at that phase's high mark. `malloc_trim(0)` returns the free pages of every heap.
Elsewhere (macOS, Windows, musl) this is a no-op.
"""
from __future__ import annotations

import ctypes
import sys

_trim = None
if sys.platform.startswith("linux"):
    try:
        _trim = ctypes.CDLL("libc.so.6").malloc_trim
        _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        _trim = None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True when that was possible here."""
    if _trim is None:
        return False
    _trim(0)
    return True
