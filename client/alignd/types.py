"""Typed response models. They accept extra fields so a newer server never breaks an older SDK."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Agreement",
    "Artifact",
    "CandidateResult",
    "Dataset",
    "Evaluation",
    "FeedbackItem",
    "FeedbackLabel",
    "FeedbackProgress",
    "FeedbackRatings",
    "FeedbackResponse",
    "FeedbackSet",
    "GraderRun",
    "GraderRunMetadata",
    "GraderSummary",
    "GraderValidation",
    "ItemRatings",
    "Job",
    "JobError",
    "JobEvent",
    "Metric",
    "MetricList",
    "Model",
    "MonitorAlert",
    "ResponseRating",
    "Timestamp",
]

Timestamp = int | float
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled", "paused"]
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class AlignObject(BaseModel):
    """Base of every response model: unknown fields are kept (``obj.model_extra``), never refused."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, protected_namespaces=())


class Model(AlignObject):
    id: str
    object: str = "model"
    name: str | None = None
    architecture: str | None = None
    num_parameters: int | None = None
    size_bytes: int | None = None
    status: str | None = None
    created_at: Timestamp | None = None


class Dataset(AlignObject):
    id: str
    object: str = "dataset"
    name: str | None = None
    kind: str | None = None
    num_records: int | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    status: str | None = None
    created_at: Timestamp | None = None
    job: str | None = None
    """The job that generated it (a ``generate`` job's candidates)."""
    feedback_set: str | None = None
    """The feedback set it was exported from."""
    round: int | None = None


class JobError(AlignObject):
    code: str | None = None
    message: str | None = None


class MonitorAlert(AlignObject):
    """A reward-hacking monitor that fired during PPO (``length``, ``kl``, ``entropy``, ``eos``,
    ``reward_divergence``) at update ``step``: ``value`` crossed ``threshold``."""

    stage: str | None = None
    name: str | None = None
    step: int | None = None
    value: float | None = None
    threshold: float | None = None
    message: str | None = None
    stop: bool = False
    """It was in ``stop_on`` and ended the job early."""


class Job(AlignObject):
    id: str
    object: str = "job"
    name: str | None = None
    method: str | None = None
    # A plain str, not the Literal: a future status must not break an old SDK.
    status: str = "queued"
    stage: str | None = None
    base_model: str | None = None
    datasets: dict[str, str] = Field(default_factory=dict)
    init_adapter: str | None = None
    reward_model: str | None = None
    init_reward_model: str | None = None
    round: int | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    """``evaluate`` jobs: the evaluation spec as the server resolved it."""
    lora: dict[str, Any] | None = None
    resources: dict[str, Any] = Field(default_factory=dict)
    """``{"processes": N, "strategy": "ddp" | "fsdp", "precision": "auto"}``: the processes the job trains on,
    whether they copy the base (ddp) or shard its layers (fsdp), and the base model's dtype."""
    seed: int | None = None
    progress: float | None = None
    error: JobError | None = None
    status_reason: str | None = None
    """Why the job ended as it did when the status alone does not say (``stopped_by_monitor``)."""
    monitors: list[MonitorAlert] = Field(default_factory=list)
    """The reward-hacking monitors that fired during PPO."""
    pause_requested: bool = False
    """A pause was asked for; the job is still running until its next step (then ``paused``)."""
    created_at: Timestamp | None = None
    started_at: Timestamp | None = None
    finished_at: Timestamp | None = None

    @property
    def is_terminal(self) -> bool:
        """True once the job is ``succeeded``, ``failed`` or ``cancelled``."""
        return self.status in TERMINAL_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class Artifact(AlignObject):
    id: str
    object: str = "artifact"
    job: str | None = None
    stage: str | None = None
    kind: str | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    created_at: Timestamp | None = None


class JobEvent(AlignObject):
    id: int | str | None = None
    created_at: Timestamp | None = None
    level: str | None = None
    stage: str | None = None
    message: str | None = None


class Metric(AlignObject):
    seq: int | None = None
    """The point's position in the job's log (increasing); ``?after=<seq>`` resumes after it."""
    stage: str | None = None
    step: int | float | None = None
    name: str
    value: float | None = None


