"""The engine's heap setting (reference_agent/heap.py), observed through glibc's own accounting
(``mallinfo2``) and the kernel's (resident pages in /proc/self/statm)."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from reference_agent import heap

pytestmark = pytest.mark.skipif(heap._libc() is None, reason="glibc only")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mapped_bytes() -> int:
    """Bytes glibc holds in mmapped chunks (``hblkhd``)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    return int(libc.mallinfo2().hblkhd)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


MB = 1 << 20


def test_large_tensors_come_from_the_heap_while_training_and_trim_gives_them_back() -> None:
    with heap.train_heap():
        before = _mapped_bytes()
        x = torch.ones(50 * MB // 4)  # 50 MB, touched
        assert _mapped_bytes() - before < MB  # not mmapped: from the heap
        del x
        resident = _resident_bytes()
        heap.trim()
        assert resident - _resident_bytes() > 40 * MB


def test_afterwards_large_tensors_are_mapped_again() -> None:
    with heap.train_heap():
        pass
    before = _mapped_bytes()
    # larger than any free chunk the heap may hold (those are reused whatever the threshold);
    # never touched, so it costs no memory
    x = torch.empty(200 * MB // 4)  # below HEAP_BYTES
    assert _mapped_bytes() - before >= 200 * MB
    del x
