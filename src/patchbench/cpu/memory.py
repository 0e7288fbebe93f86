"""The one malloc policy: glibc keeps freed memory mapped for reuse.

Set through libc's own mallopt (ctypes is the way to call a libc function from Python; no
patchbench code is loaded that way). `PATCHBENCH_MALLOC=default`, or any `MALLOC_*` variable of
the user's, leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: bigger blocks are always mapped afresh
TRIM_THRESHOLD = 1 << 30


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the kernel (the trainer
    and the CPU loader both call it).

    A CPU train step frees and re-allocates the same large activations every step. By default glibc
    serves blocks over its (adaptive) mmap threshold with fresh mappings and gives freed memory at
    the top of the heap back to the kernel, so each step page-faults those tensors in again, the
    kernel zeroing every 4 KiB page (tests/test_cpu_memory.py counts the faults). With the mmap
    threshold fixed at 32 MiB and the trim threshold at 1 GiB, blocks up to
    32 MiB come from the heap and freed pages stay mapped: the process keeps its peak footprint, as
    CUDA's caching allocator does; the loader's 20-30 MB batches likewise reuse freed ones. The same
    results; only where memory comes from changes. Process-wide and permanent; returns False (and
    changes nothing) off glibc, with `PATCHBENCH_MALLOC=default` (the opt-out), or when the user tunes
    malloc through `MALLOC_*` environment variables.
    """
    if os.environ.get("PATCHBENCH_MALLOC", "").lower() == "default" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
