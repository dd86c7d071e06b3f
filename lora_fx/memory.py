"""Heap management around the heavy phases of a pipeline.

``trim``: give freed heap memory back to the operating system between phases of a big-model
pipeline.

glibc's malloc serves blocks below its mmap threshold (dynamic: it rises to the largest block
freed, up to 32 MB) from its heap, and keeps them there once freed. A merge computes one ΔW
per site (13-17 MB each for d = 1024), so tens of MB stay resident that no tensor uses, and an
export's peak adds to them. ``malloc_trim(0)`` hands those pages back. It changes no value and
no allocation still in use; where the C library has no ``malloc_trim`` it does nothing.

``collector_frozen``: run an ONNX export without full garbage collections over the objects
that were alive before it (see its docstring).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def collector_frozen() -> Iterator[None]:
    """Exclude every object alive at entry from Python's cyclic collector until exit.

    A full (generation-2) collection walks every live container object. With a Hugging Face
    model and the exporter loaded that is most of a million objects, and an ONNX export, which
    allocates millions of objects, triggers one or two. None of those old objects becomes
    garbage there.
    ``gc.freeze()`` moves them out of the collector's view, so collections walk only what the
    phase itself allocated (which is still collected as usual); ``gc.unfreeze()`` puts them
    back, on any exit. Cycles among the old objects wait for the next full collection after
    exit, and that one may come sooner than it would have: a full collection inside counts only
    the phase's survivors as long-lived. So about one full collection moves to after the phase.
    ``benchmarks/bench_export.py`` charges that one to the export. Garbage made before entry (a
    merge's) is frozen too, so it stays until after the phase, which is why
    ``export_onnx(release=True)`` (memory first) does not freeze.

    Does nothing when the caller has frozen objects itself (``gc.get_freeze_count() > 0``):
    unfreezing would thaw theirs too.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
