"""The dataset rules (``alignd.validation``) and their server wrapper (``service.core.datasets``)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from alignd import validation as v
from alignd.validation import ValidationReport, validate_path, validate_stream

from service.core.datasets import DatasetKind, validate_and_store, validate_upload
from service.core.errors import PayloadTooLargeError, ValidationFailed

GOOD = {
    "sft": {"prompt": "Say hi.", "completion": "Hi!"},
    "preference": {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away."},
    "prompts": {"prompt": "Say hi."},
}


@pytest.fixture(autouse=True, params=["msgspec", "stdlib"])
def json_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test in this file runs on both parsers: msgspec first, the stdlib for lines it refuses
    (and for installs without msgspec). Reports must not depend on which one parsed a line."""
    if request.param == "msgspec":
        assert v._fast_decode is not None, "msgspec is a server dependency: the fast path must be live here"
    else:
        monkeypatch.setattr(v, "_fast_decode", None)
    return str(request.param)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False)


def check(kind: str, data: str | bytes, **kw: Any) -> ValidationReport:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return validate_stream(io.BytesIO(raw), kind, **kw)


def only_issue(report: ValidationReport) -> tuple[int, str, str]:
    assert report.num_issues == 1, report.issues
    issue = report.issues[0]
    return issue["line"], issue["code"], issue["message"]


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


NUL = "contains a NUL character (\\u0000), which is not text"

