"""The held-out evaluation inside GRPO and RLOO (``hyperparameters.eval``, as PPO's) on the tiny model: the
policy answers the eval prompts greedily every ``every`` updates and after the last, graded with the evaluate
job's code; the means go out as ``eval/<grader>/mean`` beside the training series, and training is the same
with or without it (greedy answers neither read nor advance the sampling generator)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from contract.protocol import DatasetRef, ProgressWriter, TrainingSpec, parse_line
from tests.training.test_grpo import FAST_HP, make_spec
from tests.training.test_ppo_eval import ANSWERS, GRADERS, check_eval_points
from workers.training import grpo_job
from workers.training.context import RunContext

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = {"prompts": "ds_eval", "graders": GRADERS, "every": 2, "max_new_tokens": 6, "max_prompts": 4}


def _spec(work: Path, model_dir: Path, method: str, hp: dict[str, Any]) -> TrainingSpec:
    spec = make_spec(work, model_dir, method=method, hp=hp)
    path = work / "eval.jsonl"
    path.write_text(
        "".join(f'{{"prompt": "colour {i}?", "answer": "{a}"}}\n' for i, a in enumerate(ANSWERS)),
        encoding="utf-8",
    )
    ref = DatasetRef(
        id="ds_eval", name="eval", kind="prompts", sha256="0" * 64, num_records=5, path=str(path)
    )
    return spec.model_copy(update={"datasets": {**spec.datasets, "eval_prompts": ref}})


def _run(spec: TrainingSpec) -> tuple[grpo_job.GroupResult, list[dict[str, Any]]]:
    stream = io.StringIO()
    train = grpo_job.train_grpo if spec.method == "grpo" else grpo_job.train_rloo
    result = train(RunContext(spec=spec, progress=ProgressWriter(stream)))
    return result, [m for m in map(parse_line, stream.getvalue().splitlines()) if m is not None]


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_methods_report_eval_series_at_every_n_updates_and_the_end(
    method: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    hp = {**FAST_HP, "steps": 5, "batch_size": 4, "num_generations": 2, "eval": EVAL}
    result, messages = _run(_spec(tmp_path / "eval", tiny_model_dir, method, hp))
    check_eval_points(messages)
    without = {k: v for k, v in hp.items() if k != "eval"}
    plain, _ = _run(_spec(tmp_path / "plain", tiny_model_dir, method, without))
    assert [h["reward_mean"] for h in result.history] == [h["reward_mean"] for h in plain.history]
    assert result.metrics["kl"] == plain.metrics["kl"]
