"""Turning a job request into a job record: every rule about what a job may reference lives here.

Framework-free: takes plain values and a lookup callback, returns the resolved fields or raises
ValidationFailed naming each offending field (422), so the API route stays a few lines.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from contract import reward_gate
from contract.hyperparameters import held_out_eval_block
from contract.methods import AVAILABLE_METHODS, OPTIONAL_DATASETS, REQUIRED_DATASETS, Method, stored_rl_method
from contract.resources import (
    DISTRIBUTED_METHODS,
    RESOURCES_KEY,
    Resources,
    uses_model_judge,
)
from service.core.errors import ValidationFailed
from service.core.evaluation import check_evaluation, missing_item_problems
from service.core.jobs import resolve_hyperparameters, resolve_lora
from service.core.rewards import group_problems


@dataclass(frozen=True)
class ResourceInfo:
    """What the rules need to know about a referenced resource: its kind (dataset kind, artifact kind) and,
    for an artifact, its metadata (a reward model's held-out figures, read by the quality gate)."""

    kind: str | None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


Lookup = Callable[[str, str], ResourceInfo | None]  # (resource type, id) -> info, None if not the tenant's
# A dataset's records as (line number, record), read from storage (the evaluate job checks its rows).
DatasetRows = Callable[[str], Iterable[tuple[int, dict[str, Any]]]]

# Dataset kinds each role accepts besides its own: a ranking expands to all its (better, worse) pairs, so it
# serves wherever preference pairs do (the runner expands it; see service/core/ranking.py).
ROLE_KINDS: dict[str, frozenset[str]] = {"preference": frozenset({"preference", "ranking"})}

# Methods that train a reward model, and so may continue one (``init_reward_model``).
REWARD_MODEL_METHODS = frozenset({Method.reward_model, Method.rlhf})


@dataclass(frozen=True)
class ResolvedJob:
    method: Method
    base_model: str
    datasets: dict[str, str]
    init_adapter: str | None
    reward_model: str | None
    lora: dict[str, Any]
    hyperparameters: dict[str, Any]
    seed: int
    init_reward_model: str | None = None
    evaluation: dict[str, Any] | None = None
    resources: Resources = dataclasses.field(default_factory=Resources)

    def stored_hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters column: the method's, with non-default resources under ``resources``."""
        if self.resources.is_default:
            return self.hyperparameters
        return {**self.hyperparameters, RESOURCES_KEY: self.resources.model_dump()}


def resolve_job(
    *,
    method: Method,
    base_model: str,
    datasets: dict[str, str | None],
    init_adapter: str | None,
    reward_model: str | None,
    lora: dict[str, Any] | None,
    hyperparameters: dict[str, Any] | None,
    seed: int | None,
    lookup: Lookup,
    init_reward_model: str | None = None,
    evaluation: Any = None,
    dataset_rows: DatasetRows | None = None,
    resources: Mapping[str, Any] | None = None,
    pool_max_processes: int | None = None,
) -> ResolvedJob:
    if method not in AVAILABLE_METHODS:
        available = ", ".join(sorted(m.value for m in AVAILABLE_METHODS))
        raise ValidationFailed(
            f"Method '{method.value}' is not available in this version (available: {available}).",
            code="method_not_available",
            details=[{"field": "method", "code": "method_not_available", "message": method.value}],
        )
    problems: list[dict[str, Any]] = []
    if lookup("model", base_model) is None:
        problems.append(
            {"field": "base_model", "code": "unknown_model", "message": f"no model '{base_model}'"}
        )

    needed = REQUIRED_DATASETS[method]
    given = {role: dataset_id for role, dataset_id in datasets.items() if dataset_id is not None}
    for role in needed:
        if role not in given:
            problems.append(
                {
                    "field": f"datasets.{role}",
                    "code": "missing_dataset",
                    "message": f"method '{method.value}' needs a '{role}' dataset",
                }
            )
    optional = OPTIONAL_DATASETS.get(method, {})
    for role, dataset_id in given.items():
        if role not in needed and role not in optional:
            problems.append(
                {
                    "field": f"datasets.{role}",
                    "code": "unexpected_dataset",
                    "message": f"method '{method.value}' does not use a '{role}' dataset",
                }
            )
            continue
        info = lookup("dataset", dataset_id)
        if info is None:
            problems.append(
                {
                    "field": f"datasets.{role}",
                    "code": "unknown_dataset",
                    "message": f"no dataset '{dataset_id}'",
                }
            )
        elif info.kind not in (kinds := ROLE_KINDS.get(role, frozenset({optional.get(role, role)}))):
            expected = " or ".join(f"'{k}'" for k in sorted(kinds))
            problems.append(
                {
                    "field": f"datasets.{role}",
                    "code": "wrong_dataset_kind",
                    "message": f"dataset '{dataset_id}' is of kind '{info.kind}', expected {expected}",
                }
            )

    for field, artifact_id, expected_kind in (
        ("init_adapter", init_adapter, "adapter"),
        ("reward_model", reward_model, "reward_model"),
        ("init_reward_model", init_reward_model, "reward_model"),
    ):
        if artifact_id is None:
            continue
        info = lookup("artifact", artifact_id)
        if info is None:
            problems.append(
                {"field": field, "code": "unknown_artifact", "message": f"no artifact '{artifact_id}'"}
            )
        elif info.kind != expected_kind:
            problems.append(
                {
                    "field": field,
                    "code": "wrong_artifact_kind",
                    "message": f"artifact '{artifact_id}' is a '{info.kind}', expected '{expected_kind}'",
                }
            )
    if init_reward_model is not None and method not in REWARD_MODEL_METHODS:
        problems.append(
            {
                "field": "init_reward_model",
                "code": "unexpected_field",
                "message": f"method '{method.value}' trains no reward model to continue",
            }
        )
    if method is Method.ppo and reward_model is None:
        problems.append(
            {"field": "reward_model", "code": "missing_reward_model", "message": "ppo needs a reward_model"}
        )

    resolved_lora: dict[str, Any] = {}
    resolved_hparams: dict[str, Any] = {}
    resolved_evaluation: dict[str, Any] | None = None
    try:
        resolved_lora = resolve_lora(lora)
    except ValidationFailed as exc:
        problems.extend(exc.details)
    if method is Method.evaluate:
        resolved_evaluation = _resolve_evaluation(
            evaluation,
            base_model=base_model,
            lookup=lookup,
            prompts=given.get("prompts") if not problems else None,
            dataset_rows=dataset_rows,
            problems=problems,
        )
        problems.extend(_unused_by_evaluate(init_adapter, reward_model, lora, hyperparameters))
    else:
        if evaluation is not None:
            problems.append(
                {
                    "field": "evaluation",
                    "code": "unexpected_field",
                    "message": f"method '{method.value}' takes no evaluation (method 'evaluate' does)",
                }
            )
        try:
            resolved_hparams = resolve_hyperparameters(method, hyperparameters)
        except ValidationFailed as exc:
            problems.extend(exc.details)
        if method is Method.ppo and reward_model is not None and resolved_hparams:
            problems.extend(_reward_model_gate(reward_model, resolved_hparams, lookup))
        if resolved_hparams:
            problems.extend(
                group_problems(
                    method.value,
                    resolved_hparams,
                    base_model=base_model,
                    has_reward_model=reward_model is not None,
                    rows=_rows_reader(dataset_rows, given.get("prompts"), refused=bool(problems)),
                )
            )
            problems.extend(
                _held_out_eval_problems(
                    method,
                    resolved_hparams,
                    base_model=base_model,
                    lookup=lookup,
                    dataset_rows=None if problems else dataset_rows,
                )
            )

    resolved_resources, found = resolve_resources(
        method, resources, resolved_hparams, pool_max_processes=pool_max_processes
    )
    problems.extend(found)

    if problems:
        summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:5])
        # The first problem's code on top (e.g. 'wrong_dataset_kind'); every problem in details.
        raise ValidationFailed(f"Invalid job: {summary}", code=problems[0]["code"], details=problems)
    return ResolvedJob(
        method=method,
        base_model=base_model,
        datasets=given,
        init_adapter=init_adapter,
        reward_model=reward_model,
        lora=resolved_lora,
        hyperparameters=resolved_hparams,
        seed=seed if seed is not None else secrets.randbelow(2**31),
        init_reward_model=init_reward_model,
        evaluation=resolved_evaluation,
        resources=resolved_resources,
    )


