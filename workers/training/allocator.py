"""The C heap's policy for a training process (glibc's malloc, which CPU tensors are allocated from).

glibc serves an allocation below its mmap threshold from the heap and returns larger ones to the system on
free. The threshold starts at 128 KiB but rises, up to 32 MiB, each time a large block is freed, so after the
first training step most activation tensors (a few MiB each at these shapes) come from the heap; freed, they
leave holes that the next step's differently ordered allocations only partly reuse. Measured on one PPO
update of SmolLM2-135M (bench/ppo_child.py, 8 x 77 positions, 4 minibatch passes): the peak RSS climbs
pass after pass, 1.75 -> 2.48 -> 2.78 GiB, and peaks at 2.96 GiB, while one pass needs about 2.0 GiB. A fixed
1 MiB threshold (which also turns the sliding adjustment off) sends every activation-sized block straight to
and from the system: the same update peaks at 2.13 GiB and the RSS between passes stays at 1.2 GiB.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
DEFAULT_MMAP_THRESHOLD = 1 << 20


def bound_heap_growth(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process; True when it was applied.

    A no-op (False) off Linux, on a C library without ``mallopt`` (musl), or when the operator set
    ``MALLOC_MMAP_THRESHOLD_`` themselves (glibc read it at start-up and theirs wins)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
