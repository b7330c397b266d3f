"""Keep freed CPU memory for reuse during a loop of same-sized large allocations (glibc).

A scoring loop allocates and frees the same activation tensors for every draw (tens to
hundreds of MiB on a CPU). glibc serves blocks above its mmap threshold with fresh
`mmap` pages and returns them with `munmap` on free, so every draw page-faults (and the
kernel zeroes) its whole working set again: on VGG-16-BN with 256 noise images that is
about a fifth of the draw's time (benchmarks/RESULTS.md). Inside `reuse_freed_memory()`
large blocks come from the heap and freed memory stays there for the next draw; on exit the
defaults are restored and the free heap is handed back to the OS (`malloc_trim`), so the
process does not keep the memory afterwards.

Everything is a no-op where glibc's `mallopt` is unavailable (macOS, Windows, musl), on
CUDA (its own caching allocator already reuses memory), and when nested.

Side effect, stated: after the first use, glibc's mmap threshold stays at its static
default (128 KiB) instead of adapting upwards, as in a freshly started process.

Example:
    >>> with reuse_freed_memory():
    ...     pass
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

# mallopt parameters (malloc.h) and glibc's defaults
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEEP_UP_TO = 2**31 - 1  # bytes of free heap kept instead of trimmed (mallopt takes an int)

_state = {"depth": 0}

#: Set to False to turn the policy off everywhere (e.g. to measure what it is worth).
ENABLED = True


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    # gnu_get_libc_version: glibc only (musl has no mmap tunables)
    wanted = ("mallopt", "malloc_trim", "gnu_get_libc_version")
    return libc if all(hasattr(libc, f) for f in wanted) else None


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Inside: large CPU blocks from the heap, freed memory kept for reuse (glibc only).

    Yields whether the policy is active (False where it cannot be or `enabled` is False).
    """
    libc = _libc() if enabled and ENABLED and _state["depth"] == 0 else None
    if libc is None:
        _state["depth"] += 1
        try:
            yield False
        finally:
            _state["depth"] -= 1
        return
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO) == 1
    _state["depth"] += 1
    try:
        yield ok
    finally:
        _state["depth"] -= 1
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