def resolve_resources(
    method: Method,
    raw: Mapping[str, Any] | None,
    hyperparameters: Mapping[str, Any],
    *,
    pool_max_processes: int | None,
) -> tuple[Resources, list[dict[str, Any]]]:
    """The job's ``resources`` (contract/resources.py) and what is wrong with them: a method that does not
    run data-parallel yet, ``fsdp`` with one process or a score_model judge, more processes than the pool's largest worker has
    (``ALIGND_POOL_MAX_PROCESSES``), a PPO batch that does not split evenly across the processes."""
    try:
        resources = Resources.model_validate(dict(raw or {}))
    except ValidationError as exc:
        return Resources(), _resource_details(exc)
    problems: list[dict[str, Any]] = []
    n = resources.processes
    # fsdp runs wherever processes > 1 does (a method that cannot is refused below with processes_not_supported)
    if resources.strategy == "fsdp" and uses_model_judge(hyperparameters):
        problems.append(
            {
                "field": "resources.strategy",
                "code": "strategy_not_supported",
                "message": "strategy 'fsdp' cannot run a score_model judge grader (it decodes its own answers, "
                "a different number of steps on each process); use 'ddp'",
            }
        )
    elif resources.strategy == "fsdp" and n < 2:
        problems.append(
            {
                "field": "resources.strategy",
                "code": "strategy_not_supported",
                "message": "strategy 'fsdp' shards the base across processes: ask for processes >= 2",
            }
        )
    if n > 1 and method not in DISTRIBUTED_METHODS:
        methods = ", ".join(sorted(m.value for m in DISTRIBUTED_METHODS))
        problems.append(
            {
                "field": "resources.processes",
                "code": "processes_not_supported",
                "message": f"method '{method.value}' runs in one process for now (processes > 1: {methods})",
            }
        )
    if pool_max_processes is not None and n > pool_max_processes:
        problems.append(
            {
                "field": "resources.processes",
                "code": "insufficient_capacity",
                "message": f"{n} processes asked; the largest worker of this pool has {pool_max_processes} "
                "(ALIGND_POOL_MAX_PROCESSES)",
            }
        )
    if n > 1 and hyperparameters:
        problems.extend(_split_problems(method, hyperparameters, n))
    return resources, problems


