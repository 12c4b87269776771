"""The rewards of a GRPO or RLOO job (or an rlhf job's grpo/rloo stage) at submission.

The rewards are the ``graders`` (and ``reward_weights``) in the job's hyperparameters, plus the job's
``reward_model``. These rules add to what ``contract.hyperparameters.GroupHyperparameters`` checks by itself:

- :func:`grader_details`: each raw grader parsed by the grader rules (``contract.graders.parse_grader``), so
  a bad grader is refused with those rules' codes and field paths (``hyperparameters.graders[0].pattern``);
- :func:`reward_problems`: a job needs graders, a reward model, or both; a ``score_model`` judge must be the
  job's base model (one base is loaded per job: the judge is that base with the adapters disabled);
- :func:`missing_item_field_problems`: every dataset line lacking an ``{{item.<field>}}`` a grader reads,
  with its line number (at most 100), read from the prompts dataset at submission.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from contract.graders import GraderSpecError, item_fields, leaves, parse_grader
from contract.grading import missing_item_fields

Problem = dict[str, Any]
MAX_LINE_PROBLEMS = 100  # as the dataset validator reports at most 100 bad lines
GROUP_METHODS = ("grpo", "rloo")


def grader_details(raw_hyperparameters: Any, *, prefix: str) -> list[Problem]:
    """The grader rules' problems with ``raw_hyperparameters["graders"]`` (``prefix``: where the
    hyperparameters sit, e.g. ``hyperparameters`` or ``hyperparameters.grpo``)."""
    graders = raw_hyperparameters.get("graders") if isinstance(raw_hyperparameters, dict) else None
    if not isinstance(graders, list):
        return []  # absent, or not a list: the hyperparameters model says what is wrong
    problems: list[Problem] = []
    for index, grader in enumerate(graders):
        try:
            parse_grader(grader, field_prefix=f"{prefix}.graders[{index}]")
        except GraderSpecError as exc:
            problems.extend(exc.details)
    return problems


def reward_problems(
    hyperparameters: dict[str, Any],
    *,
    method: str,
    base_model: str,
    has_reward_model: bool,
    prefix: str = "hyperparameters",
) -> list[Problem]:
    """What a resolved group method's rewards lack or name wrongly (see the module docstring)."""
    graders = [parse_grader(raw) for raw in hyperparameters.get("graders", [])]
    if not graders and not has_reward_model:
        return [
            {
                "field": f"{prefix}.graders",
                "code": "missing_reward",
                "message": f"method '{method}' needs rewards: graders in {prefix}.graders, a reward_model, "
                "or both",
            }
        ]
    problems: list[Problem] = []
    for index, grader in enumerate(graders):
        for path, leaf in leaves(grader):
            if leaf.type == "score_model" and leaf.model != base_model:
                where = f"{prefix}.graders[{index}]" + path[len(grader.name) :].replace(".", ".graders.")
                problems.append(
                    {
                        "field": f"{where}.model",
                        "code": "judge_model_not_supported",
                        "message": f"a judge here is the job's base model ({base_model}), not '{leaf.model}'",
                    }
                )
    return problems


def missing_item_field_problems(
    graders: list[Any],
    rows: Iterable[tuple[int, dict[str, Any]]],
    *,
    field: str = "datasets.prompts",
    limit: int | None = None,
) -> list[Problem]:
    """One problem per dataset line (up to 100) lacking an item field one of ``graders`` reads; only the first
    ``limit`` lines are read when given. Nothing is read when no grader reads an item field."""
    readers = [grader for grader in graders if item_fields(grader)]
    if not readers:
        return []
    problems: list[Problem] = []
    for count, (line, record) in enumerate(rows, start=1):
        gaps = [(g.name, missing) for g in readers if (missing := missing_item_fields(g, record))]
        if gaps:
            named = "; ".join(
                f"{', '.join(repr(m) for m in missing)} (grader '{name}')" for name, missing in gaps
            )
            problems.append(
                {
                    "field": field,
                    "line": line,
                    "code": "missing_item_field",
                    "message": f"line {line} lacks item fields the graders read: {named}",
                }
            )
        if len(problems) >= MAX_LINE_PROBLEMS or (limit is not None and count >= limit):
            break
    return problems


def group_problems(
    method: str,
    hyperparameters: dict[str, Any],
    *,
    base_model: str,
    has_reward_model: bool,
    rows: Callable[[], Iterable[tuple[int, dict[str, Any]]]] | None,
) -> list[Problem]:
    """The reward rules of a resolved grpo or rloo job, or of an rlhf job whose ``rl_method`` is one of them
    (its reward model is the one the pipeline trains). ``rows`` reads the prompts dataset's lines; None: not
    read (the request is refused for another reason, or there is nothing to read)."""
    if method == "rlhf":
        stage = hyperparameters.get("rl_method")
        if stage not in GROUP_METHODS:
            return []
        values, prefix, has_reward_model = hyperparameters[stage], f"hyperparameters.{stage}", True
    elif method in GROUP_METHODS:
        values, prefix = hyperparameters, "hyperparameters"
    else:
        return []
    problems = reward_problems(
        values, method=method, base_model=base_model, has_reward_model=has_reward_model, prefix=prefix
    )
    if not problems and rows is not None:
        graders = [parse_grader(raw) for raw in values.get("graders", [])]
        problems = missing_item_field_problems(graders, rows())
    return problems
