"""Job rules: methods, statuses, allowed transitions, and the hyperparameters of each method.

The hyperparameter models are the single definition of every knob: the API validates a submission against
them (unknown names are refused), stores the *resolved* values (defaults filled in) on the job row, and the
training child reads the same models back. Each field carries its help text, as TRL's config dataclasses do.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.core.errors import ValidationFailed


class Method(StrEnum):
    sft = "sft"
    reward_model = "reward_model"
    dpo = "dpo"
    ppo = "ppo"
    rlhf = "rlhf"


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

# A job only moves forward; `running -> queued` is the reconciler handing a dead worker's job to another.
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    JobStatus.running: frozenset(
        {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.queued}
    ),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    return new in ALLOWED_TRANSITIONS[current]


# Methods whose training code exists; the others are accepted by the schema and refused with 422.
AVAILABLE_METHODS: frozenset[Method] = frozenset({Method.sft})

# Which dataset kinds each method needs (role name == dataset kind).
REQUIRED_DATASETS: dict[Method, tuple[str, ...]] = {
    Method.sft: ("sft",),
    Method.reward_model: ("preference",),
    Method.dpo: ("preference",),
    Method.ppo: ("prompts",),
    Method.rlhf: ("sft", "preference", "prompts"),
}

RLHF_STAGES: tuple[Method, ...] = (Method.sft, Method.reward_model, Method.ppo)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraSettings(_Strict):
    """LoRA adapter shape, passed to ``peft.LoraConfig``."""

    r: int = Field(16, ge=1, le=1024, description="Rank of the low-rank update matrices.")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input during training.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Module names (or suffixes) to adapt, or 'all-linear' for every linear layer but the "
        "output head.",
    )

    @model_validator(mode="after")
    def _non_empty_targets(self) -> LoraSettings:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        return self


class CommonHyperparameters(_Strict):
    """Knobs every method accepts."""

    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training data.")
    max_steps: int | None = Field(
        None, ge=1, description="Hard cap on optimizer steps; training stops there even mid-epoch."
    )
    batch_size: int = Field(4, ge=1, le=4096, description="Examples per optimizer step (per device).")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak AdamW learning rate.")
    max_length: int = Field(
        512, ge=8, le=131072, description="Token budget per example; longer examples are truncated."
    )


class SFTHyperparameters(CommonHyperparameters):
    """Supervised fine-tuning: next-token loss on completion tokens only."""

    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches summed into one optimizer step."
    )
    warmup_ratio: float = Field(0.03, ge=0, le=0.5, description="Share of steps spent warming up the lr.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0, lt=1, description="AdamW weight decay on the LoRA weights.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold (global L2 norm).")
    logging_steps: int = Field(1, ge=1, description="Report metrics every this many optimizer steps.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less memory, about 30% slower."
    )
    completion_only_loss: bool = Field(
        True, description="Train on completion/assistant tokens only (prompt tokens are masked)."
    )


HYPERPARAMETER_MODELS: dict[Method, type[CommonHyperparameters]] = {
    Method.sft: SFTHyperparameters,
    Method.reward_model: CommonHyperparameters,
    Method.dpo: CommonHyperparameters,
    Method.ppo: CommonHyperparameters,
}


def _pydantic_details(exc: ValidationError, prefix: str) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in (prefix, *err["loc"]) if part != "")
        code = "unknown_hyperparameter" if err["type"] == "extra_forbidden" else "invalid_value"
        details.append({"field": loc, "code": code, "message": err["msg"]})
    return details


def resolve_hyperparameters(method: Method, raw: dict[str, Any] | None) -> dict[str, Any]:
    """Validate user hyperparameters for ``method`` and return them with every default filled in.

    ``rlhf`` takes one mapping per stage: ``{"sft": {...}, "reward_model": {...}, "ppo": {...}}``.
    Raises ValidationFailed (422, code ``invalid_hyperparameters``) naming each offending field.
    """
    raw = raw or {}
    if method is Method.rlhf:
        unknown = sorted(set(raw) - {stage.value for stage in RLHF_STAGES})
        if unknown:
            raise ValidationFailed(
                f"rlhf hyperparameters are keyed by stage (sft, reward_model, ppo); unknown: {unknown}",
                code="invalid_hyperparameters",
                details=[
                    {"field": f"hyperparameters.{k}", "code": "unknown_stage", "message": "unknown stage"}
                    for k in unknown
                ],
            )
        resolved: dict[str, Any] = {}
        details: list[dict[str, Any]] = []
        for stage in RLHF_STAGES:
            stage_raw = raw.get(stage.value) or {}
            if not isinstance(stage_raw, dict):
                details.append(
                    {
                        "field": f"hyperparameters.{stage.value}",
                        "code": "wrong_type",
                        "message": "must be an object",
                    }
                )
                continue
            try:
                resolved[stage.value] = HYPERPARAMETER_MODELS[stage].model_validate(stage_raw).model_dump()
            except ValidationError as exc:
                details.extend(_pydantic_details(exc, f"hyperparameters.{stage.value}"))
        if details:
            raise ValidationFailed(
                "Invalid hyperparameters.", code="invalid_hyperparameters", details=details
            )
        return resolved
    try:
        return HYPERPARAMETER_MODELS[method].model_validate(raw).model_dump()
    except ValidationError as exc:
        raise ValidationFailed(
            "Invalid hyperparameters: "
            + "; ".join(f"{d['field']}: {d['message']}" for d in _pydantic_details(exc, "hyperparameters")),
            code="invalid_hyperparameters",
            details=_pydantic_details(exc, "hyperparameters"),
        ) from None


def resolve_lora(raw: dict[str, Any] | None) -> dict[str, Any]:
    try:
        return LoraSettings.model_validate(raw or {}).model_dump()
    except ValidationError as exc:
        details = _pydantic_details(exc, "lora")
        raise ValidationFailed(
            "Invalid LoRA settings: " + "; ".join(f"{d['field']}: {d['message']}" for d in details),
            code="invalid_lora",
            details=details,
        ) from None
