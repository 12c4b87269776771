"""The rlhf job's final evaluation in the child, on the tiny model: an attempt resumed after its last stage
(every stage complete, their outputs handed back as local folders) runs only the evaluation of base, sft and
ppo, with the evaluate job's code, and emits what an evaluate job emits: stage-``evaluate`` metrics, events and
an ``eval`` artifact whose evaluation holds the contract's fields. The REST path is
tests/service/test_rlhf.py::test_rlhf_end_to_end."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from contract.evaluation import EvaluationResult
from contract.hyperparameters import LoraSettings
from contract.protocol import ProgressWriter, TrainingSpec, parse_line
from tests.training.adapters import random_adapter
from workers.training.context import RunContext
from workers.training.pipeline import train_rlhf

GRADER = {"type": "ends_with_eos", "name": "ends"}


def _dataset(path: Path, role: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return {"id": f"ds_{role}", "name": path.name, "kind": role, "sha256": "0" * 64, "num_records": len(rows),
            "path": str(path)}  # fmt: skip


def _resumed_spec(work: Path, model_dir: Path) -> TrainingSpec:
    """An rlhf spec resumed after a complete ppo stage: only the final evaluation is left."""
    work.mkdir(parents=True)
    sft = random_adapter(model_dir, work / "sft", seed=1)
    ppo = random_adapter(model_dir, work / "ppo", seed=2)
    held_out = [{"prompt": f"Name colour {i}."} for i in range(3)]
    datasets = {
        role: _dataset(work / f"{role}.jsonl", "prompts" if role == "eval_prompts" else role, rows)
        for role, rows in {
            "sft": [{"prompt": "a", "completion": "b"}],
            "preference": [{"prompt": "a", "chosen": "b", "rejected": "c"}],
            "prompts": [{"prompt": "a"}],
            "eval_prompts": held_out,
        }.items()
    }
    eval_block = {"prompts": "ds_eval_prompts", "graders": [GRADER], "max_new_tokens": 4}
    raw = {
        "job_id": "job_rlhf",
        "method": "rlhf",
        "base_model": {"id": "model_tiny", "name": "tiny-llama", "path": str(model_dir)},
        "datasets": datasets,
        "lora": LoraSettings().model_dump(),
        "hyperparameters": {"rl_method": "ppo", "final_evaluation": True, "ppo": {"eval": eval_block}},
        "seed": 0,
        "output_dir": str(work / "out"),
        "resume_from": {"path": str(work), "stage": "ppo", "step": 2, "stage_complete": True},
        "stage_artifacts": {
            "sft": {"id": "art_sft", "path": str(sft)},
            "reward_model": {"id": "art_rm", "path": str(work / "unused")},
            "ppo": {"id": "art_ppo", "path": str(ppo)},
        },
    }
    return TrainingSpec.model_validate(raw)


def test_resumed_after_the_last_stage_it_evaluates_base_sft_and_ppo(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    stream = io.StringIO()
    result = train_rlhf(
        RunContext(spec=_resumed_spec(tmp_path / "job", tiny_model_dir), progress=ProgressWriter(stream))
    )
    assert result.stages_run == []  # no stage trained again
    messages = [m for m in map(parse_line, stream.getvalue().splitlines()) if m is not None]
    events = [m["message"] for m in messages if m["type"] == "event"]
    assert "every stage was already complete; evaluating" in events
    artifacts = [m for m in messages if m["type"] == "artifact"]
    assert [(a["stage"], a["kind"]) for a in artifacts] == [("evaluate", "eval")]
    evaluation = EvaluationResult.model_validate(artifacts[0]["metadata"]["evaluation"])
    assert evaluation.baseline == "base" and evaluation.num_prompts == 3
    by_name = {c.name: c for c in evaluation.candidates}
    assert list(by_name) == ["base", "sft", "ppo"]
    assert all(c.adapter is None for c in evaluation.candidates)  # local folders, no artifact id
    # Each candidate answered with its own weights: the two adapters are not the base.
    assert by_name["base"].kl_to_base == 0.0 and by_name["sft"].kl_to_base != by_name["ppo"].kl_to_base
    assert by_name["base"].graders["ends"].win_rate is None
    assert by_name["ppo"].graders["ends"].win_rate is not None
    assert all(m["stage"] == "evaluate" for m in messages if m["type"] == "metric")
    assert events[-1].startswith("final evaluation on 3 held-out prompts, win-rates vs base: base: ends")
    folder = Path(artifacts[0]["path"])
    with open(folder / "per_prompt.csv", encoding="utf-8", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 9  # 3 prompts x 3 candidates
