"""Request and response schemas: ``XCreate`` for input, ``XPublic`` for output, one list envelope."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field
from sqlalchemy.engine import Row

from contract.evaluation import evaluation_of
from contract.inputs import InputModel
from contract.methods import Method
from contract.resources import MAX_PROCESSES, Precision, Resources, resources_of, without_resources
from service.core.feedback import ItemRatings, uncertainty_margin
from service.core.feedback_sets import Progress
from service.core.jobs import JobStatus
from service.db.tables import (
    ArtifactRow,
    DatasetRow,
    FeedbackItemRow,
    FeedbackLabelRow,
    FeedbackSetRow,
    JobEventRow,
    JobRow,
    ModelRow,
)

T = TypeVar("T")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. 'invalid_dataset'.")
    message: str
    details: list[dict[str, Any]] = Field(
        default_factory=list, description="Per-item problems, e.g. {line, code, message} for datasets."
    )


class ErrorBody(BaseModel):
    error: ErrorDetail


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    name: str
    architecture: str | None
    num_parameters: int
    size_bytes: int
    status: str
    created_at: int

    @classmethod
    def of(cls, row: ModelRow) -> ModelPublic:
        return cls.model_validate(row, from_attributes=True)


class DatasetPublic(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    kind: str
    num_records: int
    size_bytes: int
    sha256: str
    status: str
    created_at: int
    job: str | None = Field(None, description="The job that generated it (a generate job's candidates).")
    feedback_set: str | None = Field(None, description="The feedback set it was exported from.")
    round: int | None = Field(None, description="Feedback round it belongs to, if any.")

    @classmethod
    def of(cls, row: DatasetRow) -> DatasetPublic:
        return cls(
            id=row.id,
            name=row.name,
            kind=row.kind,
            num_records=row.num_records,
            size_bytes=row.size_bytes,
            sha256=row.sha256,
            status=row.status,
            created_at=row.created_at,
            job=row.job_id,
            feedback_set=row.feedback_set_id,
            round=row.round,
        )


class LoraCreate(InputModel):
    r: int | None = Field(None, description="Rank of the low-rank update matrices (default 16).")
    alpha: float | None = Field(
        None, description="Scaling numerator: the update is scaled by alpha / r (default 32)."
    )
    dropout: float | None = Field(
        None, description="Dropout on the LoRA input during training (default 0: off, faster and lighter)."
    )
    target_modules: str | list[str] | None = Field(
        None,
        description="Module names (or suffixes) to adapt, or 'all-linear' (the default) for every linear layer but "
        "the output head.",
    )


class JobDatasets(InputModel):
    sft: str | None = Field(None, description="Dataset id of kind 'sft' (demonstrations).")
    preference: str | None = Field(
        None,
        description="Dataset id of kind 'preference' (chosen/rejected) or 'ranking' (expanded to pairs).",
    )
    prompts: str | None = Field(None, description="Dataset id of kind 'prompts' (for PPO rollouts).")
    validation: str | None = Field(
        None,
        description="sft and dpo: a held-out dataset (kind 'sft' for sft, 'preference' for dpo), scored every "
        "hyperparameters.eval_steps: eval_loss and eval_mean_token_accuracy (sft), eval_loss, eval_accuracy and "
        "eval_margin (dpo).",
    )


class ResourcesCreate(InputModel):
    processes: int | None = Field(
        None,
        ge=1,
        le=MAX_PROCESSES,
        description="Training processes on one worker (one GPU each on a GPU worker); default 1. With N > 1 the "
        "job runs through torchrun (torch.distributed.run), data parallel: batch_size stays the examples of "
        "one optimizer step across all processes (docs/scale-out.md).",
    )
    strategy: Literal["ddp", "fsdp"] | None = Field(
        None,
        description="'ddp' (default: every process holds the whole base) or 'fsdp' (processes >= 2; not with a "
        "score_model judge grader): the decoder layers' weights and their LoRA optimizer state sharded across "
        "the processes (docs/scale-out.md).",
    )
    precision: Precision | None = Field(
        None,
        description="The base model's dtype in training: 'auto' (default: bf16 on a CUDA GPU that supports "
        "it, else fp32), 'fp32' or 'bf16' (fast on CPUs with Intel AMX). Adapters, optimizer and losses stay "
        "fp32.",
    )


class JobCreate(InputModel):
    method: Method = Field(strict=False)  # strict mode wants the member; the value is a string
    base_model: str = Field(description="Model id (model_...).")
    datasets: JobDatasets = Field(default_factory=JobDatasets)
    init_adapter: str | None = Field(None, description="Adapter artifact id to continue from (art_...).")
    reward_model: str | None = Field(None, description="reward_model artifact id, for ppo (art_...).")
    init_reward_model: str | None = Field(
        None,
        description="reward_model artifact id to continue training (reward_model and rlhf; art_...).",
    )
    round: int | None = Field(None, ge=0, le=1_000_000, description="Feedback round this job belongs to.")
    lora: LoraCreate | None = None
    resources: ResourcesCreate | None = Field(
        None,
        description="What the job asks of a worker: {processes: N, strategy: 'ddp', precision: 'auto'}. "
        "processes > 1: sft, "
        "reward_model, dpo, ppo, grpo, rloo and rlhf.",
    )
    hyperparameters: dict[str, Any] | None = Field(
        None,
        description="Per-method knobs; for rlhf keyed by stage: {rl_method: grpo (default)|ppo|rloo, final_evaluation: "
        "true|false (evaluate base, sft and the last stage on its eval block at the end; docs/evaluation.md), "
        "sft: {...}, reward_model: {...}, <rl_method>: {...}}; grpo/rloo rewards: {graders: [...], "
        "reward_weights: [...]} (docs/grpo.md).",
    )
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Fixed seed; random (and recorded) if omitted."
    )
    name: str | None = Field(None, max_length=256)
    evaluation: dict[str, Any] | None = Field(
        None,
        description="method 'evaluate' only: {candidates: [{name, adapter?}], baseline, graders: [grader, ...], "
        "sampling: {max_new_tokens, temperature, top_p, num_samples, max_prompt_length, batch_size, "
        "max_prompts}, bootstrap_resamples} (docs/evaluation.md). Checked by alignd's rules, with field-named "
        "422s.",
        json_schema_extra={
            "example": {
                "candidates": [{"name": "base"}, {"name": "sft", "adapter": "art_..."}],
                "baseline": "base",
                "graders": [
                    {
                        "type": "string_check",
                        "name": "says_yes",
                        "input": "{{sample.output_text}}",
                        "reference": "yes",
                        "operation": "like",
                    }
                ],
                "sampling": {"max_new_tokens": 64, "temperature": 0, "num_samples": 1},
            }
        },
    )


class JobError(BaseModel):
    code: str
    message: str


class MonitorAlert(BaseModel):
    """A reward-hacking monitor that fired during PPO (at most once per monitor and stage)."""

    stage: str | None = Field(description="The stage it fired in ('ppo'; rlhf: its ppo stage).")
    name: str = Field(description="length, kl, entropy, eos or reward_divergence.")
    step: int = Field(description="The PPO update it fired at.")
    value: float = Field(description="The watched quantity at that update.")
    threshold: float = Field(description="The limit it crossed.")
    message: str
    stop: bool = Field(False, description="It was in stop_on and ended the job after this update.")


class JobPublic(BaseModel):
    id: str
    object: Literal["job"] = "job"
    name: str | None
    method: Method
    status: JobStatus
    stage: str | None
    base_model: str
    datasets: dict[str, str]
    init_adapter: str | None
    reward_model: str | None
    init_reward_model: str | None = None
    round: int | None = None
    hyperparameters: dict[str, Any]
    lora: dict[str, Any]
    resources: Resources = Field(
        default_factory=Resources, description="The processes (and strategy) the job runs with."
    )
    seed: int
    evaluation: dict[str, Any] | None = Field(
        None, description="method 'evaluate': the evaluation spec as resolved (every default filled in)."
    )
    progress: float
    error: JobError | None
    status_reason: str | None = Field(
        None,
        description="Why the job ended as it did when the status alone does not say: 'stopped_by_monitor' "
        "(succeeded early: a monitor in stop_on fired; see monitors).",
    )
    monitors: list[MonitorAlert] = Field(
        default_factory=list, description="The reward-hacking monitors that fired during PPO, oldest first."
    )
    pause_requested: bool = Field(
        False,
        description="A pause was asked for and the job is still running: it becomes 'paused' once its training "
        "process has saved a checkpoint and stopped.",
    )
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, row: JobRow | Row[Any]) -> JobPublic:
        """From the ORM row, or a Core row of the jobs table (same attribute names: the hot read path)."""
        error = JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None
        evaluation = evaluation_of(row.method, row.hyperparameters)
        return cls(
            id=row.id,
            name=row.name,
            method=Method(row.method),
            status=JobStatus(row.status),
            stage=row.stage,
            base_model=row.base_model,
            datasets=dict(row.datasets),
            init_adapter=row.init_adapter,
            reward_model=row.reward_model,
            init_reward_model=row.init_reward_model,
            round=row.round,
            # An evaluate job keeps its spec in the hyperparameters column (contract/evaluation.py).
            hyperparameters={} if evaluation is not None else without_resources(row.hyperparameters),
            lora=row.lora,
            resources=resources_of(row.hyperparameters) if evaluation is None else Resources(),
            seed=row.seed,
            evaluation=evaluation,
            progress=row.progress,
            error=error,
            status_reason=row.status_reason,
            monitors=[MonitorAlert.model_validate(entry) for entry in row.monitors or []],
            pause_requested=bool(row.pause_requested) and row.status == JobStatus.running,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )


class EventPublic(BaseModel):
    id: str
    object: Literal["job.event"] = "job.event"
    created_at: int
    level: str
    stage: str | None
    message: str

    @classmethod
    def of(cls, row: JobEventRow) -> EventPublic:
        return cls(
            id=event_id(row.seq or 0),
            created_at=row.created_at,
            level=row.level,
            stage=row.stage,
            message=row.message,
        )


def event_id(seq: int) -> str:
    return f"evt_{seq}"


def parse_event_id(value: str | None) -> int:
    if value and value.startswith("evt_") and value[4:].isdigit():
        return int(value[4:])
    return 0


class MetricPublic(BaseModel):
    seq: int = Field(
        description="The point's position in the job's log: increases with every point logged, so '?after=<seq>' "
        "(or an SSE Last-Event-ID) resumes after it."
    )
    stage: str | None
    step: int
    name: str
    value: float


class ArtifactPublic(BaseModel):
    id: str
    object: Literal["artifact"] = "artifact"
    job: str
    stage: str | None
    kind: str
    size_bytes: int
    sha256: str
    created_at: int

    @classmethod
    def of(cls, row: ArtifactRow) -> ArtifactPublic:
        return cls(
            id=row.id,
            job=row.job_id,
            stage=row.stage,
            kind=row.kind,
            size_bytes=row.size_bytes,
            sha256=row.sha256,
            created_at=row.created_at,
        )


# --- feedback sets


class FeedbackSetCreate(InputModel):
    name: str = Field(min_length=1, max_length=256)
    candidates: str = Field(description="Dataset id of kind 'candidates' (or 'ranking', to label again).")
    annotations_per_item: int = Field(
        1, ge=1, le=100, description="Annotators each item should get before /next stops handing it out."
    )
    round: int | None = Field(
        None, ge=0, le=1_000_000, description="Feedback round (default: the candidates dataset's round)."
    )
    ordering: str = Field(
        "random",
        max_length=32,
        description="'random': least-labelled item first (a per-annotator hash breaks ties). 'uncertainty': "
        "the item the reward model is least sure of first (smallest gap between two of its responses' "
        "rewards); needs reward_model. Both keep annotations_per_item.",
    )
    reward_model: str | None = Field(
        None, max_length=64, description="reward_model artifact (art_...) whose scores order the items."
    )
    refresh_every_labels: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="uncertainty: after this many new labels by people, a reward_model job continues the "
        "reward model on the labels so far and a score job re-scores the items (docs/feedback.md).",
    )
    refresh_hyperparameters: dict[str, Any] | None = Field(
        None,
        description="reward_model hyperparameters of a refresh (default: those of the job that trained "
        "reward_model).",
    )
    refresh_from: str = Field(
        "latest",
        max_length=32,
        description="What a refresh continues on the labels so far: 'latest', the reward model that scored "
        "the items last (each refresh builds on the one before), or 'initial', the set's reward_model (each "
        "refresh trains it once on all labels, as a new reward_model job on them would).",
    )
    guidelines: str | None = Field(
        None,
        description="Markdown shown on the labeling page and given to judges as their rubric (at most "
        "20,000 characters).",
    )
    gold_every: int = Field(
        5,
        ge=0,
        le=1000,
        description="Every gold_every-th item served to an annotator is a gold item (rows of the candidates "
        "file with a 'gold' field) while they have unseen ones; 0: gold items are never served.",
    )
    gold_failure_threshold: float = Field(
        0.25,
        ge=0,
        le=1,
        description="An annotator failing more than this share of their gold items is flagged.",
    )
    routing: str = Field(
        "all",
        max_length=32,
        description="'all', or 'judge_reward_disagree': people are given only the items on which a judge's "
        "verdicts and the reward model's order disagree (or that either has not judged).",
    )


class FeedbackSetUpdate(InputModel):
    """Fields of a set that may change while people label it (the rest describe what it was made from)."""

    guidelines: str | None = Field(None, description="Markdown; an empty string clears them.")
    routing: str | None = Field(None, max_length=32)
    gold_every: int | None = Field(None, ge=0, le=1000)
    gold_failure_threshold: float | None = Field(None, ge=0, le=1)
    refresh_every_labels: int | None = Field(None, ge=1, le=1_000_000)


class FeedbackProgress(BaseModel):
    items: int
    items_labelled: int = Field(description="Items with at least one label.")
    items_complete: int = Field(description="Items with annotations_per_item labels or more.")
    labels: int = Field(description="Labels given, skips excluded.")
    skips: int
    annotators: int

    @classmethod
    def of(cls, progress: Progress) -> FeedbackProgress:
        return cls.model_validate(progress, from_attributes=True)


class ScoringPublic(BaseModel):
    scored_by: str | None = Field(description="The reward model whose scores order the items now.")
    scored_job: str | None = Field(description="The score job that wrote them.")
    refreshes: int = Field(description="Refreshes done (reward model continued on the labels, re-scored).")
    in_flight: dict[str, Any] | None = Field(
        description="The job running now: {job, stage: 'reward_model' | 'score', ...}; None when none."
    )
    last_refresh_labels: int = Field(description="Labels by people when the last refresh started.")


class JudgePublic(BaseModel):
    name: str
    annotator: str = Field(description="judge:<name>, as its labels name it.")
    model: str
    job: str
    status: Literal["running", "done", "failed"]
    labels: int | None = None
    asked: int | None = Field(None, description="Pairs asked, each in both orders.")
    consistent: int | None = Field(None, description="Pairs both orders gave the same verdict: labels.")
    inconsistent: int | None = Field(
        None,
        description="Pairs whose verdict flipped with the order: no label ('answer' verdicts; 'logprobs' "
        "labels them by the difference of the two orders).",
    )
    unparsed: int | None = Field(None, description="Pairs with an answer that was not 1 or 2: no label.")
    first_position_share: float | None = Field(None, description="Share of answers naming the first answer.")
    verdict: str | None = Field(None, description="'answer' or 'logprobs' (JudgeCreate.verdict).")
    position_bias: float | None = Field(
        None,
        description="logprobs verdicts: the judge's mean lean to the first position in log-odds, which the two "
        "orders cancel.",
    )
    error: str | None = None


class FeedbackEventPublic(BaseModel):
    at: int
    kind: str
    message: str
    job: str | None = None


class FeedbackSetPublic(BaseModel):
    id: str
    object: Literal["feedback_set"] = "feedback_set"
    name: str
    candidates: str
    annotations_per_item: int
    num_items: int
    round: int | None
    progress: FeedbackProgress
    created_at: int
    ordering: str
    reward_model: str | None
    refresh_every_labels: int | None
    refresh_from: str
    guidelines: str | None
    gold_every: int
    gold_failure_threshold: float
    routing: str
    scoring: ScoringPublic
    judges: list[JudgePublic]
    events: list[FeedbackEventPublic] = Field(
        description="What happened to the set, oldest first (200 kept)."
    )

    @classmethod
    def of(cls, row: FeedbackSetRow, progress: Progress) -> FeedbackSetPublic:
        state = row.state or {}
        return cls(
            id=row.id,
            name=row.name,
            candidates=row.candidates,
            annotations_per_item=row.annotations_per_item,
            num_items=row.num_items,
            round=row.round,
            progress=FeedbackProgress.of(progress),
            created_at=row.created_at,
            ordering=row.ordering,
            reward_model=row.reward_model,
            refresh_every_labels=row.refresh_every_labels,
            refresh_from=str(state.get("refresh_from", "latest")),
            guidelines=row.guidelines,
            gold_every=row.gold_every,
            gold_failure_threshold=row.gold_failure_threshold,
            routing=row.routing,
            scoring=ScoringPublic(
                scored_by=state.get("scored_by"),
                scored_job=state.get("scored_job"),
                refreshes=int(state.get("refreshes", 0)),
                in_flight=state.get("scoring"),
                last_refresh_labels=int(state.get("last_refresh_labels", 0)),
            ),
            judges=[
                JudgePublic(name=name, annotator=f"judge:{name}", **judge)
                for name, judge in (state.get("judges") or {}).items()
            ],
            events=[
                FeedbackEventPublic(**{k: e.get(k) for k in ("at", "kind", "message", "job")})
                for e in row.events or []
            ],
        )


class JudgeCreate(InputModel):
    name: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Labels as judge:<name>.",
    )
    model: str = Field(
        max_length=64,
        description="The judge: a model id (model_..., the base itself) or an adapter artifact (art_...).",
    )
    max_items: int | None = Field(None, ge=1, description="Judge only the first this many items.")
    max_new_tokens: int = Field(8, ge=1, le=256, description="Longest answer per question.")
    verdict: Literal["answer", "logprobs"] = Field(
        "answer",
        description="'answer': the greedy answer in each order; a pair is labelled only when both name the "
        "same response. 'logprobs': the log-odds of '1' over '2' in each order, the pair labelled by their "
        "difference (a constant lean to a position cancels, so a position-biased judge still gives verdicts).",
    )


class AnnotatorPublic(BaseModel):
    annotator: str
    judge: bool
    items_served: int = Field(description="Items /next handed them.")
    labels: int
    skips: int
    reasons: dict[str, int] = Field(
        description="Why /next chose the items it served them: random, overlap, margin, unscored, gold."
    )
    mean_margin: float | None = Field(description="Mean reward-model margin of the items served for it.")
    agreement_with_majority: float | None = Field(
        description="Share of their pair verdicts that match the strict majority of the other people."
    )
    majority_comparisons: int
    agreement_with: dict[str, float | None] = Field(description="Agreement with each other annotator.")
    median_seconds_per_label: float | None = Field(
        description="From /next handing the item out to the label."
    )
    gold_labelled: int
    gold_failed: int
    flagged: bool
    flag_reasons: list[str]


class AnnotatorsPublic(BaseModel):
    object: Literal["feedback_set.annotators"] = "feedback_set.annotators"
    feedback_set: str
    gold_failure_threshold: float
    annotators: list[AnnotatorPublic]


class ResponseShown(BaseModel):
    id: str
    text: str


class NextItem(BaseModel):
    id: str
    object: Literal["feedback_item"] = "feedback_item"
    feedback_set: str
    annotator: str
    prompt: str | list[dict[str, Any]] = Field(description="As in the candidates file: text or messages.")
    responses: list[ResponseShown] = Field(description="Shuffled per item and annotator; ids are stable.")
    labelled_by_you: int = Field(description="Items this annotator has labelled or skipped in this set.")
    remaining: int = Field(
        description="Items of the set this annotator has not labelled or skipped (an upper bound on what is "
        "left for them: items that reached their annotations are not handed out)."
    )
    reason: str | None = Field(
        None, description="Why this item: random, overlap, margin (see margin), unscored or gold."
    )
    margin: float | None = Field(None, description="The reward model's margin on it (uncertainty ordering).")


class LabelCreate(InputModel):
    item: str = Field(description="Item id (fbi_...).")
    annotator: str = Field(min_length=1, max_length=128)
    ranking: list[str] | None = Field(None, description="Every response id once, best first.", max_length=16)
    scores: dict[str, float] | None = Field(None, description="{response id: score}, higher is better.")
    a: str | None = Field(None, description="Pairwise: first response id.")
    b: str | None = Field(None, description="Pairwise: second response id.")
    winner: Literal["a", "b", "tie"] | None = Field(None, description="Pairwise verdict.")
    skip: bool = Field(False, description="The annotator passes on this item (no judgement).")


class LabelPublic(BaseModel):
    id: str
    object: Literal["feedback_label"] = "feedback_label"
    feedback_set: str
    item: str
    annotator: str
    kind: Literal["ranking", "scores", "pairwise", "skip"]
    ranking: list[str] | None = None
    scores: dict[str, float] | None = None
    a: str | None = None
    b: str | None = None
    winner: Literal["a", "b", "tie"] | None = None
    created_at: int

    @classmethod
    def of(cls, row: FeedbackLabelRow) -> LabelPublic:
        return cls(
            id=row.id,
            feedback_set=row.set_id,
            item=row.item_id,
            annotator=row.annotator,
            kind=row.kind,
            created_at=row.created_at,
            **row.payload,
        )


class ResponseRatingPublic(BaseModel):
    id: str
    index: int = Field(description="Position in the candidates file's responses.")
    elo: float = Field(description="Sequential Elo (K=16, start 1000) over the item's comparisons.")
    bradley_terry: float = Field(description="Bradley-Terry log-strength (mean 0 within the item).")
    comparisons: int
    wins: float = Field(description="Comparisons won; a tie counts half.")


class ItemRatingsPublic(BaseModel):
    item: str
    num_labels: int
    num_comparisons: int
    agreement: float | None = Field(description="Pairwise agreement rate among the item's annotators.")
    kendalls_w: float | None = Field(description="Kendall's W of the item's full rankings/scores.")
    order: list[str] = Field(description="Response ids, best first (Bradley-Terry, then Elo).")
    responses: list[ResponseRatingPublic]
    rewards: list[float] | None = Field(
        None, description="The current reward model's reward per response (candidates-file order), if scored."
    )
    margin: float | None = Field(
        None, description="Smallest gap between two of those rewards: the uncertainty ordering's key."
    )
    gold: list[int] | None = Field(None, description="The known answer of a gold item (indices best first).")

    @classmethod
    def of(cls, item: FeedbackItemRow, ratings: ItemRatings) -> ItemRatingsPublic:
        return cls(
            item=item.id,
            num_labels=ratings.num_labels,
            num_comparisons=ratings.num_comparisons,
            agreement=ratings.agreement,
            kendalls_w=ratings.kendalls_w,
            rewards=item.rewards,
            margin=uncertainty_margin(item.rewards) if item.rewards else None,
            gold=item.gold,
            order=[item.response_ids[i] for i in ratings.order()],
            responses=[
                ResponseRatingPublic(
                    id=x.id,
                    index=x.index,
                    elo=round(x.elo, 3),
                    bradley_terry=round(x.bradley_terry, 6),
                    comparisons=x.comparisons,
                    wins=x.wins,
                )
                for x in ratings.responses
            ],
        )


class AgreementPublic(BaseModel):
    pairwise: float | None = Field(
        description="Share of agreeing judgements over every two people (judges aside) who judged the same pair."
    )
    overlapping_judgements: int
    kendalls_w: float | None = Field(description="Mean Kendall's W over items with 2+ full labels.")
    items_with_overlap: int


class JudgeAgreementPublic(BaseModel):
    annotator: str = Field(description="judge:<name>.")
    with_majority: float | None = Field(description="Agreement with the strict majority of the people.")
    majority_comparisons: int
    with_people: dict[str, float | None] = Field(description="Agreement with each person, on shared pairs.")


class RatingsPublic(BaseModel):
    object: Literal["feedback_set.ratings"] = "feedback_set.ratings"
    feedback_set: str
    progress: FeedbackProgress
    agreement: AgreementPublic
    judges: list[JudgeAgreementPublic] = Field(
        default_factory=list, description="Each judge's agreement, beside the people's (agreement)."
    )
    items: list[ItemRatingsPublic]


class ExportCreate(InputModel):
    name: str | None = Field(None, max_length=256)
    min_labels: int = Field(1, ge=1, le=100, description="Leave out items with fewer labels.")
    min_agreement: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Leave out items whose pairwise agreement is lower; items that no two annotators "
        "judged on a common pair have no agreement and are left out too when this is set.",
    )
    round: int | None = Field(None, ge=0, le=1_000_000, description="Default: the feedback set's round.")
    judge_labels: str = Field(
        "include",
        max_length=32,
        description="'include' judges' labels as any annotator's, 'exclude' them, or 'down_weight' them "
        "(judge_weight).",
    )
    judge_weight: float = Field(0.5, ge=0, le=1, description="down_weight: the weight of a judge's verdict.")
    annotator_weights: str = Field(
        "equal",
        max_length=32,
        description="'equal', or 'agreement': each annotator's verdicts weigh their agreement with the majority.",
    )


class HealthPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
