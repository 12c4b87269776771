"""The OpenAI facade's mapping rules without a server (service/core/openai_*.py, docs/openai.md): file lines onto
alignd's dataset kinds (line numbers kept, refusals in the uploaded format's names), hyperparameters and
"auto", grader names, field renames in refusals, model names, grader error flags, the error shape."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from alignd import validation

from service.api.openai_errors import openai_error
from service.core.errors import ValidationFailed
from service.core.openai_files import DATASET_KINDS, FileFormat, convert, file_issues
from service.core.openai_graders import error_flags, job_grader
from service.core.openai_jobs import AUTO, fine_tuned_model_name, in_openai_terms, resolve_method

USER = {"role": "user", "content": "What colour is the sky?"}
ANSWER = {"role": "assistant", "content": "Blue."}


def _lines(*records: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def _convert(data: bytes, fmt: FileFormat, **kwargs: Any) -> tuple[list[Any], list[validation.Issue], Any]:
    sink = io.BytesIO()
    conversion = convert(io.BytesIO(data), sink, fmt, **kwargs)
    converted = sink.getvalue()
    report = validation.validate_stream(io.BytesIO(converted), DATASET_KINDS[fmt], **kwargs)
    rows = [
        json.loads(line) if line.strip().startswith(b"{") else line for line in converted.split(b"\n")[:-1]
    ]
    return rows, file_issues(conversion, report, fmt), conversion


def test_supervised_lines_keep_their_numbers_and_map_openais_spellings() -> None:
    developer = {
        "role": "developer",
        "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
    }
    weighted = [{**USER}, {**ANSWER, "weight": 1}, {**USER}, {**ANSWER, "weight": 1}]
    data = b"\xef\xbb\xbf" + _lines(
        {"messages": [developer, USER, ANSWER]}, b"", {"messages": weighted}, b"not json"
    )
    rows, issues, conversion = _convert(data, FileFormat.supervised)
    assert rows[0] == {"messages": [{"role": "system", "content": "Be brief."}, USER, ANSWER]}
    assert rows[1] == b""  # the blank line stays: line 3 is still line 3
    assert rows[2] == {"messages": [USER, ANSWER, USER, ANSWER]}  # weight dropped
    assert [(i["line"], i["code"]) for i in issues] == [(4, "invalid_json")]  # alignd's rules name it
    assert conversion.notes() == {"earlier_assistant_turns": 1}  # OpenAI would train on line 3's first answer


def test_supervised_lines_alignd_cannot_train_on_are_refused_by_name() -> None:
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    data = _lines(
        {"messages": [USER, {**ANSWER, "weight": 0}]},
        {"messages": [image, ANSWER]},
        {"messages": [USER, {**ANSWER, "tool_calls": [{"id": "c"}]}]},
        {"messages": [USER, ANSWER], "tools": [{"type": "function"}]},
        {"messages": [USER, {"role": "tool", "content": "42"}, ANSWER]},
        {"messages": [USER, ANSWER], "tools": []},  # empty: nothing is lost
    )
    _, issues, _ = _convert(data, FileFormat.supervised)
    assert [(i["line"], i["code"]) for i in issues] == [
        (1, "unsupported_weight"),
        (2, "unsupported_content"),
        (3, "unsupported_field"),
        (4, "unsupported_field"),
        (5, "invalid_role"),
    ]
    assert '"messages[0].content[0]": a content part "image_url" is not text' in issues[1]["message"]
    assert '"messages[1].tool_calls"' in issues[2]["message"]


def test_dpo_lines_become_preference_pairs_and_refusals_use_dpo_names() -> None:
    good = {
        "input": {"messages": [USER]},
        "preferred_output": [ANSWER],
        "non_preferred_output": [{"role": "assistant", "content": "Green."}],
        "id": 7,
    }
    same = {**good, "non_preferred_output": [ANSWER]}
    user_output = {**good, "preferred_output": [USER]}
    rows, issues, _ = _convert(
        _lines(good, {"preferred_output": [ANSWER]}, same, user_output, {**good, "input": {}}), FileFormat.dpo
    )
    assert rows[0] == {
        "id": 7,
        "prompt": [USER],
        "chosen": [ANSWER],
        "rejected": good["non_preferred_output"],
    }
    assert [(i["line"], i["code"]) for i in issues] == [
        (2, "missing_field"),
        (3, "identical_pair"),
        (4, "invalid_messages"),
        (5, "missing_field"),
    ]
    assert issues[0]["message"].startswith('"input":')
    assert '"preferred_output" and "non_preferred_output" are the same text' in issues[1]["message"]
    assert issues[2]["message"].startswith('"preferred_output[0].role"')
    assert issues[3]["message"] == '"input.messages": missing'


def test_reinforcement_lines_keep_the_fields_graders_read() -> None:
    rows, issues, _ = _convert(
        _lines(
            {"messages": [{"role": "developer", "content": "Short."}, USER], "answer": "blue"},
            {"messages": [USER, ANSWER]},
        ),
        FileFormat.reinforcement,
    )
    assert rows[0] == {"messages": [{"role": "system", "content": "Short."}, USER], "answer": "blue"}
    assert [(i["line"], i["code"]) for i in issues] == [(2, "invalid_messages")]  # the model answers next


def test_a_line_over_the_limit_is_copied_for_alignds_rules_and_the_rest_still_reads() -> None:
    long_line = json.dumps({"messages": [USER, {"role": "assistant", "content": "x" * 300}]}).encode()
    rows, issues, _ = _convert(
        _lines(long_line, {"messages": [USER, ANSWER]}), FileFormat.supervised, max_line_bytes=200
    )
    assert [(i["line"], i["code"]) for i in issues] == [(1, "line_too_long")]
    assert rows[1] == {"messages": [USER, ANSWER]}


def test_an_empty_file_is_one_issue() -> None:
    _, issues, _ = _convert(b"\n\n", FileFormat.supervised)
    assert [i["code"] for i in issues] == [validation.EMPTY_DATASET]


def test_auto_resolves_to_alignds_defaults_and_the_multiplier_scales_its_learning_rate() -> None:
    sft = resolve_method(FileFormat.supervised, {})
    assert (
        sft.openai
        == AUTO[FileFormat.supervised]
        == {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 1.0}
    )
    assert sft.hyperparameters == {"epochs": 3, "batch_size": 4, "learning_rate": 2e-4}
    dpo = resolve_method(FileFormat.dpo, {"learning_rate_multiplier": 2, "beta": "auto", "n_epochs": 2})
    assert dpo.hyperparameters == {"epochs": 2, "batch_size": 4, "learning_rate": 1e-4, "beta": 0.1}
    rl = resolve_method(FileFormat.reinforcement, {"batch_size": 3, "compute_multiplier": 2.0})
    assert rl.method == "grpo" and rl.for_records(10) == {
        "epochs": 1,
        "batch_size": 3,
        "learning_rate": 1e-4,
        "steps": 4,
    }
    assert [w.split("=")[0] for w in rl.warnings] == [
        "method.reinforcement.hyperparameters.compute_multiplier"
    ]
    assert rl.openai["reasoning_effort"] == "default" and rl.openai["compute_multiplier"] == 2.0
    with pytest.raises(ValidationFailed) as refused:
        resolve_method(FileFormat.supervised, {"learning_rate_multiplier": 5000})
    assert refused.value.details[0]["field"] == "method.supervised.hyperparameters.learning_rate_multiplier"


def test_grader_names_become_series_names_with_a_warning() -> None:
    grader = {"type": "string_check", "name": "exact", "input": "a", "reference": "b", "operation": "eq"}
    assert job_grader(grader) == (grader, [])
    renamed, warnings = job_grader({**grader, "name": "Exact match!"})
    assert renamed["name"] == "Exact_match_" and "reported as 'Exact_match_'" in warnings[0]
    assert job_grader({**grader, "name": 3})[0]["name"] == 3  # the grader rules refuse it with their message


def test_refusals_name_the_openai_request_fields() -> None:
    exc = ValidationFailed(
        "Invalid job",
        code="invalid_value",
        details=[
            {"field": "hyperparameters.epochs", "code": "invalid_value", "message": "m"},
            {
                "field": "hyperparameters.graders[0].reference",
                "code": "unknown_template_field",
                "message": "m",
            },
            {"field": "datasets.prompts", "line": 3, "code": "missing_item_field", "message": "m"},
            {"field": "base_model", "code": "unknown_model", "message": "m"},
            {"field": "seed", "code": "invalid_value", "message": "m"},
        ],
    )
    renamed = in_openai_terms(exc, FileFormat.reinforcement)
    assert [d["field"] for d in renamed.details] == [
        "method.reinforcement.hyperparameters.n_epochs",
        "method.reinforcement.grader.reference",
        "training_file",
        "model",
        "seed",
    ]
    assert renamed.code == "invalid_value" and renamed.details[2]["line"] == 3
    assert renamed.message.startswith("Invalid job: method.reinforcement.hyperparameters.n_epochs: m")


def test_fine_tuned_model_names() -> None:
    assert fine_tuned_model_name("smol", "colours", "job_1") == "ft:smol:colours:job_1"
    assert fine_tuned_model_name("org/smol:v2", None, "job_1") == "ft:org/smol-v2::job_1"


def test_grader_error_flags() -> None:
    assert error_flags([]) == {}
    assert error_flags([{"code": "missing_field"}, {"code": "regex_timeout"}]) == {
        "invalid_variable_error": True,
        "other_error": True,
    }


def test_alignds_error_body_in_openais_shape() -> None:
    body = {
        "error": {
            "code": "invalid_training_file",
            "message": "bad",
            "details": [{"field": "training_file", "line": 2}],
        }
    }
    assert openai_error(body, 422) == {
        "error": {
            "message": "bad",
            "type": "invalid_request_error",
            "param": "training_file",
            "code": "invalid_training_file",
            "details": [{"field": "training_file", "line": 2}],
        }
    }
    assert openai_error({"error": {"code": "x", "message": "m"}}, 503)["error"]["type"] == "server_error"  # type: ignore[index]
    assert openai_error({"detail": "not ours"}, 400) is None
