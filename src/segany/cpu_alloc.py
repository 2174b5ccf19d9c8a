"""Keep glibc from handing the CPU fast path's freed buffers back to the kernel after every click.

A click on the CPU allocates and frees some forty tensors of 0.1–10 MB. glibc serves blocks above its
mmap threshold (128 KiB, raised only as large blocks are freed) with fresh ``mmap`` calls and trims the
top of the heap whenever more than twice that is free, so nearly every buffer comes back as new pages
that the kernel faults in and zeroes one 4 KiB page at a time: about 4,500 page faults per ViT-B click,
and 45 → 40 ms medians when they go (2-core AMD EPYC, AVX2, interleaved runs; docs/benchmarks.md).

:func:`tune_cpu_allocator` raises the mmap threshold to glibc's 32 MiB maximum and the trim threshold to
1 GiB, which ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` would do from the environment.
The cost is that a process keeps up to 1 GiB of freed small blocks for reuse instead of returning it;
blocks over 32 MiB (the encoder's attention scores, large batches) are still mapped and unmapped.
It is a process-wide setting, so it runs only where segany builds a CPU fast path, at most once, and
never when the user chose either setting or set ``SEGANY_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 1 << 30
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")

_done: bool | None = None


def tune_cpu_allocator() -> bool:
    """Apply the thresholds above once per process; returns whether they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("SEGANY_MALLOC_TUNING", "1").strip() == "0":
        return False
    if any(k in os.environ for k in _USER_SETTINGS):  # the user tuned malloc: leave it to them
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False  # musl, macOS and Windows allocators behave differently and have no mallopt knobs
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # pragma: no cover - glibc always has it
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                TRIM_THRESHOLD_BYTES))
    if not _done:  # pragma: no cover - only if glibc changes its limits
        log.debug("mallopt refused segany's thresholds; the allocator keeps its defaults")
    return _done