# (kind, bad line, expected code, expected message or None to skip the message check)
BAD_LINES: list[tuple[str, str, str, str | None]] = [
    ("sft", '{"prompt": "a", "completion": ', "invalid_json", None),
    ("sft", "[1, 2]", "not_an_object", "expected a JSON object, got list"),
    ("sft", '"just a string"', "not_an_object", "expected a JSON object, got string"),
    (
        "sft",
        '{"prompt": "a"}',
        "missing_field",
        '"completion": missing (a record needs "prompt" and "completion")',
    ),
    ("sft", '{"text": "a"}', "missing_field", 'expected "prompt" and "completion", or "messages"'),
    ("sft", '{"prompt": "a", "completion": 3}', "wrong_type", '"completion": expected a string, got number'),
    (
        "sft",
        '{"prompt": "   \\n", "completion": "b"}',
        "empty_text",
        '"prompt": must not be empty or whitespace-only',
    ),
    ("sft", '{"prompt": "a", "completion": ""}', "empty_text", None),
    ("sft", dumps({"messages": "hi"}), "wrong_type", '"messages": expected a list of messages, got string'),
    ("sft", dumps({"messages": []}), "invalid_messages", '"messages": must contain at least one message'),
    (
        "sft",
        dumps({"messages": msgs(("user", "q"), ("tool", "x"), ("assistant", "a"))}),
        "invalid_role",
        '"messages[1].role": expected one of "system", "user", "assistant", got "tool"',
    ),
    ("sft", dumps({"messages": [{"role": 1, "content": "x"}]}), "wrong_type", None),
    ("sft", dumps({"messages": [{"content": "x"}]}), "missing_field", '"messages[0].role": missing'),
    ("sft", dumps({"messages": [{"role": "user"}]}), "missing_field", '"messages[0].content": missing'),
    ("sft", dumps({"messages": [["user", "x"]]}), "wrong_type", None),
    ("sft", dumps({"messages": msgs(("user", "q"), ("assistant", " "))}), "empty_text", None),
    (
        "sft",
        dumps({"messages": msgs(("user", "q"), ("assistant", "a"), ("user", "more?"))}),
        "invalid_messages",
        '"messages": the last message must be a "assistant" message, got "user"',
    ),
    (
        "sft",
        dumps({"messages": msgs(("assistant", "a"))}),
        "invalid_messages",
        '"messages": needs at least one message before the assistant\'s answer',
    ),
    (
        "sft",
        dumps({"messages": msgs(("user", "q"), ("assistant", "a")), "prompt": "q"}),
        "ambiguous_record",
        None,
    ),
    ("preference", '{"prompt": "p", "chosen": "a"}', "missing_field", None),
    (
        "preference",
        '{"prompt": "p", "chosen": 1, "rejected": "b"}',
        "wrong_type",
        '"chosen": expected a string or a list of assistant messages, got number',
    ),
    (
        "preference",
        '{"prompt": {"text": "p"}, "chosen": "a", "rejected": "b"}',
        "wrong_type",
        '"prompt": expected a string or a list of messages, got object',
    ),
    ("preference", '{"prompt": "p", "chosen": "a", "rejected": ""}', "empty_text", None),
    (
        "preference",
        '{"prompt": "p", "chosen": "Same  answer.", "rejected": " Same answer.\\n"}',
        "identical_pair",
        '"chosen" and "rejected" are the same text (after normalising whitespace)',
    ),
    (
        "preference",
        dumps({"prompt": "p", "chosen": msgs(("assistant", "A b")), "rejected": "A  b"}),
        "identical_pair",
        None,
    ),
    (
        "preference",
        dumps({"prompt": "p", "chosen": msgs(("user", "A")), "rejected": "B"}),
        "invalid_messages",
        '"chosen[0].role": only "assistant" messages are allowed here, got "user"',
    ),
    (
        "preference",
        dumps({"prompt": msgs(("user", "q"), ("assistant", "a")), "chosen": "x", "rejected": "y"}),
        "invalid_messages",
        '"prompt": the last message must be a "user" message, got "assistant"',
    ),
    ("prompts", '{"question": "p"}', "missing_field", None),
    (
        "prompts",
        '{"prompt": null}',
        "wrong_type",
        '"prompt": expected a string or a list of messages, got null',
    ),
    ("prompts", '{"prompt": ""}', "empty_text", None),
    ("prompts", dumps({"messages": msgs(("user", "q"), ("assistant", "a"))}), "invalid_messages", None),
    ("prompts", dumps({"prompt": "p", "messages": msgs(("user", "q"))}), "ambiguous_record", None),
    ("prompts", '{"prompt": NaN}', "invalid_json", "invalid JSON: NaN is not valid JSON"),
    ("prompts", '{"prompt": "a"} {"prompt": "b"}', "invalid_json", None),
    ("prompts", "[" * 100_000 + "]" * 100_000, "invalid_json", None),
    ("prompts", '{"prompt": "a", "n": ' + "9" * 5000 + "}", "invalid_json", None),
    # 1e999 is JSON syntax but no double: the stdlib would read inf, which no JSON writer can write back
    (
        "prompts",
        '{"prompt": "a", "n": -1e999}',
        "invalid_json",
        "invalid JSON: number -1e999 is out of range for a 64-bit float",
    ),
    # NUL: valid JSON (\u0000), not text; named wherever the rules read text
    ("sft", '{"prompt": "a\\u0000b", "completion": "c"}', "invalid_characters", f'"prompt": {NUL}'),
    ("sft", dumps({"prompt": "a", "completion": "\x00"}), "invalid_characters", f'"completion": {NUL}'),
    (
        "sft",
        dumps({"messages": msgs(("user", "q"), ("assistant", "a\x00"))}),
        "invalid_characters",
        f'"messages[1].content": {NUL}',
    ),
    (
        "preference",
        dumps({**GOOD["preference"], "rejected": "b\x00"}),
        "invalid_characters",
        f'"rejected": {NUL}',
    ),
    (
        "preference",
        dumps({**GOOD["preference"], "chosen": msgs(("assistant", "\x00a"))}),
        "invalid_characters",
        f'"chosen[0].content": {NUL}',
    ),
    ("prompts", dumps({"prompt": "\x00"}), "invalid_characters", f'"prompt": {NUL}'),
    (
        "prompts",
        dumps({"messages": msgs(("user", "\x00"))}),
        "invalid_characters",
        f'"messages[0].content": {NUL}',
    ),
]


@pytest.mark.parametrize(("kind", "line", "code", "message"), BAD_LINES)
def test_each_code_with_its_line_number_after_good_and_blank_lines(
    kind: str, line: str, code: str, message: str | None
) -> None:
    good = dumps(GOOD[kind])
    # lines: 1 good, 2 blank, 3 whitespace-only, 4 good, 5 BAD, 6 good
    data = f"{good}\n\n  \t\n{good}\n{line}\n{good}\n"
    report = check(kind, data)
    lineno, got_code, got_message = only_issue(report)
    assert (lineno, got_code) == (5, code)
    if message is not None:
        assert got_message == message
    assert report.num_records == 4  # blank lines are not records; the bad line is
    assert code in v.CODES


