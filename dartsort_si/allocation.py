"""How the process gets memory from the system while a sort runs.

Every chunk makes arrays of 1-30 MB (traces, residuals, objectives) and a few steps make arrays
of hundreds of MB. glibc's malloc serves those from fresh mappings and returns them to the
system when freed, so the next one faults its pages in again: a 60 s x 128 ch NP2 sort took
4.1 million page faults (16 GB of pages for a peak of 2.3 GB) and 22 s of system time out of
123 s of CPU (/usr/bin/time -v). With malloc kept from mapping (M_MMAP_MAX 0) and from
trimming (M_TRIM_THRESHOLD 1 GB) freed memory is reused in place: 0.4-0.8 million faults,
6-13 s of system time, wall 69.5 -> 58-63 s (three runs), peak memory 2.31 -> 2.36-2.69 GB. Both
are restored after the sort (as static thresholds: glibc's own adjustment of them stays off)
and the freed memory handed back (malloc_trim), so the caller's process does not keep it.
Tried as well: torch's huge-page allocations (THP_MEM_ALLOC_ENABLE=1) faulted 0.25 million
pages but spent more system time compacting memory (12-14 s), wall 62.8-63.9 s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager

# glibc's mallopt parameters and their defaults (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
SORT_TRIM_THRESHOLD = 1 << 30


def _glibc():
    """The C library if it is glibc (mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (absent outside glibc)
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def memory_kept_in_process():
    """Within: freed memory stays with the process for the next allocation (see the module's
    doc). A no-op where the C library is not glibc (macOS, Windows, musl)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, SORT_TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
