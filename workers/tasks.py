"""The arq worker: ``alignd-server worker`` serves the method queues and runs each job with the JobRunner.

- ``WorkerSettings`` holds the arq settings; ``WorkerSettings.for_method(settings, method, state)`` adds the
  per-process ones (Redis, queue name ``alignd:queue:<method>``, ``max_jobs`` = ALIGND_WORKER_CONCURRENCY,
  job timeout, tries). One arq ``Worker`` per served method runs in one event loop; they share one
  semaphore, so the process never runs more than ``worker_concurrency`` jobs whatever the mix of methods.
- The task ``run_job(ctx, job_id)`` runs the blocking ``JobRunner.run`` in a thread. The job row is the
  truth: a duplicate or stale delivery finds the row not ``queued`` and returns at once.
- Redis outages do not kill the worker: running jobs go on (they only need the database and storage),
  polling resumes when Redis is back, and the API's reconciler re-enqueues what Redis lost.
- SIGTERM/SIGINT: stop taking jobs, stop the training children (SIGTERM: they checkpoint), the runner hands
  their jobs back as ``queued`` and this worker re-enqueues them, then exit. A SIGKILLed worker's jobs are
  recovered by lease expiry instead (reconciler).
- Prometheus metrics on ``ALIGND_WORKER_METRICS_PORT``: job durations, jobs by final status, running jobs,
  the last training tokens/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from arq import Retry
from arq.connections import ArqRedis
from arq.worker import Worker, func
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from redis.exceptions import RedisError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import select

from contract.methods import Method
from service.core.jobs import JobStatus
from service.db.session import make_engine, session_scope
from service.db.tables import JobRow
from service.logs import job_id_var
from service.queue.arq import (
    TASK_NAME,
    arq_job_id,
    json_deserializer,
    json_serializer,
    queue_name,
    redis_pool,
)
from service.settings import Settings
from service.storage import ArtifactStore, StorageUnavailable, open_store
from workers.runner import JobRunner

log = logging.getLogger(__name__)

# Job durations from seconds (a failed input check) to two days (a long RLHF run).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 172800)


def served_methods(settings: Settings) -> list[str]:
    """ALIGND_WORKER_METHODS as a list; unset or empty: every method."""
    known = [method.value for method in Method]
    if not settings.worker_methods or not settings.worker_methods.strip():
        return known
    chosen = [part.strip() for part in settings.worker_methods.split(",") if part.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(f"ALIGND_WORKER_METHODS: unknown method(s) {unknown}; known: {known}")
    return list(dict.fromkeys(chosen))


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.duration = Histogram(
            "alignd_worker_job_duration_seconds",
            "Wall time of one job run on this worker, by the status it ended in.",
            ["status"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Counter(
            "alignd_worker_jobs",
            "Job runs on this worker by final status (queued: handed back on shutdown).",
            ["status"],
            registry=self.registry,
        )
        self.running = Gauge("alignd_worker_running_jobs", "Jobs running now.", registry=self.registry)
        self.tokens_per_second = Gauge(
            "alignd_worker_training_tokens_per_second",
            "The last training throughput a job on this worker reported.",
            registry=self.registry,
        )

    def on_metric(self, _job_id: str, name: str, value: float) -> None:
        if name == "tokens_per_second":
            self.tokens_per_second.set(value)


@dataclass
class WorkerState:
    """What every arq Worker of this process shares: settings, runner, thread pool, metrics, stop flag."""

    settings: Settings
    methods: list[str]
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    stopping: threading.Event = field(default_factory=threading.Event)
    engine: Engine | None = None
    store: ArtifactStore | None = None
    runner: JobRunner | None = None
    executor: ThreadPoolExecutor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ensure_started(self) -> JobRunner:
        with self._lock:
            if self.runner is None:
                settings = self.settings
                settings.data_dir.mkdir(parents=True, exist_ok=True)
                self.engine = make_engine(settings.resolved_database_url)
                self.store = open_store(
                    settings.resolved_storage_url, s3_endpoint_url=settings.s3_endpoint_url
                )
                worker_id = f"{socket.gethostname()}-{secrets.token_hex(3)}"
                self.runner = JobRunner(
                    settings=settings, engine=self.engine, store=self.store, worker_id=worker_id
                )
                self.runner.on_metric = self.metrics.on_metric
                self.executor = ThreadPoolExecutor(
                    max_workers=settings.worker_concurrency, thread_name_prefix="alignd-job"
                )
                log.info("worker %s serving %s", worker_id, ", ".join(self.methods))
            return self.runner

    def run_sync(self, job_id: str) -> str | None:
        runner = self.ensure_started()
        token = job_id_var.set(job_id)
        started = time.monotonic()
        self.metrics.running.inc()
        try:
            log.info("job delivered")
            status = runner.run(job_id)
            if status is None:
                log.info(
                    "job not taken: not queued any more (taken elsewhere, finished or cancelled) or waiting "
                    "for capacity; skipped"
                )
                return None
            elapsed = time.monotonic() - started
            log.info("job ended: %s after %.1f s", status.value, elapsed)
            self.metrics.duration.labels(status.value).observe(elapsed)
            self.metrics.jobs.labels(status.value).inc()
            return status.value
        finally:
            self.metrics.running.dec()
            job_id_var.reset(token)

    def requeue_info(self, job_id: str) -> tuple[str, int] | None:
        """(method, generation) of a job that is queued again, to hand it straight back to the queue."""
        assert self.engine is not None
        with session_scope(self.engine) as session:
            row = session.exec(select(JobRow).where(JobRow.id == job_id)).first()
            if row is None or row.status != JobStatus.queued:
                return None
            return row.method, row.lease_token


async def startup(ctx: dict[str, Any]) -> None:
    """arq on_startup: build engine, store and runner from Settings (once per process)."""
    state: WorkerState = ctx["state"]
    await asyncio.to_thread(state.ensure_started)


async def shutdown(ctx: dict[str, Any]) -> None:
    """arq on_shutdown: stop the training children; the runner puts their jobs back to `queued`."""
    state: WorkerState = ctx["state"]
    state.stopping.set()
    if state.runner is not None:
        state.runner.shutdown()


async def run_job(ctx: dict[str, Any], job_id: str) -> str | None:
    state: WorkerState = ctx["state"]
    state.ensure_started()
    assert state.executor is not None
    loop = asyncio.get_running_loop()
    try:
        status = await loop.run_in_executor(state.executor, state.run_sync, job_id)
    except asyncio.CancelledError:
        if not state.stopping.is_set() and state.runner is not None:
            # arq's job_timeout cancelled us; the thread runs on, so stop the child and fail the job.
            state.runner.abort(
                job_id,
                "job_timeout",
                f"The job ran longer than ALIGND_JOB_TIMEOUT_SECONDS ({state.settings.job_timeout_seconds:g} s).",
            )
        raise
    except (OperationalError, DBAPIError, StorageUnavailable) as exc:
        # A dependency is down: arq delivers this entry again later (up to max_tries); after that the
        # row is still `queued` and the reconciler enqueues it again.
        log.warning("job %s not started, dependency down (%s); retrying later", job_id, exc)
        raise Retry(defer=5) from exc
    if status == JobStatus.queued.value:
        # Handed back on shutdown: enqueue the new generation now rather than at the next reconcile pass.
        with contextlib.suppress(Exception):
            info = await asyncio.to_thread(state.requeue_info, job_id)
            if info is not None:
                redis: ArqRedis = ctx["redis"]
                await redis.enqueue_job(
                    TASK_NAME, job_id, _job_id=arq_job_id(job_id, info[1]), _queue_name=queue_name(info[0])
                )
    return status


class WorkerSettings:
    """arq settings of an alignd worker (the parts that do not depend on Settings)."""

    functions = [func(run_job, name=TASK_NAME)]
    on_startup = startup
    on_shutdown = shutdown
    job_serializer = staticmethod(json_serializer)
    job_deserializer = staticmethod(json_deserializer)
    # No results in Redis: the row holds the outcome, and a kept result would block re-enqueueing the id.
    keep_result = 0
    retry_jobs = True
    poll_delay = 0.5
    health_check_interval = 30
    # Signals are handled by serve() so that jobs are handed back before the loop stops.
    handle_signals = False

    @classmethod
    def for_method(
        cls, settings: Settings, method: str, state: WorkerState, pool: ArqRedis | None = None
    ) -> dict[str, Any]:
        name = queue_name(method)
        return {
            "functions": cls.functions,
            "on_startup": cls.on_startup,
            "on_shutdown": cls.on_shutdown,
            "job_serializer": cls.job_serializer,
            "job_deserializer": cls.job_deserializer,
            "keep_result": cls.keep_result,
            "retry_jobs": cls.retry_jobs,
            "poll_delay": cls.poll_delay,
            "health_check_interval": cls.health_check_interval,
            "handle_signals": cls.handle_signals,
            "redis_pool": pool,
            "queue_name": name,
            "health_check_key": f"{name}:health-check",
            "max_jobs": settings.worker_concurrency,
            "job_timeout": settings.job_timeout_seconds,
            "max_tries": settings.job_max_tries,
            "ctx": {"state": state, "settings": settings},
        }


class ResilientWorker(Worker):
    """An arq Worker whose poll loop survives Redis outages (arq's own would end the process)."""

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except (RedisError, OSError) as exc:
            log.warning("redis unavailable on %s (%s); retrying", self.queue_name, exc)
            await asyncio.sleep(1)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        """arq's ``start_jobs``, one id at a time, giving back the slot a Redis error leaves taken.

        arq takes a slot (the process-wide semaphore and this queue's job counter) for an id before its Redis
        calls that mark the job in progress; a connection error there skips the release. With
        ALIGND_WORKER_CONCURRENCY=1 one such error at the wrong moment left the worker polling, healthy to
        its health check, and never starting a job again (found by tests/faults, Redis killed -9).
        """
        for job_id in job_ids:
            try:
                await super().start_jobs([job_id])
            except (RedisError, OSError):
                # Every await in arq's loop body that talks to Redis comes after the slot was taken, and
                # nothing releases it on an exception: release it here (unless the job did start, which
                # releases its own), then let the poll loop retry.
                if job_id.decode() not in self.tasks:
                    self.job_counter -= 1
                    self.sem.release()
                raise


async def _keep_polling(worker: Worker, stopping: threading.Event) -> None:
    while not stopping.is_set():
        try:
            await worker.main()
        except (RedisError, OSError) as exc:  # Redis down at start (main() logs Redis info first)
            log.warning("redis unavailable (%s); retrying", exc)
            await asyncio.sleep(1)


async def serve(settings: Settings, *, ready: threading.Event | None = None) -> None:
    """Run the worker until SIGTERM/SIGINT."""
    methods = served_methods(settings)
    state = WorkerState(settings=settings, methods=methods)
    if settings.worker_metrics_port:
        start_http_server(settings.worker_metrics_port, addr="0.0.0.0", registry=state.metrics.registry)
    await asyncio.to_thread(state.ensure_started)
    pool = ArqRedis(
        redis_pool(settings.redis_url), job_serializer=json_serializer, job_deserializer=json_deserializer
    )
    slots = asyncio.BoundedSemaphore(settings.worker_concurrency)
    workers: list[Worker] = []
    for method in methods:
        worker: Worker = ResilientWorker(**WorkerSettings.for_method(settings, method, state, pool))
        # One budget for the process: each Worker waits for a free slot before it marks a job as taken,
        # so a job it cannot start yet stays available to other workers.
        worker.sem = slots
        workers.append(worker)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    mains = [asyncio.create_task(_keep_polling(worker, state.stopping)) for worker in workers]
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("worker stopping: handing running jobs back to the queue")
    for worker in workers:
        worker.allow_pick_jobs = False
    await shutdown({"state": state})
    running = [task for worker in workers for task in worker.tasks.values() if not task.done()]
    if running:
        await asyncio.gather(*running, return_exceptions=True)
    for task in mains:
        task.cancel()
    await asyncio.gather(*mains, return_exceptions=True)
    with contextlib.suppress(Exception):
        await pool.delete(*(worker.health_check_key for worker in workers))
    with contextlib.suppress(Exception):
        await pool.aclose(close_connection_pool=True)
    if state.executor is not None:
        state.executor.shutdown(wait=True)
    if state.engine is not None:
        state.engine.dispose()
    log.info("worker stopped")


async def check_health(settings: Settings) -> bool:
    """True when every served queue's worker wrote its health-check key recently (arq's convention)."""
    pool = ArqRedis(redis_pool(settings.redis_url))
    try:
        for method in served_methods(settings):
            if not await pool.exists(f"{queue_name(method)}:health-check"):
                return False
        return True
    finally:
        await pool.aclose(close_connection_pool=True)
