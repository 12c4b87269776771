"""The embedded queue: worker threads inside the server process, each driving one training child.

Threads are enough here: the heavy work happens in the child process, and the thread only relays its output
into the database. Ids are de-duplicated so the reconciler may re-enqueue freely.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class InlineQueue:
    def __init__(self, run_job: Callable[[str], object], *, concurrency: int = 1) -> None:
        self._run_job = run_job
        self._concurrency = concurrency
        self._pending: queue.Queue[str | None] = queue.Queue()
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self._concurrency):
            thread = threading.Thread(target=self._loop, name=f"alignd-inline-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 30.0) -> None:
        for _ in self._threads:
            self._pending.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    def enqueue(self, job_id: str, *, method: str = "", generation: int = 0) -> None:
        # One process runs every method, and a dead runner thread means a dead server: the id alone
        # de-duplicates.
        with self._lock:
            if job_id in self._known:
                return
            self._known.add(job_id)
        self._pending.put(job_id)

    def ping(self) -> None:
        return None

    def depth(self) -> int | None:
        with self._lock:
            return len(self._known)

    def _loop(self) -> None:
        while True:
            job_id = self._pending.get()
            if job_id is None:
                return
            try:
                self._run_job(job_id)
            except Exception:  # a runner bug must not kill the worker thread
                log.exception("runner crashed on job %s", job_id)
            finally:
                with self._lock:
                    self._known.discard(job_id)