class MetricList(list[Metric]):
    """The rows of ``GET /v1/jobs/{id}/metrics`` in server order, with pandas-free helpers."""

    def as_dict(self, *, stage: str | None = None) -> dict[str, dict[str, list[Any]]]:
        """``{name: {"step": [...], "value": [...]}}``, optionally only for one ``stage``.

        >>> rows = MetricList(
        ...     [Metric(name="loss", step=1, value=2.0), Metric(name="loss", step=2, value=1.5)]
        ... )
        >>> rows.as_dict()
        {'loss': {'step': [1, 2], 'value': [2.0, 1.5]}}
        """
        out: dict[str, dict[str, list[Any]]] = {}
        for row in self:
            if stage is not None and row.stage != stage:
                continue
            series = out.setdefault(row.name, {"step": [], "value": []})
            series["step"].append(row.step)
            series["value"].append(row.value)
        return out

    def latest(self, name: str, *, stage: str | None = None) -> Metric | None:
        """The last row named ``name`` (optionally in ``stage``), or None."""
        for row in reversed(self):
            if row.name == name and (stage is None or row.stage == stage):
                return row
        return None

    @property
    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self:
            seen.setdefault(row.name, None)
        return list(seen)


# --- feedback sets (human feedback rounds)


class FeedbackProgress(AlignObject):
    items: int = 0
    items_labelled: int = 0
    items_complete: int = 0
    labels: int = 0
    skips: int = 0
    annotators: int = 0


class FeedbackSet(AlignObject):
    id: str
    object: str = "feedback_set"
    name: str | None = None
    candidates: str | None = None
    annotations_per_item: int | None = None
    num_items: int | None = None
    round: int | None = None
    progress: FeedbackProgress | None = None
    created_at: Timestamp | None = None
    ordering: str | None = None
    """"random" or "uncertainty" (smallest reward-model margin first)."""
    reward_model: str | None = None
    refresh_every_labels: int | None = None
    refresh_from: str | None = None
    """What a refresh continues: "latest" (the last refreshed reward model) or "initial" (the set's own)."""
    guidelines: str | None = None
    gold_every: int | None = None
    gold_failure_threshold: float | None = None
    routing: str | None = None
    scoring: dict[str, Any] | None = None
    """scored_by, scored_job, refreshes, in_flight, last_refresh_labels."""
    judges: list[dict[str, Any]] = Field(default_factory=list)
    events: list[dict[str, Any]] = Field(default_factory=list)


class FeedbackAnnotators(AlignObject):
    """Per annotator: items served and why, agreement with the majority, seconds per label, gold items."""

    object: str = "feedback_set.annotators"
    feedback_set: str | None = None
    gold_failure_threshold: float | None = None
    annotators: list[dict[str, Any]] = Field(default_factory=list)


class FeedbackResponse(AlignObject):
    id: str
    text: str


class FeedbackItem(AlignObject):
    """What ``/next`` hands an annotator: the prompt and the responses in this annotator's order."""

    id: str
    object: str = "feedback_item"
    feedback_set: str | None = None
    annotator: str | None = None
    prompt: str | list[dict[str, Any]] = ""
    responses: list[FeedbackResponse] = Field(default_factory=list)
    labelled_by_you: int | None = None
    remaining: int | None = None
    reason: str | None = None
    """Why /next chose it: random, overlap, margin, unscored or gold."""
    margin: float | None = None


class FeedbackLabel(AlignObject):
    id: str
    object: str = "feedback_label"
    feedback_set: str | None = None
    item: str | None = None
    annotator: str | None = None
    kind: str | None = None
    ranking: list[str] | None = None
    scores: dict[str, float] | None = None
    a: str | None = None
    b: str | None = None
    winner: str | None = None
    created_at: Timestamp | None = None


class ResponseRating(AlignObject):
    id: str
    index: int | None = None
    elo: float | None = None
    bradley_terry: float | None = None
    comparisons: int | None = None
    wins: float | None = None


class ItemRatings(AlignObject):
    item: str
    num_labels: int = 0
    num_comparisons: int = 0
    agreement: float | None = None
    kendalls_w: float | None = None
    order: list[str] = Field(default_factory=list)
    responses: list[ResponseRating] = Field(default_factory=list)
    rewards: list[float] | None = None
    margin: float | None = None
    gold: list[int] | None = None


class Agreement(AlignObject):
    pairwise: float | None = None
    overlapping_judgements: int | None = None
    kendalls_w: float | None = None
    items_with_overlap: int | None = None


class FeedbackRatings(AlignObject):
    object: str = "feedback_set.ratings"
    feedback_set: str | None = None
    progress: FeedbackProgress | None = None
    agreement: Agreement | None = None
    items: list[ItemRatings] = Field(default_factory=list)


# --- evaluations and graders


