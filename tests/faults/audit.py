"""What the fault suite checks once every job has ended, from the database rows and the bucket itself.

- every accepted job succeeded, once (one "Job succeeded." event, one set of artifacts);
- every attempt that started training after a checkpoint was stored resumed from the newest stored one
  (never from step 0), and each checked metric series is steps 1..N, once each, in the order written: the
  attempt after a kill went on at the checkpoint's step + 1 (earlier attempts' points past the
  checkpoint are dropped when the attempt resumes, see workers/resume.py);
- the bucket holds exactly the objects the artifact rows name (no orphan, none missing), each with the
  row's size and sha256.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import create_engine
from sqlmodel import Session, col, select

from service.db.artifacts import succeeded_jobs_with_checkpoints
from service.db.tables import ArtifactRow, JobEventRow, JobMetricRow, JobRow
from tests.faults.jobs import EXPECTED_ARTIFACTS, SERIES

ATTEMPT = re.compile(r"^Job started on worker \S+ \(attempt (\d+)\)\.$")
RESUME = re.compile(r"^Resuming from checkpoint (\S+): stage (\S+), step (\d+)")
STORED_CHECKPOINT = re.compile(r"^Stored checkpoint artifact (\S+) \(\d+ bytes\) at step (\d+)")
TRAINING_STARTED = "Training process started"


@dataclass
class JobReport:
    job_id: str
    method: str
    status: str
    error: str | None
    attempts: int
    successes: int
    resumes: int
    restarts_from_zero: list[str] = field(default_factory=list)
    resumed_older: list[str] = field(default_factory=list)
    series_problems: list[str] = field(default_factory=list)
    artifact_problems: list[str] = field(default_factory=list)


@dataclass
class Audit:
    jobs: list[JobReport]
    orphan_objects: list[str]
    missing_objects: list[str]
    corrupt_objects: list[str]

    @property
    def lost(self) -> list[JobReport]:
        return [job for job in self.jobs if job.status != "succeeded"]

    @property
    def duplicated(self) -> list[JobReport]:
        return [job for job in self.jobs if job.successes > 1 or job.artifact_problems]

    def figures(self) -> dict[str, Any]:
        return {
            "jobs": len(self.jobs),
            "jobs_lost": len(self.lost),
            "jobs_duplicated": len(self.duplicated),
            "orphan_objects": len(self.orphan_objects),
            "missing_objects": len(self.missing_objects),
            "corrupt_objects": len(self.corrupt_objects),
            "resumes": sum(job.resumes for job in self.jobs),
            "resumes_from_step_0_after_a_checkpoint": sum(len(job.restarts_from_zero) for job in self.jobs),
            "resumes_from_an_older_checkpoint": sum(len(job.resumed_older) for job in self.jobs),
            "metric_series_problems": sum(len(job.series_problems) for job in self.jobs),
            "max_attempts_of_a_job": max((job.attempts for job in self.jobs), default=0),
        }

    def problems(self) -> list[str]:
        found = [f"{j.job_id}: {j.status} ({j.error})" for j in self.lost]
        for job in self.jobs:
            if job.successes > 1:
                found.append(f"{job.job_id}: {job.successes} 'Job succeeded.' events")
            found += [f"{job.job_id}: {p}" for p in job.artifact_problems + job.series_problems]
            found += [f"{job.job_id}: {p}" for p in job.restarts_from_zero + job.resumed_older]
        found += [f"orphan object {key}" for key in self.orphan_objects]
        found += [f"missing object {key}" for key in self.missing_objects]
        found += [f"corrupt object {key}" for key in self.corrupt_objects]
        return found


def check_resumes(report: JobReport, events: list[JobEventRow]) -> None:
    """Every training start after a stored checkpoint names the newest one in its attempt's resume event."""
    newest: tuple[str, str | None, int] | None = None  # (artifact id, stage, step)
    resumed: tuple[str, str, int] | None = None
    for event in events:
        message = event.message
        if ATTEMPT.match(message):
            resumed = None
        elif found := RESUME.match(message):
            resumed = (found[1], found[2], int(found[3]))
        elif found := STORED_CHECKPOINT.match(message):
            newest = (found[1], event.stage, int(found[2]))
        elif message.startswith(TRAINING_STARTED):
            if resumed is not None:
                report.resumes += 1
            if newest is None:
                continue
            if resumed is None:
                report.restarts_from_zero.append(
                    f"training started from step 0 though checkpoint {newest[0]} ({newest[1]} step "
                    f"{newest[2]}) was stored: {message}"
                )
                newest = None  # that restart dropped the job's checkpoints
            elif resumed[0] != newest[0]:
                report.resumed_older.append(
                    f"resumed from {resumed} though {newest} was the newest stored checkpoint"
                )


