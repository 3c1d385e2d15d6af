"""Host memory: hand freed tensor memory back to the operating system.

glibc's malloc serves a large allocation (128 KiB and up) with its own mmap, returned to the
system when freed, but it raises that threshold each time such a block is freed (up to 32 MiB).
Once raised, the many short-lived tensors of a forward and backward pass come from the heap
instead, and the heap keeps what they free: a run's resident memory grows with every stage it has
run. Setting the trim threshold turns that adjustment off (glibc keeps the mmap threshold where it
is once either is set) and gives the heap's free top back past 1 MiB.

Measured with `bench/train.py`'s model, a cold run in the flow's process: peak RSS 726 MiB instead
of 814-831, at the same steps/s (setting the mmap threshold itself to 1 MiB instead saved as much
memory but cost 8-10% of the steps/s).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt's parameter number (malloc.h)
TRIM_THRESHOLD = 1 << 20


def return_freed_memory() -> bool:
    """Set glibc's trim threshold for this process (True if set; False on another C library)."""
    mallopt = _glibc("mallopt")
    return bool(mallopt and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def trim() -> bool:
    """Hand every free page of the heap back now, not only its top (glibc's `malloc_trim`): after
    a phase that freed many small blocks (a large dataset's listing and records, parsed and
    dropped), what the next phase allocates then counts once, not on top of what they left."""
    malloc_trim = _glibc("malloc_trim")
    return bool(malloc_trim and malloc_trim(0))


def _glibc(name: str):
    """The C library's function `name`, or None where there is none (not glibc: macOS, musl)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, TypeError, AttributeError):
        return None
