"""The JobQueue protocol shared by the embedded (in-process) queue and the arq/Redis queue."""

from __future__ import annotations

from typing import Protocol


class QueueUnavailable(RuntimeError):
    """The queue backend cannot be reached (the API answers 503; the job row stays queued)."""


class JobQueue(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def enqueue(self, job_id: str) -> None:
        """Hand a job id to a worker. Idempotent: an id already waiting or running is not added twice."""
        ...

    def ping(self) -> None:
        """Raise QueueUnavailable when jobs cannot be enqueued."""
        ...