def check_series(report: JobReport, metrics: list[JobMetricRow]) -> None:
    """Each checked series is exactly 1..N in write order; no (stage, name) repeats a step."""
    steps: dict[tuple[str | None, str], list[int]] = defaultdict(list)
    for point in metrics:
        steps[(point.stage, point.name)].append(point.step)
    for key, series in steps.items():
        if any(b <= a for a, b in itertools.pairwise(series)):
            report.series_problems.append(f"{key} steps not strictly increasing: {series}")
    if report.status != "succeeded":
        return
    for key, last in SERIES[report.method].items():
        if steps.get(key) != list(range(1, last + 1)):
            report.series_problems.append(f"{key} steps {steps.get(key)} != 1..{last}")


def check_artifacts(report: JobReport, artifacts: list[ArtifactRow]) -> None:
    if report.status != "succeeded":
        return
    kept = Counter((a.stage, a.kind) for a in artifacts)
    expected = Counter(EXPECTED_ARTIFACTS[report.method])
    if kept != expected:
        report.artifact_problems.append(f"artifacts {dict(kept)} != {dict(expected)}")


def audit_jobs(database_url: str, job_ids: list[str]) -> list[JobReport]:
    engine = create_engine(database_url)
    reports = []
    try:
        with Session(engine) as session:
            for job_id in job_ids:
                job = session.exec(select(JobRow).where(JobRow.id == job_id)).one()
                events = list(
                    session.exec(
                        select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(col(JobEventRow.seq))
                    )
                )
                metrics = list(
                    session.exec(
                        select(JobMetricRow)
                        .where(JobMetricRow.job_id == job_id)
                        .order_by(col(JobMetricRow.seq))
                    )
                )
                artifacts = list(session.exec(select(ArtifactRow).where(ArtifactRow.job_id == job_id)))
                report = JobReport(
                    job_id=job_id,
                    method=job.method,
                    status=job.status,
                    error=f"{job.error_code}: {job.error_message}" if job.error_code else None,
                    attempts=job.attempts,
                    successes=sum(e.message == "Job succeeded." for e in events),
                    resumes=0,
                )
                check_resumes(report, events)
                check_series(report, metrics)
                check_artifacts(report, artifacts)
                reports.append(report)
    finally:
        engine.dispose()
    return reports


def audit_bucket(database_url: str, s3: Any, bucket: str, prefix: str = "alignd/") -> tuple[list[str], ...]:
    """(orphans, missing, corrupt): objects under artifacts/ without a row, rows without an object, and
    objects whose size or stored sha256 differ from their row."""
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            rows = {prefix + a.storage_key: a for a in session.exec(select(ArtifactRow))}
    finally:
        engine.dispose()
    listed: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}artifacts/"):
        listed.update({item["Key"]: item["Size"] for item in page.get("Contents", [])})
    orphans = sorted(set(listed) - set(rows))
    missing = sorted(set(rows) - set(listed))
    corrupt = []
    for key in sorted(set(rows) & set(listed)):
        head = s3.head_object(Bucket=bucket, Key=key)
        if (
            head["ContentLength"] != rows[key].size_bytes
            or head["Metadata"].get("sha256") != rows[key].sha256
        ):
            corrupt.append(key)
    return orphans, missing, corrupt


def wait_for_leftover_checkpoints(database_url: str, timeout: float = 60.0) -> None:
    """Until no succeeded job has checkpoints: a runner killed between a job's success and its checkpoint
    drop leaves them to the reconciler's next pass (service/db/artifacts.py), which the audit then sees."""
    engine = create_engine(database_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with Session(engine) as session:
                if not succeeded_jobs_with_checkpoints(session) or time.monotonic() > deadline:
                    return
            time.sleep(0.5)
    finally:
        engine.dispose()


def audit(database_url: str, s3: Any, bucket: str, job_ids: list[str]) -> Audit:
    wait_for_leftover_checkpoints(database_url)
    orphans, missing, corrupt = audit_bucket(database_url, s3, bucket)
    return Audit(audit_jobs(database_url, job_ids), orphans, missing, corrupt)
