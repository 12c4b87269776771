"""The evaluate job: does an adapter beat the base (or another adapter)? Answered per grader, with intervals.

1. The base model is loaded once; every candidate's adapter, every judge adapter and every reward model is
   a frozen adapter on it (``scoring.load_shared_models``).
2. Each candidate answers every prompt ``num_samples`` times (``rollout.sample_responses``; greedy at
   temperature 0). Every candidate starts from the same seed, so two candidates with the same weights give the
   same answers (common random numbers: a paired comparison sees only what the weights change).
3. Per answer: whether it ended with EOS, its length in tokens (the EOS included), and its log-likelihood ratio
   to the base, ``sum over answer tokens of log p_candidate - log p_base`` (the adapter-disabled model scores
   the same tokens, both at temperature 1). ``kl_to_base`` is the mean of that over the candidate's answers:
   a Monte-Carlo estimate of KL(candidate || base) when answers are sampled at temperature 1, and the
   log-likelihood ratio of the answers given otherwise (greedy ones included).
4. Every answer is graded by every grader (``contract.grading.grade``, the sample being ``{output_text,
   finish_reason, output_tokens}`` and the item its dataset row); model-backed graders score through
   ``scoring.ChildScorer``. A grader that cannot score an answer gives 0 and the error is kept.
5. ``contract.statistics``: each grader's mean over prompts with its 95% bootstrap interval, and each
   candidate's paired win-rate against the baseline with its interval.

Output: an ``eval`` artifact (``evaluation.json``, ``per_prompt.csv``: one row per prompt, candidate and
sample, with the answer, its length, finish reason, log-ratio to the base, each grader's score and errors;
``references.json``: per prompt, what each grader with a reference template compared the answers with),
whose metadata carries the evaluation, and metrics ``eval/<candidate>/<grader>/mean`` and ``.../win_rate``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from alignd import validation

from contract import grading, statistics
from contract.evaluation import (
    EVAL_ARTIFACT_KIND,
    EVALUATION_FILE,
    PER_PROMPT_FILE,
    REFERENCES_FILE,
    STAGE,
    CandidateResult,
    EvaluationResult,
    EvaluationSpec,
    GraderSummary,
    metric_name,
    model_refs,
    spec_problems,
)
from contract.graders import Sample
from contract.grading import ModelScorer, grade
from workers.training import lora, rollout
from workers.training.context import RunContext
from workers.training.errors import INVALID_DATASET, INVALID_SPEC, TrainingError
from workers.training.scoring import ChildScorer, SharedModels, load_shared_models

ROLE = "prompts"


@dataclass(frozen=True)
class PromptRow:
    line: int
    record: dict[str, Any]
    messages: list[rollout.Message]


@dataclass
class Answers:
    """One candidate's answers, prompt-major: answer ``p * num_samples + s`` is sample s of prompt p."""

    texts: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    ended: list[bool] = field(default_factory=list)
    log_ratios: list[float] = field(default_factory=list)


def read_rows(path: str, max_prompts: int | None) -> list[PromptRow]:
    """The dataset's rows (the graders' items) and their prompts as messages, read with the upload's rules."""
    rows: list[PromptRow] = []
    try:
        for line, record in validation.iter_records(path, kind="prompts"):
            rows.append(PromptRow(line, record, rollout.parse_prompt_record(record, line)))
            if max_prompts is not None and len(rows) >= max_prompts:
                break
    except validation.DatasetLineError as exc:
        raise TrainingError(INVALID_DATASET, str(exc)) from None
    except OSError as exc:
        raise TrainingError(INVALID_DATASET, f"cannot read {path}: {exc}") from None
    if not rows:
        raise TrainingError(INVALID_DATASET, f"{path} holds no prompts")
    return rows


def _answer_logprobs(
    models: SharedModels,
    ids: torch.Tensor,
    mask: torch.Tensor,
    tokens: torch.Tensor,
    answer_mask: torch.Tensor,
) -> torch.Tensor:
    """Per row, the sum over answer tokens of log p(token) under the active adapter (temperature 1)."""
    full = torch.cat([ids, tokens], dim=1)
    attention = torch.cat([mask, answer_mask], dim=1)
    hidden = models.body()(
        input_ids=full,
        attention_mask=attention,
        position_ids=rollout.position_ids_from_mask(attention),
        use_cache=False,
    ).last_hidden_state
    width = ids.size(1)
    # Only the positions that predict answer tokens go through the output head (a vocabulary-wide matrix).
    head: Any = models.model.get_output_embeddings()  # type: ignore[operator]  # transformers' typing
    logits = head(hidden[:, width - 1 : width - 1 + tokens.size(1)])
    return (rollout.token_logprobs(logits, tokens) * answer_mask).sum(dim=1)