def test_good_records_of_every_form_pass() -> None:
    lines = {
        "sft": [
            {"prompt": "p", "completion": "c", "id": 7, "meta": {"source": "x"}},  # extra fields are ignored
            {"messages": msgs(("system", "s"), ("user", "q"), ("assistant", "a"))},
            {
                "messages": [
                    {"role": "user", "content": "q", "name": "bob"},
                    {"role": "assistant", "content": "a"},
                ]
            },
        ],
        "preference": [
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {
                "prompt": msgs(("system", "s"), ("user", "q")),
                "chosen": msgs(("assistant", "a")),
                "rejected": "b",
            },
            {"prompt": "p", "chosen": "Yes.", "rejected": "yes."},  # case is kept
        ],
        "prompts": [{"prompt": "p"}, {"prompt": msgs(("user", "q"))}, {"messages": msgs(("user", "q"))}],
    }
    for kind, records in lines.items():
        report = check(kind, "".join(dumps(r) + "\n" for r in records))
        assert report.ok, (kind, report.issues)
        assert report.num_records == len(records)


def test_nul_in_ranking_responses_and_iter_records() -> None:
    line = dumps({"prompt": "p", "responses": ["a", "b\x00"], "ranking": [1, 0]})
    assert only_issue(check("ranking", line)) == (1, "invalid_characters", f'"responses[1]": {NUL}')
    good = dumps({"prompt": "p", "responses": ["a", "b"]})
    with pytest.raises(v.DatasetLineError) as info:
        list(v.iter_records(io.BytesIO(f"{good}\n{line}\n".encode()), kind="candidates"))
    assert (info.value.line, info.value.code) == (2, "invalid_characters")


def test_nul_outside_the_text_the_rules_read_and_an_escaped_backslash_pass() -> None:
    records = [
        {"prompt": "p", "completion": "c", "meta": "ignored\x00field"},  # extra fields are not read
        {"prompt": "\\u0000 is how JSON writes NUL", "completion": "c"},  # the text \u0000, not a NUL
    ]
    assert check("sft", "".join(dumps(r) + "\n" for r in records)).ok


def test_invalid_utf8_names_its_line_and_byte() -> None:
    data = b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n{"prompt": "\xc3\xa9t\xc3\xa9"}\n'
    assert only_issue(check("prompts", data)) == (2, "invalid_utf8", "not valid UTF-8: byte 0xe9 at byte 16")


def test_line_too_long_in_every_reading_path() -> None:
    good = dumps(GOOD["prompts"])
    long_line = dumps({"prompt": "x" * 500})
    data = f"{good}\n{long_line}\n{good}\n{long_line}"  # the last long line has no newline
    for chunk_size in (1, 7, 64, 1 << 20):  # in one block, across chunks, and buffered then skipped
        report = check("prompts", data, max_line_bytes=100, chunk_size=chunk_size)
        assert [(i["line"], i["code"]) for i in report.issues] == [(2, "line_too_long"), (4, "line_too_long")]
        assert report.num_records == 4
    assert check("prompts", data, max_line_bytes=len(long_line)).ok  # the cap is inclusive


def test_crlf_line_endings() -> None:
    good = dumps(GOOD["preference"])
    bad = dumps({"prompt": "p", "chosen": "a", "rejected": "a"})
    ok = check("preference", f"{good}\r\n{good}\r\n")
    assert ok.ok and ok.num_records == 2
    report = check("preference", f"{good}\r\n\r\n{bad}\r\n{good}\r\n")
    assert only_issue(report)[:2] == (3, "identical_pair")


def test_bom_is_accepted_on_line_one_only() -> None:
    good = dumps(GOOD["sft"]).encode()
    bom = b"\xef\xbb\xbf"
    with_bom = bom + good + b"\n" + good + b"\n"
    report = check("sft", with_bom)
    assert report.ok and report.num_records == 2
    assert report.sha256 == hashlib.sha256(with_bom).hexdigest()  # hashed as uploaded, BOM included
    # a BOM that is not at the start of the file is a broken line
    assert only_issue(check("sft", good + b"\n" + bom + good + b"\n"))[:2] == (2, "invalid_json")
    # ...and a BOM alone on line 1 leaves a blank line, not a record
    assert check("sft", bom + b"\n" + good).num_records == 1


