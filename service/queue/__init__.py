"""Job queues carry only job ids; the database row is the truth."""

from __future__ import annotations

from service.queue.base import JobQueue, QueueUnavailable

__all__ = ["JobQueue", "QueueUnavailable"]
