"""Runs one job: lease it, fetch its inputs, spawn the training child, relay its output, store artifacts, finish.

The job row is the truth. This module orchestrates one attempt; each step lives in its own module:

- ``workers/lease.py``: the lease (compare-and-set, fencing token, heartbeat) and every write made under it;
- ``workers/inputs.py``: base model, datasets and adapters on local disk, and the TrainingSpec;
- ``workers/resume.py``: which checkpoint the attempt resumes from, and clearing the work it redoes;
- ``workers/supervise.py``: the child process, its stdout protocol relay, SIGTERM/SIGKILL, its log;
- ``workers/outputs.py``: artifacts, checkpoints and generated datasets into storage; the orphan sweep.

No torch here: training happens in ``python -m workers.training spec.json`` (see contract/protocol.py).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from contract.protocol import PAUSE_FLAG_FILE, TrainingSpec
from contract.resources import EXIT_RANK_LOST, resources_of
from service.core.jobs import JobStatus
from service.db.artifacts import drop_checkpoints
from service.db.tables import JobRow
from service.settings import Settings
from service.storage import ArtifactStore
from workers import lease as leases
from workers import outputs, supervise
from workers.capacity import WAITING_FOR_CAPACITY, Capacity, Reservation
from workers.inputs import InputCache, InputMissing, fetch_inputs, write_spec
from workers.lease import Lease, LeaseLost
from workers.resume import start_point

log = logging.getLogger(__name__)

# The lease and heartbeat come from Settings.lease_seconds / heartbeat_seconds (tests shorten them).


class JobRunner:
    def __init__(self, *, settings: Settings, engine: Engine, store: ArtifactStore, worker_id: str) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.worker_id = worker_id
        self._stopping = threading.Event()
        self._children = supervise.Children()
        # job id -> error: jobs to stop and fail (the arq worker's job_timeout), read at each heartbeat.
        self._aborts: dict[str, tuple[str, str]] = {}
        self._inputs = InputCache(settings.data_dir / "cache")
        # Training processes (or GPUs) this worker runs at once over its jobs; job id -> what it holds.
        self.capacity = Capacity.from_settings(settings)
        self._reservations: dict[str, Reservation] = {}
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
        self._children.terminate_all()

    def abort(self, job_id: str, code: str, message: str) -> None:
        """Stop a job this runner is running and mark it failed with ``code`` (e.g. the arq job timeout)."""
        self._aborts[job_id] = (code, message)

    # ------------------------------------------------------------------ lease and fenced writes

    def acquire(self, job_id: str) -> Lease | None:
        """Take the job if it is queued (compare-and-set on status). None when someone else has it."""
        return leases.acquire(self.engine, job_id, owner=self.worker_id, lease_seconds=self.lease_seconds)

    def heartbeat(self, lease: Lease) -> bool:
        """Extend the lease; returns whether a cancel was requested. Raises LeaseLost."""
        return leases.heartbeat(self.engine, lease, lease_seconds=self.lease_seconds)

    def add_event(self, lease: Lease, message: str, *, level: str = "info", stage: str | None = None) -> None:
        leases.add_event(self.engine, lease, message, level=level, stage=stage)

    def finish(self, lease: Lease, status: JobStatus, *, error: tuple[str, str] | None = None) -> None:
        # The attempt's child is gone and every upload it asked for has its row: sweep what a killed earlier
        # attempt, or a checkpoint prune cut short, left behind before the job is seen to end.
        self._sweep_orphans(lease)
        leases.end(self.engine, lease, status, error=error)

    def release(self, lease: Lease, reason: str) -> None:
        """Give a running job back to the queue (worker shutting down): it will run again, resuming."""
        leases.release(self.engine, lease, reason)

    def _sweep_orphans(self, lease: Lease) -> None:
        outputs.sweep_orphans(self.engine, self.store, lease)

    def _store_artifact(self, lease: Lease, message: dict[str, Any]) -> None:
        outputs.store_artifact(self.engine, self.store, lease, message)

    # ------------------------------------------------------------------ the run

    def run(self, job_id: str, *, resume: bool = True) -> JobStatus | None:
        """Run a queued job to a final state. Returns the final status, or None if the job was not ours or
        does not fit in this worker's free capacity (it stays queued with a ``waiting_for_capacity`` event).

        ``resume``: continue from the job's newest usable checkpoint (see ``workers/resume.py``) when an
        earlier attempt left one; False starts over (its checkpoints are replaced as the new run writes its
        own). Returns ``queued`` when the job was handed back to run again (worker stopping, or a crashed
        child with tries left); the caller (or the reconciler) enqueues it.
        """
        hyperparameters = leases.queued_hyperparameters(self.engine, job_id)
        if hyperparameters is None:
            return None
        processes = resources_of(hyperparameters).processes
        reservation = self.capacity.reserve(processes)
        if reservation is None:
            # Not taken: it stays queued and the reconciler hands it out again (here or to a larger worker).
            message = self.capacity.waiting_message(processes, self.worker_id)
            leases.note_waiting(self.engine, job_id, message, prefix=WAITING_FOR_CAPACITY)
            log.info("job %s: %s", job_id, message)
            return None
        try:
            return self._run_reserved(job_id, reservation, resume=resume)
        finally:
            self.capacity.release(reservation)

    def _run_reserved(self, job_id: str, reservation: Reservation, *, resume: bool) -> JobStatus | None:
        lease = self.acquire(job_id)
        if lease is None:
            return None
        self._reservations[job_id] = reservation
        keeper_stop = threading.Event()
        keeper = threading.Thread(
            target=leases.keep_lease,
            args=(self.heartbeat, lease, keeper_stop),
            kwargs={"every_seconds": self.heartbeat_seconds},
            name=f"lease-{job_id}",
            daemon=True,
        )
        keeper.start()
        try:
            return self._run_leased(lease, resume=resume)
        except LeaseLost:
            log.warning("lease on %s lost; leaving the job to its new owner", job_id)
            return None
        finally:
            self._reservations.pop(job_id, None)
            keeper_stop.set()
            keeper.join()

    def _run_leased(self, lease: Lease, *, resume: bool = True) -> JobStatus | None:
        attempt_dir = self.settings.work_dir / "jobs" / lease.job_id / f"attempt-{lease.token}"
        shutil.rmtree(attempt_dir, ignore_errors=True)
        attempt_dir.mkdir(parents=True)
        try:
            job = leases.fenced_job(self.engine, lease)
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

    def _prepare(self, job: JobRow, attempt_dir: Path, *, lease: Lease, resume: bool = True) -> TrainingSpec:
        inputs = fetch_inputs(self.engine, self.store, self._inputs, job)
        resume_from, stage_artifacts = start_point(
            self.engine, self.store, self._inputs, lease, job, attempt_dir, resume=resume
        )
        return write_spec(
            job,
            inputs,
            attempt_dir=attempt_dir,
            checkpoint_dir=self._checkpoint_dir(job.id),
            resume_from=resume_from,
            stage_artifacts=stage_artifacts,
        )

    def _checkpoint_dir(self, job_id: str) -> Path:
        return self.settings.work_dir / "jobs" / job_id / "checkpoints"

    def _supervise(self, lease: Lease, spec: TrainingSpec, attempt_dir: Path) -> JobStatus | None:
        log_path = attempt_dir / "child.log"
        reservation = self._reservations.get(lease.job_id)
        child = self._children.spawn(
            supervise.child_command(
                self.settings, attempt_dir / "spec.json", processes=spec.resources.processes
            ),
            env={**supervise.child_env(self.settings), **(reservation.child_env() if reservation else {})},
            cwd=attempt_dir,
            log_path=log_path,
        )
        try:
            self.add_event(
                lease,
                f"Training process started (pid {child.pid})."
                if spec.resources.processes == 1
                else f"Training launcher started (pid {child.pid}): torchrun with "
                f"{spec.resources.processes} processes.",
            )
            end = supervise.relay(
                child,
                lease,
                handle=lambda message: self._handle(lease, message),
                announce=lambda message, level: self.add_event(lease, message, level=level),
                stops=supervise.StopRequests(
                    abort=lambda: self._aborts.get(lease.job_id),
                    stopping=self._stopping,
                    cancel_grace_seconds=self.settings.cancel_grace_seconds,
                    mark_pause=lambda: (attempt_dir / PAUSE_FLAG_FILE).touch(),
                ),
            )
        finally:
            self._children.reap(child)
        return self._settle(lease, end, log_path)

    def _settle(self, lease: Lease, end: supervise.ChildExit, log_path: Path) -> JobStatus:
        """The job's status after its child ended: finished, failed, or queued again to resume."""
        if end.abort is not None:
            self._aborts.pop(lease.job_id, None)
            self.finish(lease, JobStatus.failed, error=end.abort)
            return JobStatus.failed
        if end.cancelled or (end.paused and lease.cancel_requested.is_set()):
            self.finish(lease, JobStatus.cancelled)
            return JobStatus.cancelled
        # Exit 0: it finished before it read the signal (it succeeds below); an error line: it failed anyway.
        if end.paused and end.returncode != 0 and end.error is None:
            return leases.pause(self.engine, lease)
        if self._stopping.is_set():
            self.release(lease, "Worker shutting down; the job will run again.")
            return JobStatus.queued
        if end.returncode == 0:
            # An earlier attempt's leftovers (objects without a row) go before the job is seen succeeded,
            # waiting out a store outage under the lease; then the success; then its checkpoints, which a kill
            # before the success would have taken from a job its retry must resume (drop_checkpoints).
            outputs.sweep_orphans_when_reachable(
                self.engine, self.store, lease, give_up=lambda: self._stopping.is_set() or lease.lost.is_set()
            )
            leases.end(self.engine, lease, JobStatus.succeeded)
            try:
                drop_checkpoints(self.engine, self.store, lease.job_id)
            except Exception as exc:  # the job has succeeded; the reconciler drops what is left
                log.warning("could not drop the checkpoints of %s: %s", lease.job_id, exc)
            shutil.rmtree(self._checkpoint_dir(lease.job_id), ignore_errors=True)
            return JobStatus.succeeded
        error = end.error
        if end.returncode == EXIT_RANK_LOST or (error is None and end.returncode < 0):
            # Killed by a signal nobody here sent (the OOM killer, an operator, a node problem), or one rank of
            # a torchrun job was (the launcher's exit 75; the other ranks then fail on their collectives and
            # may print an error line): a crash, not a verdict on the job. Run it again, resuming from its
            # newest checkpoint, while tries are left.
            name = (
                "a signal to one of its ranks"
                if end.returncode == EXIT_RANK_LOST
                else supervise.signal_name(-end.returncode)
            )
            attempts = leases.attempts(self.engine, lease)
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
                f"ALIGND_JOB_MAX_TRIES={self.settings.job_max_tries}. Last output:\n"
                f"{supervise.tail(log_path, 20)}",
            )
        if error is None:
            error = (
                "training_crashed",
                f"training process exited with code {end.returncode}. Last output:\n{supervise.tail(log_path, 20)}",
            )
        self.finish(lease, JobStatus.failed, error=error)
        return JobStatus.failed

    def _handle(self, lease: Lease, message: dict[str, Any]) -> None:
        """One protocol message from the child: recorded under the lease, or its output stored."""
        kind = message["type"]
        stage = message.get("stage")
        if kind == "event":
            self.add_event(
                lease, str(message.get("message", "")), level=str(message.get("level", "info")), stage=stage
            )
        elif kind == "metric":
            values = message.get("values") or {}
            if self.on_metric is not None:
                for name, value in values.items():
                    with contextlib.suppress(TypeError, ValueError):
                        self.on_metric(lease.job_id, str(name), float(value))
            leases.add_metrics(self.engine, lease, values, step=message.get("step", 0), stage=stage)
        elif kind == "progress":
            leases.set_progress(self.engine, lease, message, stage=stage)
        elif kind == "monitor":
            leases.add_monitor(self.engine, lease, message, stage=stage)
        elif kind == "artifact":
            refused = outputs.refused_artifact(message)
            if refused is not None:
                self._aborts[lease.job_id] = refused
            else:
                self._store_artifact(lease, message)
        elif kind == "checkpoint":
            outputs.store_checkpoint(self.engine, self.store, lease, message)
        elif kind == "dataset":
            refused = outputs.store_dataset(
                self.engine, self.store, lease, message, max_bytes=self.settings.max_dataset_bytes
            )
            if refused is not None:
                self._aborts[lease.job_id] = refused
        elif kind == "chat":
            outputs.store_chat(self.engine, lease, message)
        elif kind == "error":
            self.add_event(
                lease, f"{message.get('code')}: {message.get('message')}", level="error", stage=stage
            )
