"""Prometheus metrics of the API: requests by route template and status, latency, jobs by status, queue depth.

Each app gets its own registry (tests build many apps in one process; a process-global registry would refuse
the second). Jobs by status and queue depth are read at scrape time: one GROUP BY on an indexed column and
one ZCARD per method queue, cheap at any realistic scrape interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from service.core.jobs import JobStatus
from service.db.tables import JobRow

log = logging.getLogger(__name__)

# Request latency buckets (seconds): uploads of large models take minutes, most calls milliseconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _StateCollector(Collector):
    def __init__(self, engine: Callable[[], Engine | None], depth: Callable[[], int | None]) -> None:
        self._engine = engine
        self._depth = depth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("alignd_jobs", "Jobs in the database by status.", labels=["status"])
        engine = self._engine()
        if engine is not None:
            try:
                with Session(engine) as session:
                    counts = dict(
                        session.exec(select(JobRow.status, func.count()).group_by(JobRow.status)).all()
                    )
                for status in JobStatus:
                    jobs.add_metric([status.value], float(counts.get(status.value, 0)))
                yield jobs
            except Exception as exc:  # database down: leave the series out rather than fail the scrape
                log.debug("jobs gauge skipped: %s", exc)
        depth = self._depth()
        if depth is not None:
            gauge = GaugeMetricFamily(
                "alignd_queue_depth", "Entries in the job queue (waiting or running; arq: all method queues)."
            )
            gauge.add_metric([], float(depth))
            yield gauge


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "alignd_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "alignd_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch_state(self, engine: Callable[[], Engine | None], depth: Callable[[], int | None]) -> None:
        self.registry.register(_StateCollector(engine, depth))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
