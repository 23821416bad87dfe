"""glibc malloc settings for CPU inference: freed activation memory is kept mapped for the next tensor.

PyTorch's CPU allocator is plain malloc/free. glibc serves a block above its mmap threshold (128 KiB at first,
raised adaptively) with a fresh mmap and trims the heap top once more than 2x that is free, so a forward that
allocates and frees MB-sized activations unmaps memory and faults it back in (zeroed by the kernel) over and over:
~8K page faults (32 MB) per 512-token pico prefill. Fixing the mmap threshold at the largest value its adaptive
rule reaches (32 MiB) and the trim threshold at 64 MiB (2x, the rule's ratio) keeps that memory for reuse; resident
memory after a forward then includes freed transients up to 64 MiB at the heap top, as glibc's own adaptation
can, but from the first forward on. Prefill time on the loaded 2-core bench machine: bench/RESULTS.md (issue 21).
An explicit `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` in the environment wins; other C libraries (or a
preloaded allocator) are left alone.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3           # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20                             # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD = 64 << 20                             # 2x the mmap threshold, as glibc's adaptive rule keeps
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process (idempotent); True when they are in effect."""
    global _applied
    if _applied:
        return True
    if any(v in os.environ for v in _ENV) or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied
