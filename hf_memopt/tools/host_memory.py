"""How much freed memory the host allocator keeps: glibc malloc's mmap threshold, for CPU runs that count peak RSS.

glibc serves an allocation below its mmap threshold from its heap, and by default raises that threshold (up to
32 MiB) each time a large buffer is freed, so freed tensors of up to 32 MiB stay in the process's resident set and
lift its peak although no tensor holds them. Measured (docs/min_memory.md, LLaMA 58M, batch 4 x 256, checkpointing):
LoQT layer-wise peaks at 1421-1482 MiB RSS with the default and at 922 MiB with a fixed 128 KiB threshold, Adafactor
at 1326-1405 and 1105. A fixed threshold makes every buffer above it a private mapping that goes back to the system
when freed, at the price of fresh page faults for each such buffer: +29% (Adafactor) and +35% (LoQT) CPU time per
update in the same measurement, so it is an opt-in trade of time for memory. The environment variable
``MALLOC_MMAP_THRESHOLD_`` does the same for a whole process; :func:`set_malloc_mmap_threshold` sets it from inside
one (recipes: ``memory.malloc_mmap_threshold``), for the allocations made after the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from hf_memopt.shared.validation import check_int

__all__ = ["MAX_MMAP_THRESHOLD", "set_malloc_mmap_threshold"]

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MAX_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit (HEAP_MAX_SIZE / 2); mallopt refuses more


def set_malloc_mmap_threshold(n_bytes: int) -> None:
    """Fix glibc malloc's mmap threshold at ``n_bytes`` (0 to 32 MiB) for the rest of this process.

    Raises ``ValueError`` outside that range and ``RuntimeError`` where the process does not use glibc's malloc
    (macOS, Windows, musl), rather than ignoring the setting.
    """
    check_int("malloc_mmap_threshold", n_bytes, 0, MAX_MMAP_THRESHOLD)
    libc_name, _ = platform.libc_ver()
    path = ctypes.util.find_library("c")
    if libc_name != "glibc" or path is None:
        raise RuntimeError(
            f"malloc_mmap_threshold: needs glibc's malloc (Linux with glibc); this process runs on "
            f"{platform.system()} with {libc_name or 'another C library'}. Remove the setting"
        )
    if ctypes.CDLL(path).mallopt(M_MMAP_THRESHOLD, n_bytes) != 1:
        raise RuntimeError(f"malloc_mmap_threshold: glibc's mallopt refused {n_bytes} bytes")
