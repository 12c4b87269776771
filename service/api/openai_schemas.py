"""Request and response schemas of the OpenAI facade (``/openai/v1``): OpenAI's object shapes, field for field
as the pinned ``openai`` release (3.57.0) reads them, plus a few alignd fields a client may ignore.

Requests are :class:`contract.inputs.InputModel` like alignd's own (unknown fields refused, strict types), so
an OpenAI field alignd does not know is a clear 400 rather than silently dropped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    BaseModel,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

from contract.inputs import InputModel

T = TypeVar("T")
Auto = Literal["auto"]


@dataclass(frozen=True)
class _AutoOr:
    """Pydantic metadata: a hyperparameter that is ``"auto"`` or a number of ``kind`` in range, checked as one
    rule. A plain union would report each of its branches failing (``n_epochs.constrained-int`` and
    ``n_epochs.literal['auto']``) where the facade's error names one field, ``param``, as OpenAI's does."""

    kind: type
    low: float
    high: float | None = None
    exclusive: bool = False  # low itself is out of range

    def check(self, value: Any) -> Any:
        if value == "auto":
            return value
        name = "an integer" if self.kind is int else "a number"
        numeric = type(value) is int or (self.kind is float and type(value) is float)
        if not numeric or not math.isfinite(value):
            raise ValueError(f"must be 'auto' or {name}")
        if value < self.low or (self.exclusive and value == self.low) or (self.high and value > self.high):
            bounds = f"{'above' if self.exclusive else 'at least'} {self.low:g}"
            raise ValueError(
                f"must be 'auto' or {name} {bounds}" + (f" and at most {self.high:g}" if self.high else "")
            )
        return value

    def __get_pydantic_core_schema__(self, _source: Any, _handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_plain_validator_function(self.check)

    def __get_pydantic_json_schema__(
        self, _schema: CoreSchema, _handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        number: dict[str, Any] = {"type": "integer" if self.kind is int else "number"}
        number["exclusiveMinimum" if self.exclusive else "minimum"] = self.low
        if self.high is not None:
            number["maximum"] = self.high
        return {"anyOf": [number, {"type": "string", "enum": ["auto"]}]}


Epochs = Annotated[Any, _AutoOr(int, 1, 1000)]
BatchSize = Annotated[Any, _AutoOr(int, 1, 4096)]
Multiplier = Annotated[Any, _AutoOr(float, 0, exclusive=True)]
EvalCount = Annotated[Any, _AutoOr(int, 1)]

# A suffix lands inside ft:<base>:<suffix>:<job id>, which /openai/v1/models/{model} takes as a path part.
SUFFIX_PATTERN = r"[^:/\s]{1,64}"


class OpenAIList(BaseModel, Generic[T]):
    """OpenAI's list and cursor page: ``data`` plus ``has_more``, and the ids a client pages on."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def page(cls, data: list[T], has_more: bool = False) -> OpenAIList[T]:
        ids = [getattr(item, "id", None) for item in data]
        return cls(
            data=data, has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None
        )


