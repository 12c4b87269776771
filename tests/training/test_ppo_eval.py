"""The held-out evaluation inside PPO (``hyperparameters.eval``) on the tiny model: the policy answers the
eval prompts greedily every ``every`` updates and after the last, graded with the evaluate job's code, and the
means go out as ``eval/<grader>/mean`` beside the training series; the evaluation does not change training."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from contract.protocol import DatasetRef, ProgressWriter, TrainingSpec, parse_line
from tests.training.test_ppo import FAST_HP, ends_early_reward, make_spec
from workers.training.context import RunContext
from workers.training.ppo_job import train_ppo

ANSWERS = ["red", "yellow", "blue", "green", "white"]
GRADERS: list[dict[str, Any]] = [
    # Never equal to a random tiny model's answer: always 1, so the mean is exactly 1.0.
    {
        "type": "string_check",
        "name": "not_item",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}} never said",
        "operation": "ne",
    },
    {
        "type": "string_check",
        "name": "is_item",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    },
]
HP: dict[str, Any] = {
    **FAST_HP,
    "steps": 5,
    "batch_size": 8,
    "eval": {"prompts": "ds_eval", "graders": GRADERS, "every": 2, "max_new_tokens": 6, "max_prompts": 4},
}


def _spec(work: Path, model_dir: Path, hp: dict[str, Any]) -> TrainingSpec:
    spec = make_spec(work, model_dir, hp=hp)
    path = work / "eval.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"colour {i}?", "answer": a}) + "\n" for i, a in enumerate(ANSWERS)),
        encoding="utf-8",
    )
    ref = DatasetRef(
        id="ds_eval", name="eval", kind="prompts", sha256="0" * 64, num_records=5, path=str(path)
    )
    return spec.model_copy(update={"datasets": {**spec.datasets, "eval_prompts": ref}})


def _run(spec: TrainingSpec) -> tuple[Any, list[dict[str, Any]]]:
    stream = io.StringIO()
    result = train_ppo(
        RunContext(spec=spec, progress=ProgressWriter(stream)), reward_function=ends_early_reward
    )
    return result, [m for m in map(parse_line, stream.getvalue().splitlines()) if m is not None]


def check_eval_points(messages: list[dict[str, Any]]) -> None:
    """With ``every`` 2 over 5 updates: eval series at updates 2, 4 and 5 (the last), graded per row, beside
    the training series on every update."""
    metrics = [m for m in messages if m["type"] == "metric"]
    evaluated = {m["step"]: m["values"] for m in metrics if "eval/not_item/mean" in m["values"]}
    assert sorted(evaluated) == [2, 4, 5]
    for values in evaluated.values():
        assert values["eval/not_item/mean"] == 1.0  # every answer graded against its own row
        assert 0.0 <= values["eval/is_item/mean"] <= 1.0
        assert 0.0 <= values["eval/eos_rate"] <= 1.0
        assert 1.0 <= values["eval/mean_length"] <= 6.0
    assert all("reward_mean" in m["values"] for m in metrics)  # beside the training series


def test_ppo_reports_eval_series_at_every_n_updates_and_the_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    result, messages = _run(_spec(tmp_path / "eval", tiny_model_dir, HP))
    check_eval_points(messages)
    # Greedy answers on held-out prompts neither read nor advance PPO's sampling: training is unchanged.
    without = {k: v for k, v in HP.items() if k != "eval"}
    plain, _ = _run(_spec(tmp_path / "plain", tiny_model_dir, without))
    assert [h["reward_mean"] for h in result.history] == [h["reward_mean"] for h in plain.history]
    assert result.metrics["reward_mean"] == plain.metrics["reward_mean"]