def test_last_line_without_newline_and_blank_lines_keep_numbers() -> None:
    bad = '{"prompt": 1}'
    assert only_issue(check("prompts", f"\n\n{bad}"))[:2] == (3, "wrong_type")


@pytest.mark.parametrize("data", [b"", b"\n", b"\n\r\n   \n", b"\xef\xbb\xbf"])
def test_empty_dataset(data: bytes) -> None:
    report = check("sft", data)
    assert report.is_empty and not report.ok
    assert report.issues == [v.Issue(line=0, code="empty_dataset", message=report.issues[0]["message"])]


def test_issue_list_is_capped_but_counts_everything() -> None:
    lines = ["not json"] * 150 + [dumps(GOOD["sft"])]
    report = check("sft", "\n".join(lines))
    assert report.num_issues == 150
    assert len(report.issues) == 100 and report.truncated
    assert [i["line"] for i in report.issues] == list(range(1, 101))
    assert len(check("sft", "\n".join(lines), max_issues=5).issues) == 5


def test_size_and_sha256_match_hashlib_for_any_chunking() -> None:
    rng = random.Random(0)
    lines = []
    for i in range(300):
        rec: Any = {"prompt": "p" * rng.randint(1, 300), "chosen": f"a{i} é 😀", "rejected": f"b{i}"}
        lines.append(dumps(rec) if i % 37 else "{broken")
    data = ("\r\n".join(lines) + "\n").encode()
    reference = check("preference", data)
    assert reference.sha256 == hashlib.sha256(data).hexdigest()
    assert reference.size_bytes == len(data)
    assert reference.num_records == 300
    assert [i["line"] for i in reference.issues] == [i + 1 for i in range(300) if i % 37 == 0]
    for chunk_size in (1, 3, 100, 4096):
        assert check("preference", data, chunk_size=chunk_size) == reference


def test_identical_pair_normalisation_matches_its_definition() -> None:
    # The fast path must agree with the plain definition: equal after " ".join(s.split()).
    rng = random.Random(1)
    alphabet = ["a", "b", " ", "\n", "\t", "  ", "\u3000", "."]
    for _ in range(20_000):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 150)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 150)))
        if rng.random() < 0.4:
            b = rng.choice(["", " ", "\n"]) + " ".join(a.split()) + rng.choice(["", "  ", "\n"])
        if not a.strip() or not b.strip():
            continue
        assert v._same_text(a, b) == (" ".join(a.split()) == " ".join(b.split())), (a, b)


