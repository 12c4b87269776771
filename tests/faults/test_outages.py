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
from collections.abc import Iterator
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
    hit: list[tuple[str, int]] = []  # (job, its last event seq when the endpoint was cut)
    premature: set[str] = set()
    with stack.client() as client:
        inputs = upload_inputs(client, tiny_model_dir, sft_jsonl, tmp_path)
        job_ids = [submit(client, sft_job(inputs, seed=seed)) for seed in range(max(JOBS, outages))]
        while len(hit) < outages:
            pending = [job_id for job_id in job_ids if job_id not in {j for j, _ in hit}]
            job_id = _writing_outputs(stack, pending)
            if job_id is None:
                assert probe.statuses(pending)["succeeded"] < len(pending), "no upload was caught"
                time.sleep(0.05)
                continue
            stack.s3_proxy.stop()
            hit.append((job_id, probe.last_event_seq(job_id)))
            cut, down = time.monotonic(), rng.uniform(3.0, 8.0)
            while time.monotonic() - cut < down:
                premature.update(_succeeded_without_objects(stack, probe, job_ids))
                time.sleep(0.3)
            stack.s3_proxy.start()
        wait_until_ended(probe, job_ids, timeout=600)
        premature.update(_succeeded_without_objects(stack, probe, job_ids))
    result = audit(stack.database_url, stack.s3(), stack.bucket, job_ids)
    uploads_after_cut = sum(_stored_adapter_after(probe, job_id, seq) for job_id, seq in hit)
    probe.close()
    figures = {
        "s3_outages": len(hit),
        "outages_before_the_final_upload": uploads_after_cut,
        "jobs_succeeded_before_their_artifacts_were_durable": len(premature),
        **result.figures(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    targets = {"s3_outages": outages, "jobs_succeeded_before_their_artifacts_were_durable": 0}
    targets.update(jobs_lost=0, jobs_duplicated=0, orphan_objects=0, resumes_from_step_0_after_a_checkpoint=0)
    fault_results.add("s3_down", targets=targets, figures=figures)
    assert not premature, premature
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
