"""Host memory for CPU compute: freed blocks are kept for reuse instead of going back to the kernel.

A 3D window's activations are tens of MB each. glibc's malloc gives such blocks their own mapping
(above its mmap threshold, which starts at 128 KiB) and unmaps them when they are freed, and it
trims the top of its heap above 128 KiB free; the next window maps them again and the kernel
zero-fills every page on first touch. On the head-and-neck network (fp32, 4 windows of 48x48x56
per call, 2 cores) that was 27,000 page faults and 94 ms of kernel time per window, 30% of the
forward pass; with ``keep_freed_memory`` it is none, and the forward pass is 1.5x faster
(BENCHMARKS.md, "Freed memory kept for reuse"). ``pipeline.inference.predict_tiles`` calls it
before its first window on a CPU. A training step of the same network gained nothing measurable
(its backward pass dominates), so training does not call it itself.

``keep_freed_memory`` raises the mmap threshold to glibc's maximum (32 MiB) and switches trimming
off (``mallopt``): the process's resident memory stays near its peak instead of shrinking between
windows; the peak itself is unchanged. Blocks over 32 MiB (a whole volume) are still mapped and
unmapped. Where the C library has no ``mallopt`` (macOS, Windows) or ignores it (musl) nothing
changes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper bound on 64-bit systems (4 MiB x sizeof(long))
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


@functools.cache
def keep_freed_memory() -> bool:
    """Once per process: tell glibc's malloc to keep freed blocks of up to 32 MiB and the free
    top of its heap for reuse. True if the C library accepted both settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    log.debug("malloc keeps freed blocks up to %d MiB for reuse: %s", MMAP_THRESHOLD_MAX >> 20,
              "yes" if ok else "no (the C library ignored mallopt)")
    return ok
