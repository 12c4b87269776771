"""OpenAI's grader conventions on alignd's graders (framework-free, torch-free).

The grader JSON is the same (docs/graders.md: alignd accepts OpenAI's kinds as they are), so what is left to
map is small: a reinforcement job's grader name, which alignd uses as a metric series name, and the dry
run's error report, which OpenAI gives as flags and alignd as a list of reasons.
"""

from __future__ import annotations

import re
from typing import Any

from contract.hyperparameters import REWARD_NAME_PATTERN

__all__ = ["error_flags", "job_grader"]

_NOT_IN_SERIES_NAME = re.compile(r"[^A-Za-z0-9_.-]")

# alignd's grading error codes -> OpenAI's flag for them; any other code sets other_error.
_FLAGS = {
    "formula_error": "formula_parse_error",
    "missing_field": "invalid_variable_error",
    "sample_not_json": "sample_parse_error",
    "needs_model_scorer": "model_grader_server_error",
    "model_scorer_failed": "model_grader_server_error",
    "score_out_of_range": "model_grader_parse_error",
}


def job_grader(grader: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The alignd GRPO grader for an OpenAI reinforcement grader, and warnings. The specs are the same JSON;
    only the name differs in what it may be: alignd's names a metric series (``reward/<name>``)."""
    name = grader.get("name")
    if not isinstance(name, str) or re.fullmatch(REWARD_NAME_PATTERN, name):
        return grader, []  # valid, or a shape the grader rules refuse with their own message
    series = _NOT_IN_SERIES_NAME.sub("_", name)[:48] or "grader"
    warning = (
        f"Grader name {name!r} is reported as {series!r}: alignd's grader names are metric series names "
        "([A-Za-z0-9_.-], at most 48 characters)."
    )
    return {**grader, "name": series}, [warning]


def error_flags(errors: list[dict[str, Any]]) -> dict[str, bool]:
    """OpenAI's ``metadata.errors`` flags set by alignd's grading errors (``{grader, code, message}``)."""
    flags: dict[str, bool] = {}
    for error in errors:
        flags[_FLAGS.get(str(error.get("code")), "other_error")] = True
    return flags
