"""Fuzzing the dataset validator, every kind: random bytes, random JSON, valid records and their mutations.

Properties, for every input file: the validator never raises; every issue has a known code, a message the
server can encode as UTF-8, and a real line number (0 only for ``empty_dataset``), one issue per line, in
order; size and sha256 are of the exact bytes. And the readers agree with each other: the same report at any
chunk size, with msgspec or the stdlib parser, and ``iter_records`` stops at the validator's first bad line
with its code and message (or yields every record when the file is good).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
from collections.abc import Iterator
from typing import Any

from alignd import validation
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz import mutate
from tests.fuzz.budget import FUZZ_SETTINGS, VARIANTS, target

KIND_NAMES = sorted(validation.kinds())


@contextlib.contextmanager
def stdlib_parser() -> Iterator[None]:
    """Validate as the SDK does without its 'fast' extra: msgspec's decoder switched off."""
    fast = validation._fast_decode
    validation._fast_decode = None
    try:
        yield
    finally:
        validation._fast_decode = fast


def line_count(data: bytes) -> int:
    return data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)


def check_report(report: validation.ValidationReport, data: bytes, max_issues: int) -> None:
    assert report.size_bytes == len(data)
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert len(report.issues) <= max(max_issues, 1) and report.num_issues >= len(report.issues)
    lines = line_count(data)
    previous = 0
    for issue in report.issues:
        assert issue["code"] in validation.CODES, issue
        assert isinstance(issue["message"], str) and issue["message"], issue
        if issue["code"] == validation.EMPTY_DATASET:
            assert issue["line"] == 0 and report.num_records == 0
        else:
            assert previous < issue["line"] <= lines, (issue, lines)
            previous = issue["line"]
    assert report.num_records <= lines
    json.dumps(report.to_dict(), ensure_ascii=False).encode("utf-8")  # what the server sends back


def comparable(report: dict[str, Any]) -> dict[str, Any]:
    """The report minus what may rightly depend on the chunk size: a line_too_long message names the line's
    size only when the line fitted in one chunk (past that the reader stops buffering it)."""
    issues = [
        {**i, "message": i["message"].split(" (")[0]} if i["code"] == validation.LINE_TOO_LONG else i
        for i in report["issues"]
    ]
    return {**report, "issues": issues}


def check_readers_agree(data: bytes, kind: str, chunk_size: int, max_line_bytes: int) -> None:
    def run(chunk: int) -> dict[str, Any]:
        report = validation.validate_stream(
            io.BytesIO(data), kind, chunk_size=chunk, max_line_bytes=max_line_bytes
        )
        check_report(report, data, validation.DEFAULT_MAX_ISSUES)
        return report.to_dict()

    expected = run(1 << 18)  # the default chunk size, as iter_records reads
    assert comparable(run(chunk_size)) == comparable(expected), "a different chunk size changed the report"
    with stdlib_parser():
        assert run(1 << 18) == expected, "the stdlib parser disagrees with msgspec"
    first_bad = next((i for i in expected["issues"] if i["line"] > 0), None)
    try:
        records = list(validation.iter_records(io.BytesIO(data), kind=kind, max_line_bytes=max_line_bytes))
    except validation.DatasetLineError as exc:
        assert first_bad is not None, f"iter_records refused line {exc.line} ({exc.code}) the validator took"
        assert (exc.line, exc.code, exc.message) == (
            first_bad["line"],
            first_bad["code"],
            first_bad["message"],
        )
    else:
        assert first_bad is None, f"iter_records read past {first_bad}"
        assert len(records) == expected["num_records"]


def fuzz_file(name: str, data: bytes, kind: str, chunk_size: int, max_line_bytes: int) -> None:
    with target(name).input():
        check_readers_agree(data, kind, chunk_size, max_line_bytes)


def reader_settings(rng: random.Random) -> tuple[str, int, int]:
    """A kind, a chunk size (tiny ones split lines, BOMs and escapes across reads) and a line cap."""
    kind = rng.choice(KIND_NAMES)
    chunk = rng.choice([1, 2, 3, 7, 64, 1 << 18])
    cap = rng.choice([1, 5, 40, 300, validation.DEFAULT_MAX_LINE_BYTES])
    return kind, chunk, cap


seeds = st.integers(0, 2**32 - 1)


@FUZZ_SETTINGS
@given(seed=seeds)
def test_random_bytes(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(VARIANTS):
        data = rng.randbytes(rng.randint(0, 300))
        if rng.random() < 0.5:  # newlines make lines, whatever else the bytes are
            data = b"\n".join(data[i : i + 20] for i in range(0, len(data), 20))
        fuzz_file("validator: random bytes", data, *reader_settings(rng))


@FUZZ_SETTINGS
@given(seed=seeds)
def test_random_json(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(VARIANTS):
        lines = [mutate.encode(rng, mutate.random_json(rng)) for _ in range(rng.randint(0, 6))]
        layout = (rng.choice([b"\n", b"\r\n"]), rng.random() < 0.2, rng.random() < 0.5)
        fuzz_file("validator: random JSON lines", joined(lines, *layout), *reader_settings(rng))


def joined(lines: list[bytes], newline: bytes, bom: bool, trailing: bool) -> bytes:
    body = newline.join(lines) + (newline if trailing and lines else b"")
    return (b"\xef\xbb\xbf" if bom else b"") + body


@FUZZ_SETTINGS
@given(seed=seeds)
def test_valid_and_mutated_lines(seed: int) -> None:
    """A file of valid records is accepted; then edits to its bytes or to one record are fuzzed."""
    rng = random.Random(seed)
    kind = rng.choice(KIND_NAMES)
    records = [mutate.valid_record(rng, kind) for _ in range(rng.randint(1, 5))]
    layout = (rng.choice([b"\n", b"\r\n"]), rng.random() < 0.2, rng.random() < 0.5)
    data = joined([mutate.encode(rng, r) for r in records], *layout)
    name = "validator: valid + mutated lines"
    with target(name).input():
        report = validation.validate_stream(io.BytesIO(data), kind)
        assert report.ok and report.num_records == len(records), (data, report.issues)
    for _ in range(VARIANTS - 1):
        if rng.random() < 0.5:
            variant = mutate.mutate(rng, data)
        else:  # a structural edit to one record, the others left valid
            edited = list(records)
            index = rng.randrange(len(edited))
            edited[index] = mutate.mutate_value(rng, edited[index])
            variant = b"\n".join(mutate.encode(rng, r) for r in edited)
        fuzz_file(name, variant, kind, rng.choice([1, 5, 1 << 18]), validation.DEFAULT_MAX_LINE_BYTES)
