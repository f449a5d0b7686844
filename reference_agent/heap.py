"""The C heap while the engine trains (glibc only; everything here is a no-op elsewhere).

An update of K runs allocates and frees tensors of K × 512 × 64 floats (7 MB at K = 55) dozens
of times per step. Under glibc's defaults two things go wrong (measured, docs/performance.md):

* above its dynamic mmap threshold each such tensor is mapped fresh and unmapped on free, so every
  step page-faults megabytes of new zeroed pages;
* below it, the heap fragments and is never trimmed: a 55-run LunarLander batch grew by about
  60 MB/s to 9 GB in 3 minutes, and ``malloc_trim(0)`` gave almost all of it back (2.0 → 0.45 GB
  for an 8-run batch).

``train_heap`` therefore keeps freed memory in the heap (``mallopt(M_MMAP_THRESHOLD)`` and
``mallopt(M_TRIM_THRESHOLD)`` at ``HEAP_BYTES``; the effect of ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_``) and the engine calls ``trim`` (``malloc_trim(0)``: every whole free
page back to the system) every ``TRIM_EVERY`` updates, which bounds the process (about 1.1 GB for
the 55-run batch) and makes its updates faster than the defaults do. On exit the thresholds go
back to glibc's initial 128 KiB, fixed (glibc has no call that restores its dynamic threshold).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
from collections.abc import Iterator

HEAP_BYTES = 256 << 20
"""glibc's mmap and trim thresholds while the engine trains."""

TRIM_EVERY = 100
"""Updates between two ``trim`` calls (measured at K = 55: 25–27 updates/s trimming every 20, 100
or 500 updates, 18–21 with glibc's defaults; every 500 let the process swing to 2.4 GB)."""

GLIBC_INITIAL_BYTES = 128 << 10
"""glibc's initial mmap and trim thresholds (mallopt(3))."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None (another platform or C library: musl has no ``malloc_trim``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _set_thresholds(nbytes: int) -> None:
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, nbytes)
        libc.mallopt(_M_TRIM_THRESHOLD, nbytes)


def trim() -> None:
    """Give every whole free page of the heap back to the system (``malloc_trim(0)``)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def train_heap() -> Iterator[None]:
    """Keep freed memory in the heap while the block runs (the caller trims every
    ``TRIM_EVERY`` updates); afterwards trim and fix the thresholds at glibc's initial values.
    Process-wide, like ``torch.set_num_threads``."""
    _set_thresholds(HEAP_BYTES)
    try:
        yield
    finally:
        _set_thresholds(GLIBC_INITIAL_BYTES)
        trim()
