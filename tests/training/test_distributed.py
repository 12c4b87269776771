"""The torchrun path at the child level: ``python -m workers.training.launch N spec.json``, as the runner starts it.

A checkpoint holds nothing that depends on the number of processes (the global step, epoch and position in
the epoch's seeded batch order; LoRA weights, optimizer and schedule, the same on every rank): a 1-process
run's checkpoint resumed on 2 processes goes on with the same losses the 1-process run had.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.training._child import REPO_ROOT, ChildRun, child_env, run_child, write_spec

HYPERPARAMETERS = {
    "epochs": 10,
    "max_steps": 6,
    "batch_size": 4,
    "learning_rate": 5e-3,
    "max_length": 48,
    "logging_steps": 1,
    "checkpoint_steps": 3,
}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _launch(spec_path: Path, processes: int, timeout: float = 240) -> ChildRun:
    proc = subprocess.run(
        [sys.executable, "-m", "workers.training.launch", str(processes), str(spec_path)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return ChildRun(proc.returncode, proc.stdout.splitlines(), proc.stderr)


def _losses(run: ChildRun) -> dict[int, float]:
    return {m["step"]: m["values"]["loss"] for m in run.of_type("metric") if "loss" in m["values"]}


def _with(spec_path: Path, **changes: Any) -> None:
    spec = json.loads(spec_path.read_text())
    spec.update(changes)
    spec_path.write_text(json.dumps(spec))


def test_a_one_process_checkpoint_resumes_on_two_processes_with_the_same_losses(
    tmp_path: Path, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    single = write_spec(
        tmp_path / "one",
        model_dir=tiny_model_dir,
        dataset=sft_jsonl,
        hyperparameters=HYPERPARAMETERS,
        lora=LORA,
    )
    _with(single, checkpoint_dir=str(tmp_path / "one" / "checkpoints"))
    first = run_child(single, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    at_3 = next(m for m in first.of_type("checkpoint") if m["step"] == 3)

    double = write_spec(
        tmp_path / "two",
        model_dir=tiny_model_dir,
        dataset=sft_jsonl,
        hyperparameters=HYPERPARAMETERS,
        lora=LORA,
    )
    _with(
        double,
        checkpoint_dir=str(tmp_path / "two" / "checkpoints"),
        resume_from={"path": at_3["path"], "stage": "sft", "step": 3},
    )
    second = _launch(double, 2)
    assert second.returncode == 0, second.stderr[-3000:]
    events = [m["message"] for m in second.of_type("event")]
    assert any(e.startswith("resumed from checkpoint at step 3") for e in events), events
    assert any(e.startswith("data parallel over 2 processes (gloo") for e in events), events
    resumed, original = _losses(second), _losses(first)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(original[step], rel=1e-4), (step, resumed, original)
    # Rank 0 alone wrote: one adapter and one card announced, checkpoints only from rank 0.
    kinds = sorted(m["kind"] for m in second.of_type("artifact"))
    assert kinds == ["adapter", "model_card"], kinds
    assert [m["step"] for m in second.of_type("checkpoint")] == [6]


def test_the_launcher_refuses_a_wrong_command_line(tmp_path: Path) -> None:
    run = _launch(tmp_path / "missing.json", 0, timeout=60)
    assert run.returncode == 2
    assert run.of_type("error")[0]["code"] == "invalid_spec"
