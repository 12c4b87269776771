"""How an OpenAI fine-tuning job maps onto an alignd job (framework-free, torch-free).

The facade keeps one job system: ``POST /openai/v1/fine_tuning/jobs`` becomes an alignd ``sft``, ``dpo`` or
``grpo`` job. This module holds the rules, each documented in docs/openai.md:

- :func:`resolve_method`: OpenAI's hyperparameter names onto alignd's, ``"auto"`` onto documented defaults
  (:data:`AUTO`), and the knobs alignd has no counterpart for, reported as warnings for the job's events;
- :func:`in_openai_terms`: a refusal by alignd's submission rules, its field paths renamed to the OpenAI
  request's (``hyperparameters.epochs`` -> ``method.supervised.hyperparameters.n_epochs``);
- :func:`fine_tuned_model_name`: ``ft:<base>:<suffix>:<job id>``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from contract.hyperparameters import DPOHyperparameters, GRPOHyperparameters, SFTHyperparameters
from contract.methods import Method
from service.core.errors import ValidationFailed
from service.core.openai_files import FileFormat

__all__ = [
    "ALIGND_METHODS",
    "AUTO",
    "MappedMethod",
    "fine_tuned_model_name",
    "in_openai_terms",
    "resolve_method",
]

ALIGND_METHODS: dict[FileFormat, Method] = {
    FileFormat.supervised: Method.sft,
    FileFormat.dpo: Method.dpo,
    FileFormat.reinforcement: Method.grpo,
}
_HYPERPARAMETER_MODELS: dict[FileFormat, type[BaseModel]] = {
    FileFormat.supervised: SFTHyperparameters,
    FileFormat.dpo: DPOHyperparameters,
    FileFormat.reinforcement: GRPOHyperparameters,
}


def _default(fmt: FileFormat, name: str) -> Any:
    return _HYPERPARAMETER_MODELS[fmt].model_fields[name].default


# What "auto" (or an absent value) resolves to: alignd's own defaults for the method, except reinforcement's
# n_epochs (GRPO counts updates, not passes: one pass over the prompts).
AUTO: dict[FileFormat, dict[str, Any]] = {
    FileFormat.supervised: {
        "n_epochs": _default(FileFormat.supervised, "epochs"),
        "batch_size": _default(FileFormat.supervised, "batch_size"),
        "learning_rate_multiplier": 1.0,
    },
    FileFormat.dpo: {
        "n_epochs": _default(FileFormat.dpo, "epochs"),
        "batch_size": _default(FileFormat.dpo, "batch_size"),
        "learning_rate_multiplier": 1.0,
        "beta": _default(FileFormat.dpo, "beta"),
    },
    FileFormat.reinforcement: {
        "n_epochs": 1,
        "batch_size": _default(FileFormat.reinforcement, "batch_size"),
        "learning_rate_multiplier": 1.0,
    },
}
# The base learning rate learning_rate_multiplier scales: the method's alignd default.
BASE_LEARNING_RATES: dict[FileFormat, float] = {
    fmt: float(_default(fmt, "learning_rate")) for fmt in FileFormat
}
# OpenAI reinforcement knobs alignd's GRPO has no counterpart for, with the value that asks for nothing.
IGNORED_REINFORCEMENT: dict[str, Any] = {
    "compute_multiplier": "auto",
    "eval_interval": "auto",
    "eval_samples": "auto",
    "reasoning_effort": "default",
}


@dataclass(frozen=True)
class MappedMethod:
    method: Method
    hyperparameters: dict[str, Any]  # alignd's, for the job (reinforcement: see for_records)
    openai: dict[str, Any]  # OpenAI's, "auto" resolved: what the job answers as its hyperparameters
    warnings: list[str] = field(default_factory=list)

    def for_records(self, num_records: int) -> dict[str, Any]:
        """The job's hyperparameters for a training file of ``num_records`` lines: reinforcement's n_epochs
        become GRPO updates, one per batch_size prompts."""
        if self.method is not Method.grpo:
            return dict(self.hyperparameters)
        updates = self.openai["n_epochs"] * max(1, math.ceil(num_records / self.openai["batch_size"]))
        return {**self.hyperparameters, "steps": updates}


def _where(fmt: FileFormat, name: str) -> str:
    return f"method.{fmt.value}.hyperparameters.{name}"


def resolve_method(fmt: FileFormat, given: dict[str, Any]) -> MappedMethod:
    """alignd's hyperparameters for an OpenAI method's (``given``: names to values, ``"auto"`` allowed;
    absent names are ``"auto"``). Raises ValidationFailed when the learning rate the multiplier asks for is
    not one. Checked before any file is read: a refusal costs no conversion."""
    values = {
        name: (default if given.get(name, "auto") == "auto" else given[name])
        for name, default in AUTO[fmt].items()
    }
    learning_rate = BASE_LEARNING_RATES[fmt] * float(values["learning_rate_multiplier"])
    if not learning_rate < 1:
        where = _where(fmt, "learning_rate_multiplier")
        raise ValidationFailed(
            f"{where}: {values['learning_rate_multiplier']} x the base learning rate "
            f"{BASE_LEARNING_RATES[fmt]:g} is {learning_rate:g}; it must stay below 1",
            code="invalid_hyperparameters",
            details=[{"field": where, "code": "invalid_value", "message": "too large"}],
        )
    hyperparameters: dict[str, Any] = {
        "epochs": values["n_epochs"],
        "batch_size": values["batch_size"],
        "learning_rate": learning_rate,
    }
    warnings: list[str] = []
    if fmt is FileFormat.dpo:
        hyperparameters["beta"] = values["beta"]
    if fmt is FileFormat.reinforcement:
        for name, inert in IGNORED_REINFORCEMENT.items():
            values[name] = given.get(name, inert)
            if values[name] != inert:
                warnings.append(
                    f"method.reinforcement.hyperparameters.{name}={given[name]!r} is ignored: alignd's GRPO "
                    "has no counterpart (docs/openai.md)."
                )
    return MappedMethod(ALIGND_METHODS[fmt], hyperparameters, values, warnings)


def fine_tuned_model_name(base: str, suffix: str | None, job_id: str) -> str:
    """``ft:<base>:<suffix>:<job id>`` (OpenAI's ``ft:<base>:<org>:<suffix>:<id>`` without the org, which a
    self-hosted tenant has no use for); an absent suffix leaves its place empty, as OpenAI does. Colons in the
    base model's name become dashes, so the name splits the same way back."""
    return f"ft:{base.replace(':', '-')}:{suffix or ''}:{job_id}"


