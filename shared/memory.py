"""Keep a process's resident memory from ratcheting up after large requests.

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MB on 64-bit),
so after one 4 MB request body the next ones come from the heap, where fragmentation keeps the
pages resident long after the request. Fixing the threshold at 128 KiB (`mallopt`, the same as
the `MALLOC_MMAP_THRESHOLD_` environment variable) sends every large buffer — bodies, base64
text, decoded images — to its own mapping, returned to the system on free. Only the processes
that handle request bodies call this (the Router, ClipEncoder): torch's allocations in the
pipeline are large and many, and mapping each would cost page faults on every step.

Arenas are capped at two (`MALLOC_ARENA_MAX`): glibc gives each new thread (the decode pool,
asyncio's executor, Ray's own) an arena of its own, up to eight per core, and each keeps the
small blocks it once held.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENAS = 2


@functools.cache
def bound_heap_growth() -> bool:
    """Fix glibc's mmap threshold and cap its arenas in this process; False where there is no
    glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        fixed = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        capped = libc.mallopt(M_ARENA_MAX, ARENAS)
        return bool(fixed and capped)
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
