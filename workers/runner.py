"""Runs one job: lease it, fetch its inputs, spawn the training child, relay its output, store artifacts, finish.

The job row is the truth. The runner takes a lease (owner + fencing token + expiry) with a compare-and-set
on the row; every later write checks the token, so a runner whose lease was handed to another worker
(after a long pause, say) can no longer touch the job. Cancellation is a flag on the row, read at every
heartbeat, so a cancel accepted by any API replica reaches the process that runs the job.

No torch here: training happens in ``python -m workers.training spec.json`` (see contract/protocol.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contract.methods import RLHF_STAGES, Method
from contract.protocol import (
    CHECKPOINT_META_FILE,
    AdapterRef,
    BaseModelRef,
    DatasetRef,
    ResumeRef,
    TrainingSpec,
    parse_line,
)
from service.core import ranking
from service.core.errors import AlignError
from service.core.ids import new_id, now
from service.core.jobs import JobStatus
from service.db.artifacts import sweep_orphan_objects
from service.db.datasets import add_dataset_file
from service.db.session import session_scope
from service.db.tables import ArtifactRow, DatasetRow, JobEventRow, JobMetricRow, JobRow, ModelRow
from service.settings import Settings
from service.storage import ArtifactStore
from service.storage.keys import artifact_key, dataset_key, model_key

log = logging.getLogger(__name__)

# The lease and heartbeat come from Settings.lease_seconds / heartbeat_seconds (tests shorten them).


class LeaseLost(Exception):
    """Another runner owns the job now (or it was reset): stop writing."""


@dataclass
class Lease:
    job_id: str
    token: int
    owner: str
    # Set by the lease keeper thread (see JobRunner._keep_lease), read by the relay loop.
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)


# A stage's output that later stages consume (and that a resume past the stage hands back in the spec).
STAGE_OUTPUT_KINDS = ("adapter", "reward_model")


def job_stages(method: str) -> tuple[str, ...]:
    """The stages a job of ``method`` runs through, in order (the ``stage`` its lines carry)."""
    if method == Method.rlhf.value:
        return tuple(stage.value for stage in RLHF_STAGES)
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


def pack_folder(folder: Path, dest: Path) -> tuple[int, str]:
    """Write ``folder``'s files at the root of a .tar.gz; return (size, sha256)."""
    with tarfile.open(dest, "w:gz") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.add(path, arcname=path.relative_to(folder).as_posix(), recursive=False)
    digest = hashlib.sha256()
    with open(dest, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return dest.stat().st_size, digest.hexdigest()


class JobRunner:
    def __init__(self, *, settings: Settings, engine: Engine, store: ArtifactStore, worker_id: str) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.worker_id = worker_id
        self._stopping = threading.Event()
        self._children: set[subprocess.Popen[str]] = set()
        self._children_lock = threading.Lock()
        # job id -> error: jobs to stop and fail (the arq worker's job_timeout), read at each heartbeat.
        self._aborts: dict[str, tuple[str, str]] = {}
        # Concurrent jobs (ALIGND_WORKER_CONCURRENCY > 1) often share a base model: one download at a time
        # into the cache, or two writers of the same file would interleave.
        self._cache_lock = threading.Lock()
        # Called with (job_id, metric name, value) for every metric the child reports (worker /metrics).
        self.on_metric: Callable[[str, str, float], None] | None = None

    @property
    def lease_seconds(self) -> float:
        return self.settings.lease_seconds

    @property
    def heartbeat_seconds(self) -> float:
        return self.settings.heartbeat_seconds

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        """Stop every running child; their jobs go back to `queued` for the next start."""
        self._stopping.set()
        with self._children_lock:
            children = list(self._children)
        for child in children:
            _signal_group(child, signal.SIGTERM)

    def abort(self, job_id: str, code: str, message: str) -> None:
        """Stop a job this runner is running and mark it failed with ``code`` (e.g. the arq job timeout)."""
        self._aborts[job_id] = (code, message)

    # ------------------------------------------------------------------ lease and fenced writes

    def acquire(self, job_id: str) -> Lease | None:
        """Take the job if it is queued (compare-and-set on status). None when someone else has it."""
        with session_scope(self.engine) as session:
            job = session.exec(select(JobRow).where(JobRow.id == job_id)).first()
            if job is None or job.status != JobStatus.queued:
                return None
            token = job.lease_token + 1
            result = session.execute(
                update(JobRow)
                .where(
                    col(JobRow.id) == job_id,
                    col(JobRow.status) == JobStatus.queued.value,
                    col(JobRow.lease_token) == job.lease_token,
                )
                .values(
                    status=JobStatus.running,
                    lease_owner=self.worker_id,
                    lease_token=token,
                    lease_expires_at=time.time() + self.lease_seconds,
                    started_at=job.started_at or now(),
                    attempts=job.attempts + 1,
                    error_code=None,
                    error_message=None,
                )
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
        return Lease(job_id=job_id, token=token, owner=self.worker_id)

    def _fenced(self, session: Any, lease: Lease) -> JobRow:
        job = session.exec(select(JobRow).where(JobRow.id == lease.job_id).with_for_update()).first()
        if job is None or job.lease_token != lease.token or job.status != JobStatus.running:
            raise LeaseLost(lease.job_id)
        return job

    def heartbeat(self, lease: Lease) -> bool:
        """Extend the lease; returns whether a cancel was requested. Raises LeaseLost."""
        with session_scope(self.engine) as session:
            job = self._fenced(session, lease)
            job.lease_expires_at = time.time() + self.lease_seconds
            session.add(job)
            return job.cancel_requested

    def add_event(self, lease: Lease, message: str, *, level: str = "info", stage: str | None = None) -> None:
        with session_scope(self.engine) as session:
            job = self._fenced(session, lease)
            session.add(
                JobEventRow(
                    job_id=lease.job_id,
                    created_at=now(),
                    level=level,
                    stage=stage or job.stage,
                    message=message,
                )
            )

    def finish(self, lease: Lease, status: JobStatus, *, error: tuple[str, str] | None = None) -> None:
        # The attempt's child is gone and every upload it asked for has its row: sweep what a killed earlier
        # attempt, or a checkpoint prune cut short, left behind before the job is seen to end.
        self._sweep_orphans(lease)
        with session_scope(self.engine) as session:
            job = self._fenced(session, lease)
            job.status = status
            job.finished_at = now()
            job.lease_owner = None
            job.lease_expires_at = None
            if status is JobStatus.succeeded:
                job.progress = 1.0
            if error is not None:
                job.error_code, job.error_message = error
            session.add(job)
            text = {
                JobStatus.succeeded: "Job succeeded.",
                JobStatus.cancelled: "Job cancelled.",
                JobStatus.failed: f"Job failed: {error[1] if error else 'unknown error'}",
                JobStatus.queued: "Job released and queued again.",
            }[status]
            level = "error" if status is JobStatus.failed else "info"
            session.add(
                JobEventRow(job_id=lease.job_id, created_at=now(), level=level, stage=job.stage, message=text)
            )

    def release(self, lease: Lease, reason: str) -> None:
        """Give a running job back to the queue (worker shutting down): it will run again, resuming."""
        with session_scope(self.engine) as session:
            job = self._fenced(session, lease)
            job.status = JobStatus.queued
            job.lease_owner = None
            job.lease_expires_at = None
            session.add(job)
            session.add(
                JobEventRow(
                    job_id=lease.job_id, created_at=now(), level="warning", stage=job.stage, message=reason
                )
            )

    # ------------------------------------------------------------------ the run

    def run(self, job_id: str, *, resume: bool = True) -> JobStatus | None:
        """Run a queued job to a final state. Returns the final status, or None if the job was not ours.

        ``resume``: continue from the job's newest usable checkpoint (see :meth:`resume_plan`) when an earlier
        attempt left one; False starts over (its checkpoints are replaced as the new run writes its own).
        Returns ``queued`` when the job was handed back to run again (worker stopping, or a crashed child
        with tries left); the caller (or the reconciler) enqueues it.
        """
        lease = self.acquire(job_id)
        if lease is None:
            return None
        keeper_stop = threading.Event()
        keeper = threading.Thread(
            target=self._keep_lease, args=(lease, keeper_stop), name=f"lease-{job_id}", daemon=True
        )
        keeper.start()
        try:
            return self._run_leased(lease, resume=resume)
        except LeaseLost:
            log.warning("lease on %s lost; leaving the job to its new owner", job_id)
            return None
        finally:
            keeper_stop.set()
            keeper.join()

    def _keep_lease(self, lease: Lease, stop: threading.Event) -> None:
        """Extend the lease every heartbeat from its own thread, for the whole attempt.

        A thread of its own, because the relay loop is not the only long step: downloading a base model,
        uploading an artifact or a checkpoint can each outlast the lease, and a lease that lapses meanwhile
        hands a healthy job to another worker.
        """
        while not stop.wait(self.heartbeat_seconds):
            try:
                if self.heartbeat(lease):
                    lease.cancel_requested.set()
            except LeaseLost:
                lease.lost.set()
                return
            except Exception as exc:  # a database blip: the lease has slack, try again next beat
                log.warning("heartbeat for %s failed: %s", lease.job_id, exc)

    def _run_leased(self, lease: Lease, *, resume: bool = True) -> JobStatus | None:
        attempt_dir = self.settings.work_dir / "jobs" / lease.job_id / f"attempt-{lease.token}"
        shutil.rmtree(attempt_dir, ignore_errors=True)
        attempt_dir.mkdir(parents=True)
        try:
            with session_scope(self.engine) as session:
                job = self._fenced(session, lease)  # detached afterwards; expire_on_commit is off
            if job.cancel_requested:
                self.finish(lease, JobStatus.cancelled)
                return JobStatus.cancelled
            if job.attempts > 1:  # an earlier attempt may have died between an upload and its row
                self._sweep_orphans(lease)
            self.add_event(lease, f"Job started on worker {self.worker_id} (attempt {job.attempts}).")
            try:
                spec = self._prepare(job, attempt_dir, lease=lease, resume=resume)
            except InputMissing as exc:
                self.finish(lease, JobStatus.failed, error=("input_missing", str(exc)))
                return JobStatus.failed
            return self._supervise(lease, spec, attempt_dir)
        finally:
            # Outputs were uploaded; the log stays for post-mortems until the next attempt.
            for child in ("out", "spec.json", "resume"):
                target = attempt_dir / child
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)

    def _prepare(
        self, job: JobRow, attempt_dir: Path, *, lease: Lease | None = None, resume: bool = True
    ) -> TrainingSpec:
        with session_scope(self.engine) as session:
            model = session.exec(select(ModelRow).where(ModelRow.id == job.base_model)).first()
            if model is None:
                raise InputMissing(f"base model {job.base_model} no longer exists")
            model_ref = BaseModelRef(id=model.id, name=model.name, path=str(self._materialise_model(model)))
            datasets: dict[str, DatasetRef] = {}
            for role, dataset_id in job.datasets.items():
                row = session.exec(select(DatasetRow).where(DatasetRow.id == dataset_id)).first()
                if row is None:
                    raise InputMissing(f"dataset {dataset_id} no longer exists")
                path = self._materialise_dataset(row)
                if role == "preference" and row.kind == "ranking":
                    datasets[role] = self._expanded_ranking(row, path)
                    continue
                datasets[role] = DatasetRef(
                    id=row.id,
                    name=row.name,
                    kind=row.kind,
                    sha256=row.sha256,
                    num_records=row.num_records,
                    path=str(path),
                )
            adapters: dict[str, AdapterRef | None] = {}
            for field in ("init_adapter", "reward_model", "init_reward_model"):
                artifact_id = getattr(job, field)
                if artifact_id is None:
                    adapters[field] = None
                    continue
                artifact = session.exec(select(ArtifactRow).where(ArtifactRow.id == artifact_id)).first()
                if artifact is None:
                    raise InputMissing(f"artifact {artifact_id} no longer exists")
                adapters[field] = AdapterRef(id=artifact.id, path=str(self._materialise_artifact(artifact)))
        resume_from: ResumeRef | None = None
        stage_artifacts: dict[str, AdapterRef] = {}
        if lease is not None:
            plan, folder = self._resume_plan_fetched(job, attempt_dir) if resume else (None, None)
            plan = plan or ResumePlan(None, None, 0, False, (), {})
            self._discard_redone_work(lease, job, plan)
            if plan.checkpoint is not None and folder is not None and plan.stage is not None:
                resume_from = ResumeRef(
                    path=str(folder), stage=plan.stage, step=plan.step, stage_complete=plan.stage_complete
                )
                for stage, output in plan.stage_outputs.items():
                    stage_artifacts[stage] = AdapterRef(
                        id=output.id, path=str(self._materialise_artifact(output))
                    )
                self.add_event(
                    lease,
                    f"Resuming from checkpoint {plan.checkpoint.id}: stage {plan.stage}, step {plan.step}"
                    + (" (stage complete)" if plan.stage_complete else "")
                    + (
                        f"; reusing the stored outputs of {', '.join(plan.done_stages)}"
                        if plan.done_stages
                        else ""
                    )
                    + ".",
                    stage=plan.stage,
                )
        output_dir = attempt_dir / "out"
        output_dir.mkdir()
        spec = TrainingSpec(
            job_id=job.id,
            method=job.method,
            base_model=model_ref,
            datasets=datasets,
            init_adapter=adapters["init_adapter"],
            init_reward_model=adapters["init_reward_model"],
            reward_model=adapters["reward_model"],
            lora=job.lora,
            hyperparameters=job.hyperparameters,
            seed=job.seed,
            output_dir=str(output_dir),
            checkpoint_dir=str(self._checkpoint_dir(job.id)),
            resume_from=resume_from,
            stage_artifacts=stage_artifacts,
        )
        (attempt_dir / "spec.json").write_text(spec.model_dump_json(indent=2), encoding="utf-8")
        return spec

    # ------------------------------------------------------------------ checkpoints and resume

    checkpoints_kept = 2  # newest checkpoints kept in storage per job; older ones are deleted

    def _checkpoint_dir(self, job_id: str) -> Path:
        return self.settings.work_dir / "jobs" / job_id / "checkpoints"

    def checkpoints(self, job_id: str) -> list[ArtifactRow]:
        """The job's stored checkpoints, newest first (their metadata: stage, step, stage_complete)."""
        with session_scope(self.engine) as session:
            return list(
                session.exec(
                    select(ArtifactRow)
                    .where(ArtifactRow.job_id == job_id, ArtifactRow.kind == "checkpoint")
                    .order_by(col(ArtifactRow.seq).desc())
                ).all()
            )

    def resume_plan(self, job: JobRow) -> list[ResumePlan]:
        """Every checkpoint of ``job`` a new attempt could start from, best (newest) first.

        A checkpoint of stage S at step k is usable when every stage before S (and S itself when the
        checkpoint marks S complete) has its output artifact stored: the attempt skips those stages, and
        resumes S from step k (or starts the next stage). Download problems are handled by the caller, which
        falls back to the next plan.
        """
        stages = job_stages(job.method)
        with session_scope(self.engine) as session:
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
        for row in self.checkpoints(job.id):
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

    def _resume_plan_fetched(self, job: JobRow, attempt_dir: Path) -> tuple[ResumePlan | None, Path | None]:
        """The best plan whose checkpoint downloads and unpacks complete, with its local folder."""
        for plan in self.resume_plan(job):
            assert plan.checkpoint is not None
            folder = attempt_dir / "resume" / plan.checkpoint.id
            try:
                self._extract_artifact(plan.checkpoint, folder)
                json.loads((folder / CHECKPOINT_META_FILE).read_text(encoding="utf-8"))
            except Exception as exc:  # missing object, corrupt archive, storage hiccup: try an older one
                log.warning(
                    "checkpoint %s of %s unusable (%s); trying an older one", plan.checkpoint.id, job.id, exc
                )
                shutil.rmtree(folder, ignore_errors=True)
                continue
            return plan, folder
        return None, None

    def _discard_redone_work(self, lease: Lease, job: JobRow, plan: ResumePlan) -> None:
        """Delete what the new attempt produces again: outputs of stages it reruns, metrics past the resume point.

        Earlier attempts' metric points after the checkpoint's step would otherwise appear twice; the series
        then describes the one run that produced the final artifacts (the events keep every attempt's story).
        """
        stages = job_stages(job.method)
        kept = set(plan.done_stages)
        redo = [s for s in stages if s not in kept]
        keys: list[str] = []
        with session_scope(self.engine) as session:
            self._fenced(session, lease)
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
                keys.extend(self._delete_checkpoint_rows(session, job.id))
        self._delete_objects(keys)

    def _extract_artifact(self, artifact: ArtifactRow, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        archive = folder.parent / f"{artifact.id}.tar.gz"
        try:
            self.store.get_to_path(artifact.storage_key, archive)
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(folder, filter="data")
        finally:
            archive.unlink(missing_ok=True)

    def _store_checkpoint(self, lease: Lease, message: dict[str, Any]) -> None:
        folder = Path(str(message["path"]))
        metadata = {
            "stage": message.get("stage"),
            "step": int(message.get("step", 0)),
            "stage_complete": bool(message.get("stage_complete", False)),
        }
        self._store_artifact(lease, {**message, "kind": "checkpoint", "metadata": metadata})
        # Stored: the child never reads the local folder again, and a resume fetches from storage.
        shutil.rmtree(folder, ignore_errors=True)
        self._prune_checkpoints(lease)

    def _prune_checkpoints(self, lease: Lease) -> None:
        with session_scope(self.engine) as session:
            self._fenced(session, lease)
            rows = session.exec(
                select(ArtifactRow)
                .where(ArtifactRow.job_id == lease.job_id, ArtifactRow.kind == "checkpoint")
                .order_by(col(ArtifactRow.seq).desc())
            ).all()
            stale = list(rows[self.checkpoints_kept :])
            keys = [row.storage_key for row in stale]
            for row in stale:
                session.delete(row)
        self._delete_objects(keys)

    def drop_checkpoints(self, lease: Lease) -> None:
        """Delete every checkpoint of a job about to succeed (nothing resumes it), rows then objects.

        Before the job is marked succeeded, so no reader sees a succeeded job still listing checkpoints or
        holding their objects. (Failed and cancelled jobs keep theirs.)
        """
        with session_scope(self.engine) as session:
            self._fenced(session, lease)
            keys = self._delete_checkpoint_rows(session, lease.job_id)
        self._delete_objects(keys)
        shutil.rmtree(self._checkpoint_dir(lease.job_id), ignore_errors=True)

    @staticmethod
    def _delete_checkpoint_rows(session: Any, job_id: str) -> list[str]:
        rows = session.exec(
            select(ArtifactRow).where(ArtifactRow.job_id == job_id, ArtifactRow.kind == "checkpoint")
        ).all()
        for row in rows:
            session.delete(row)
        return [row.storage_key for row in rows]

    def _sweep_orphans(self, lease: Lease) -> None:
        """Delete the job's objects that no row references, holding the job's row (and so its lease)."""
        try:
            with session_scope(self.engine) as session:
                # Locked and fenced for the whole sweep: a lease that lapsed cannot pass to a new worker
                # whose fresh upload, not yet given its row, the sweep would take for an orphan.
                self._fenced(session, lease)
                sweep_orphan_objects(session, self.store, lease.job_id)
        except LeaseLost:
            raise
        except Exception as exc:  # an orphaned object costs space, not correctness: never fail a job on it
            log.warning("could not sweep orphan artifact objects of %s: %s", lease.job_id, exc)

    def _delete_objects(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.store.delete(key)
            except Exception as exc:  # an orphaned object costs space, not correctness
                log.warning("could not delete artifact object %s: %s", key, exc)

    # Inputs are immutable once uploaded, so a folder completed once (marker written last) is reused.
    def _cache_dir(self, kind: str, resource_id: str) -> Path:
        return self.settings.data_dir / "cache" / kind / resource_id

    def _materialise_model(self, model: ModelRow) -> Path:
        folder = self._cache_dir("models", model.id)
        with self._cache_lock:
            if (folder / ".complete").exists():
                return folder
            folder.mkdir(parents=True, exist_ok=True)
            for filename in model.files:
                self.store.get_to_path(model_key(model.id, filename), folder / filename)
            (folder / ".complete").touch()
        return folder

    def _materialise_dataset(self, dataset: DatasetRow) -> Path:
        local = self.store.local_path(dataset_key(dataset.id))
        if local is not None:
            return local
        path = self._cache_dir("datasets", dataset.id) / "data.jsonl"
        with self._cache_lock:
            if not path.exists():
                self.store.get_to_path(dataset_key(dataset.id), path)
        return path

    def _materialise_artifact(self, artifact: ArtifactRow) -> Path:
        folder = self._cache_dir("artifacts", artifact.id)
        with self._cache_lock:
            if (folder / ".complete").exists():
                return folder
            folder.mkdir(parents=True, exist_ok=True)
            archive = folder.parent / f"{artifact.id}.tar.gz"
            self.store.get_to_path(artifact.storage_key, archive)
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(folder, filter="data")  # written by us, but never trust paths blindly
            archive.unlink()
            (folder / ".complete").touch()
        return folder

    def _child_command(self, spec_path: Path) -> list[str]:
        python = self.settings.training_python or sys.executable
        return [python, "-m", "workers.training", str(spec_path)]

    def _supervise(self, lease: Lease, spec: TrainingSpec, attempt_dir: Path) -> JobStatus | None:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if self.settings.torch_threads:
            env["ALIGND_TORCH_THREADS"] = str(self.settings.torch_threads)
        # The child must import the same `workers` package as this process, installed or not.
        project_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [project_root, env.get("PYTHONPATH")]))
        log_path = attempt_dir / "child.log"
        with open(log_path, "w", encoding="utf-8") as log_file:
            child = subprocess.Popen(
                self._child_command(attempt_dir / "spec.json"),
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env=env,
                cwd=attempt_dir,
                start_new_session=True,  # its own process group: cancel reaches grandchildren too
            )
        with self._children_lock:
            self._children.add(child)
        try:
            return self._relay(lease, spec, child, log_path)
        finally:
            with self._children_lock:
                self._children.discard(child)
            if child.poll() is None:
                _signal_group(child, signal.SIGKILL)
                child.wait()

    def _relay(
        self, lease: Lease, spec: TrainingSpec, child: subprocess.Popen[str], log_path: Path
    ) -> JobStatus | None:
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, name=f"relay-{lease.job_id}", daemon=True).start()
        self.add_event(lease, f"Training process started (pid {child.pid}).")
        error: tuple[str, str] | None = None
        abort_error: tuple[str, str] | None = None
        cancel_sent_at: float | None = None
        stop_sent = False
        eof = False
        while not eof:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                line = ""
            if line is None:
                eof = True
            elif line:
                message = parse_line(line)
                if message is not None:
                    if message["type"] == "error":
                        error = (str(message.get("code", "training_error")), str(message.get("message", "")))
                    self._handle(lease, message)
            if lease.lost.is_set():
                raise LeaseLost(lease.job_id)  # _supervise kills the child on the way out
            if lease.job_id in self._aborts and abort_error is None:
                abort_error = self._aborts[lease.job_id]
                self.add_event(lease, f"{abort_error[1]} Stopping the training process.", level="error")
                _signal_group(child, signal.SIGTERM)
                cancel_sent_at = time.monotonic()
            if lease.cancel_requested.is_set() and cancel_sent_at is None:
                self.add_event(lease, "Cancel requested: stopping the training process.", level="warning")
                _signal_group(child, signal.SIGTERM)
                cancel_sent_at = time.monotonic()
            if self._stopping.is_set() and not stop_sent:
                _signal_group(child, signal.SIGTERM)
                stop_sent = True
            if (
                cancel_sent_at is not None
                and time.monotonic() - cancel_sent_at > self.settings.cancel_grace_seconds
            ):
                _signal_group(child, signal.SIGKILL)
        returncode = child.wait()
        # An abort raised while handling the last lines (a rejected generated dataset) lands after EOF.
        abort_error = abort_error or self._aborts.get(lease.job_id)
        if abort_error is not None:
            self._aborts.pop(lease.job_id, None)
            self.finish(lease, JobStatus.failed, error=abort_error)
            return JobStatus.failed
        if cancel_sent_at is not None:
            self.finish(lease, JobStatus.cancelled)
            return JobStatus.cancelled
        if self._stopping.is_set():
            self.release(lease, "Worker shutting down; the job will run again.")
            return JobStatus.queued
        if returncode == 0:
            self.drop_checkpoints(lease)
            self.finish(lease, JobStatus.succeeded)
            return JobStatus.succeeded
        if error is None and returncode < 0:
            # Killed by a signal nobody here sent (the OOM killer, an operator, a node problem): a crash, not
            # a verdict on the job. Run it again, resuming from its newest checkpoint, while tries are left.
            name = _signal_name(-returncode)
            attempts = self._attempts(lease)
            if attempts < self.settings.job_max_tries:
                self.release(
                    lease,
                    f"Training process killed by {name} (attempt {attempts} of {self.settings.job_max_tries}); "
                    "queued again to resume from its newest checkpoint.",
                )
                return JobStatus.queued
            error = (
                "training_crashed",
                f"training process killed by {name} in attempt {attempts}, the last of "
                f"ALIGND_JOB_MAX_TRIES={self.settings.job_max_tries}. Last output:\n{_tail(log_path, 20)}",
            )
        if error is None:
            tail = _tail(log_path, 20)
            error = (
                "training_crashed",
                f"training process exited with code {returncode}. Last output:\n{tail}",
            )
        self.finish(lease, JobStatus.failed, error=error)
        return JobStatus.failed

    def _attempts(self, lease: Lease) -> int:
        with session_scope(self.engine) as session:
            return int(self._fenced(session, lease).attempts)

    def _handle(self, lease: Lease, message: dict[str, Any]) -> None:
        kind = message["type"]
        stage = message.get("stage")
        if kind == "event":
            self.add_event(
                lease, str(message.get("message", "")), level=str(message.get("level", "info")), stage=stage
            )
        elif kind == "metric":
            if self.on_metric is not None:
                for name, value in (message.get("values") or {}).items():
                    with contextlib.suppress(TypeError, ValueError):
                        self.on_metric(lease.job_id, str(name), float(value))
            with session_scope(self.engine) as session:
                job = self._fenced(session, lease)
                created = now()
                for name, value in (message.get("values") or {}).items():
                    session.add(
                        JobMetricRow(
                            job_id=lease.job_id,
                            stage=stage or job.stage,
                            step=int(message.get("step", 0)),
                            name=str(name)[:64],
                            value=float(value),
                            created_at=created,
                        )
                    )
        elif kind == "progress":
            with session_scope(self.engine) as session:
                job = self._fenced(session, lease)
                job.progress = float(message.get("progress", job.progress))
                if stage:
                    job.stage = stage
                session.add(job)
        elif kind == "artifact":
            self._store_artifact(lease, message)
        elif kind == "checkpoint":
            self._store_checkpoint(lease, message)
        elif kind == "dataset":
            self._store_dataset(lease, message)
        elif kind == "error":
            self.add_event(
                lease, f"{message.get('code')}: {message.get('message')}", level="error", stage=stage
            )

    # --- datasets in and out (feedback rounds)

    def _expanded_ranking(self, row: DatasetRow, path: Path) -> DatasetRef:
        """A ``ranking`` dataset in the ``preference`` role, as the (better, worse) pairs the trainers read.

        Expanded once per dataset into the input cache (inputs are immutable); each pair keeps its source line
        as ``group`` so the reward trainer can keep one prompt's pairs in one batch.
        """
        folder = self._cache_dir("datasets", row.id)
        folder.mkdir(parents=True, exist_ok=True)
        pairs = folder / "pairs.jsonl"
        if not pairs.exists():  # expand_file renames into place: an existing file is complete
            ranking.expand_file(path, pairs)
        digest = hashlib.sha256()
        count = 0
        with open(pairs, "rb") as handle:
            for line in handle:
                digest.update(line)
                count += 1
        return DatasetRef(
            id=row.id,
            name=row.name,
            kind="preference",
            sha256=digest.hexdigest(),
            num_records=count,
            path=str(pairs),
            source_kind="ranking",
        )

    def _store_dataset(self, lease: Lease, message: dict[str, Any]) -> None:
        """A dataset the child wrote (``generate``'s candidates): checked with the upload rules, then stored."""
        kind = str(message.get("kind"))
        try:
            with session_scope(self.engine) as session:
                job = self._fenced(session, lease)
                tenant, job_round, stage = job.tenant, job.round, message.get("stage") or job.stage
            with Session(self.engine, expire_on_commit=False) as session:
                row = add_dataset_file(
                    session,
                    self.store,
                    Path(str(message["path"])),
                    tenant=tenant,
                    kind=kind,
                    name=str(message.get("name") or f"{kind} from {lease.job_id}"),
                    max_bytes=self.settings.max_dataset_bytes,
                    job_id=lease.job_id,
                    round=job_round,
                )
        except (AlignError, OSError, KeyError) as exc:
            text = exc.message if isinstance(exc, AlignError) else str(exc)
            details = getattr(exc, "details", [])[:3]
            self._aborts[lease.job_id] = (
                "invalid_output",
                f"The generated {kind} dataset was refused: {text} {details}",
            )
            return
        self.add_event(
            lease,
            f"Stored {kind} dataset {row.id} ({row.num_records} records, {row.size_bytes} bytes).",
            stage=stage,
        )

    def _store_artifact(self, lease: Lease, message: dict[str, Any]) -> None:
        folder = Path(str(message["path"]))
        artifact_id = new_id("artifact")
        archive = folder.parent / f"{artifact_id}.tar.gz"
        size, sha256 = pack_folder(folder, archive)
        key = artifact_key(lease.job_id, artifact_id)
        self.store.put_file(key, archive)
        archive.unlink()
        try:
            with session_scope(self.engine) as session:
                job = self._fenced(session, lease)
                session.add(
                    ArtifactRow(
                        id=artifact_id,
                        tenant=job.tenant,
                        job_id=job.id,
                        stage=message.get("stage") or job.stage,
                        kind=str(message["kind"]),
                        size_bytes=size,
                        sha256=sha256,
                        storage_key=key,
                        meta=dict(message.get("metadata") or {}),
                        created_at=now(),
                    )
                )
                session.add(
                    JobEventRow(
                        job_id=job.id,
                        created_at=now(),
                        level="info",
                        stage=message.get("stage") or job.stage,
                        message=f"Stored {message['kind']} artifact {artifact_id} ({size} bytes)"
                        + (f" at step {message.get('step')}." if message["kind"] == "checkpoint" else "."),
                    )
                )
        except LeaseLost:
            self.store.delete(key)  # not ours to publish any more
            raise


class InputMissing(Exception):
    pass


def _signal_group(child: subprocess.Popen[str], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, sig)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(path: Path, count: int) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=count)).strip()
    except OSError:
        return ""
