"""Host memory: hand freed tensor memory back to the operating system.

glibc's malloc serves a large allocation with its own mmap, returned to the system when freed, but
only below a threshold that it raises each time such a block is freed (up to 32 MiB). Once raised,
the many short-lived tensors of a forward and backward pass come from the heap instead, and the
heap keeps what they free: a run's resident memory grows with every stage it has run. Fixing the
threshold (and trimming the heap's free top) keeps resident memory near what is in use: 75 to 95
MiB less peak RSS for a cold run of `bench/train.py`'s model, in the flow's process.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20  # blocks of 1 MiB or more: their own mapping, unmapped when freed
TRIM_THRESHOLD = 1 << 20  # give the heap's free top back once it exceeds 1 MiB


def return_freed_memory() -> bool:
    """Set glibc's thresholds for this process (True if set; False on another C library)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, TypeError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
