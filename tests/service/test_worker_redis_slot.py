"""A Redis error while the worker starts a job must not cost it the slot for good.

Found by the fault suite (tests/faults/test_kills.py, Redis killed -9 and restarted empty): arq takes a slot
(the process-wide semaphore and the queue's job counter) before the Redis calls that mark a job in progress,
and a connection error there never gives it back. With one slot the worker kept polling, and its health
check kept passing, but it never started a job again. A real redis-server, stopped under the worker.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import RedisServer, make_settings


def test_a_redis_error_while_starting_a_job_gives_the_slot_back(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    from arq.connections import ArqRedis
    from arq.worker import Worker

    from service.queue.arq import json_deserializer, json_serializer, redis_pool
    from workers.tasks import ResilientWorker, WorkerSettings, WorkerState

    settings = make_settings(tmp_path / "w", queue="arq", redis_url=redis_server.url)
    state = WorkerState(settings=settings, methods=["sft"])

    async def slots_after_a_failed_start(worker_class: type[Worker]) -> tuple[int, bool]:
        pool = ArqRedis(
            redis_pool(redis_server.url), job_serializer=json_serializer, job_deserializer=json_deserializer
        )
        worker = worker_class(**WorkerSettings.for_method(settings, "sft", state, pool))
        worker.sem = asyncio.BoundedSemaphore(1)  # one slot per process, as serve() shares it
        try:
            await worker.start_jobs([b"job_x:0"])
        except Exception as exc:  # the connection error the poll loop logs and retries after
            assert "connect" in str(exc).lower() or isinstance(exc, OSError), exc
        finally:
            await pool.aclose(close_connection_pool=True)
        return worker.job_counter, worker.sem.locked()

    redis_server.stop()
    try:
        assert asyncio.run(slots_after_a_failed_start(Worker)) == (1, True)  # arq alone: the slot is gone
        assert asyncio.run(slots_after_a_failed_start(ResilientWorker)) == (0, False)
    finally:
        redis_server.start()
