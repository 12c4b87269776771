"""Graders at the API: specs validated by ``contract.graders``, refusals turned into the service's 422s.

``validate_grader`` is what a job submission calls on its grader (field path included, e.g.
``grader.graders.exact.reference``); ``dry_run`` scores one sample for ``POST /v1/graders/run``. Model-backed
graders (score_model, reward_model) need a worker that loads the model, so the dry run refuses them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from contract.graders import GraderSpecError, Sample, model_backed, parse_grader
from contract.grading import GradeResult, as_sample, grade
from service.core.errors import ValidationFailed

# A policy refusal outranks shape problems as the error's top-level code; details carry every problem.
_TOP_CODES = ("grader_kind_not_allowed", "grader_kind_not_supported")


def validate_grader(raw: Any, *, field: str = "grader") -> Any:
    """The validated grader model; raises ValidationFailed (422) naming each offending field."""
    try:
        return parse_grader(raw, field_prefix=field)
    except GraderSpecError as exc:
        codes = {detail["code"] for detail in exc.details}
        code = next((top for top in _TOP_CODES if top in codes), "invalid_grader")
        raise ValidationFailed(f"Invalid grader: {exc}", code=code, details=exc.details) from None


def refuse_model_backed(grader: Any, *, field: str = "grader") -> None:
    """A dry run has no worker to load a judge or reward model: 422 ``grader_needs_worker``."""
    names = model_backed(grader)
    if names:
        raise ValidationFailed(
            f"Grader(s) {', '.join(names)} score with a model (score_model / reward_model), which needs a worker "
            "that loads the model; the dry run scores rule graders only.",
            code="grader_needs_worker",
            details=[
                {"field": field, "code": "grader_needs_worker", "message": f"{name} needs a model"}
                for name in names
            ],
        )


def dry_run(
    raw_grader: Any, model_sample: str | Sample, item: Mapping[str, Any]
) -> tuple[GradeResult, float]:
    """Validate and score one sample with a rule grader; the result and the seconds grading took."""
    grader = validate_grader(raw_grader)
    refuse_model_backed(grader)
    started = time.perf_counter()
    result = grade(grader, as_sample(model_sample), item)
    return result, time.perf_counter() - started
