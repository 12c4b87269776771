"""Where the next attempt of a job starts: its newest usable checkpoint, and the stage outputs it reuses.

A new attempt resumes from a stored checkpoint when one is usable, and first deletes what it will produce
again (outputs of the stages it reruns, metric points past the resume point), so the job's artifacts and
metric series describe one run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import col, select

from contract.evaluation import STAGE as EVAL_STAGE
from contract.methods import Method, rlhf_stages, stored_rl_method
from contract.protocol import CHECKPOINT_META_FILE, AdapterRef, ResumeRef
from service.db.session import session_scope
from service.db.tables import ArtifactRow, JobMetricRow, JobRow
from service.storage import ArtifactStore, StorageUnavailable
from workers.inputs import InputCache
from workers.lease import STOPPED_BY_MONITOR, Lease, add_event, fenced
from workers.outputs import delete_checkpoint_rows, delete_objects

log = logging.getLogger(__name__)

# A stage's output that later stages consume (and that a resume past the stage hands back in the spec).
STAGE_OUTPUT_KINDS = ("adapter", "reward_model")


def job_stages(method: str, hyperparameters: dict[str, Any] | None = None) -> tuple[str, ...]:
    """The stages a job of ``method`` runs through, in order (the ``stage`` its lines carry); an rlhf job's last
    training stage is its ``rl_method`` (as stored: ppo for a row older than the key), then its final
    evaluation, which takes no checkpoint: an attempt resumed past the last stage redoes it whole, so the
    outputs and metrics an earlier attempt left of it go."""
    if method == Method.rlhf.value:
        stages = rlhf_stages(stored_rl_method(hyperparameters))
        return (*stages, EVAL_STAGE)
    return (method,)


@dataclass(frozen=True)
class ResumePlan:
    """Where the next attempt of a job starts: a checkpoint (None: from scratch) and the stages it skips."""

    checkpoint: ArtifactRow | None
    stage: str | None
    step: int
    stage_complete: bool
    done_stages: tuple[str, ...]  # stages whose stored outputs the attempt reuses
    stage_outputs: dict[str, ArtifactRow]


FROM_SCRATCH = ResumePlan(None, None, 0, False, (), {})


def checkpoints(engine: Engine, job_id: str) -> list[ArtifactRow]:
    """The job's stored checkpoints, newest first (their metadata: stage, step, stage_complete)."""
    with session_scope(engine) as session:
        return list(
            session.exec(
                select(ArtifactRow)
                .where(ArtifactRow.job_id == job_id, ArtifactRow.kind == "checkpoint")
                .order_by(col(ArtifactRow.seq).desc())
            ).all()
        )


def resume_plans(engine: Engine, job: JobRow) -> list[ResumePlan]:
    """Every checkpoint of ``job`` a new attempt could start from, best (newest) first.

    A checkpoint of stage S at step k is usable when every stage before S (and S itself when the
    checkpoint marks S complete) has its output artifact stored: the attempt skips those stages, and
    resumes S from step k (or starts the next stage). A checkpoint that is missing or corrupt in storage is
    skipped by the caller for the next plan; an unreachable store ends the attempt instead.
    """
    stages = job_stages(job.method, job.hyperparameters)
    with session_scope(engine) as session:
        outputs = list(
            session.exec(
                select(ArtifactRow)
                .where(ArtifactRow.job_id == job.id, col(ArtifactRow.kind).in_(STAGE_OUTPUT_KINDS))
                .order_by(col(ArtifactRow.seq).desc())
            ).all()
        )
    newest_output: dict[str, ArtifactRow] = {}
    for row in outputs:
        if row.stage is not None:
            newest_output.setdefault(row.stage, row)
    plans = []
    for row in checkpoints(engine, job.id):
        stage = row.meta.get("stage") or row.stage
        if stage not in stages:
            continue
        complete = bool(row.meta.get("stage_complete"))
        index = stages.index(stage)
        done = stages[: index + 1] if complete else stages[:index]
        if any(s not in newest_output for s in done):
            continue  # an earlier stage's output is gone: this checkpoint cannot be continued
        plans.append(
            ResumePlan(
                checkpoint=row,
                stage=stage,
                step=int(row.meta.get("step", 0)),
                stage_complete=complete,
                done_stages=done,
                stage_outputs={s: newest_output[s] for s in done},
            )
        )
    return plans


def fetch_best_plan(
    engine: Engine, store: ArtifactStore, job: JobRow, attempt_dir: Path
) -> tuple[ResumePlan | None, Path | None]:
    """The best plan whose checkpoint downloads and unpacks complete, with its local folder."""
    for plan in resume_plans(engine, job):
        assert plan.checkpoint is not None
        folder = attempt_dir / "resume" / plan.checkpoint.id
        try:
            extract_artifact(store, plan.checkpoint, folder)
            json.loads((folder / CHECKPOINT_META_FILE).read_text(encoding="utf-8"))
        except StorageUnavailable:
            # The store is down, not the checkpoint bad: falling back would start the job over and delete
            # its checkpoints. The attempt ends here and a later one resumes once the store is back.
            shutil.rmtree(folder, ignore_errors=True)
            raise
        except Exception as exc:  # missing object, corrupt archive: try an older one
            log.warning(
                "checkpoint %s of %s unusable (%s); trying an older one", plan.checkpoint.id, job.id, exc
            )
            shutil.rmtree(folder, ignore_errors=True)
            continue
        return plan, folder
    return None, None