@torch.no_grad()
def _sample_batch(
    models: SharedModels,
    adapter: str | None,
    rows: list[list[int]],
    spec: EvaluationSpec,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer tokens, answer mask, ended with EOS, log-ratio to the base) for left-padded prompt rows."""
    ids, mask = rollout.left_pad(rows, models.pad_token_id)
    ids, mask = ids.to(models.device), mask.to(models.device)
    sampling = spec.sampling
    with models.active(adapter):
        raw = rollout.sample_responses(
            models.step,
            ids,
            mask,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            eos_token_id=models.eos_token_id,
            pad_token_id=models.pad_token_id,
            generator=generator,
        )
        tokens, answer_mask, ended = rollout.truncate_after_eos(raw, models.eos_token_id, models.pad_token_id)
        if adapter is None:
            return tokens, answer_mask, ended, torch.zeros(tokens.size(0))
        candidate = _answer_logprobs(models, ids, mask, tokens, answer_mask)
    with models.active(None):
        base = _answer_logprobs(models, ids, mask, tokens, answer_mask)
    return tokens, answer_mask, ended, (candidate - base).float().cpu()


def sample_candidate(
    ctx: RunContext,
    models: SharedModels,
    adapter: str | None,
    encoded: list[list[int]],
    spec: EvaluationSpec,
    *,
    on_batch: Any,
) -> Answers:
    """Every answer of one candidate (``adapter`` None: the base itself), in prompt-major order."""
    k, size = spec.sampling.num_samples, spec.sampling.batch_size
    generator = torch.Generator(device=models.device).manual_seed(ctx.spec.seed)
    answers = Answers()
    for start in range(0, len(encoded), size):
        started = time.perf_counter()
        rows = [prompt for prompt in encoded[start : start + size] for _ in range(k)]
        with ctx.cancel.deferred():  # SIGTERM waits for the batch: a half-sampled batch is worth nothing
            tokens, answer_mask, ended, ratios = _sample_batch(models, adapter, rows, spec, generator)
        lengths = [int(n) for n in answer_mask.sum(dim=1).tolist()]
        for row, length in enumerate(lengths):
            text = models.tokenizer.decode(tokens[row, :length].tolist(), skip_special_tokens=True)
            answers.texts.append(str(text))
        answers.lengths += lengths
        answers.ended += [bool(x) for x in ended.tolist()]
        answers.log_ratios += [float(x) for x in ratios.tolist()]
        on_batch(sum(lengths), len(rows), time.perf_counter() - started)
    return answers


def grade_answers(
    spec: EvaluationSpec, rows: list[PromptRow], answers: Answers, scorer: ModelScorer
) -> tuple[list[list[float]], list[list[list[dict[str, str]]]]]:
    """Scores ``[grader][answer]`` and the errors behind each, every answer graded with its prompt's row."""
    k = spec.sampling.num_samples
    scores: list[list[float]] = [[] for _ in spec.graders]
    errors: list[list[list[dict[str, str]]]] = [[] for _ in spec.graders]
    for index, text in enumerate(answers.texts):
        sample = Sample(
            output_text=text,
            finish_reason="stop" if answers.ended[index] else "length",
            output_tokens=answers.lengths[index],
        )
        item = rows[index // k].record
        for g, grader in enumerate(spec.graders):
            result = grade(grader, sample, item, model_scorer=scorer)
            scores[g].append(result.reward)
            errors[g].append(result.metadata["errors"])
    return scores, errors


def _summaries(
    spec: EvaluationSpec,
    seed: int,
    index: int,
    scores: list[list[float]],
    baseline: list[list[float]],
    errors: Any,
) -> dict[str, GraderSummary]:
    k, resamples = spec.sampling.num_samples, spec.bootstrap_resamples
    is_baseline = spec.candidates[index].name == spec.baseline_name
    out: dict[str, GraderSummary] = {}
    for g, grader in enumerate(spec.graders):
        ours = statistics.per_prompt_means(scores[g], k)
        mean = statistics.mean_with_ci(ours, seed=(seed, g, index, 0), resamples=resamples)
        summary = GraderSummary(
            mean=mean.estimate, ci_low=mean.low, ci_high=mean.high, errors=sum(1 for e in errors[g] if e)
        )
        if not is_baseline:
            theirs = statistics.per_prompt_means(baseline[g], k)
            win = statistics.win_rate_with_ci(ours, theirs, seed=(seed, g, index, 1), resamples=resamples)
            summary.win_rate, summary.win_rate_ci_low, summary.win_rate_ci_high = (
                win.estimate,
                win.low,
                win.high,
            )
        out[grader.name] = summary
    return out


def summarize(
    ctx: RunContext,
    rows: list[PromptRow],
    answers: list[Answers],
    scores: list[list[list[float]]],
    errors: Any,
) -> EvaluationResult:
    spec = ctx.spec.evaluation
    assert spec is not None
    names = [c.name for c in spec.candidates]
    baseline = scores[names.index(spec.baseline_name)]
    candidates = [
        CandidateResult(
            name=candidate.name,
            adapter=candidate.adapter,
            eos_rate=sum(got.ended) / len(got.ended),
            mean_length=sum(got.lengths) / len(got.lengths),
            kl_to_base=sum(got.log_ratios) / len(got.log_ratios),
            graders=_summaries(spec, ctx.spec.seed, index, scores[index], baseline, errors[index]),
        )
        for index, (candidate, got) in enumerate(zip(spec.candidates, answers, strict=True))
    ]
    return EvaluationResult(
        job=ctx.spec.job_id,
        baseline=spec.baseline_name,
        num_prompts=len(rows),
        num_samples=spec.sampling.num_samples,
        bootstrap_resamples=spec.bootstrap_resamples,
        confidence=statistics.CONFIDENCE,
        candidates=candidates,
    )


def _prompt_text(record: dict[str, Any]) -> str:
    prompt = record.get("prompt", record.get("messages"))
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)


