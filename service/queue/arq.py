"""The production queue: arq on Redis. The API enqueues job ids; ``alignd-server worker`` runs them.

Design (shared with ``workers/tasks.py``, which imports the names below):

- **One arq queue per method**: ``alignd:queue:<method>`` (``alignd:queue:sft``, ``alignd:queue:dpo``, ...).
  A worker pool started with ``ALIGND_WORKER_METHODS=ppo,rlhf`` listens only on those queues, so a job is
  never picked up by a worker that cannot run it and nothing has to be handed back.
- **arq job id = ``<job id>:<generation>``**, the generation being the row's lease token while it is queued.
  arq refuses an id whose job or result key exists, which makes a repeated enqueue of a queued row a
  no-op (the reconciler re-enqueues every queued row on every pass). A job handed back after its worker
  died has a higher token, hence a new arq id: the dead worker's entry, which arq keeps "in progress" until
  ``job_timeout`` passes, cannot block it. Workers keep no results (``keep_result=0``), so a finished or
  failed arq entry never blocks a later re-enqueue of the same generation either.
- Payloads are JSON (the only argument is the job id): nothing pickled crosses Redis.

The API code is synchronous (route threads, the reconciler thread) and arq is asyncio, so the queue owns
one private event loop in a thread and hands it arq's own ``enqueue_job``: the dedupe rules stay arq's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix
from redis.asyncio import ConnectionPool
from redis.exceptions import RedisError

from service.queue.base import QueueUnavailable

log = logging.getLogger(__name__)

QUEUE_PREFIX = "alignd:queue:"
TASK_NAME = "run_job"
T = TypeVar("T")


def queue_name(method: str) -> str:
    return f"{QUEUE_PREFIX}{method}"


def arq_job_id(job_id: str, generation: int) -> str:
    return f"{job_id}:{generation}"


def json_serializer(payload: dict[str, Any]) -> bytes:
    # Failed-job results carry the exception object; its repr is all anyone needs from Redis.
    return json.dumps(payload, default=repr).encode()


def json_deserializer(data: bytes) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(data)
    return value


def redis_pool(redis_url: str) -> ConnectionPool:
    # Short timeouts: an unreachable Redis must turn into a quick 503/retry, not a hung request thread.
    return ConnectionPool.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)


class ArqQueue:
    def __init__(self, redis_url: str, *, methods: Iterable[str], timeout: float = 6.0) -> None:
        self._redis_url = redis_url
        self._methods = list(methods)
        self._timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._redis: ArqRedis | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._loop is not None:
                return
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="alignd-arq-queue", daemon=True)
            self._thread.start()
            self._loop = loop
            # Built lazily by redis-py: creating it opens no connection, so the API starts with Redis down.
            self._redis = ArqRedis(
                redis_pool(self._redis_url),
                job_serializer=json_serializer,
                job_deserializer=json_deserializer,
            )

    def stop(self) -> None:
        with self._lock:
            loop, thread, redis = self._loop, self._thread, self._redis
            self._loop = self._thread = self._redis = None
        if loop is None:
            return
        if redis is not None:
            try:
                asyncio.run_coroutine_threadsafe(redis.aclose(close_connection_pool=True), loop).result(5)
            except Exception as exc:  # closing a dead connection is not worth failing shutdown over
                log.debug("closing the arq pool: %s", exc)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        loop.close()

    def _call(self, make: Any) -> Any:
        self.start()
        assert self._loop is not None and self._redis is not None
        coroutine: Coroutine[Any, Any, Any] = make(self._redis)
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self._timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            future.cancel()
            raise QueueUnavailable(f"redis unreachable: {type(exc).__name__}: {exc}") from exc

    def enqueue(self, job_id: str, *, method: str, generation: int = 0) -> None:
        job = self._call(
            lambda redis: redis.enqueue_job(
                TASK_NAME, job_id, _job_id=arq_job_id(job_id, generation), _queue_name=queue_name(method)
            )
        )
        if job is None:
            log.debug("job %s (generation %s) is already in the arq queue", job_id, generation)

    def forget(self, job_id: str, *, method: str, generation: int) -> None:
        """Drop the entry of a generation whose worker died (the reconciler calls this on lease expiry).

        Without it arq would keep the dead worker's entry "in progress" until job_timeout passes, counted
        in the queue depth (and by KEDA) all that time; re-delivering it later would be harmless (the row
        is no longer `queued` for that generation), just wasteful.
        """
        arq_id = arq_job_id(job_id, generation)

        async def drop(redis: ArqRedis) -> None:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.zrem(queue_name(method), arq_id)
                pipe.delete(
                    job_key_prefix + arq_id, in_progress_key_prefix + arq_id, retry_key_prefix + arq_id
                )
                await pipe.execute()

        self._call(drop)

    def ping(self) -> None:
        self._call(lambda redis: redis.ping())

    def depth(self) -> int | None:
        """Entries in the method queues (arq keeps an entry in its sorted set while queued and running)."""

        async def count(redis: ArqRedis) -> int:
            total = 0
            for method in self._methods:
                total += int(await redis.zcard(queue_name(method)))
            return total

        try:
            return int(self._call(count))
        except QueueUnavailable:
            return None
