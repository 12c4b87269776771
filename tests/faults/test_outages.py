"""Dependencies down mid-run: PostgreSQL crashed and restarted, the S3 endpoint cut while a job uploads.

PostgreSQL: a private cluster (the shared one on :5432 cannot be restarted by a test) crashed with an
immediate shutdown while jobs train. Meanwhile every API request is a 503 with Retry-After and
``database_unavailable``; afterwards the API and the workers recover by themselves, and every job ends
`succeeded` once, resumed from its newest checkpoint.

S3: every S3 call of the API and the workers goes through a TCP proxy; it is cut the moment a job's
training child starts writing its final outputs, so the artifact uploads meet a dead endpoint. They are
retried, and the job is not `succeeded` before its artifacts are durable: whenever the test sees the job
succeeded (looking at moto directly, past the cut proxy), every artifact row has its object.

Counts: ALIGND_FAULTS_PG_OUTAGES and ALIGND_FAULTS_S3_OUTAGES (default 1 each, the `make test` slice).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import RedisServer
from tests.faults.audit import audit, audit_bucket
from tests.faults.chaos import FaultPlan, Probe, wait_until_ended
from tests.faults.jobs import sft_job, submit, upload_inputs
from tests.faults.report import FaultResults
from tests.faults.services import FaultStack, PrivatePostgres, fault_stack, private_postgres

JOBS = 3


def _count(name: str, default: int) -> int:
    value = os.environ.get(f"ALIGND_FAULTS_{name}")
    return int(value) if value else default


@pytest.fixture
def pg_stack(
    tmp_path: Path, redis_server: RedisServer, moto_s3: str, aws_env: dict[str, str]
) -> Iterator[tuple[FaultStack, PrivatePostgres]]:
    with (
        private_postgres() as postgres,
        fault_stack(
            tmp_path,
            database_url=postgres.url,
            redis=redis_server,
            moto_endpoint=moto_s3,
            aws_env=aws_env,
            extra_env={"ALIGND_DB_RETRY_SECONDS": "0.5"},
        ) as stack,
    ):
        yield stack, postgres


@dataclass
class OutageLog:
    outages: int = 0
    down_seconds: list[float] = field(default_factory=list)
    recovery_seconds: list[float] = field(default_factory=list)
    answered_503: int = 0
    wrong_answers: list[str] = field(default_factory=list)


def _probe_requests(client: httpx.Client, job_id: str, body: dict[str, Any], log: OutageLog) -> None:
    """A read, a list and a submission while the database is down: each a 503 that says when to retry."""
    for method, path, json in (
        ("GET", f"/v1/jobs/{job_id}", None),
        ("GET", "/v1/jobs", None),
        ("POST", "/v1/jobs", body),
    ):
        try:
            response = client.request(method, path, json=json, timeout=15)
        except httpx.TransportError as exc:
            log.wrong_answers.append(f"{method} {path}: {type(exc).__name__}")
            continue
        code = response.json().get("error", {}).get("code") if response.status_code >= 400 else None
        if (
            response.status_code == 503
            and code == "database_unavailable"
            and response.headers.get("retry-after")
        ):
            log.answered_503 += 1
        else:
            log.wrong_answers.append(f"{method} {path}: {response.status_code} {response.text[:200]}")


def _wait_ready(client: httpx.Client, timeout: float = 120) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            if client.get("/readyz", timeout=10).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the API did not recover after PostgreSQL came back")


def _wait_training_checkpoint(probe: Probe, job_ids: list[str], since: dict[str, int]) -> None:
    """Until some job stored a checkpoint after ``since`` (its last event seq at the previous outage)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if any(probe.checkpoint_since(job_id, since.get(job_id, 0)) for job_id in job_ids):
            return
        time.sleep(0.3)
    raise AssertionError("no job stored a checkpoint")


