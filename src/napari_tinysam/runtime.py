"""Process-level settings that make CPU inference faster.

The image encoder allocates many large (tens of MB) intermediate tensors. With glibc's
defaults each of them is a fresh ``mmap`` that the kernel must zero page by page, which
costs about a third of an embedding on a 2-core machine. Raising glibc's mmap and trim
thresholds keeps freed blocks in the heap for reuse (the effect PyTorch's CPU tuning
guide obtains with jemalloc or tcmalloc). The cost: memory freed by large arrays stays
with the process instead of returning to the operating system. Set
``TINYSAM_NO_ALLOCATOR_TUNING=1`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator(threshold: int = 1 << 30) -> bool:
    """Apply the glibc settings once per process; returns whether they were applied."""
    global _done
    if _done:
        return True
    if os.environ.get("TINYSAM_NO_ALLOCATOR_TUNING") or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)) and libc.mallopt(
            _M_TRIM_THRESHOLD, ctypes.c_int(threshold)
        )
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    _done = bool(ok)
    return _done
