"""Request and response schemas: ``XCreate`` for input, ``XPublic`` for output, one list envelope."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, Field
from sqlalchemy.engine import Row

from contract.evaluation import evaluation_of
from contract.inputs import InputModel
from contract.methods import Method
from contract.resources import MAX_PROCESSES, Resources, resources_of, without_resources
from service.core.feedback import ItemRatings
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
        None, description="'ddp' (default). 'fsdp' is refused with 422 strategy_not_supported for now."
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
        description="What the job asks of a worker: {processes: N, strategy: 'ddp'}. processes > 1: sft, "
        "reward_model, dpo, ppo, grpo, rloo and rlhf.",
    )
    hyperparameters: dict[str, Any] | None = Field(
        None,
        description="Per-method knobs; for rlhf keyed by stage: {rl_method: ppo|grpo|rloo, final_evaluation: "
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

    @classmethod
    def of(cls, row: FeedbackSetRow, progress: Progress) -> FeedbackSetPublic:
        return cls(
            id=row.id,
            name=row.name,
            candidates=row.candidates,
            annotations_per_item=row.annotations_per_item,
            num_items=row.num_items,
            round=row.round,
            progress=FeedbackProgress.of(progress),
            created_at=row.created_at,
        )


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

    @classmethod
    def of(cls, item: FeedbackItemRow, ratings: ItemRatings) -> ItemRatingsPublic:
        return cls(
            item=item.id,
            num_labels=ratings.num_labels,
            num_comparisons=ratings.num_comparisons,
            agreement=ratings.agreement,
            kendalls_w=ratings.kendalls_w,
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
        description="Share of agreeing judgements over every two annotators who judged the same pair."
    )
    overlapping_judgements: int
    kendalls_w: float | None = Field(description="Mean Kendall's W over items with 2+ full labels.")
    items_with_overlap: int


class RatingsPublic(BaseModel):
    object: Literal["feedback_set.ratings"] = "feedback_set.ratings"
    feedback_set: str
    progress: FeedbackProgress
    agreement: AgreementPublic
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


class HealthPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)