def test_postgres_crash_mid_run_is_503_then_recovers(
    pg_stack: tuple[FaultStack, PrivatePostgres],
    fault_plan: FaultPlan,
    fault_results: FaultResults,
    tiny_model_dir: Path,
    sft_jsonl: Path,
    tmp_path: Path,
) -> None:
    stack, postgres = pg_stack
    outages = _count("PG_OUTAGES", 1)
    rng = random.Random(fault_plan.seed + 3)
    log = OutageLog()
    started = time.monotonic()
    probe = Probe(stack.database_url)
    with stack.client() as client:
        inputs = upload_inputs(client, tiny_model_dir, sft_jsonl, tmp_path)
        job_ids = [submit(client, sft_job(inputs, seed=seed)) for seed in range(JOBS)]
        since: dict[str, int] = {}
        for _ in range(outages):
            _wait_training_checkpoint(probe, job_ids, since)
            since = {job_id: probe.last_event_seq(job_id) for job_id in job_ids}
            down = rng.uniform(2.0, 9.0)  # sometimes past the 5 s lease
            postgres.crash()
            crashed = time.monotonic()
            while time.monotonic() - crashed < down:
                _probe_requests(client, job_ids[0], sft_job(inputs, seed=99), log)
                time.sleep(0.5)
            postgres.start()
            log.outages += 1
            log.down_seconds.append(round(time.monotonic() - crashed, 1))
            log.recovery_seconds.append(round(_wait_ready(client), 1))
        job_ids.append(submit(client, sft_job(inputs, seed=100)))  # new work is accepted and runs
        wait_until_ended(probe, job_ids, timeout=600)
    probe.close()
    result = audit(stack.database_url, stack.s3(), stack.bucket, job_ids)
    figures = {
        "pg_outages": log.outages,
        "pg_down_s": log.down_seconds,
        "api_recovered_after_s": log.recovery_seconds,
        "requests_answered_503_with_retry_after": log.answered_503,
        "requests_answered_otherwise": len(log.wrong_answers),
        **result.figures(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    targets = {"pg_outages": outages, "requests_answered_otherwise": 0, "jobs_lost": 0, "orphan_objects": 0}
    targets["jobs_duplicated"] = targets["resumes_from_step_0_after_a_checkpoint"] = 0
    fault_results.add("postgres_down", targets=targets, figures=figures, notes=log.wrong_answers[:5])
    assert log.answered_503 > 0
    assert not log.wrong_answers, log.wrong_answers
    assert not result.problems(), (result.problems(), stack.worker_logs())


def _writing_outputs(stack: FaultStack, job_ids: list[str]) -> str | None:
    """A job whose training child has begun writing its final outputs (files in attempt-*/out/)."""
    for slot in stack.workers:
        for job_id in job_ids:
            for out in (slot.data_dir / "work" / "jobs" / job_id).glob("attempt-*/out"):
                if any(out.iterdir()):
                    return job_id
    return None


def _succeeded_without_objects(stack: FaultStack, probe: Probe, job_ids: list[str]) -> list[str]:
    """Jobs seen `succeeded` while an artifact row of theirs has no object in the bucket (moto, directly)."""
    done = [job_id for job_id in job_ids if probe.statuses([job_id])["succeeded"]]
    if not done:
        return []
    _, missing, corrupt = audit_bucket(stack.database_url, stack.s3(), stack.bucket)
    return [job_id for job_id in done if any(f"/{job_id}/" in key for key in missing + corrupt)]


@dataclass
class S3Cuts:
    """Where each cut landed: ``final_upload`` (the child writing its outputs, the uploads next) or
    ``mid_training`` (right after a checkpoint: the next checkpoint upload, or the resume download of the
    attempt that follows, meets the dead endpoint)."""

    hits: list[tuple[str, str, int]] = field(default_factory=list)  # (moment, job, its last event seq)
    premature: set[str] = field(default_factory=set)

    def jobs(self, moment: str) -> set[str]:
        return {job for kind, job, _ in self.hits if kind == moment}


def _await_moment(
    moment: str, stack: FaultStack, probe: Probe, job_ids: list[str], cuts: S3Cuts, more: Callable[[], str]
) -> str:
    """The next job at ``moment``; ``more()`` submits another job whenever fewer than two are left to run."""
    since = {job: seq for _, job, seq in cuts.hits}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        active = probe.statuses(job_ids)
        if active["queued"] + active["running"] < 2:
            job_ids.append(more())
        if moment == "final_upload":
            found = _writing_outputs(stack, [j for j in job_ids if j not in cuts.jobs(moment)])
        else:
            found = next((j for j in job_ids if probe.checkpoint_since(j, since.get(j, 0))), None)
        if found is not None:
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {moment} moment to cut the S3 endpoint at")


def test_s3_down_during_artifact_upload_is_retried(
    kill_stack: FaultStack,
    fault_plan: FaultPlan,
    fault_results: FaultResults,
    tiny_model_dir: Path,
    sft_jsonl: Path,
    tmp_path: Path,
) -> None:
    stack = kill_stack
    outages = _count("S3_OUTAGES", 1)
    rng = random.Random(fault_plan.seed + 4)
    started = time.monotonic()
    probe = Probe(stack.database_url)
    cuts = S3Cuts()
    with stack.client() as client:
        inputs = upload_inputs(client, tiny_model_dir, sft_jsonl, tmp_path)
        job_ids = [submit(client, sft_job(inputs, seed=seed)) for seed in range(JOBS)]
        for index in range(outages):
            moment = "final_upload" if index % 2 == 0 else rng.choice(["final_upload", "mid_training"])
            job_id = _await_moment(
                moment,
                stack,
                probe,
                job_ids,
                cuts,
                lambda: submit(client, sft_job(inputs, seed=rng.randrange(1 << 16))),
            )
            stack.s3_proxy.stop()
            cuts.hits.append((moment, job_id, probe.last_event_seq(job_id)))
            cut, down = time.monotonic(), rng.uniform(3.0, 8.0)
            while time.monotonic() - cut < down:
                cuts.premature.update(_succeeded_without_objects(stack, probe, job_ids))
                time.sleep(0.3)
            stack.s3_proxy.start()
        wait_until_ended(probe, job_ids, timeout=600)
        cuts.premature.update(_succeeded_without_objects(stack, probe, job_ids))
    result = audit(stack.database_url, stack.s3(), stack.bucket, job_ids)
    before_final = sum(
        _stored_adapter_after(probe, job, seq) for kind, job, seq in cuts.hits if kind == "final_upload"
    )
    probe.close()
    figures = {
        "s3_outages": len(cuts.hits),
        "s3_outages_by_moment": dict(Counter(kind for kind, _, _ in cuts.hits)),
        "outages_before_the_final_upload": before_final,
        "jobs_succeeded_before_their_artifacts_were_durable": len(cuts.premature),
        **result.figures(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    targets = {"s3_outages": outages, "jobs_succeeded_before_their_artifacts_were_durable": 0}
    targets.update(jobs_lost=0, jobs_duplicated=0, orphan_objects=0, resumes_from_step_0_after_a_checkpoint=0)
    fault_results.add("s3_down", targets=targets, figures=figures)
    assert not cuts.premature, cuts.premature
    assert not result.problems(), (result.problems(), stack.worker_logs())


def _stored_adapter_after(probe: Probe, job_id: str, seq: int) -> bool:
    from sqlmodel import Session, col, select

    from service.db.tables import JobEventRow

    with Session(probe.engine) as session:
        found = session.exec(
            select(JobEventRow.seq).where(
                JobEventRow.job_id == job_id,
                col(JobEventRow.seq) > seq,
                col(JobEventRow.message).startswith("Stored adapter artifact"),
            )
        ).first()
    return found is not None