def _split_problems(
    method: Method, hyperparameters: Mapping[str, Any], processes: int, *, prefix: str = "hyperparameters"
) -> list[dict[str, Any]]:
    """What an online method's batch needs to run on ``processes`` (rlhf: its last stage's)."""
    if method is Method.rlhf:
        stage = Method(stored_rl_method(hyperparameters))
        return _split_problems(
            stage, hyperparameters[stage.value], processes, prefix=f"{prefix}.{stage.value}"
        )
    if method is Method.ppo:
        return _ppo_split_problems(hyperparameters, processes, prefix=prefix)
    if method in (Method.grpo, Method.rloo):
        uneven = _uneven("batch_size", int(hyperparameters["batch_size"]), processes, prefix=prefix)
        return uneven + _eval_block_problems(method.value, hyperparameters, prefix=prefix)
    return []


def _uneven(name: str, value: int, processes: int, *, prefix: str) -> list[dict[str, Any]]:
    """An online method's batch that does not split evenly: each process takes an equal share (the same
    number of answers, minibatches and optimizer steps)."""
    if value % processes == 0:
        return []
    return [
        {
            "field": f"{prefix}.{name}",
            "code": "uneven_split",
            "message": f"{name} is {value}: with {processes} processes it must be a multiple of {processes} "
            "(each process takes an equal share)",
        }
    ]


def _resource_details(exc: ValidationError) -> list[dict[str, Any]]:
    details = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in ("resources", *err["loc"]))
        code = "unknown_field" if err["type"] == "extra_forbidden" else "invalid_value"
        details.append({"field": loc, "code": code, "message": err["msg"]})
    return details


def _ppo_split_problems(
    hyperparameters: Mapping[str, Any], processes: int, *, prefix: str
) -> list[dict[str, Any]]:
    """PPO with N processes: each samples and trains on an equal share of every rollout and minibatch, so
    both must split evenly (every process takes the same number of optimizer steps)."""
    rollout_size = int(hyperparameters.get("rollout_batch_size") or hyperparameters["batch_size"])
    mini_batch = min(int(hyperparameters.get("mini_batch_size") or rollout_size), rollout_size)
    problems = _uneven("rollout_batch_size", rollout_size, processes, prefix=prefix)
    problems += _uneven("mini_batch_size", mini_batch, processes, prefix=prefix)
    return problems + _eval_block_problems("ppo", hyperparameters, prefix=prefix)


def _eval_block_problems(
    method: str, hyperparameters: Mapping[str, Any], *, prefix: str
) -> list[dict[str, Any]]:
    if hyperparameters.get("eval") is None:
        return []
    return [
        {
            "field": f"{prefix}.eval",
            "code": "processes_not_supported",
            "message": f"{method}'s held-out eval block (and rlhf's final evaluation on it) runs in one process "
            "for now: drop it or use processes=1",
        }
    ]


