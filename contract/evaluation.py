"""The ``evaluate`` job: what it compares (:class:`EvaluationSpec`) and what it reports (:class:`EvaluationResult`).

An evaluation samples answers to every prompt of a ``prompts`` dataset from each *candidate* (the base model,
or the base with one adapter), grades every answer with each grader (``contract.graders``), and compares each
candidate with the *baseline* candidate prompt by prompt (``contract.statistics``). The API validates the spec
at submission (``service/core/evaluation.py``), the runner hands it to the child in ``TrainingSpec.evaluation``
and the child (``workers/training/evaluate.py``) answers with an ``eval`` artifact holding
:data:`EVALUATION_FILE` (the result) and :data:`PER_PROMPT_FILE` (every prompt, answer and score).
docs/evaluation.md documents both.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field

from contract.graders import Grader, leaves
from contract.inputs import InputModel
from contract.methods import Method

EVAL_ARTIFACT_KIND = "eval"
EVALUATION_FILE = "evaluation.json"
PER_PROMPT_FILE = "per_prompt.csv"
# Per prompt (by prompt_index), what each grader with a reference template compared answers with on its item.
REFERENCES_FILE = "references.json"
STAGE = "evaluate"
# Candidate and grader names go into metric names (eval/<candidate>/<grader>/win_rate), which hold 64
# characters: 24 + 24 keeps the longest within it.
NAME_PATTERN = r"[A-Za-z0-9_.-]{1,24}"
_NAME = re.compile(NAME_PATTERN)
MAX_CANDIDATES = 8
MAX_GRADERS = 16


class _Spec(InputModel):
    """What a client sends: strict types, no unknown fields, finite numbers (contract/inputs.py)."""


class SamplingSettings(_Spec):
    """How every candidate answers: the same settings for all, so only the weights differ."""

    max_new_tokens: int = Field(64, ge=1, le=4096, description="Answer length limit in tokens.")
    temperature: float = Field(
        0.0, ge=0, le=2, description="0: greedy (the most likely token each step); above 0: sampled."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (temperature > 0 only).")
    num_samples: int = Field(
        1, ge=1, le=16, description="Answers per prompt and candidate; > 1 needs temperature > 0."
    )
    max_prompt_length: int = Field(
        512, ge=8, le=32768, description="Prompts longer than this many tokens are cut from the left."
    )
    batch_size: int = Field(8, ge=1, le=512, description="Prompts sampled together.")
    max_prompts: int | None = Field(None, ge=1, description="Evaluate only the dataset's first N prompts.")


class CandidateSpec(_Spec):
    name: str = Field(description=f"Unique within the evaluation; {NAME_PATTERN}.")
    adapter: str | None = Field(
        None, description="An adapter artifact (art_...) on the job's base model; omitted: the base itself."
    )


class EvaluationSpec(_Spec):
    candidates: list[CandidateSpec] = Field(min_length=1, max_length=MAX_CANDIDATES)
    baseline: str | None = Field(
        None, description="The candidate every other is compared with (default: the first candidate)."
    )
    graders: list[Grader] = Field(min_length=1, max_length=MAX_GRADERS)
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    bootstrap_resamples: int = Field(
        2000, ge=100, le=100_000, description="Bootstrap resamples behind every interval."
    )

    @property
    def baseline_name(self) -> str:
        return self.baseline if self.baseline is not None else self.candidates[0].name

    def dump(self) -> dict[str, Any]:
        """As stored on the job row: every default filled in, graders in their JSON form."""
        dumped: dict[str, Any] = self.model_dump(mode="json", by_alias=True)
        dumped["baseline"] = self.baseline_name
        return dumped


def spec_problems(spec: EvaluationSpec, *, field: str = "evaluation") -> list[dict[str, str]]:
    """What the spec's models cannot say by themselves: names, the baseline, sampling that would repeat itself.

    One ``{"field", "code", "message"}`` per problem (empty: the spec is consistent)."""
    problems: list[dict[str, str]] = []
    seen: set[str] = set()
    for index, candidate in enumerate(spec.candidates):
        where = f"{field}.candidates[{index}].name"
        if _NAME.fullmatch(candidate.name) is None:
            problems.append(
                {
                    "field": where,
                    "code": "invalid_name",
                    "message": f"'{candidate.name}' must match {NAME_PATTERN}",
                }
            )
        elif candidate.name in seen:
            problems.append(
                {
                    "field": where,
                    "code": "duplicate_name",
                    "message": f"candidate '{candidate.name}' is named twice",
                }
            )
        seen.add(candidate.name)
    if spec.baseline is not None and spec.baseline not in seen:
        problems.append(
            {
                "field": f"{field}.baseline",
                "code": "unknown_baseline",
                "message": f"'{spec.baseline}' is not a candidate (candidates: {', '.join(sorted(seen))})",
            }
        )
    grader_names: set[str] = set()
    for index, grader in enumerate(spec.graders):
        where = f"{field}.graders[{index}].name"
        if _NAME.fullmatch(grader.name) is None:
            problems.append(
                {
                    "field": where,
                    "code": "invalid_name",
                    "message": f"'{grader.name}' must match {NAME_PATTERN} (it names the grader's metrics)",
                }
            )
        elif grader.name in grader_names:
            problems.append(
                {
                    "field": where,
                    "code": "duplicate_name",
                    "message": f"grader '{grader.name}' is named twice",
                }
            )
        grader_names.add(grader.name)
    if spec.sampling.num_samples > 1 and spec.sampling.temperature == 0:
        problems.append(
            {
                "field": f"{field}.sampling.num_samples",
                "code": "invalid_value",
                "message": "greedy decoding (temperature 0) gives the same answer every time: set temperature "
                "> 0 for several samples per prompt",
            }
        )
    return problems


def model_refs(spec: EvaluationSpec) -> list[tuple[str, str, str]]:
    """``(field, id, kind)`` for every model the spec names: candidate adapters ("adapter"), reward-model
    graders' artifacts ("reward_model") and score-model judges ("judge": a model_... or art_... id)."""
    refs: list[tuple[str, str, str]] = []
    for index, candidate in enumerate(spec.candidates):
        if candidate.adapter is not None:
            refs.append((f"evaluation.candidates[{index}].adapter", candidate.adapter, "adapter"))
    for index, grader in enumerate(spec.graders):
        for path, leaf in leaves(grader):
            where = f"evaluation.graders[{index}]" + path[len(grader.name) :].replace(".", ".graders.")
            if leaf.type == "reward_model":
                refs.append((f"{where}.artifact", leaf.artifact, "reward_model"))
            elif leaf.type == "score_model":
                refs.append((f"{where}.model", leaf.model, "judge"))
    return refs


