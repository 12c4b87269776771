"""SIGKILLed workers and training children, and Redis killed -9 and restarted empty, while jobs run.

Every accepted job must end `succeeded` exactly once, each attempt after a kill resuming from the newest
checkpoint, with one set of artifacts in the bucket. Counts come from ALIGND_FAULTS_* (tests/faults/chaos.py):
the defaults are the short slice `make test` runs; `make faults` asks for the full targets.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx

from tests.faults.audit import audit
from tests.faults.chaos import Chaos, FaultPlan, Probe, wait_until_ended
from tests.faults.jobs import Inputs, random_job, submit, upload_inputs
from tests.faults.report import FaultResults
from tests.faults.services import FaultStack, training_children


def feed(client: httpx.Client, chaos: Chaos, inputs: Inputs, loops: list[threading.Thread]) -> None:
    """Keep ``plan.outstanding`` jobs queued or running until the fault loops are done (or the budget)."""
    plan = chaos.plan
    rng = random.Random(plan.seed + 2)
    started = last_report = time.monotonic()
    while any(loop.is_alive() for loop in loops):
        if plan.budget_seconds is not None and time.monotonic() - started > plan.budget_seconds:
            chaos.stop.set()
            break
        counts = chaos.probe.statuses(list(chaos.job_ids))
        if time.monotonic() - last_report > 60:  # a long run says how far it got
            last_report = time.monotonic()
            log = chaos.log
            print(
                f"[faults] {last_report - started:.0f} s: {len(log.worker_kills)} worker, "
                f"{len(log.child_kills)} child, {len(log.redis_kills)} Redis kills; jobs {dict(counts)}",
                flush=True,
            )
        for _ in range(plan.outstanding - counts["queued"] - counts["running"]):
            chaos.job_ids.append(submit(client, random_job(inputs, rng, rlhf_share=plan.rlhf_share)))
        time.sleep(0.5)


def test_kills_lose_and_duplicate_nothing(
    kill_stack: FaultStack,
    fault_plan: FaultPlan,
    fault_results: FaultResults,
    tiny_model_dir: Path,
    sft_jsonl: Path,
    tmp_path: Path,
) -> None:
    stack, plan = kill_stack, fault_plan
    targets = {
        "worker_kills": plan.worker_kills,
        "child_kills": plan.child_kills,
        "redis_kills": plan.redis_kills,
        "jobs_lost": 0,
        "jobs_duplicated": 0,
        "orphan_objects": 0,
        "resumes_from_step_0_after_a_checkpoint": 0,
    }
    print(f"\n[faults] kills: plan {asdict(plan)}")
    started = time.monotonic()
    probe = Probe(stack.database_url)
    chaos = Chaos(stack, plan, probe)
    with stack.client() as client:
        inputs = upload_inputs(client, tiny_model_dir, sft_jsonl, tmp_path)
        loops = [
            threading.Thread(target=chaos.process_loop, name="faults-kills", daemon=True),
            threading.Thread(target=chaos.redis_loop, name="faults-redis", daemon=True),
        ]
        sampler = threading.Thread(target=chaos.sample_loop, name="faults-sampler", daemon=True)
        for thread in [*loops, sampler]:
            thread.start()
        try:
            feed(client, chaos, inputs, loops)
            for loop in loops:
                loop.join()
            wait_until_ended(probe, chaos.job_ids, timeout=600)
        finally:
            chaos.stop.set()
            sampler.join()
    faults_done = time.monotonic()
    time.sleep(1)  # the last jobs' children exit right after their final line
    strays = [child for child in training_children() if child.job_id in set(chaos.job_ids)]
    result = audit(stack.database_url, stack.s3(), stack.bucket, chaos.job_ids)
    probe.close()
    figures = {
        **chaos.log.figures(),
        **result.figures(),
        "training_processes_left": len(strays),
        "wall_s": round(time.monotonic() - started, 1),
        "faults_phase_s": round(faults_done - started, 1),
    }
    notes = []
    if plan.budget_seconds is not None:
        notes.append(f"stopped striking after the {plan.budget_seconds:g} s budget; counts are what fit")
    fault_results.add("kills", targets=targets, figures=figures, notes=notes)

    problems = result.problems() + chaos.log.overlapping_attempts + chaos.log.children_outliving_worker
    problems += [f"training process {child.pid} of {child.job_id} still running" for child in strays]
    assert not problems, (problems, stack.worker_logs())
    if plan.budget_seconds is None:
        assert figures["worker_kills"] >= plan.worker_kills and figures["child_kills"] >= plan.child_kills
        assert figures["redis_kills"] >= plan.redis_kills
