"""alignd's API in its own process for the service benchmarks (one uvicorn worker, like the baseline).

    python bench/serve_alignd.py --port P --data-dir D --api-keys bench:KEY [--database-url URL --redis-url URL]

Jobs must be accepted but never trained here (a training child would compete for the CPU being measured):

- embedded mode (inline queue): the queue is the real ``InlineQueue`` with no consumer threads started, so
  ``POST /v1/jobs`` runs the whole request path (auth, validation, tenant lookups, the queued-jobs check, the
  job and event rows, commit, enqueue) and the ids simply wait;
- production mode (``--redis-url``): the real ``ArqQueue`` on Redis, with no arq worker running.

``max_queued_jobs_per_tenant`` is raised so the POST benchmark measures acceptance, not the 429 path.

``--gc-probe PATH`` (``bench/api_gc.py``) records every garbage collection's generation and pause through
``gc.callbacks`` and writes them as JSON to PATH on SIGUSR1, starting a new record each time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def install_gc_probe(path: Path) -> None:
    """Each collection as [generation, pause in ms]; SIGUSR1 writes those since the last signal to ``path``."""
    pauses: list[list[float]] = []
    started = [0.0]

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append([info["generation"], (time.perf_counter() - started[0]) * 1000])

    def dump(_signum: int, _frame: object) -> None:
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"collections": pauses, "tracked_objects": len(gc.get_objects())}))
        partial.replace(path)  # whole or absent: the reader waits for the file to appear
        pauses.clear()

    gc.callbacks.append(on_collection)
    signal.signal(signal.SIGUSR1, dump)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--api-keys", required=True)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--gc-probe", type=Path, default=None)
    args = parser.parse_args()
    if args.gc_probe:
        install_gc_probe(args.gc_probe)

    from alignd_server import embedded
    from service.api import app as app_module
    from service.queue.inline import InlineQueue
    from service.settings import Settings

    values: dict[str, object] = {
        "data_dir": Path(args.data_dir),
        "api_keys": args.api_keys,
        "max_queued_jobs_per_tenant": 10**9,
        "torch_threads": 1,
    }
    if args.database_url:
        values["database_url"] = args.database_url
    if args.redis_url:
        values["queue"] = "arq"
        values["redis_url"] = args.redis_url
    settings = Settings(**values)
    if settings.queue == "inline":
        original = app_module._open_queue

        def parked_queue(s: Settings, runner: object) -> object:
            queue = original(s, runner)  # type: ignore[arg-type]
            assert isinstance(queue, InlineQueue)
            queue._concurrency = 0  # no consumer threads: accepted jobs wait, nothing trains
            return queue

        app_module._open_queue = parked_queue  # type: ignore[assignment]
    app = embedded.create_app(settings)  # its queue is the parked one above
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
