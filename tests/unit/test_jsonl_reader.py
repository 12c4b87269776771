"""The one JSONL reader (``alignd.validation.iter_records``): it reads a file as the validator does."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from alignd import validation as v
from alignd.validation import DatasetLineError, iter_records, validate_stream

BOM = b"\xef\xbb\xbf"
SFT = {"prompt": "Say hi.", "completion": "Hi!"}


@pytest.fixture(autouse=True, params=["msgspec", "stdlib"])
def json_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both parsers, as in test_validation.py: what a line reads as must not depend on which one parsed it."""
    if request.param == "msgspec":
        assert v._fast_decode is not None, "msgspec is a server dependency: the fast path must be live here"
    else:
        monkeypatch.setattr(v, "_fast_decode", None)
    return str(request.param)


def line(record: Any) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


def read(data: bytes, **kw: Any) -> list[tuple[int, dict[str, Any]]]:
    return list(iter_records(io.BytesIO(data), **kw))


def test_bom_crlf_and_blank_lines_keep_editor_line_numbers(tmp_path: Path) -> None:
    data = BOM + line({"a": 1}) + b"\r\n\r\n   \r\n" + line({"b": "é"}) + b"\r\n\n" + line({"c": None})
    expected = [(1, {"a": 1}), (4, {"b": "é"}), (6, {"c": None})]
    assert read(data) == expected
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    assert list(iter_records(path)) == list(iter_records(str(path))) == expected


def test_a_bom_alone_or_an_empty_file_yields_nothing() -> None:
    assert read(b"") == read(BOM) == read(BOM + b"\r\n \n") == []


def test_a_bad_line_is_reported_with_its_number_after_the_good_lines() -> None:
    records = iter_records(io.BytesIO(line({"a": 1}) + b"\n\n" + b'{"b": ' + b"\n" + line({"c": 3}) + b"\n"))
    assert next(records) == (1, {"a": 1})
    with pytest.raises(DatasetLineError) as info:
        next(records)
    error = info.value
    assert (error.line, error.code) == (3, v.INVALID_JSON)
    assert error.message.startswith("invalid JSON: ") and str(error) == f"line 3: {error.message}"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (BOM + line({"a": 1}), v.INVALID_JSON),  # a BOM is only skipped at the start of the file
        (b"[1, 2]", v.NOT_AN_OBJECT),
        (b'{"a": NaN}', v.INVALID_JSON),
        (b'{"a": "caf\xe9"}', v.INVALID_UTF8),
        (b'{"a": 1} {"b": 2}', v.INVALID_JSON),
        (line({"a": "x" * 100}), v.LINE_TOO_LONG),
    ],
)
def test_bad_lines_get_the_validators_code_and_message(bad: bytes, code: str) -> None:
    data = BOM + line(SFT) + b"\r\n" + bad + b"\r\n" + line(SFT) + b"\r\n"
    with pytest.raises(DatasetLineError) as info:
        read(data, max_line_bytes=64)
    issue = validate_stream(io.BytesIO(data), "sft", max_line_bytes=64).issues[0]
    assert (info.value.line, info.value.code, info.value.message) == (2, code, issue["message"])
    assert issue["line"] == 2 and issue["code"] == code


def test_with_a_kind_each_record_is_checked_by_that_kinds_rules() -> None:
    data = line(SFT) + b"\n" + line({"prompt": "a"}) + b"\n"
    assert read(data) == [(1, SFT), (2, {"prompt": "a"})]  # no kind: any JSON object
    with pytest.raises(DatasetLineError) as info:
        read(data, kind="sft")
    issue = validate_stream(io.BytesIO(data), "sft").issues[0]
    assert (info.value.line, info.value.code, info.value.message) == (2, issue["code"], issue["message"])
    assert info.value.code == v.MISSING_FIELD


def test_a_line_longer_than_a_chunk_is_read_whole() -> None:
    big = {"prompt": "p", "completion": "é" * (v._CHUNK_SIZE // 2 + 10)}  # over one 256 KiB chunk in UTF-8
    assert read(BOM + line(big) + b"\n" + line(SFT)) == [(1, big), (2, SFT)]


def test_an_unknown_kind_fails_before_the_file_is_opened(tmp_path: Path) -> None:
    with pytest.raises(v.UnknownKindError):
        iter_records(tmp_path / "missing.jsonl", kind="nope")
    with pytest.raises(FileNotFoundError):  # the file itself is opened when reading starts
        list(iter_records(tmp_path / "missing.jsonl"))