def test_memory_stays_flat_on_a_huge_line_without_newlines() -> None:
    class Endless:
        """20 MB of 'x' with no newline, produced on demand."""

        def __init__(self) -> None:
            self.left = 20 << 20

        def read(self, size: int) -> bytes:
            n = min(size, self.left)
            self.left -= n
            return b"x" * n

    tracemalloc.start()
    try:
        report = validate_stream(Endless(), "sft", max_line_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert only_issue(report)[:2] == (1, "line_too_long")
    assert report.size_bytes == 20 << 20
    assert peak < 4 << 20  # about one line cap plus one chunk, not 20 MB


def test_validate_path_matches_validate_stream(tmp_path: Path) -> None:
    data = f"{dumps(GOOD['sft'])}\n{{}}\n".encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    assert validate_path(path, "sft") == check("sft", data)


def test_unknown_kind() -> None:
    with pytest.raises(v.UnknownKindError, match="unknown dataset kind 'verdicts'"):
        check("verdicts", "{}")


def test_a_new_kind_plugs_into_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    def check_verdicts(rec: dict[str, Any]) -> v.Problem | None:
        responses = rec.get("responses")
        if not isinstance(responses, list) or len(responses) < 2:
            return "too_few_responses", '"responses": needs at least 2'
        return None

    monkeypatch.setattr(v, "_REGISTRY", dict(v._REGISTRY))  # undone after the test
    v.register_kind("verdicts", check_verdicts, description="test kind")
    with pytest.raises(ValueError, match="already registered"):
        v.register_kind("verdicts", check_verdicts, description="again")
    report = check("verdicts", '{"responses": ["a", "b"]}\n{"responses": ["a"]}\nnope\n')
    assert [(i["line"], i["code"]) for i in report.issues] == [(2, "too_few_responses"), (3, "invalid_json")]
    assert "verdicts" in v.kinds()


# --- the server wrapper ---------------------------------------------------------------------------------------


class CountingStream:
    """Serves ``total`` bytes of valid sft lines lazily and remembers how many were read."""

    LINE = (dumps(GOOD["sft"]) + "\n").encode()

    def __init__(self, total: int) -> None:
        self.total = total
        self.served = 0

    def read(self, size: int = -1) -> bytes:
        n = min(self.total - self.served, size if size >= 0 else self.total)
        self.served += n
        reps = n // len(self.LINE) + 1
        return (self.LINE * reps)[:n]


def test_dataset_kinds_all_have_rules() -> None:
    assert {k.value for k in DatasetKind} == {"sft", "preference", "prompts", "ranking", "candidates"}
    assert set(DatasetKind) <= set(v.kinds())


def test_validate_upload_returns_the_report() -> None:
    data = (dumps(GOOD["preference"]) + "\n") * 3
    report = validate_upload(io.BytesIO(data.encode()), DatasetKind.preference, max_bytes=10_000)
    assert report.ok and report.num_records == 3 and report.kind == "preference"


def test_validate_upload_bad_lines_are_a_422_with_every_line() -> None:
    lines = [
        dumps(GOOD["sft"]),
        '{"prompt": "a"}',
        "{",
        dumps(GOOD["sft"]),
        '{"prompt": 1, "completion": "c"}',
    ]
    lines += ["{"] * 200
    with pytest.raises(ValidationFailed) as info:
        validate_upload(io.BytesIO("\n".join(lines).encode()), "sft", max_bytes=1 << 20)
    err = info.value
    assert (err.status, err.code) == (422, "invalid_dataset")
    assert len(err.details) == 100
    assert err.details[:3] == [
        {"line": 2, "code": "missing_field", "message": err.details[0]["message"]},
        {"line": 3, "code": "invalid_json", "message": err.details[1]["message"]},
        {"line": 5, "code": "wrong_type", "message": '"prompt": expected a string, got number'},
    ]
    assert err.message.startswith("203 bad lines in the sft dataset: line 2: missing_field: ")
    assert "line 5: wrong_type" in err.message and err.message.endswith("(and 200 more)")


def test_validate_upload_empty_is_its_own_422() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_upload(io.BytesIO(b"\n\n"), "prompts", max_bytes=100)
    assert (info.value.status, info.value.code) == (422, "empty_dataset")


def test_validate_upload_unknown_kind() -> None:
    with pytest.raises(ValidationFailed) as info:
        validate_upload(io.BytesIO(b"{}"), "verdicts", max_bytes=100)
    assert (info.value.status, info.value.code) == (422, "invalid_kind")


def test_size_cap_raises_413_mid_stream() -> None:
    stream = CountingStream(total=50 << 20)
    with pytest.raises(PayloadTooLargeError) as info:
        validate_upload(stream, "sft", max_bytes=1 << 20)
    assert (info.value.status, info.value.code) == (413, "dataset_too_large")
    assert stream.served < 2 << 20  # stopped after the cap plus one chunk, not at the end of 50 MB


def test_size_cap_is_inclusive() -> None:
    stream = CountingStream(total=len(CountingStream.LINE) * 10)
    report = validate_upload(stream, "sft", max_bytes=stream.total)
    assert report.num_records == 10 and report.size_bytes == stream.total


def test_validate_and_store_writes_identical_bytes() -> None:
    rng = random.Random(2)
    data = "".join(
        dumps({"messages": msgs(("user", f"q{i}"), ("assistant", "é" * rng.randint(1, 5000)))}) + "\r\n"
        for i in range(500)
    ).encode()
    dest = io.BytesIO()
    report = validate_and_store(io.BytesIO(data), "sft", dest, max_bytes=len(data))
    assert dest.getvalue() == data
    assert report.sha256 == hashlib.sha256(data).hexdigest() and report.size_bytes == len(data)


def test_validate_and_store_raises_after_writing_so_the_caller_can_delete() -> None:
    data = b'{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n'
    dest = io.BytesIO()
    with pytest.raises(ValidationFailed):
        validate_and_store(io.BytesIO(data), "sft", dest, max_bytes=1000)
    assert dest.getvalue() == data
