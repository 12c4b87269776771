"""The garbage collector's policy for a serving process.

Measured (``bench/api_gc.py``, docs/performance.md "API latency and throughput"): after start-up the API
process holds about 180,000 long-lived objects (the imported modules, FastAPI's routes and models,
SQLAlchemy's metadata), and every full (generation 2) collection walks them all, holding the event loop
about 100 ms, one to three times per 10 s under load: that was the p99 tail of ``GET /v1/jobs/{id}`` at 50
connections. ``gc.freeze()`` once start-up is done moves those objects to the permanent generation, so later
collections walk only what requests allocated. Reference counting frees everything as before; only cycles
among the frozen objects wait for ``release_startup_heap()``, which the app's shutdown calls.

The generation thresholds stay the interpreter's: a young generation of 50,000 (tried) made the rarer young
collections during job submissions take 60-140 ms each.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left as garbage, then freeze the rest."""
    gc.collect()  # garbage frozen now could never be collected while frozen
    gc.freeze()


def release_startup_heap() -> None:
    """Give the collector the frozen objects back (shutdown)."""
    gc.unfreeze()
