"""The evaluate job's spec at submission (service/core/evaluation.py): every refusal names its field; the
models it names are looked up by kind; dataset lines missing a grader's item field are listed by number."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from contract.evaluation import EvaluationSpec, evaluation_of, model_refs, stored_hyperparameters
from service.core.evaluation import check_evaluation, missing_item_problems

BASE = "model_base"
KINDS = {"art_sft": "adapter", "art_rm": "reward_model", "art_card": "model_card"}
SAYS_YES = {
    "type": "string_check",
    "name": "yes",
    "input": "{{sample.output_text}}",
    "reference": "yes",
    "operation": "like",
}


def lookup(resource: str, resource_id: str) -> str | None:
    return KINDS.get(resource_id) if resource == "artifact" else None


def check(**evaluation: Any) -> tuple[EvaluationSpec | None, list[dict[str, Any]]]:
    raw = {
        "candidates": [{"name": "base"}, {"name": "sft", "adapter": "art_sft"}],
        "graders": [SAYS_YES],
        **evaluation,
    }
    return check_evaluation(raw, base_model=BASE, lookup=lookup)


def fields(problems: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(p["field"], p["code"]) for p in problems]


def test_a_good_spec_is_resolved_with_its_defaults() -> None:
    spec, problems = check()
    assert problems == [] and spec is not None
    stored = spec.dump()
    assert stored["baseline"] == "base"  # the first candidate by default
    assert stored["sampling"] == {
        "max_new_tokens": 64,
        "temperature": 0.0,
        "top_p": 1.0,
        "num_samples": 1,
        "max_prompt_length": 512,
        "batch_size": 8,
        "max_prompts": None,
    }
    assert stored["graders"][0]["operation"] == "like"
    assert EvaluationSpec.model_validate(stored).dump() == stored  # what the runner reads back
    assert evaluation_of("evaluate", stored_hyperparameters(stored)) == stored
    assert evaluation_of("sft", stored_hyperparameters(stored)) is None


def test_names_and_baseline() -> None:
    _, problems = check(baseline="other")
    assert fields(problems) == [("evaluation.baseline", "unknown_baseline")]
    _, problems = check(candidates=[{"name": "a"}, {"name": "a"}, {"name": "has space"}])
    assert fields(problems) == [
        ("evaluation.candidates[1].name", "duplicate_name"),
        ("evaluation.candidates[2].name", "invalid_name"),
    ]
    _, problems = check(graders=[SAYS_YES, {**SAYS_YES, "name": "a" * 25}])
    assert fields(problems) == [("evaluation.graders[1].name", "invalid_name")]


def test_shape_problems_and_grader_problems_together() -> None:
    spec, problems = check(
        candidates=[],
        graders=[{"type": "python", "name": "p"}, {**SAYS_YES, "operation": "regexp"}],
        colour=1,
    )
    assert spec is None
    assert fields(problems) == [
        ("evaluation.graders[0].type", "grader_kind_not_allowed"),
        ("evaluation.graders[1].operation", "invalid_value"),
        ("evaluation.candidates", "invalid_value"),
        ("evaluation.colour", "unknown_field"),
    ]
    assert fields(check_evaluation(None, base_model=BASE, lookup=lookup)[1]) == [
        ("evaluation", "missing_evaluation")
    ]


def test_every_model_named_is_looked_up_by_kind() -> None:
    judge = {
        "type": "score_model",
        "name": "judge",
        "input": [{"role": "user", "content": "rate {{sample.output_text}}"}],
    }
    mix = {
        "type": "multi",
        "name": "mix",
        "calculate_output": "rm + j",
        "graders": {
            "rm": {"type": "reward_model", "name": "rm", "artifact": "art_sft"},
            "j": {**judge, "model": "model_other"},
        },
    }
    _, problems = check(
        candidates=[
            {"name": "base"},
            {"name": "x", "adapter": "art_card"},
            {"name": "y", "adapter": "art_none"},
        ],
        graders=[
            mix,
            {**judge, "name": "ok_base", "model": BASE},
            {**judge, "name": "ok_adapter", "model": "art_sft"},
        ],
    )
    assert fields(problems) == [
        ("evaluation.candidates[1].adapter", "wrong_artifact_kind"),
        ("evaluation.candidates[2].adapter", "unknown_artifact"),
        ("evaluation.graders[0].graders.rm.artifact", "wrong_artifact_kind"),
        ("evaluation.graders[0].graders.j.model", "judge_model_not_supported"),
    ]
    spec, problems = check(graders=[{"type": "reward_model", "name": "rm", "artifact": "art_rm"}])
    assert problems == [] and spec is not None
    assert model_refs(spec) == [
        ("evaluation.candidates[1].adapter", "art_sft", "adapter"),
        ("evaluation.graders[0].artifact", "art_rm", "reward_model"),
    ]


def test_greedy_with_several_samples_is_refused() -> None:
    _, problems = check(sampling={"num_samples": 3})
    assert fields(problems) == [("evaluation.sampling.num_samples", "invalid_value")]
    assert check(sampling={"num_samples": 3, "temperature": 0.7})[1] == []


def test_rows_missing_an_item_field_are_listed_by_line() -> None:
    spec, _ = check(graders=[SAYS_YES, {**SAYS_YES, "name": "ref", "reference": "{{item.answer.text}}"}])
    assert spec is not None
    rows: list[tuple[int, dict[str, Any]]] = [
        (1, {"prompt": "a", "answer": {"text": "x"}}),
        (2, {"prompt": "b"}),
        (4, {"prompt": "c", "answer": 3}),
    ]
    problems = missing_item_problems(spec, rows)
    assert [(p["line"], p["code"]) for p in problems] == [
        (2, "missing_item_field"),
        (4, "missing_item_field"),
    ]
    assert "'answer.text'" in problems[0]["message"] and "grader 'ref'" in problems[0]["message"]
    limited = spec.model_copy(update={"sampling": spec.sampling.model_copy(update={"max_prompts": 1})})
    assert missing_item_problems(limited, rows) == []
    many: list[tuple[int, dict[str, Any]]] = [(line, {"prompt": "p"}) for line in range(1, 500)]
    assert len(missing_item_problems(spec, many)) == 100
    # Graders that read no item field never read the file.
    plain, _ = check()
    assert plain is not None

    def unread() -> Iterator[tuple[int, dict[str, Any]]]:
        raise AssertionError("the rows were read")
        yield  # a generator: raising only when iterated

    assert missing_item_problems(plain, unread()) == []
