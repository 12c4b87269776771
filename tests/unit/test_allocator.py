"""Giving freed heap pages back (workers/training/allocator.py): on Linux glibc, where this suite runs, a
process that freed activation-sized blocks in another order than it took them holds far less afterwards."""

from __future__ import annotations

import subprocess
import sys

from workers.training.allocator import release_freed_memory

RSS_AFTER_CHURN = """
import sys
from workers.training.allocator import release_freed_memory
import torch
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
# Passes whose activation-sized blocks are freed in another order than they were taken, as a training pass's
# are, with a long-lived small tensor kept between passes: the holes the heap keeps are what the trim returns.
kept = []
for step in range(6):
    blocks = [torch.ones(1 << (18 + (i + step) % 4)) for i in range(40)]
    kept.append(torch.ones(1000))
    del blocks[::2]
    del blocks
    if sys.argv[1] == "trim":
        assert release_freed_memory()
print(rss_mb())
"""


def test_available_on_linux_glibc() -> None:
    assert isinstance(release_freed_memory(), bool)


def test_freed_blocks_go_back_to_the_system() -> None:
    rss = {}
    for mode in ("keep", "trim"):
        out = subprocess.run(
            [sys.executable, "-c", RSS_AFTER_CHURN, mode], capture_output=True, text=True, check=True
        )
        rss[mode] = int(out.stdout.split()[-1])
    assert rss["trim"] < rss["keep"] - 50, rss