class OpenAIErrorObject(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The request field at fault (the first problem's), if any.")
    code: str | None = Field(description="alignd's stable error code, e.g. invalid_training_file.")
    details: list[dict[str, Any]] = Field(
        default_factory=list,
        description="alignd's addition: every problem, e.g. {field, line, code, message} per bad line.",
    )


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorObject


# --- files


class OpenAIFile(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["processed"] = Field(
        "processed",
        description="Deprecated by OpenAI; always 'processed': files are read when a job uses them.",
    )
    status_details: str | None = None
    expires_at: int | None = None


class OpenAIFileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# --- fine-tuning jobs: requests


class OpenAISupervisedHyperparameters(InputModel):
    n_epochs: Epochs = "auto"
    batch_size: BatchSize = "auto"
    learning_rate_multiplier: Multiplier = "auto"


class OpenAIDpoHyperparameters(OpenAISupervisedHyperparameters):
    beta: Multiplier = "auto"


class OpenAIReinforcementHyperparameters(OpenAISupervisedHyperparameters):
    compute_multiplier: Multiplier = "auto"
    eval_interval: EvalCount = "auto"
    eval_samples: EvalCount = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"


class OpenAISupervisedMethod(InputModel):
    hyperparameters: OpenAISupervisedHyperparameters | None = None


class OpenAIDpoMethod(InputModel):
    hyperparameters: OpenAIDpoHyperparameters | None = None


class OpenAIReinforcementMethod(InputModel):
    grader: dict[str, Any] = Field(
        description="OpenAI's grader JSON (string_check, text_similarity, score_model, multi) or any alignd "
        "grader kind (docs/graders.md); python is refused."
    )
    hyperparameters: OpenAIReinforcementHyperparameters | None = None


class OpenAIMethodCreate(InputModel):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: OpenAISupervisedMethod | None = None
    dpo: OpenAIDpoMethod | None = None
    reinforcement: OpenAIReinforcementMethod | None = None

    @model_validator(mode="after")
    def _one_block(self) -> OpenAIMethodCreate:
        others = [
            name
            for name in ("supervised", "dpo", "reinforcement")
            if name != self.type and getattr(self, name)
        ]
        if others:
            raise ValueError(f"method.{others[0]} is given, but the method's type is {self.type!r}")
        return self

    def hyperparameters(self) -> dict[str, Any]:
        """The given hyperparameters of the method's own block (absent ones are "auto")."""
        block = getattr(self, self.type)
        values = getattr(block, "hyperparameters", None) if block is not None else None
        return values.model_dump(exclude_unset=True) if values is not None else {}


class OpenAIFineTuningJobCreate(InputModel):
    model: str = Field(
        min_length=1,
        max_length=512,
        description="An alignd base model id (model_...), a base model's name (unique among the tenant's), "
        "or a fine-tuned model (ft:...) to continue from.",
    )
    training_file: str = Field(min_length=1, max_length=64, description="A file id (file_...).")
    validation_file: str | None = Field(
        None, max_length=64, description="Validated like the training file; not trained or scored on."
    )
    method: OpenAIMethodCreate | None = Field(
        None, description="Default: supervised with every value 'auto'."
    )
    hyperparameters: OpenAISupervisedHyperparameters | None = Field(
        None, description="Deprecated by OpenAI in favour of method; the supervised method's hyperparameters."
    )
    suffix: str | None = Field(None, description="Up to 64 characters, no ':', '/' or whitespace.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = Field(
        None, description="Up to 16 pairs; keys up to 64 characters, values up to 512."
    )
    integrations: list[dict[str, Any]] | None = Field(
        None, description="Accepted and ignored (a warning event says so): alignd reports to no tracker."
    )

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and re.fullmatch(SUFFIX_PATTERN, value) is None:
            raise ValueError("must be 1 to 64 characters without ':', '/' or whitespace")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError("at most 16 pairs")
        if any(len(key) > 64 or len(item) > 512 for key, item in value.items()):
            raise ValueError("keys are at most 64 characters, values at most 512")
        return value


# --- fine-tuning jobs: responses


class OpenAIJobErrorObject(BaseModel):
    code: str
    message: str
    param: str | None = None


class OpenAIJobHyperparameters(BaseModel):
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


class OpenAIAligndLinks(BaseModel):
    """alignd's addition to the job: where its weights are (alignd's own API, not OpenAI's)."""

    job: str = Field(description="The alignd job (GET /v1/jobs/{id}); the same id.")
    method: str = Field(description="The alignd method it runs: sft, dpo or grpo.")
    adapter: str | None = Field(description="The trained LoRA adapter artifact, once the job succeeded.")
    adapter_url: str | None = Field(description="Its download: GET /v1/artifacts/{id}/content (.tar.gz).")


class OpenAIFineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: OpenAIJobErrorObject | None
    fine_tuned_model: str | None = Field(description="ft:<base>:<suffix>:<job id>, once succeeded.")
    finished_at: int | None
    hyperparameters: OpenAIJobHyperparameters
    model: str
    organization_id: str = Field(description="The tenant.")
    result_files: list[str] = Field(default_factory=list, description="Always empty (docs/openai.md).")
    seed: int
    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]
    trained_tokens: int | None = Field(
        None,
        description="supervised jobs, once succeeded: the non-pad tokens of every training example the job "
        "consumed (each epoch counts again); null for dpo and reinforcement jobs and before the end.",
    )
    training_file: str
    validation_file: str | None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None
    method: dict[str, Any]
    alignd: OpenAIAligndLinks


class OpenAIFineTuningJobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] = Field(default_factory=dict, description="{'stage': ...} when the event has one.")
    type: Literal["message", "metrics"] = "message"


class OpenAICheckpointMetrics(BaseModel):
    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class OpenAIFineTuningJobCheckpoint(BaseModel):
    id: str = Field(description="The alignd artifact holding it (GET /v1/artifacts/{id}/content).")
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: OpenAICheckpointMetrics
    step_number: int


# --- models


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field(description="The tenant.")


# --- graders


class OpenAIGraderValidateResult(BaseModel):
    grader: dict[str, Any] = Field(description="The spec as alignd stores it: every default filled in.")


class OpenAIGraderRunErrors(BaseModel):
    """OpenAI's error flags; alignd's own reasons are in ``metadata.error_details``."""

    formula_parse_error: bool = False
    invalid_variable_error: bool = False
    model_grader_parse_error: bool = False
    model_grader_refusal_error: bool = False
    model_grader_server_error: bool = False
    model_grader_server_error_details: str | None = None
    other_error: bool = False
    python_grader_runtime_error: bool = False
    python_grader_runtime_error_details: str | None = None
    python_grader_server_error: bool = False
    python_grader_server_error_type: str | None = None
    sample_parse_error: bool = False
    truncated_observation_error: bool = False
    unresponsive_reward_error: bool = False


class OpenAIGraderRunMetadata(BaseModel):
    name: str
    type: str
    errors: OpenAIGraderRunErrors
    error_details: list[dict[str, str]] = Field(description="alignd: {grader, code, message} per failure.")
    execution_time: float
    scores: dict[str, float]
    sampled_model_name: str | None = None
    token_usage: int | None = None


class OpenAIGraderRunResult(BaseModel):
    reward: float
    metadata: OpenAIGraderRunMetadata
    sub_rewards: dict[str, float]
    model_grader_token_usage_per_model: dict[str, Any] = Field(default_factory=dict)
