"""The evaluate job at submission: its ``evaluation`` object checked into problems that name each field.

``check_evaluation`` validates the spec (``contract.evaluation``), its graders (``contract.graders``, with the
field paths ``service/core/graders.py`` reports), and every model it names: candidate adapters must be the
tenant's ``adapter`` artifacts, reward-model graders the tenant's ``reward_model`` artifacts, and a score-model
judge the job's base model or an adapter on it (one base is loaded per job). ``missing_item_problems`` reads
the prompts dataset and lists each line that lacks an ``{{item.<field>}}`` a grader reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError

from contract.evaluation import EvaluationSpec, model_refs, spec_problems
from contract.graders import GraderSpecError, parse_grader
from service.core.rewards import missing_item_field_problems

Problem = dict[str, Any]
# (resource type, id) -> the resource's kind ("" for a model), None when the tenant has no such resource.
KindLookup = Callable[[str, str], str | None]


def _grader_problems(raw: dict[str, Any]) -> list[Problem]:
    graders = raw.get("graders")
    if not isinstance(graders, list):
        return []  # the spec's own validation says what is wrong with the list
    problems: list[Problem] = []
    for index, grader in enumerate(graders):
        try:
            parse_grader(grader, field_prefix=f"evaluation.graders[{index}]")
        except GraderSpecError as exc:
            problems.extend(exc.details)
    return problems


def _spec_problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        if len(loc) >= 2 and loc[0] == "graders" and isinstance(loc[1], int):
            continue  # reported by _grader_problems, with the grader rules' own codes and paths
        field = "evaluation" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)
        code = {"extra_forbidden": "unknown_field", "missing": "missing_field"}.get(
            error["type"], "invalid_value"
        )
        problems.append({"field": field, "code": code, "message": str(error["msg"])})
    return problems


def _model_problems(spec: EvaluationSpec, *, base_model: str, lookup: KindLookup) -> list[Problem]:
    problems: list[Problem] = []
    for field, resource_id, wanted in model_refs(spec):
        if wanted == "judge" and resource_id.startswith("model_"):
            if resource_id != base_model:
                problems.append(
                    {
                        "field": field,
                        "code": "judge_model_not_supported",
                        "message": f"an evaluation judges with its base model ({base_model}) or an adapter "
                        f"artifact on it, not '{resource_id}'",
                    }
                )
            continue
        expected = "adapter" if wanted == "judge" else wanted
        kind = lookup("artifact", resource_id)
        if kind is None:
            problems.append(
                {"field": field, "code": "unknown_artifact", "message": f"no artifact '{resource_id}'"}
            )
        elif kind != expected:
            problems.append(
                {
                    "field": field,
                    "code": "wrong_artifact_kind",
                    "message": f"artifact '{resource_id}' is a '{kind}', expected '{expected}'",
                }
            )
    return problems


def check_evaluation(
    raw: Any, *, base_model: str, lookup: KindLookup
) -> tuple[EvaluationSpec | None, list[Problem]]:
    """The validated spec (None when it cannot be built) and every problem found in it."""
    if not isinstance(raw, dict):
        return None, [
            {
                "field": "evaluation",
                "code": "missing_evaluation" if raw is None else "invalid_value",
                "message": "method 'evaluate' needs an 'evaluation' object (candidates, baseline, graders)",
            }
        ]
    problems = _grader_problems(raw)
    try:
        spec = EvaluationSpec.model_validate(raw)
    except ValidationError as exc:
        return None, problems + _spec_problems(exc)
    problems += spec_problems(spec)
    problems += _model_problems(spec, base_model=base_model, lookup=lookup)
    return spec, problems


def missing_item_problems(
    spec: EvaluationSpec, rows: Iterable[tuple[int, dict[str, Any]]], *, field: str = "datasets.prompts"
) -> list[Problem]:
    """One problem per dataset line (up to 100) lacking an item field a grader reads, with its line number.

    Only the lines the job evaluates are read (``sampling.max_prompts``); the rule is GRPO's rewards' own."""
    return missing_item_field_problems(spec.graders, rows, field=field, limit=spec.sampling.max_prompts)