def write_per_prompt(
    path: Path, spec: EvaluationSpec, rows: list[PromptRow], answers: list[Answers], scores: Any, errors: Any
) -> None:
    """One CSV row per (prompt, candidate, sample): a prompt's answers side by side, every score beside them."""
    k = spec.sampling.num_samples
    graders = [g.name for g in spec.graders]
    header = ["prompt_index", "line", "prompt", "candidate", "sample", "answer", "finish_reason", "tokens"]
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*header, "log_ratio_to_base", *graders, "grader_errors"])
        for p, row in enumerate(rows):
            for c, candidate in enumerate(spec.candidates):
                for s in range(k):
                    i = p * k + s
                    got = answers[c]
                    problems = [e for g in range(len(graders)) for e in errors[c][g][i]]
                    writer.writerow(
                        [p, row.line, _prompt_text(row.record), candidate.name, s, got.texts[i]]
                        + ["stop" if got.ended[i] else "length", got.lengths[i], f"{got.log_ratios[i]:.6g}"]
                        + [f"{scores[c][g][i]:.6g}" for g in range(len(graders))]
                        + [json.dumps(problems, ensure_ascii=False) if problems else ""]
                    )


def write_references(path: Path, spec: EvaluationSpec, rows: list[PromptRow]) -> None:
    """Per prompt (in prompt_index order), each reference-taking grader's reference rendered on its item, so
    a reader sees what the answers were compared with without the dataset at hand."""
    table: list[dict[str, str]] = []
    for row in rows:
        merged: dict[str, str] = {}
        for grader in spec.graders:
            merged.update(grading.references(grader, row.record))
        table.append(merged)
    path.write_text(json.dumps(table, ensure_ascii=False), encoding="utf-8")


def _load(ctx: RunContext, spec: EvaluationSpec, local_adapters: Mapping[str, str]) -> SharedModels:
    refs = model_refs(spec)
    wanted = {ref: kind for _, ref, kind in refs if ref.startswith("art_") or ref in local_adapters}
    fetched = {ref: got.path for ref, got in ctx.spec.evaluation_artifacts.items()} | dict(local_adapters)
    missing = sorted(ref for ref in wanted if ref not in fetched)
    if missing:
        raise TrainingError(INVALID_SPEC, f"the runner did not fetch artifacts {missing}")
    return load_shared_models(
        ctx.spec.base_model.path,
        adapters={ref: fetched[ref] for ref, kind in wanted.items() if kind != "reward_model"},
        reward_models={ref: fetched[ref] for ref, kind in wanted.items() if kind == "reward_model"},
        device=lora.pick_device(),
        precision=ctx.spec.resources.precision,
    )


def _spec(ctx: RunContext) -> tuple[EvaluationSpec, str]:
    spec = ctx.spec.evaluation
    if spec is None:
        raise TrainingError(INVALID_SPEC, "method evaluate needs the evaluation spec")
    problems = spec_problems(spec)
    if problems:
        raise TrainingError(INVALID_SPEC, f"invalid evaluation: {problems[:3]}")
    dataset = ctx.spec.datasets.get(ROLE)
    if dataset is None:
        raise TrainingError(INVALID_SPEC, f"method evaluate needs a dataset with role '{ROLE}'")
    return spec, dataset.path