# alignd's request fields -> the OpenAI request's, per method (longest prefix first).
def _renames(fmt: FileFormat) -> list[tuple[str, str]]:
    hp = f"method.{fmt.value}.hyperparameters"
    renames = [
        ("hyperparameters.graders", f"method.{fmt.value}.grader"),
        ("hyperparameters.epochs", f"{hp}.n_epochs"),
        ("hyperparameters.steps", f"{hp}.n_epochs"),
        ("hyperparameters.batch_size", f"{hp}.batch_size"),
        ("hyperparameters.learning_rate", f"{hp}.learning_rate_multiplier"),
        ("hyperparameters.beta", f"{hp}.beta"),
        ("hyperparameters", hp),
        ("base_model", "model"),
        ("init_adapter", "model"),
        ("datasets", "training_file"),
    ]
    return renames


def _renamed(path: str, renames: list[tuple[str, str]]) -> str:
    for alignd_name, openai_name in renames:
        if path == alignd_name or path.startswith((f"{alignd_name}.", f"{alignd_name}[")):
            rest = path[len(alignd_name) :]
            if alignd_name == "hyperparameters.graders":
                rest = re.sub(r"^\[0\]", "", rest)  # the job's one grader is the method's grader
            elif alignd_name == "datasets":
                rest = ""  # datasets.sft, datasets.prompts...: the training file either way
            return openai_name + rest
    return path


def in_openai_terms(exc: ValidationFailed, fmt: FileFormat) -> ValidationFailed:
    """``exc`` (a refusal by alignd's submission rules) with each detail's field renamed to the OpenAI
    request's field, so the facade's error ``param`` names what the caller sent."""
    renames = _renames(fmt)
    details = [
        {**detail, "field": _renamed(str(detail["field"]), renames)} if "field" in detail else detail
        for detail in exc.details
    ]
    summary = "; ".join(f"{d.get('field', 'request')}: {d.get('message', '')}" for d in details[:5])
    return ValidationFailed(
        f"Invalid job: {summary}" if details else exc.message, code=exc.code, details=details
    )
