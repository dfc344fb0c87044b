"""Keep a CPU training process's freed activation memory for the next step instead of handing
it back to the kernel.

glibc's malloc serves every block over its mmap threshold (128 KB at first, raised as larger
blocks are freed, up to 32 MB) with a fresh mmap, and gives freed memory at the top of the heap
back once over 128 KB is free. A training step allocates and frees activations of a few MB each,
so the next step faults the same pages in again: thousands of page faults a step, time the
kernel spends zeroing pages (docs/performance.md#training-on-the-cpu). With both thresholds
raised, the second step reuses the first's memory. The process's peak memory does not grow (a
step needs what it needs); what it keeps after its peak is freed to no one until it exits, which
a training run does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt's parameter numbers (glibc's malloc.h)."""
MMAP_THRESHOLD = 32 * 2**20
"""glibc's own ceiling for its dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit): blocks
above it (a large model's weights while loading) still get their own mapping."""
TRIM_THRESHOLD = 2**31 - 1
"""The largest value mallopt takes: the heap's free top is kept, not trimmed."""


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False (and nothing changed) where
    the C library is not glibc or refuses a setting."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    done = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.warning("mallopt refused the training allocator settings; training runs with glibc's defaults")
    return done
