"""The JobQueue protocol shared by the embedded (in-process) queue and the arq/Redis queue."""

from __future__ import annotations

from typing import Protocol


class QueueUnavailable(RuntimeError):
    """The queue backend cannot be reached (the API answers 503; the job row stays queued)."""


class JobQueue(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def enqueue(self, job_id: str, *, method: str, generation: int = 0) -> None:
        """Hand a job id to a worker. Idempotent: an id already waiting or running is not added twice.

        ``method`` routes the job (arq: one queue per method); ``generation`` is the row's lease token
        while it is queued. A queue that remembers ids (arq keeps a crashed worker's entry "in progress"
        until its timeout) keys on (id, generation), so a job handed back after a dead worker is a new
        entry while a repeated enqueue of the same queued row stays a no-op.
        """
        ...

    def depth(self) -> int | None:
        """Entries waiting or running in the queue (for /metrics), None when unknown."""
        ...

    def ping(self) -> None:
        """Raise QueueUnavailable when jobs cannot be enqueued."""
        ...