def extract_artifact(store: ArtifactStore, artifact: ArtifactRow, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    archive = folder.parent / f"{artifact.id}.tar.gz"
    try:
        store.get_to_path(artifact.storage_key, archive)
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(folder, filter="data")
    finally:
        archive.unlink(missing_ok=True)


def start_point(
    engine: Engine,
    store: ArtifactStore,
    cache: InputCache,
    lease: Lease,
    job: JobRow,
    attempt_dir: Path,
    *,
    resume: bool,
) -> tuple[ResumeRef | None, dict[str, AdapterRef]]:
    """Choose where this attempt starts, clear what it redoes, and return the spec's resume fields.

    ``resume`` False starts over: the job's checkpoints are deleted with the rest of the redone work.
    """
    plan, folder = fetch_best_plan(engine, store, job, attempt_dir) if resume else (None, None)
    plan = plan or FROM_SCRATCH
    discard_redone_work(engine, store, lease, job, plan)
    if plan.checkpoint is None or folder is None or plan.stage is None:
        return None, {}
    resume_from = ResumeRef(
        path=str(folder), stage=plan.stage, step=plan.step, stage_complete=plan.stage_complete
    )
    stage_artifacts = {
        stage: AdapterRef(id=output.id, path=str(cache.artifact(store, output)))
        for stage, output in plan.stage_outputs.items()
    }
    add_event(
        engine,
        lease,
        f"Resuming from checkpoint {plan.checkpoint.id}: stage {plan.stage}, step {plan.step}"
        + (" (stage complete)" if plan.stage_complete else "")
        + (f"; reusing the stored outputs of {', '.join(plan.done_stages)}" if plan.done_stages else "")
        + ".",
        stage=plan.stage,
    )
    return resume_from, stage_artifacts


def _discard_redone_monitors(job: JobRow, plan: ResumePlan, redo: list[str]) -> None:
    """The monitor alerts the new attempt raises again go, by the metric points' rule (the attempt's
    monitors restart from the checkpoint's state, so it fires them again if the run repeats)."""

    def redone(entry: dict[str, Any]) -> bool:
        if plan.checkpoint is None:
            return True
        if plan.stage is not None and not plan.stage_complete and entry.get("stage") == plan.stage:
            return int(entry.get("step", 0)) > plan.step
        return entry.get("stage") in redo

    kept = [entry for entry in job.monitors if not redone(entry)]
    if kept != job.monitors:
        job.monitors = kept
    job.status_reason = STOPPED_BY_MONITOR if any(entry.get("stop") for entry in kept) else None


def discard_redone_work(
    engine: Engine, store: ArtifactStore, lease: Lease, job: JobRow, plan: ResumePlan
) -> None:
    """Delete what the new attempt produces again: outputs of stages it reruns, metrics past the resume point.

    Earlier attempts' metric points after the checkpoint's step would otherwise appear twice; the series
    then describes the one run that produced the final artifacts (the events keep every attempt's story).
    """
    stages = job_stages(job.method, job.hyperparameters)
    kept = set(plan.done_stages)
    redo = [s for s in stages if s not in kept]
    keys: list[str] = []
    with session_scope(engine) as session:
        _discard_redone_monitors(fenced(session, lease), plan, redo)
        rows = session.exec(
            select(ArtifactRow).where(ArtifactRow.job_id == job.id, ArtifactRow.kind != "checkpoint")
        ).all()
        for row in rows:
            if row.stage in kept:
                continue
            keys.append(row.storage_key)
            session.delete(row)
        metric_filter = [col(JobMetricRow.job_id) == job.id]
        if plan.stage is not None and not plan.stage_complete:
            # Points of the resumed stage up to its step stay; every later stage starts over.
            later = [s for s in redo if s != plan.stage]
            session.execute(
                delete(JobMetricRow).where(
                    *metric_filter,
                    col(JobMetricRow.stage) == plan.stage,
                    col(JobMetricRow.step) > plan.step,
                )
            )
            if later:
                session.execute(
                    delete(JobMetricRow).where(*metric_filter, col(JobMetricRow.stage).in_(later))
                )
        elif plan.checkpoint is not None:
            session.execute(delete(JobMetricRow).where(*metric_filter, col(JobMetricRow.stage).in_(redo)))
        else:
            # From scratch: earlier checkpoints (unusable, or resume=False) must not be resumed later.
            session.execute(delete(JobMetricRow).where(*metric_filter))
            keys.extend(delete_checkpoint_rows(session, job.id))
    delete_objects(store, keys)
