"""Giving the C heap's free pages back to the system between training passes (glibc's malloc, which CPU
tensors are allocated from).

glibc serves an allocation below its mmap threshold from the heap. The threshold starts at 128 KiB but rises,
up to 32 MiB, each time a large block is freed, so after the first training step most activation tensors (a
few MiB each at these shapes) come from the heap; freed, they leave holes that the next pass's differently
ordered allocations only partly reuse, and the resident set climbs pass after pass. Measured on one PPO update
of SmolLM2-135M (bench/ppo_child.py, 8 x 77 positions, 4 minibatch passes): 1.75 -> 2.48 -> 2.78 GiB after
the first three backwards, a 2.96 GiB peak, where one pass needs about 2.0 GiB.

Two remedies were measured side by side (alignd's PPO child alone, 3 updates each, 2026-12-01):

- a fixed 1 MiB mmap threshold (``mallopt``), every activation-sized block mapped and unmapped: peak 2.10 GiB,
  but 17.6-21.3 s per update, since each new mapping faults its pages in on first touch;
- ``malloc_trim(0)`` after each minibatch's backward (:func:`release_freed_memory`), the holes' pages handed
  back once per pass: peak 2.32 GiB at 15.0-15.2 s per update, against 2.57 GiB and 15.3 s with neither.

The trainers call the second (PPO after each minibatch, GRPO/RLOO after each optimizer step).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once; None off Linux or on a C library without it (musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return None
    if function is None:
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


def release_freed_memory() -> bool:
    """Hand the heap's free pages back to the system; True when some were (False off glibc too)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
