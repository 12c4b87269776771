"""Submission rules for jobs: statuses and their transitions, and the resolution of hyperparameters and
LoRA settings into API errors that name each offending field.

The knobs themselves (methods, ``LoraSettings``, every ``*Hyperparameters`` model) live in the torch-free
``contract`` package, which the training child reads too.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from contract.hyperparameters import HYPERPARAMETER_MODELS, LoraSettings
from contract.methods import RLHF_STAGES, Method
from service.core.errors import ValidationFailed


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


class IllegalTransition(ValueError):
    """A code path asked for a move the lifecycle forbids (a bug on the server's side, never a client's input:
    each caller names constant statuses, and its compare-and-set on the row checks the current one)."""

    def __init__(self, current: JobStatus, new: JobStatus) -> None:
        super().__init__(f"a job never moves from {current.value!r} to {new.value!r}")
        self.current = current
        self.new = new


def can_transition(current: JobStatus, new: JobStatus) -> bool:
    return new in ALLOWED_TRANSITIONS[current]


def transition(current: JobStatus | str, new: JobStatus) -> JobStatus:
    """``new``, if a job may move from ``current`` to it; raises IllegalTransition otherwise.

    Every write of a job's status goes through this (``service.db.jobs.status_change`` for the
    compare-and-set updates), so ``ALLOWED_TRANSITIONS`` is the lifecycle the code can actually produce.
    """
    current = JobStatus(current)
    if not can_transition(current, new):
        raise IllegalTransition(current, new)
    return new


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