def _reward_model_gate(
    reward_model: str, hyperparameters: dict[str, Any], lookup: Lookup
) -> list[dict[str, Any]]:
    """PPO on a reward model that fails its quality gate optimises noise: refused unless the job says
    ``allow_weak_reward_model`` (contract/reward_gate.py has the rule; the floor is the reward model's own)."""
    info = lookup("artifact", reward_model)
    if info is None or info.kind != "reward_model" or hyperparameters.get("allow_weak_reward_model"):
        return []
    quality, floor = reward_gate.quality_of(info.metadata), reward_gate.floor_of(info.metadata)
    failure = reward_gate.failure(quality, floor)
    if failure is None:
        return []
    return [
        {
            "field": "reward_model",
            "code": reward_gate.REWARD_MODEL_TOO_WEAK,
            "message": f"reward model '{reward_model}' is too weak to drive PPO: {failure}. Improve the "
            "preference data (more pairs, more held out, consistent labels), or set "
            "hyperparameters.allow_weak_reward_model to run anyway",
        }
    ]


def _resolve_evaluation(
    raw: Any,
    *,
    base_model: str,
    lookup: Lookup,
    prompts: str | None,
    dataset_rows: DatasetRows | None,
    problems: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The evaluate job's spec as stored, problems appended to ``problems``.

    The prompts dataset's lines are read only once everything else holds (``prompts`` is None otherwise):
    no file is read for a request that is refused anyway."""

    def kind_of(resource: str, resource_id: str) -> str | None:
        info = lookup(resource, resource_id)
        return None if info is None else info.kind or ""

    spec, found = check_evaluation(raw, base_model=base_model, lookup=kind_of)
    problems.extend(found)
    if spec is None or found:
        return None
    if prompts is not None and dataset_rows is not None:
        problems.extend(missing_item_problems(spec, dataset_rows(prompts)))
    return spec.dump()


def _held_out_eval_problems(
    method: Method,
    hyperparameters: dict[str, Any],
    *,
    base_model: str,
    lookup: Lookup,
    dataset_rows: DatasetRows | None,
) -> list[dict[str, Any]]:
    """An online job's (or rlhf last stage's) eval block, checked as an evaluate job's graders are: names, the
    artifacts they name, the prompts dataset, and its lines' item fields (read only when nothing else is
    wrong; ``dataset_rows`` None: not read)."""
    block, prefix = held_out_eval_block(method.value, hyperparameters)
    if block is None:
        return []
    # The block as a one-candidate evaluation: the same rules, the fields renamed to where the block is.
    raw = {
        "candidates": [{"name": "policy"}],
        "graders": block["graders"],
        "sampling": {key: block[key] for key in ("max_new_tokens", "max_prompts", "batch_size")},
    }

    def kind_of(resource: str, resource_id: str) -> str | None:
        info = lookup(resource, resource_id)
        return None if info is None else info.kind or ""

    spec, found = check_evaluation(raw, base_model=base_model, lookup=kind_of)
    problems = [{**p, "field": p["field"].replace("evaluation.", f"{prefix}.", 1)} for p in found]
    where, dataset_id = f"{prefix}.prompts", block["prompts"]
    info = lookup("dataset", dataset_id)
    if info is None:
        problems.append({"field": where, "code": "unknown_dataset", "message": f"no dataset '{dataset_id}'"})
    elif info.kind != "prompts":
        problems.append(
            {
                "field": where,
                "code": "wrong_dataset_kind",
                "message": f"dataset '{dataset_id}' is of kind '{info.kind}', expected 'prompts'",
            }
        )
    elif spec is not None and not problems and dataset_rows is not None:
        problems.extend(missing_item_problems(spec, dataset_rows(dataset_id), field=where))
    return problems


def _unused_by_evaluate(
    init_adapter: str | None, reward_model: str | None, lora: Any, hyperparameters: Any
) -> list[dict[str, Any]]:
    """Fields an evaluate job would silently ignore: refused, so nobody thinks they took effect."""
    where = {
        "init_adapter": (init_adapter, "candidates name their adapters in evaluation.candidates"),
        "reward_model": (reward_model, "reward models grade as reward_model graders in evaluation.graders"),
        "lora": (lora, "candidates keep their own adapters' shapes"),
        "hyperparameters": (hyperparameters, "sampling settings go in evaluation.sampling"),
    }
    return [
        {"field": field, "code": "unexpected_field", "message": f"method 'evaluate' takes no {field}: {why}"}
        for field, (value, why) in where.items()
        if value
    ]


def _rows_reader(
    dataset_rows: DatasetRows | None, dataset_id: str | None, *, refused: bool
) -> Callable[[], Iterable[tuple[int, dict[str, Any]]]] | None:
    """Reads ``dataset_id``'s lines when called; None when there is nothing to read or the request is refused
    anyway (no file is read for it)."""
    if dataset_rows is None or dataset_id is None or refused:
        return None
    return lambda: dataset_rows(dataset_id)
