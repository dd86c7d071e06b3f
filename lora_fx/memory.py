"""Give freed heap memory back to the operating system between phases of a big-model pipeline.

glibc's malloc serves blocks below its mmap threshold (dynamic: it rises to the largest block
freed, up to 32 MB) from its heap, and keeps them there once freed. A merge computes one ΔW
per site (13-17 MB each for d = 1024), so tens of MB stay resident that no tensor uses, and an
export's peak adds to them. ``malloc_trim(0)`` hands those pages back. It changes no value and
no allocation still in use; where the C library has no ``malloc_trim`` it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim() -> bool:
    """Return the C heap's free pages to the OS; True when ``malloc_trim`` ran."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
