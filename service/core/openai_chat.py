"""Chat completions of the OpenAI facade, the rules without the framework: a finished chat job's failure as the
error its request answers, and what a stream sends next from the output stored so far.

A chat job's output is each choice's whole text so far (workers/outputs.store_chat), so a stream sends the
part of each text beyond what it has sent. A text that does not extend what was sent can only come from a
second attempt of the job (its worker died and another one ran it again): that stream ends with an error
rather than send a completion spliced from two runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from contract.hyperparameters import CONTEXT_LENGTH_EXCEEDED, INVALID_MESSAGES
from service.core.errors import AlignError, ConflictError, ValidationFailed
from service.core.jobs import JobStatus

# Failures of the request, not of alignd: a 400 naming ``messages``.
_INPUT_ERRORS = frozenset({CONTEXT_LENGTH_EXCEEDED, INVALID_MESSAGES})


def job_failure(job_id: str, status: JobStatus, code: str | None, message: str | None) -> AlignError:
    """The error a chat request answers when its job ended without succeeding."""
    if status is JobStatus.cancelled:
        return ConflictError(
            f"The chat job {job_id} was cancelled before it finished.", code="chat_cancelled"
        )
    if code in _INPUT_ERRORS:
        text = message or code
        return ValidationFailed(
            f"messages: {text}", code=code, details=[{"field": "messages", "code": code, "message": text}]
        )
    return AlignError(
        f"The chat job {job_id} failed ({code}): {message} (GET /v1/jobs/{job_id}/events has its events).",
        code=code or "chat_failed",
        status=500,
    )


def text_deltas(sent: list[str], choices: Sequence[dict[str, Any]]) -> list[tuple[int, str]] | None:
    """(choice index, new text) for each choice whose stored text grew past what was sent, and ``sent``
    brought up to date; None when a stored text does not extend what was sent."""
    deltas = []
    for choice in choices:
        index, text = int(choice["index"]), str(choice["text"])
        if not 0 <= index < len(sent) or not text.startswith(sent[index]):
            return None
        if len(text) > len(sent[index]):
            deltas.append((index, text[len(sent[index]) :]))
            sent[index] = text
    return deltas
