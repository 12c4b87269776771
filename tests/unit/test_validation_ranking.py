"""The ``ranking`` and ``candidates`` dataset rules (``alignd.validation``): every code, with its line number."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from alignd import validation as v

from service.core.datasets import validate_upload
from service.core.errors import ValidationFailed

GOOD: dict[str, dict[str, Any]] = {
    "ranking": {"prompt": "Name a colour.", "responses": ["Red.", "Blue.", "A chair."], "ranking": [1, 0, 2]},
    "candidates": {"prompt": "Name a colour.", "responses": ["Red.", "Blue."]},
}
SCORES = {"prompt": [{"role": "user", "content": "Hi"}], "responses": ["Hello!", "Go."], "scores": [2, 0.5]}

BAD_LINES: list[tuple[str, dict[str, Any], str]] = [
    ("ranking", {"responses": ["a", "b"], "ranking": [0, 1]}, "missing_field"),
    ("ranking", {"prompt": "p", "ranking": [0, 1]}, "missing_field"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"]}, "missing_field"),
    ("ranking", {"prompt": "p", "responses": "a", "ranking": [0]}, "wrong_type"),
    ("ranking", {"prompt": "p", "responses": ["a"], "ranking": [0]}, "too_few_responses"),
    ("ranking", {"prompt": "p", "responses": [], "scores": []}, "too_few_responses"),
    (
        "ranking",
        {"prompt": "p", "responses": [f"r{i}" for i in range(17)], "ranking": []},
        "too_many_responses",
    ),
    ("ranking", {"prompt": "p", "responses": ["a", " a "], "ranking": [0, 1]}, "duplicate_response"),
    ("ranking", {"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}, "empty_text"),
    ("ranking", {"prompt": "p", "responses": ["a", 3], "ranking": [0, 1]}, "wrong_type"),
    ("ranking", {"prompt": "", "responses": ["a", "b"], "ranking": [0, 1]}, "empty_text"),
    ("ranking", {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 1]}, "invalid_ranking"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, "invalid_ranking"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranking": [1, 2]}, "invalid_ranking"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, True]}, "wrong_type"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "ranking": "0,1"}, "wrong_type"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "scores": [1]}, "scores_length_mismatch"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "scores": [1, 2, 3]}, "scores_length_mismatch"),
    ("ranking", {"prompt": "p", "responses": ["a", "b"], "scores": [1, "2"]}, "wrong_type"),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "scores": [1, 2]},
        "ambiguous_record",
    ),
    ("candidates", {"prompt": "p", "responses": ["a"]}, "too_few_responses"),
    ("candidates", {"prompt": "p", "responses": ["same", "same"]}, "duplicate_response"),
    ("candidates", {"prompt": "p"}, "missing_field"),
    (
        "candidates",
        {"prompt": "p", "responses": [[{"role": "user", "content": "x"}], "b"]},
        "invalid_messages",
    ),
]


@pytest.mark.parametrize(("kind", "record", "code"), BAD_LINES)
def test_each_code_with_its_line_number(kind: str, record: dict[str, Any], code: str) -> None:
    good = json.dumps(GOOD[kind])
    data = f"{good}\n\n{good}\n{json.dumps(record)}\n{good}\n".encode()  # the bad record is line 4
    report = v.validate_stream(io.BytesIO(data), kind)
    assert [(i["line"], i["code"]) for i in report.issues] == [(4, code)], report.issues
    assert code in v.CODES


def test_good_records_of_both_forms() -> None:
    lines = [GOOD["ranking"], SCORES, {**SCORES, "scores": [1, 1]}]  # ties allowed
    lines.append(
        {"prompt": "p", "responses": [[{"role": "assistant", "content": "x"}], "y"], "ranking": [1, 0]}
    )
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    report = v.validate_stream(io.BytesIO(data), "ranking")
    assert report.ok and report.num_records == 4
    many = {"prompt": "p", "responses": [f"r{i}" for i in range(16)], "ranking": list(range(15, -1, -1))}
    assert v.validate_stream(io.BytesIO(json.dumps(many).encode()), "ranking").ok
    assert v.validate_stream(io.BytesIO(json.dumps(GOOD["candidates"]).encode()), "candidates").ok
    # a ranking record is a valid candidates record too (the extra field is ignored)
    assert v.validate_stream(io.BytesIO(json.dumps(GOOD["ranking"]).encode()), "candidates").ok


def test_the_server_refuses_a_bad_ranking_upload_with_line_numbers() -> None:
    data = f'{json.dumps(GOOD["ranking"])}\n{{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}}\n'
    with pytest.raises(ValidationFailed) as info:
        validate_upload(io.BytesIO(data.encode()), "ranking", max_bytes=10_000)
    assert info.value.code == "invalid_dataset"
    assert info.value.details == [
        {
            "line": 2,
            "code": "invalid_ranking",
            "message": '"ranking": must be a permutation of 0..1, got [0, 0]',
        }
    ]
