"""An evaluation's per-prompt rows as JSON: the eval artifact's per_prompt.csv (and references.json) read once.

The artifact is immutable, so what is parsed from it is kept in a small in-process cache by artifact id: a
browser paging through a few hundred prompts, or sorting them, unpacks the archive once, not once per page.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import tarfile
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import IO, Any

from contract.evaluation import PER_PROMPT_FILE, REFERENCES_FILE, PromptAnswer, PromptResult
from service.core.errors import ConflictError
from service.db.tables import ArtifactRow
from service.storage import ArtifactStore

FIXED_BEFORE = ["prompt_index", "line", "prompt", "candidate", "sample", "answer", "finish_reason", "tokens"]
FIXED_AFTER = "grader_errors"
CACHED_ARTIFACTS = 4
# A prompt may be long (max_prompt_length goes to 32768 tokens): more than csv's default 128 KiB per field.
csv.field_size_limit(64 << 20)

_cache: OrderedDict[str, list[PromptResult]] = OrderedDict()
_cache_lock = threading.Lock()


def prompt_results(store: ArtifactStore, artifact: ArtifactRow) -> list[PromptResult]:
    """Every prompt of the evaluation, in prompt_index order (cached per artifact)."""
    with _cache_lock:
        if artifact.id in _cache:
            _cache.move_to_end(artifact.id)
            return _cache[artifact.id]
    results = _read(store, artifact)
    with _cache_lock:
        _cache[artifact.id] = results
        while len(_cache) > CACHED_ARTIFACTS:
            _cache.popitem(last=False)
    return results


def _unreadable(artifact: ArtifactRow, why: str) -> ConflictError:
    return ConflictError(
        f"The eval artifact {artifact.id} cannot be read as per-prompt rows: {why}.",
        code="evaluation_unreadable",
    )


def _read(store: ArtifactStore, artifact: ArtifactRow) -> list[PromptResult]:
    files = _members(store, artifact, {PER_PROMPT_FILE, REFERENCES_FILE})
    if PER_PROMPT_FILE not in files:
        raise _unreadable(artifact, f"it holds no {PER_PROMPT_FILE}")
    references: list[dict[str, str]] | None = None
    if REFERENCES_FILE in files:  # absent from evaluations stored before it was written
        references = json.loads(files[REFERENCES_FILE])
    try:
        return _parse(files[PER_PROMPT_FILE].decode("utf-8"), references)
    except (KeyError, ValueError, IndexError) as exc:
        raise _unreadable(artifact, str(exc)[:200]) from None


def _members(store: ArtifactStore, artifact: ArtifactRow, names: set[str]) -> dict[str, bytes]:
    with (
        _open_archive(store, artifact.storage_key) as handle,
        tarfile.open(fileobj=handle, mode="r:gz") as tar,
    ):
        out = {}
        for member in tar:
            if member.isfile() and member.name.lstrip("./") in names:
                extracted = tar.extractfile(member)
                if extracted is not None:
                    out[member.name.lstrip("./")] = extracted.read()
        return out


@contextlib.contextmanager
def _open_archive(store: ArtifactStore, key: str) -> Iterator[IO[bytes]]:
    """The stored .tar.gz as a file: the local file itself, or a spooled copy of the object's bytes (S3)."""
    path = store.local_path(key)
    if path is not None:
        with open(path, "rb") as handle:
            yield handle
        return
    with tempfile.SpooledTemporaryFile(max_size=16 << 20) as spooled:
        for chunk in store.iter_chunks(key):
            spooled.write(chunk)
        spooled.seek(0)
        yield spooled


def _prompt(text: str) -> str | list[dict[str, Any]]:
    # per_prompt.csv holds a chat prompt as its messages' JSON (workers/training/evaluate.py: _prompt_text).
    if text.startswith("[{"):
        try:
            messages = json.loads(text)
        except ValueError:
            return text
        if isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages):
            return messages
    return text


def _rows(table: str) -> Iterator[tuple[dict[str, str], list[str]]]:
    reader = csv.reader(io.StringIO(table, newline=""))
    header = next(reader)
    graders = header[len(FIXED_BEFORE) + 1 : -1]  # between log_ratio_to_base and grader_errors
    if header[: len(FIXED_BEFORE)] != FIXED_BEFORE or header[-1] != FIXED_AFTER:
        raise ValueError(f"unexpected columns {header}")
    for values in reader:
        yield dict(zip(header, values, strict=True)), graders


def _parse(table: str, references: list[dict[str, str]] | None) -> list[PromptResult]:
    results: list[PromptResult] = []
    for row, graders in _rows(table):
        index = int(row["prompt_index"])
        if not results or results[-1].index != index:
            results.append(
                PromptResult(
                    index=index,
                    line=int(row["line"]),
                    prompt=_prompt(row["prompt"]),
                    references=references[index] if references is not None else None,
                    answers=[],
                )
            )
        results[-1].answers.append(
            PromptAnswer(
                candidate=row["candidate"],
                sample=int(row["sample"]),
                answer=row["answer"],
                finish_reason=row["finish_reason"],
                tokens=int(row["tokens"]),
                log_ratio_to_base=float(row["log_ratio_to_base"]),
                scores={name: float(row[name]) for name in graders},
                grader_errors=json.loads(row[FIXED_AFTER]) if row[FIXED_AFTER] else [],
            )
        )
    return results