class GraderSummary(AlignObject):
    """One grader's numbers for one candidate: the mean over prompts and, against the baseline, the paired
    win-rate (ties count half), each with its 95% bootstrap interval. The baseline itself has no win-rate."""

    mean: float
    ci_low: float
    ci_high: float
    win_rate: float | None = None
    win_rate_ci_low: float | None = None
    win_rate_ci_high: float | None = None
    errors: int = 0
    """Answers the grader could not score (scored 0; the reasons are in per_prompt.csv)."""


class CandidateResult(AlignObject):
    name: str
    adapter: str | None = None
    eos_rate: float | None = None
    mean_length: float | None = None
    kl_to_base: float | None = None
    graders: dict[str, GraderSummary] = Field(default_factory=dict)


def _fmt_interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None or low is None or high is None:
        return "-"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


class PromptAnswer(AlignObject):
    """One candidate's answer to one prompt (one of ``num_samples``) with every grader's score."""

    candidate: str
    sample: int = 0
    answer: str
    finish_reason: str | None = None
    tokens: int | None = None
    log_ratio_to_base: float | None = None
    scores: dict[str, float] = Field(default_factory=dict)
    grader_errors: list[dict[str, Any]] = Field(default_factory=list)


class EvaluationPrompt(AlignObject):
    """``GET /v1/jobs/{id}/evaluation/prompts``: one prompt, its candidates' answers side by side."""

    object: str = "evaluation.prompt"
    index: int
    line: int | None = None
    prompt: str | list[dict[str, Any]]
    references: dict[str, str] | None = None
    """What each reference-taking grader compared the answers with on this prompt's item."""
    answers: list[PromptAnswer] = Field(default_factory=list)


class Evaluation(AlignObject):
    """``GET /v1/jobs/{id}/evaluation``: an evaluate job's result. :meth:`table` formats it for people."""

    object: str = "evaluation"
    job: str | None = None
    baseline: str
    num_prompts: int | None = None
    num_samples: int | None = None
    bootstrap_resamples: int | None = None
    confidence: float | None = None
    candidates: list[CandidateResult] = Field(default_factory=list)
    per_prompt_artifact: str | None = None
    """The ``eval`` artifact whose ``per_prompt.csv`` holds every prompt, answer and score."""

    def candidate(self, name: str) -> CandidateResult:
        for candidate in self.candidates:
            if candidate.name == name:
                return candidate
        raise KeyError(name)

    def table(self) -> str:
        """Two plain-text tables: the candidates (EOS rate, length, KL to the base), then one row per candidate
        and grader (mean and win-rate vs the baseline, each with its 95% interval)."""
        head = [["candidate", "adapter", "eos_rate", "mean_length", "kl_to_base"]]
        for c in self.candidates:
            numbers = [
                f"{v:.3f}" if v is not None else "-" for v in (c.eos_rate, c.mean_length, c.kl_to_base)
            ]
            head.append([c.name, c.adapter or "-", *numbers])
        scores = [["candidate", "grader", "mean [95% CI]", f"win rate vs {self.baseline} [95% CI]", "errors"]]
        for c in self.candidates:
            for name, s in c.graders.items():
                win = _fmt_interval(s.win_rate, s.win_rate_ci_low, s.win_rate_ci_high)
                scores.append([c.name, name, _fmt_interval(s.mean, s.ci_low, s.ci_high), win, str(s.errors)])
        about = f"{self.num_prompts} prompts x {self.num_samples} samples; baseline {self.baseline}"
        return f"{about}\n\n{_aligned(head)}\n\n{_aligned(scores)}\n"


class GraderRunMetadata(AlignObject):
    name: str | None = None
    type: str | None = None
    errors: list[dict[str, Any]] = Field(default_factory=list)
    scores: dict[str, float] = Field(default_factory=dict)
    details: dict[str, Any] = Field(default_factory=dict)
    execution_time: float | None = None


class GraderRun(AlignObject):
    """``POST /v1/graders/run``: the reward one sample gets from a rule grader."""

    reward: float
    metadata: GraderRunMetadata = Field(default_factory=GraderRunMetadata)
    sub_rewards: dict[str, float] = Field(default_factory=dict)


class GraderValidation(AlignObject):
    """``POST /v1/graders/validate``: the grader as the server stores it, the item fields it reads, and the
    graders inside it that score with a model."""

    object: str = "grader"
    grader: dict[str, Any] = Field(default_factory=dict)
    item_fields: list[str] = Field(default_factory=list)
    model_backed: list[str] = Field(default_factory=list)
