"""The faults: SIGKILLs of workers and of training children, Redis killed -9 and restarted empty, at random
moments drawn from one seeded RNG, while a feeder keeps jobs queued and running.

A targeted kill waits until a training child has stored a new checkpoint since it started (so the kill
tests a resume, not a restart of a job that never got anywhere), then strikes at a random moment after
it; the victim is chosen among the stages that have been hit least so far, so SFT, the reward model and
PPO all get their share. A share of the worker kills strikes any worker at any moment instead: idle,
starting a child, loading the model, uploading.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import create_engine, func
from sqlmodel import Session, col, select

from service.db.tables import JobEventRow, JobRow
from tests.faults.services import FaultStack, TrainingChild, WorkerSlot, training_children


def _env_number(name: str, default: float) -> float:
    value = os.environ.get(f"ALIGND_FAULTS_{name}")
    return float(value) if value not in (None, "") else default


@dataclass(frozen=True)
class FaultPlan:
    """How much to break. Defaults: the short slice `make test` runs; `make faults` sets the targets."""

    worker_kills: int = 3
    child_kills: int = 2
    redis_kills: int = 2
    seed: int = 0
    budget_seconds: float | None = None  # stop striking after this long and report what was done
    rlhf_share: float = 0.0  # share of submitted jobs that are rlhf (SFT -> reward model -> PPO)
    outstanding: int = 4  # jobs kept queued or running while the faults go on
    any_time_share: float = 0.25  # worker kills that strike whatever the worker is doing

    @classmethod
    def from_env(cls) -> FaultPlan:
        """ALIGND_FAULTS_<FIELD> (upper case) overrides each field."""
        budget = _env_number("BUDGET_SECONDS", 0)
        return cls(
            worker_kills=int(_env_number("WORKER_KILLS", cls.worker_kills)),
            child_kills=int(_env_number("CHILD_KILLS", cls.child_kills)),
            redis_kills=int(_env_number("REDIS_KILLS", cls.redis_kills)),
            seed=int(_env_number("SEED", cls.seed)),
            budget_seconds=budget or None,
            rlhf_share=_env_number("RLHF_SHARE", cls.rlhf_share),
            outstanding=int(_env_number("OUTSTANDING", cls.outstanding)),
            any_time_share=_env_number("ANY_TIME_SHARE", cls.any_time_share),
        )


TERMINAL = ("succeeded", "failed", "cancelled")


class Probe:
    """Read-only queries on the job rows, for choosing victims and moments."""

    def __init__(self, database_url: str) -> None:
        self.engine = create_engine(database_url, pool_pre_ping=True)

    def stage(self, job_id: str) -> str:
        with Session(self.engine) as session:
            row = session.exec(select(JobRow.status, JobRow.stage).where(JobRow.id == job_id)).first()
        return "none" if row is None else (row[1] or f"before_stage ({row[0]})")

    def last_event_seq(self, job_id: str) -> int:
        with Session(self.engine) as session:
            value = session.exec(select(func.max(JobEventRow.seq)).where(JobEventRow.job_id == job_id)).one()
        return int(value or 0)

    def checkpoint_since(self, job_id: str, seq: int) -> bool:
        with Session(self.engine) as session:
            found = session.exec(
                select(JobEventRow.seq).where(
                    JobEventRow.job_id == job_id,
                    col(JobEventRow.seq) > seq,
                    col(JobEventRow.message).startswith("Stored checkpoint artifact"),
                )
            ).first()
        return found is not None

    def statuses(self, job_ids: list[str]) -> Counter[str]:
        if not job_ids:
            return Counter()
        with Session(self.engine) as session:
            rows = session.exec(select(JobRow.status).where(col(JobRow.id).in_(job_ids))).all()
        return Counter(rows)

    def close(self) -> None:
        self.engine.dispose()


@dataclass
class FaultLog:
    worker_kills: list[dict[str, Any]] = field(default_factory=list)
    child_kills: list[dict[str, Any]] = field(default_factory=list)
    redis_kills: list[dict[str, Any]] = field(default_factory=list)
    overlapping_attempts: list[str] = field(default_factory=list)
    children_outliving_worker: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        mid = [kill for kill in self.worker_kills if kill["jobs"]]
        return {
            "worker_kills": len(self.worker_kills),
            "worker_kills_mid_job": len(mid),
            "worker_kills_by_stage": dict(Counter(s for kill in mid for s in kill["stages"])),
            "child_kills": len(self.child_kills),
            "child_kills_by_stage": dict(Counter(kill["stage"] for kill in self.child_kills)),
            "redis_kills": len(self.redis_kills),
            "redis_kills_with_jobs_queued_and_running": sum(
                1 for kill in self.redis_kills if kill["queued"] and kill["running"]
            ),
            "overlapping_attempts": len(self.overlapping_attempts),
            "children_outliving_their_worker": len(self.children_outliving_worker),
        }


class Chaos:
    def __init__(self, stack: FaultStack, plan: FaultPlan, probe: Probe) -> None:
        self.stack = stack
        self.plan = plan
        self.probe = probe
        self.rng = random.Random(plan.seed)
        self.redis_rng = random.Random(plan.seed + 1)  # its own stream: the two loops run concurrently
        self.log = FaultLog()
        self.stop = threading.Event()
        self.job_ids: list[str] = []  # accepted jobs, appended by the feeder
        self._first_seen: dict[int, int] = {}  # child pid -> the job's last event seq when first seen
        self._stage_hits: Counter[str] = Counter()

    # ------------------------------------------------------------------ helpers

    def _slot_of(self, child: TrainingChild) -> WorkerSlot | None:
        return next((slot for slot in self.stack.workers if slot.pid == child.ppid), None)

    def _eligible(self) -> list[TrainingChild]:
        """Children that stored a checkpoint since this suite first saw them."""
        ready = []
        for child in training_children():
            if self._slot_of(child) is None:
                continue  # its worker was just killed: it is dying on its own
            if child.pid not in self._first_seen:
                self._first_seen[child.pid] = self.probe.last_event_seq(child.job_id)
            elif self.probe.checkpoint_since(child.job_id, self._first_seen[child.pid]):
                ready.append(child)
        return ready

    def _pick(self, children: list[TrainingChild]) -> tuple[TrainingChild, str]:
        staged = [(child, self.probe.stage(child.job_id)) for child in children]
        fewest = min(self._stage_hits[stage] for _, stage in staged)
        child, stage = self.rng.choice([pair for pair in staged if self._stage_hits[pair[1]] == fewest])
        self._stage_hits[stage] += 1
        return child, stage

    def _wait_for_victim(self) -> tuple[TrainingChild, str] | None:
        while not self.stop.is_set():
            ready = self._eligible()
            if ready:
                return self._pick(ready)
            self.stop.wait(0.3)
        return None

    def _next_kind(self) -> str | None:
        left = {
            "worker": self.plan.worker_kills - len(self.log.worker_kills),
            "child": self.plan.child_kills - len(self.log.child_kills),
        }
        kinds = [kind for kind, count in left.items() if count > 0]
        if not kinds:
            return None
        return self.rng.choices(kinds, weights=[left[k] for k in kinds])[0]

    # ------------------------------------------------------------------ strikes

    def kill_worker(self, slot: WorkerSlot, *, targeted: bool) -> None:
        children = [child for child in training_children() if child.ppid == slot.pid]
        stages = [self.probe.stage(child.job_id) for child in children]
        slot.sigkill()
        self.log.worker_kills.append(
            {
                "t": time.monotonic(),
                "worker": slot.index,
                "targeted": targeted,
                "jobs": [child.job_id for child in children],
                "stages": stages,
            }
        )
        self._check_children_die(children, slot)
        self.stop.wait(self.rng.uniform(0.2, 2.0))  # the node comes back after a moment
        slot.start()

    def _check_children_die(self, children: list[TrainingChild], slot: WorkerSlot) -> None:
        """Nobody signals the children of a SIGKILLed worker: they must go by themselves, at once."""
        deadline = time.monotonic() + 5
        alive = {child.pid for child in children}
        while alive and time.monotonic() < deadline:
            alive &= {child.pid for child in training_children()}
            time.sleep(0.1)
        for pid in alive:
            self.log.children_outliving_worker.append(f"child {pid} of killed worker {slot.index}")

    def kill_child(self, child: TrainingChild, stage: str) -> None:
        try:
            os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        self.log.child_kills.append({"t": time.monotonic(), "job": child.job_id, "stage": stage})

    # ------------------------------------------------------------------ loops (threads)

    def process_loop(self) -> None:
        while not self.stop.is_set() and (kind := self._next_kind()) is not None:
            self.stop.wait(self.rng.uniform(0.5, 3.0))
            if kind == "worker" and self.rng.random() < self.plan.any_time_share:
                live = [slot for slot in self.stack.workers if slot.pid is not None]
                if live:
                    self.kill_worker(self.rng.choice(live), targeted=False)
                continue
            victim = self._wait_for_victim()
            if victim is None:
                return
            child, stage = victim
            self.stop.wait(self.rng.uniform(0.0, 1.5))  # a random moment after its checkpoint
            if kind == "child":
                self.kill_child(child, stage)
            elif (slot := self._slot_of(child)) is not None:
                self.kill_worker(slot, targeted=True)

    def redis_loop(self) -> None:
        rng = self.redis_rng
        while not self.stop.is_set() and len(self.log.redis_kills) < self.plan.redis_kills:
            self.stop.wait(rng.uniform(1.0, 5.0))
            counts = self.probe.statuses(list(self.job_ids))
            while not self.stop.is_set() and not (counts["queued"] and counts["running"]):
                self.stop.wait(0.3)
                counts = self.probe.statuses(list(self.job_ids))
            if self.stop.is_set():
                return
            down = rng.uniform(0.2, 2.0)
            self.stack.redis.stop()  # SIGKILL, no save: it comes back empty
            self.stop.wait(down)
            self.stack.redis.start()
            self.log.redis_kills.append(
                {
                    "t": time.monotonic(),
                    "queued": counts["queued"],
                    "running": counts["running"],
                    "down_seconds": round(down, 2),
                }
            )

    def sample_loop(self) -> None:
        """Two live training processes of one job would be two attempts at once: a duplicate run."""
        while not self.stop.wait(0.5):
            mine = set(self.job_ids)
            per_job = Counter(child.job_id for child in training_children() if child.job_id in mine)
            for job_id, count in per_job.items():
                if count > 1:
                    self.log.overlapping_attempts.append(f"{job_id}: {count} training processes")


def wait_until_ended(probe: Probe, job_ids: list[str], timeout: float) -> None:
    """Until every job is in a final state (the audit then says which did not succeed), or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            counts = probe.statuses(job_ids)
        except Exception:  # the database restarting: look again
            counts = Counter()
        if sum(counts[status] for status in TERMINAL) == len(job_ids):
            return
        time.sleep(0.5)
