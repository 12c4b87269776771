"""Dataset uploads on the server: the SDK's rules (``alignd.validation``), turned into the API's errors.

The rules themselves live in ``alignd.validation`` (one home, so ``alignd datasets validate`` and the server
report the same lines with the same codes). This module only adds what the server needs: the kind enum, a byte
cap enforced while streaming (413 before the whole body is read), storing the bytes in the same pass, and the
mapping of a report to 422s.
"""

from __future__ import annotations

from enum import StrEnum
from typing import IO, Any

from alignd import validation
from alignd.validation import Issue, Readable, ValidationReport

from service.core.errors import PayloadTooLargeError, ValidationFailed

__all__ = [
    "DatasetKind",
    "ValidationReport",
    "validate_and_store",
    "validate_upload",
]


class DatasetKind(StrEnum):
    sft = "sft"
    preference = "preference"
    prompts = "prompts"
    ranking = "ranking"
    candidates = "candidates"


# Every kind the API accepts must have rules; a kind added here without rules fails at import, not at upload.
_missing_rules = {k.value for k in DatasetKind} - set(validation.kinds())
if _missing_rules:  # pragma: no cover - a programming error caught by any test run
    raise RuntimeError(f"dataset kinds without rules in alignd.validation: {sorted(_missing_rules)}")

# How many issues the 422 message spells out; all of them (up to the cap) are in `details`.
_MESSAGE_ISSUES = 3


class _CappedReader:
    """Wraps the upload stream: counts bytes, copies them to ``sink``, raises 413 once past ``max_bytes``.

    The check runs on every read, so an oversize upload is refused after ``max_bytes`` plus one chunk has been
    read, never after reading the whole body.
    """

    def __init__(self, stream: Readable, *, max_bytes: int, sink: IO[bytes] | None) -> None:
        self._read = stream.read
        self._max_bytes = max_bytes
        self._write = sink.write if sink is not None else None
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        chunk = self._read(size)
        self.count += len(chunk)
        if self.count > self._max_bytes:
            raise PayloadTooLargeError(
                f"The dataset is larger than the limit of {self._max_bytes} bytes.",
                code="dataset_too_large",
                details=[{"max_bytes": self._max_bytes}],
            )
        if self._write is not None and chunk:
            self._write(chunk)
        return chunk


def _describe(issue: Issue) -> str:
    return f"line {issue['line']}: {issue['code']}: {issue['message']}"


def _raise_for(report: ValidationReport) -> None:
    if report.is_empty:
        raise ValidationFailed(
            "The dataset has no records (the file is empty or has only blank lines).", code="empty_dataset"
        )
    if report.ok:
        return
    first = "; ".join(_describe(i) for i in report.issues[:_MESSAGE_ISSUES])
    more = report.num_issues - min(len(report.issues), _MESSAGE_ISSUES)
    noun = "line" if report.num_issues == 1 else "lines"
    message = f"{report.num_issues} bad {noun} in the {report.kind} dataset: {first}"
    if more > 0:
        message += f" (and {more} more)"
    details: list[dict[str, Any]] = [dict(i) for i in report.issues]
    raise ValidationFailed(message, code="invalid_dataset", details=details)


def _kind(kind: DatasetKind | str) -> str:
    try:
        return DatasetKind(kind).value
    except ValueError:
        allowed = ", ".join(k.value for k in DatasetKind)
        raise ValidationFailed(
            f"Unknown dataset kind {kind!r}; expected one of {allowed}.", code="invalid_kind"
        ) from None


def validate_upload(
    stream: Readable,
    kind: DatasetKind | str,
    *,
    max_bytes: int,
    max_line_bytes: int = validation.DEFAULT_MAX_LINE_BYTES,
) -> ValidationReport:
    """Validate an uploaded JSONL stream; return the report of a good dataset.

    Raises ``ValidationFailed`` (422) with code ``invalid_dataset`` (``details`` = the bad lines, up to 100),
    ``empty_dataset`` or ``invalid_kind``, and ``PayloadTooLargeError`` (413, ``dataset_too_large``) as soon
    as more than ``max_bytes`` have been read.
    """
    return _validate(stream, kind, max_bytes=max_bytes, max_line_bytes=max_line_bytes, sink=None)


def validate_and_store(
    stream: Readable,
    kind: DatasetKind | str,
    dest: IO[bytes],
    *,
    max_bytes: int,
    max_line_bytes: int = validation.DEFAULT_MAX_LINE_BYTES,
) -> ValidationReport:
    """Like :func:`validate_upload`, and writes every byte read to ``dest`` in the same pass.

    On any error ``dest`` holds a partial or invalid copy: the caller owns it and deletes it (a rejected upload
    stores nothing). On success ``dest`` holds exactly the bytes whose ``sha256`` the report gives.
    """
    return _validate(stream, kind, max_bytes=max_bytes, max_line_bytes=max_line_bytes, sink=dest)


def _validate(
    stream: Readable,
    kind: DatasetKind | str,
    *,
    max_bytes: int,
    max_line_bytes: int,
    sink: IO[bytes] | None,
) -> ValidationReport:
    name = _kind(kind)
    reader = _CappedReader(stream, max_bytes=max_bytes, sink=sink)
    report = validation.validate_stream(reader, name, max_line_bytes=max_line_bytes)
    _raise_for(report)
    return report