def run(ctx: RunContext, *, local_adapters: Mapping[str, str] | None = None) -> EvaluationResult:
    """The evaluate job of ``ctx.spec`` (the registry's entry point, and the rlhf job's final evaluation).

    ``local_adapters``: candidate adapters that are no artifact yet, ref -> local folder (the rlhf job's own
    stage outputs, inside its child); their candidates are reported without an ``adapter`` id."""
    spec, dataset_path = _spec(ctx)
    local = dict(local_adapters or {})
    progress = ctx.progress
    rows = read_rows(dataset_path, spec.sampling.max_prompts)
    models = _load(ctx, spec, local)
    encoded, cut = rollout.encode_prompts(
        models.tokenizer, [row.messages for row in rows], max_length=spec.sampling.max_prompt_length
    )
    batches = -(-len(rows) // spec.sampling.batch_size)
    total_steps = batches * len(spec.candidates)
    progress.event(
        f"{len(rows)} prompts x {spec.sampling.num_samples} samples for {len(spec.candidates)} candidates, "
        f"{len(spec.graders)} graders, baseline '{spec.baseline_name}'"
        + (f"; {cut} prompts cut from the left to {spec.sampling.max_prompt_length} tokens" if cut else ""),
        stage=STAGE,
    )
    step = 0

    def on_batch(tokens: int, answers: int, seconds: float) -> None:
        nonlocal step
        step += 1
        values = {"tokens_per_second": tokens / max(seconds, 1e-9), "mean_answer_tokens": tokens / answers}
        progress.metric(stage=STAGE, step=step, values=values)
        progress.progress(0.9 * step / total_steps, stage=STAGE)

    scorer = ChildScorer(models, base_model_id=ctx.spec.base_model.id, seed=ctx.spec.seed)
    answers, scores, errors = [], [], []
    for candidate in spec.candidates:
        got = sample_candidate(ctx, models, candidate.adapter, encoded, spec, on_batch=on_batch)
        graded, problems = grade_answers(spec, rows, got, scorer)
        answers.append(got)
        scores.append(graded)
        errors.append(problems)
    result = summarize(ctx, rows, answers, scores, errors)
    for candidate_result in result.candidates:
        if candidate_result.adapter in local:
            candidate_result.adapter = None  # a local ref names no artifact a client could fetch
    _publish(ctx, spec, rows, answers, scores, errors, result, step=step)
    return result


def describe(candidate: CandidateResult) -> str:
    """``name: grader mean [low, high], wins w [low, high]; ...`` (no win-rate on the baseline)."""
    parts = [
        f"{name} {s.mean:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"
        + (
            f", wins {s.win_rate:.3f} [{s.win_rate_ci_low:.3f}, {s.win_rate_ci_high:.3f}]"
            if s.win_rate is not None
            else ""
        )
        for name, s in candidate.graders.items()
    ]
    return f"{candidate.name}: " + "; ".join(parts)


def _publish(
    ctx: RunContext,
    spec: EvaluationSpec,
    rows: list[PromptRow],
    answers: list[Answers],
    scores: Any,
    errors: Any,
    result: EvaluationResult,
    *,
    step: int,
) -> None:
    """Final metrics, a readable summary event, and the eval artifact."""
    values: dict[str, float] = {}
    for candidate in result.candidates:
        values[f"eval/{candidate.name}/eos_rate"] = candidate.eos_rate
        values[f"eval/{candidate.name}/mean_length"] = candidate.mean_length
        values[f"eval/{candidate.name}/kl_to_base"] = candidate.kl_to_base
        for name, summary in candidate.graders.items():
            values[metric_name(candidate.name, name, "mean")] = summary.mean
            if summary.win_rate is not None:
                values[metric_name(candidate.name, name, "win_rate")] = summary.win_rate
    ctx.progress.metric(stage=STAGE, step=step, values=values)
    for candidate in result.candidates:
        ctx.progress.event(describe(candidate), stage=STAGE)
    folder = Path(ctx.spec.output_dir) / EVAL_ARTIFACT_KIND
    folder.mkdir(parents=True, exist_ok=True)
    # Fields that do not apply are left out (the baseline's win-rates, the base's adapter), as the API answers.
    document = result.model_dump(mode="json", exclude_none=True)
    (folder / EVALUATION_FILE).write_text(
        json.dumps({**document, "per_prompt_artifact": None}, indent=2), encoding="utf-8"
    )
    write_per_prompt(folder / PER_PROMPT_FILE, spec, rows, answers, scores, errors)
    write_references(folder / REFERENCES_FILE, spec, rows)
    ctx.progress.progress(1.0, stage=STAGE)
    ctx.progress.artifact(
        str(folder),
        stage=STAGE,
        kind="eval",
        metadata={"evaluation": document},
    )
