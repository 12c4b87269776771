"""A feedback set's two jobs: ``score`` (a reward model scores every response) and ``judge`` (an AI annotator).

Both read the set's candidates file (the ``candidates`` dataset; its line order is the items' order) and
publish their result in the metadata of one artifact, which the set reads back
(``service/db/feedback_jobs.py``), with the same result as a JSON file inside the artifact for a client.

- ``score``: the reward (``scoring.reward_of``: the reward trainer's tokenisation, the head at the last token)
  of every (prompt, response); artifact ``item_scores`` with ``{"reward_model", "rewards": [[r, ...], ...]}``.
- ``judge``: the judge model (the base, or the base with ``init_adapter``) is asked about every pair of an
  item's responses twice, once in each presentation order, with the set's guidelines as its rubric, and
  answers 1 or 2 (``scoring.judge_answer``, the evaluate job's judge path; the first number in the answer
  counts). A pair gets a verdict only when both orders name the same response: a judge that prefers a
  position, not an answer, gives no verdict rather than a biased one. With ``verdict: "logprobs"`` nothing
  is generated: each order gives the log-odds of "1" over "2" as the answer's first token, and the pair's
  verdict is the sign of their difference (a constant lean to a position cancels; ``position_bias`` is its
  mean). Artifact ``judge_labels`` with ``{"name", "verdict", "labels": [{"position", "pairs": [[i, j,
  "a"|"b"], ...]}], "asked", "consistent", "inconsistent", "unparsed", "first_position_share",
  "position_bias"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignd import validation

from contract.hyperparameters import (
    ITEM_SCORES_KIND,
    JUDGE_LABELS_KIND,
    JudgeHyperparameters,
    ScoreHyperparameters,
)
from workers.training import lora
from workers.training.context import RunContext
from workers.training.errors import INVALID_DATASET, INVALID_SPEC, TrainingError
from workers.training.scoring import (
    SharedModels,
    answer_log_odds,
    first_number,
    judge_answer,
    load_shared_models,
    rewards_of,
)

ROLE = "candidates"
JUDGE_SYSTEM = (
    "You compare two answers to the same prompt and say which one is better.\n"
    "Follow these guidelines:\n{rubric}\n"
    "Reply with the number only: 1 if Answer 1 is better, 2 if Answer 2 is better."
)
JUDGE_QUESTION = (
    "Prompt:\n{prompt}\n\nAnswer 1:\n{first}\n\nAnswer 2:\n{second}\n\nWhich answer is better, 1 or 2?"
)


def _records(ctx: RunContext, limit: int | None = None) -> list[dict[str, Any]]:
    dataset = ctx.spec.datasets.get(ROLE)
    if dataset is None:
        raise TrainingError(INVALID_SPEC, f"method {ctx.spec.method} needs a dataset with role '{ROLE}'")
    records: list[dict[str, Any]] = []
    try:
        for _, record in validation.iter_records(dataset.path):
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    except (OSError, validation.DatasetLineError) as exc:
        raise TrainingError(INVALID_DATASET, f"cannot read {dataset.path}: {exc}") from None
    return records


def _text(response: Any) -> str:
    if isinstance(response, str):
        return response
    return "\n".join(str(m.get("content", "")) for m in response)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def _publish(ctx: RunContext, kind: Any, result: dict[str, Any]) -> None:
    folder = Path(ctx.spec.output_dir) / kind
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{kind}.json").write_text(json.dumps(result), encoding="utf-8")
    ctx.progress.progress(1.0, stage=ctx.spec.method)
    ctx.progress.artifact(str(folder), stage=ctx.spec.method, kind=kind, metadata=result)


def run_score(ctx: RunContext) -> dict[str, Any]:
    """Every response's reward under the job's reward model, item by item."""
    hp = ScoreHyperparameters.model_validate(ctx.spec.hyperparameters)
    reward = ctx.spec.reward_model
    if reward is None:
        raise TrainingError(INVALID_SPEC, "method score needs a reward_model")
    records = _records(ctx)
    models = load_shared_models(
        ctx.spec.base_model.path,
        adapters={},
        reward_models={reward.id: reward.path},
        device=lora.pick_device(),
        precision=ctx.spec.resources.precision,
    )
    rewards: list[list[float]] = []
    chunk = 32  # items per progress line
    for start in range(0, len(records), chunk):
        part = records[start : start + chunk]
        examples = [(record["prompt"], _text(r)) for record in part for r in record["responses"]]
        with ctx.cancel.deferred():
            flat = rewards_of(models, reward.id, examples, max_length=hp.max_length)
        for record in part:
            count = len(record["responses"])
            rewards.append([round(x, 6) for x in flat[:count]])
            flat = flat[count:]
        ctx.progress.progress(0.95 * len(rewards) / len(records), stage="score")
    ctx.progress.event(f"scored {len(records)} items with reward model {reward.id}", stage="score")
    result = {"reward_model": reward.id, "rewards": rewards}
    _publish(ctx, ITEM_SCORES_KIND, result)
    return result


def _judge_messages(hp: JudgeHyperparameters, prompt: str, first: str, second: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": JUDGE_SYSTEM.format(rubric=hp.rubric.strip() or "(none)")},
        {"role": "user", "content": JUDGE_QUESTION.format(prompt=prompt, first=first, second=second)},
    ]


def _ask(
    models: SharedModels, hp: JudgeHyperparameters, judge: str | None, prompt: str, first: str, second: str
) -> int | None:
    """1 or 2: the answer the judge names as better; None when it names neither."""
    answer = judge_answer(
        models,
        _judge_messages(hp, prompt, first, second),
        judge=judge,
        max_new_tokens=hp.max_new_tokens,
        max_prompt_tokens=hp.max_length,
    )
    number = first_number(answer)
    return int(number) if number in (1.0, 2.0) else None


def _verdict_by_answers(
    models: SharedModels,
    hp: JudgeHyperparameters,
    judge: str | None,
    question: tuple[str, str, str],
    counts: dict[str, float],
) -> str | None:
    """The verdict ("a" or "b") when both orders' greedy answers name the same response, else None."""
    prompt, a, b = question
    forward, backward = _ask(models, hp, judge, prompt, a, b), _ask(models, hp, judge, prompt, b, a)
    for said in (forward, backward):
        if said is not None:
            counts["answered"] += 1
            counts["first_position"] += int(said == 1)
    if forward is None or backward is None:
        counts["unparsed"] += 1
        return None
    if (forward == 1) == (backward == 2):  # both orders name the same response
        counts["consistent"] += 1
        return "a" if forward == 1 else "b"
    counts["inconsistent"] += 1
    return None