# --- the result


class GraderSummary(BaseModel):
    mean: float = Field(description="Mean score over prompts (per-prompt means when num_samples > 1).")
    ci_low: float = Field(description="95% percentile bootstrap interval of the mean, over prompts.")
    ci_high: float
    win_rate: float | None = Field(
        None,
        description="Share of prompts where this candidate scored higher than the baseline (ties count half); "
        "absent on the baseline itself.",
    )
    win_rate_ci_low: float | None = Field(None, description="95% paired bootstrap interval of the win-rate.")
    win_rate_ci_high: float | None = None
    errors: int = Field(0, description="Answers the grader could not score (scored 0; see per_prompt.csv).")


class CandidateResult(BaseModel):
    name: str
    adapter: str | None = None
    eos_rate: float = Field(description="Share of answers that ended with the EOS token (not cut off).")
    mean_length: float = Field(description="Mean answer length in tokens (the EOS included).")
    kl_to_base: float = Field(
        description="Mean over answers of sum over answer tokens of log p_candidate - log p_base, on the "
        "candidate's own answers (0 for the base itself)."
    )
    graders: dict[str, GraderSummary]


class EvaluationResult(BaseModel):
    object: str = "evaluation"
    job: str
    baseline: str
    num_prompts: int
    num_samples: int
    bootstrap_resamples: int
    confidence: float
    candidates: list[CandidateResult]
    per_prompt_artifact: str | None = Field(
        None,
        description="The eval artifact holding per_prompt.csv (every prompt, answer and score). Null inside "
        "the artifact's own evaluation.json, whose id is given when it is stored.",
    )


class PromptAnswer(BaseModel):
    """One candidate's answer to a prompt (one of ``num_samples``), with every grader's score."""

    candidate: str
    sample: int = Field(description="0 .. num_samples - 1.")
    answer: str
    finish_reason: str = Field(description="'stop' (ended with EOS) or 'length' (cut at max_new_tokens).")
    tokens: int = Field(description="Answer length in tokens, the EOS included.")
    log_ratio_to_base: float = Field(
        description="sum over answer tokens of log p_candidate - log p_base (0 for the base itself)."
    )
    scores: dict[str, float] = Field(description="{grader name: score}, one entry per grader.")
    grader_errors: list[dict[str, str]] = Field(
        default_factory=list,
        description="Why a grader could not score this answer ({grader, code, message}; it scored 0).",
    )


class PromptResult(BaseModel):
    """One prompt of an evaluation: its answers side by side, candidates in the evaluation's order."""

    object: str = "evaluation.prompt"
    index: int = Field(description="The prompt's position in the evaluation (0-based): the list's cursor.")
    line: int = Field(description="Its line in the prompts dataset (1-based).")
    prompt: str | list[dict[str, Any]] = Field(description="The prompt text, or its chat messages.")
    references: dict[str, str] | None = Field(
        None,
        description="{grader: the reference it compared answers with on this item} for graders with a "
        "reference template (string_check, text_similarity, numeric); null for evaluations stored before "
        "references were recorded.",
    )
    answers: list[PromptAnswer]


def metric_name(candidate: str, grader: str, statistic: str) -> str:
    return f"eval/{candidate}/{grader}/{statistic}"


# --- where the spec lives on the job row: its hyperparameters column, under one key (no schema migration)

EVALUATION_KEY = "evaluation"


def stored_hyperparameters(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The evaluate job's ``hyperparameters`` column: ``{"evaluation": <the resolved spec>}``."""
    return {EVALUATION_KEY: evaluation}


def evaluation_of(method: str, hyperparameters: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved spec of an evaluate job's row (None for every other method)."""
    if method != Method.evaluate:
        return None
    stored = hyperparameters.get(EVALUATION_KEY)
    return stored if isinstance(stored, dict) else None
