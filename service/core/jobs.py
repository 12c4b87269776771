"""Submission rules for jobs: statuses and their transitions, and the resolution of hyperparameters and
LoRA settings into API errors that name each offending field.

The knobs themselves (methods, ``LoraSettings``, every ``*Hyperparameters`` model) live in the torch-free
``contract`` package, which the training child reads too.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import ValidationError

from contract.hyperparameters import HYPERPARAMETER_MODELS, RLHF_STAGE_DEFAULTS, LoraSettings, RLHFSettings
from contract.methods import DEFAULT_RL_METHOD, RL_METHODS, Method, rlhf_stages
from service.core.errors import ConflictError, ValidationFailed
from service.core.rewards import grader_details


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    # Stopped on request with its checkpoints kept; `resume` queues it again to continue from the newest.
    paused = "paused"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})

# A job only moves forward; `running -> queued` is the reconciler handing a dead worker's job to another,
# `paused -> queued` a resume.
ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed, JobStatus.paused}),
    JobStatus.running: frozenset(
        {JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.queued, JobStatus.paused}
    ),
    JobStatus.paused: frozenset({JobStatus.queued, JobStatus.cancelled}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


def ensure_unfinished(job_id: str, status: str) -> None:
    """Cancel and pause act on an unfinished job only: 409 ``job_finished`` otherwise."""
    if JobStatus(status).is_terminal:
        raise ConflictError(f"Job {job_id} already finished with status '{status}'.", code="job_finished")


def ensure_pausable(job_id: str, status: str, *, cancel_requested: bool) -> None:
    ensure_unfinished(job_id, status)
    if cancel_requested:
        raise ConflictError(f"Job {job_id} is being cancelled.", code="job_cancelling")


def ensure_resumable(job_id: str, status: str, *, pause_requested: bool) -> None:
    """A paused job resumes; a running one whose pause is pending has it withdrawn; nothing else (409)."""
    if status != JobStatus.paused and not (status == JobStatus.running and pause_requested):
        raise ConflictError(
            f"Job {job_id} is '{status}', not paused; only a paused job (or one pausing) can be resumed.",
            code="job_not_paused",
        )


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


GROUP_METHODS = frozenset({Method.grpo, Method.rloo})


def _validate(method: Method, raw: Any, prefix: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """(``raw`` validated by ``method``'s model with every default filled in, or None; the problems)."""
    if not isinstance(raw, dict):
        return None, [{"field": prefix, "code": "wrong_type", "message": "must be an object"}]
    try:
        model = HYPERPARAMETER_MODELS[method].model_validate(raw)
        if method in GROUP_METHODS:
            # Graders are stored in their JSON form (json_schema's spec under its OpenAI name, "schema").
            return model.model_dump(mode="json", by_alias=True), []
        return model.model_dump(), []
    except ValidationError as exc:
        details = _pydantic_details(exc, prefix)
    if method in GROUP_METHODS:
        # A bad grader is reported by the grader rules, with their codes and field paths, not pydantic's
        # union errors; the rest (weights, names, other knobs) keeps the model's message.
        graders = grader_details(raw, prefix=prefix)
        if graders:
            inside = f"{prefix}.graders."
            details = [d for d in details if not d["field"].startswith(inside)] + graders
    return None, details


def _resolve_rlhf(raw: dict[str, Any]) -> dict[str, Any]:
    """rlhf: ``{"rl_method": "grpo" | "ppo" | "rloo", "final_evaluation": true, "sft": {...},
    "reward_model": {...}, <rl_method>: {...}}`` (``contract.hyperparameters.RLHFSettings``; a stage's values
    over ``RLHF_STAGE_DEFAULTS`` over the method's own defaults)."""
    rl_method = raw.get("rl_method", DEFAULT_RL_METHOD.value)
    if rl_method not in {m.value for m in RL_METHODS}:
        raise ValidationFailed(
            f"rlhf rl_method must be one of {', '.join(m.value for m in RL_METHODS)}, not {rl_method!r}",
            code="invalid_hyperparameters",
            details=[
                {
                    "field": "hyperparameters.rl_method",
                    "code": "invalid_value",
                    "message": f"one of {', '.join(m.value for m in RL_METHODS)}",
                }
            ],
        )
    stages = rlhf_stages(rl_method)
    own = RLHFSettings.model_fields  # rl_method, final_evaluation: the job's knobs beside its stages
    unknown = sorted(set(raw) - set(stages) - set(own))
    if unknown:
        raise ValidationFailed(
            f"rlhf hyperparameters are {', '.join(own)} and one object per stage ({', '.join(stages)}); "
            f"unknown: {unknown}",
            code="invalid_hyperparameters",
            details=[
                {"field": f"hyperparameters.{k}", "code": "unknown_stage", "message": "unknown stage"}
                for k in unknown
            ],
        )
    resolved: dict[str, Any] = {}
    details: list[dict[str, Any]] = []
    try:
        resolved.update(RLHFSettings.model_validate({k: raw[k] for k in own if k in raw}).model_dump())
    except ValidationError as exc:
        details.extend(_pydantic_details(exc, "hyperparameters"))
    for stage in stages:
        given = raw.get(stage) or {}
        if isinstance(given, dict):  # the stage's own values win over rlhf's defaults for it
            given = {**RLHF_STAGE_DEFAULTS.get(stage, {}), **given}
        values, found = _validate(Method(stage), given, f"hyperparameters.{stage}")
        details.extend(found)
        if values is not None:
            resolved[stage] = values
    if details:
        raise ValidationFailed("Invalid hyperparameters.", code="invalid_hyperparameters", details=details)
    return resolved


def resolve_hyperparameters(method: Method, raw: dict[str, Any] | None) -> dict[str, Any]:
    """Validate user hyperparameters for ``method`` and return them with every default filled in.

    ``rlhf`` takes one mapping per stage and the method of its last stage:
    ``{"rl_method": "grpo", "sft": {...}, "reward_model": {...}, "grpo": {...}}`` (``rl_method`` ppo or rloo:
    that key instead of ``grpo``). Raises ValidationFailed (422, code ``invalid_hyperparameters``) naming each
    offending field.
    """
    raw = raw or {}
    if method is Method.rlhf:
        return _resolve_rlhf(raw)
    values, details = _validate(method, raw, "hyperparameters")
    if values is None:
        raise ValidationFailed(
            "Invalid hyperparameters: " + "; ".join(f"{d['field']}: {d['message']}" for d in details),
            code="invalid_hyperparameters",
            details=details,
        )
    return values


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