def _verdict_by_logprobs(
    models: SharedModels,
    hp: JudgeHyperparameters,
    judge: str | None,
    question: tuple[str, str, str],
    counts: dict[str, float],
) -> str | None:
    """The sign of lo(a first) - lo(b first), lo the log-odds of '1' over '2': a judge's constant lean to a
    position adds the same amount to both and cancels; what is left is its lean to a response."""
    prompt, a, b = question
    forward = answer_log_odds(
        models, _judge_messages(hp, prompt, a, b), judge=judge, max_prompt_tokens=hp.max_length
    )
    backward = answer_log_odds(
        models, _judge_messages(hp, prompt, b, a), judge=judge, max_prompt_tokens=hp.max_length
    )
    counts["answered"] += 2
    counts["first_position"] += int(forward > 0) + int(backward > 0)
    counts["position_bias"] += (forward + backward) / 2
    counts["consistent" if (forward > 0) == (backward < 0) else "inconsistent"] += 1
    lean = forward - backward
    return "a" if lean > 0 else "b" if lean < 0 else None


def run_judge(ctx: RunContext) -> dict[str, Any]:
    """Both-order pairwise verdicts of the judge on every item (see the module docstring)."""
    hp = JudgeHyperparameters.model_validate(ctx.spec.hyperparameters)
    records = _records(ctx, hp.max_items)
    adapter = ctx.spec.init_adapter
    models = load_shared_models(
        ctx.spec.base_model.path,
        adapters={} if adapter is None else {adapter.id: adapter.path},
        reward_models={},
        device=lora.pick_device(),
        precision=ctx.spec.resources.precision,
    )
    judge = None if adapter is None else adapter.id
    verdict = _verdict_by_logprobs if hp.verdict == "logprobs" else _verdict_by_answers
    counts: dict[str, float] = dict.fromkeys(
        ("asked", "consistent", "inconsistent", "unparsed", "first_position", "answered", "position_bias"),
        0.0,
    )
    labels = []
    for position, record in enumerate(records):
        texts = [_text(r) for r in record["responses"]]
        prompt = _prompt_text(record["prompt"])
        pairs = []
        with ctx.cancel.deferred():
            for i in range(len(texts)):
                for j in range(i + 1, len(texts)):
                    counts["asked"] += 1
                    said = verdict(models, hp, judge, (prompt, texts[i], texts[j]), counts)
                    if said is not None:
                        pairs.append([i, j, said])
        labels.append({"position": position, "pairs": pairs})
        ctx.progress.progress(0.95 * (position + 1) / len(records), stage="judge")
    share = counts["first_position"] / counts["answered"] if counts["answered"] else None
    asked = int(counts["asked"])
    ctx.progress.event(
        f"judge {hp.name} ({hp.verdict}): {asked} pairs asked in both orders on {len(records)} items; "
        f"{int(counts['consistent'])} consistent, {int(counts['inconsistent'])} flipped with the order, "
        f"{int(counts['unparsed'])} without a 1/2 answer",
        stage="judge",
    )
    result = {
        "name": hp.name,
        "verdict": hp.verdict,
        "labels": labels,
        "asked": asked,
        "consistent": int(counts["consistent"]),
        "inconsistent": int(counts["inconsistent"]),
        "unparsed": int(counts["unparsed"]),
        "first_position_share": share,
        # the mean lean to the first position in log-odds (logprobs verdicts only): what the two orders cancel
        "position_bias": round(counts["position_bias"] / asked, 4)
        if hp.verdict == "logprobs" and asked
        else None,
    }
    _publish(ctx, JUDGE_LABELS_KIND, result)
    return result
