"""The dataset rules: streaming JSONL validation, shared by the SDK and the server.

This module is the ONE home of the rules. The server (``service/core/datasets.py``) wraps it to answer
422/413; ``alignd datasets validate`` runs it locally before an upload. Same code, so the same lines get the
same codes and messages on both sides. It needs neither httpx nor pydantic: the standard library, and
msgspec when it is installed (a faster parser for the same outcome).

How a file is read
------------------
This module also holds the ONE JSONL reader, :func:`iter_records`: the trainers, candidate generation,
ranking expansion and feedback sets read datasets through it, so a file the upload accepted reads the same
way everywhere after it (a BOM, CRLF, blank lines, the JSON rules). The validator reads through its core.

- Bytes are read in chunks (never the whole file) and hashed as they are (``sha256`` is of the exact bytes,
  BOM and CRLF included), so memory stays flat in the file size: at most one chunk plus one line.
- Lines are split on ``\\n`` only. ``\\r\\n`` works because a trailing ``\\r`` is JSON whitespace. We never
  use ``splitlines()``: it also splits on U+2028, U+0085 and friends, which may appear raw in JSON strings.
- A UTF-8 byte-order mark at the start of the file is accepted and skipped (Notepad and Excel's "CSV UTF-8"
  write one; refusing it would reject files that look fine to their authors). A BOM anywhere else is
  ``invalid_json``.
- Blank (empty or whitespace-only) lines are skipped; they are not records, but they keep their line numbers,
  so a reported line number is what an editor shows.
- A line longer than ``max_line_bytes`` (default 1 MiB, excluding the ``\\n``) is reported as
  ``line_too_long`` without being held in memory whole.
- Each bad line gets ONE issue (the first problem found, fields checked in a fixed order), so the issue list
  reads as "the bad lines". The list is capped (default 100) but ``num_issues`` counts them all.

Unknown extra fields are allowed and ignored, at the record and the message level: users carry ids, sources,
labels and metadata in their JSONL, and making them strip those before every upload would buy nothing.

The text the rules read (prompts, completions, responses, message contents) must not hold a NUL character
(``invalid_characters``): ``\u0000`` is valid JSON, but PostgreSQL refuses it in text and jsonb and C-string
readers cut the text there. The check is a memchr per string those rules already look at, so it costs the hot
loop next to nothing; ignored fields are not walked. A lone surrogate escape is ``invalid_json`` (below).

Kinds are kept in a registry (:func:`register_kind`) so later kinds (``ranking``, ``candidates``) plug in
without touching the reader.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, Protocol, TypedDict

__all__ = [
    "AMBIGUOUS_RECORD",
    "CODES",
    "DEFAULT_MAX_ISSUES",
    "DEFAULT_MAX_LINE_BYTES",
    "DUPLICATE_RESPONSE",
    "EMPTY_DATASET",
    "EMPTY_TEXT",
    "IDENTICAL_PAIR",
    "INVALID_CHARACTERS",
    "INVALID_JSON",
    "INVALID_MESSAGES",
    "INVALID_RANKING",
    "INVALID_ROLE",
    "INVALID_UTF8",
    "JSON_TOO_DEEP",
    "LINE_TOO_LONG",
    "MAX_EXTRA_DEPTH",
    "MAX_RESPONSES",
    "MIN_RESPONSES",
    "MISSING_FIELD",
    "NOT_AN_OBJECT",
    "SCORES_LENGTH_MISMATCH",
    "TOO_FEW_RESPONSES",
    "TOO_MANY_RESPONSES",
    "WRONG_TYPE",
    "DatasetLineError",
    "Issue",
    "KindSpec",
    "Problem",
    "Readable",
    "RecordCheck",
    "UnknownKindError",
    "ValidationReport",
    "get_kind",
    "iter_records",
    "kinds",
    "ranking_responses",
    "register_kind",
    "validate_path",
    "validate_stream",
]

# --- issue codes (stable: clients branch on them)
INVALID_JSON: Final = "invalid_json"
NOT_AN_OBJECT: Final = "not_an_object"
MISSING_FIELD: Final = "missing_field"
WRONG_TYPE: Final = "wrong_type"
EMPTY_TEXT: Final = "empty_text"
IDENTICAL_PAIR: Final = "identical_pair"
INVALID_ROLE: Final = "invalid_role"
INVALID_MESSAGES: Final = "invalid_messages"
AMBIGUOUS_RECORD: Final = "ambiguous_record"
INVALID_UTF8: Final = "invalid_utf8"
LINE_TOO_LONG: Final = "line_too_long"
# text holding a NUL character: valid JSON (\u0000), but PostgreSQL's text and jsonb refuse it and C-string
# readers cut the text there
INVALID_CHARACTERS: Final = "invalid_characters"
EMPTY_DATASET: Final = "empty_dataset"
# an unknown field inside a message nested past MAX_EXTRA_DEPTH
JSON_TOO_DEEP: Final = "json_too_deep"
# ranking and candidates
TOO_FEW_RESPONSES: Final = "too_few_responses"
TOO_MANY_RESPONSES: Final = "too_many_responses"
DUPLICATE_RESPONSE: Final = "duplicate_response"
INVALID_RANKING: Final = "invalid_ranking"
SCORES_LENGTH_MISMATCH: Final = "scores_length_mismatch"

CODES: Final = frozenset(
    {
        INVALID_JSON,
        NOT_AN_OBJECT,
        MISSING_FIELD,
        WRONG_TYPE,
        EMPTY_TEXT,
        IDENTICAL_PAIR,
        INVALID_ROLE,
        INVALID_MESSAGES,
        AMBIGUOUS_RECORD,
        INVALID_UTF8,
        LINE_TOO_LONG,
        INVALID_CHARACTERS,
        EMPTY_DATASET,
        JSON_TOO_DEEP,
        TOO_FEW_RESPONSES,
        TOO_MANY_RESPONSES,
        DUPLICATE_RESPONSE,
        INVALID_RANKING,
        SCORES_LENGTH_MISMATCH,
    }
)

# Responses per prompt in ranking and candidates records: fewer than 2 is no comparison; past 16 a person
# cannot rank them reliably, and the C(K,2) pairs per prompt (120 at 16) would dominate a reward-model batch.
MIN_RESPONSES: Final = 2
MAX_RESPONSES: Final = 16
# Unknown fields inside a message ride along with the prompt or response into feedback sets, the database and
# API responses, whose serializers recurse: a 500-deep one made GET /v1/feedback-sets/{id}/next answer 500.
# Real metadata nests 2 or 3 levels; ignored record-level fields are never read, so they are not walked.
MAX_EXTRA_DEPTH: Final = 32

DEFAULT_MAX_LINE_BYTES: Final = 1 << 20
DEFAULT_MAX_ISSUES: Final = 100
# 256 KiB reads: per-chunk work (read, hash, split) is noise at this size, and the chunk plus its split lines
# stay in the CPU cache (measured: 64-256 KiB ~320-350 MB/s, 1 MiB ~310, 4 MiB ~260).
_CHUNK_SIZE: Final = 256 << 10
_BOM: Final = "\ufeff"


class Readable(Protocol):
    """What the reader needs from a stream: binary files, sockets' makefile(), upload wrappers."""

    def read(self, size: int, /) -> bytes: ...


class Issue(TypedDict):
    """One bad line, JSON-ready (it is also the server's error ``details`` entry). ``line`` is 1-based;
    ``0`` means the file as a whole (only ``empty_dataset``)."""

    line: int
    code: str
    message: str


# A record check returns None for a good record, else (code, message). Returning a tuple instead of raising
# keeps the good path (nearly every line) free of exception set-up and message formatting.
Problem = tuple[str, str]
RecordCheck = Callable[[dict[str, Any]], Problem | None]


@dataclass
class ValidationReport:
    kind: str
    num_records: int = 0
    """Non-blank lines, good or bad."""
    size_bytes: int = 0
    sha256: str = ""
    issues: list[Issue] = field(default_factory=list)
    """The first ``max_issues`` issues, in line order."""
    num_issues: int = 0
    """All issues, including those past the cap."""

    @property
    def ok(self) -> bool:
        return self.num_issues == 0

    @property
    def truncated(self) -> bool:
        return self.num_issues > len(self.issues)

    @property
    def is_empty(self) -> bool:
        return self.num_records == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "num_records": self.num_records,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "ok": self.ok,
            "num_issues": self.num_issues,
            "issues": [dict(i) for i in self.issues],
        }


# --- the kind registry


@dataclass(frozen=True)
class KindSpec:
    name: str
    check: RecordCheck
    description: str


class UnknownKindError(ValueError):
    pass


_REGISTRY: dict[str, KindSpec] = {}


def register_kind(name: str, check: RecordCheck, *, description: str, replace: bool = False) -> KindSpec:
    """Add a dataset kind. ``check`` gets each parsed JSON object and returns None or ``(code, message)``."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"dataset kind {name!r} is already registered")
    spec = KindSpec(name=name, check=check, description=description)
    _REGISTRY[name] = spec
    return spec


def kinds() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_kind(kind: str) -> KindSpec:
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        known = ", ".join(f'"{k}"' for k in _REGISTRY)
        raise UnknownKindError(f"unknown dataset kind {kind!r}; expected one of {known}") from None


# --- helpers for checks (cold paths build messages; hot paths only compare types)

_ROLES: Final = frozenset({"system", "user", "assistant"})
_ROLE_LIST: Final = '"system", "user", "assistant"'


def _tname(value: object) -> str:
    """JSON-ish type name for messages ("got number")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: object, limit: int = 40) -> str:
    """A short rendering of a bad value for a message (never the whole of a long string)."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_blank(s: str) -> bool:
    # isspace() stops at the first non-space character, so this is O(1) for real text.
    return not s or s.isspace()


def _nul_problem(path: str) -> Problem:
    return INVALID_CHARACTERS, f'"{path}": contains a NUL character (\\u0000), which is not text'


def _text_problem(path: str, value: object, expected: str) -> Problem:
    if isinstance(value, str):
        return EMPTY_TEXT, f'"{path}": must not be empty or whitespace-only'
    return WRONG_TYPE, f'"{path}": expected {expected}, got {_tname(value)}'


def _depth(value: list[Any] | dict[str, Any], limit: int) -> int:
    """Levels of lists/objects in ``value`` (1 for a flat one), counted up to ``limit + 1`` at most."""
    level: list[Any] = [value]
    depth = 0
    while level and depth <= limit:
        depth += 1
        level = [
            child
            for container in level
            for child in (container.values() if type(container) is dict else container)
            if type(child) is dict or type(child) is list
        ]
    return depth


def _deep_extra(message: dict[str, Any]) -> str | None:
    """The first unknown field of a message nested deeper than :data:`MAX_EXTRA_DEPTH`, or None."""
    for key, value in message.items():
        container = type(value) is dict or type(value) is list
        if (
            container
            and key != "role"
            and key != "content"
            and _depth(value, MAX_EXTRA_DEPTH) > MAX_EXTRA_DEPTH
        ):
            return key
    return None


def _check_messages(
    path: str, msgs: list[Any], *, last: str | None, only: str | None = None
) -> Problem | None:
    """A chat ``messages`` list. ``last``: required role of the final message; ``only``: the one role allowed.

    Each message is an object with ``role`` in system/user/assistant and a non-blank string ``content``.
    """
    if not msgs:
        return INVALID_MESSAGES, f'"{path}": must contain at least one message'
    for i, m in enumerate(msgs):
        if type(m) is not dict:
            return WRONG_TYPE, f'"{path}[{i}]": expected an object with "role" and "content", got {_tname(m)}'
        role = m.get("role")
        # type check first: a list/dict role is unhashable and would raise in the set lookup
        if type(role) is not str or role not in _ROLES:
            if role is None and "role" not in m:
                return MISSING_FIELD, f'"{path}[{i}].role": missing'
            if not isinstance(role, str):
                return WRONG_TYPE, f'"{path}[{i}].role": expected a string, got {_tname(role)}'
            return INVALID_ROLE, f'"{path}[{i}].role": expected one of {_ROLE_LIST}, got {_show(role)}'
        content = m.get("content")
        if type(content) is not str or not content or content.isspace():
            if content is None and "content" not in m:
                return MISSING_FIELD, f'"{path}[{i}].content": missing'
            return _text_problem(f"{path}[{i}].content", content, "a string")
        if "\x00" in content:  # a memchr: the text checks' one extra cost per string
            return _nul_problem(f"{path}[{i}].content")
        if len(m) > 2 and (deep := _deep_extra(m)) is not None:  # extras travel with the message
            return (
                JSON_TOO_DEEP,
                f'"{path}[{i}]": field {_show(deep)} nests more than {MAX_EXTRA_DEPTH} levels deep',
            )
        if only is not None and role != only:
            return (
                INVALID_MESSAGES,
                f'"{path}[{i}].role": only "{only}" messages are allowed here, got "{role}"',
            )
    if last is not None:
        final = msgs[-1]["role"]
        if final != last:
            return INVALID_MESSAGES, f'"{path}": the last message must be a "{last}" message, got "{final}"'
    return None


def _check_prompt(value: object, path: str = "prompt") -> Problem | None:
    """A prompt: a non-blank string, or messages ending with a user turn (the model answers next)."""
    if type(value) is str:
        if not value or value.isspace():
            return EMPTY_TEXT, f'"{path}": must not be empty or whitespace-only'
        return _nul_problem(path) if "\x00" in value else None
    if type(value) is list:
        return _check_messages(path, value, last="user")
    return WRONG_TYPE, f'"{path}": expected a string or a list of messages, got {_tname(value)}'


def _response_text(path: str, value: object) -> str | Problem:
    """A preference response: a string, or a list of assistant messages. Returns its text, or a Problem."""
    if type(value) is str:
        if not value or value.isspace():
            return EMPTY_TEXT, f'"{path}": must not be empty or whitespace-only'
        return _nul_problem(path) if "\x00" in value else value
    if type(value) is list:
        problem = _check_messages(path, value, last=None, only="assistant")
        if problem is not None:
            return problem
        return "\n".join([m["content"] for m in value])
    return WRONG_TYPE, f'"{path}": expected a string or a list of assistant messages, got {_tname(value)}'


_EDGE: Final = 64  # characters looked at by the cheap first/last-word test in _same_text


def _same_text(a: str, b: str) -> bool:
    """Equal after normalising whitespace (strip, and any run of whitespace counts as one space).

    Case and punctuation are kept: "Yes." and "yes" are a real (if weak) preference. Runs once per preference
    line, so it rejects distinct pairs with cheap necessary conditions (normalisation keeps the first and last
    non-space characters and the first and last words) before the exact, allocating ``split()`` comparison.
    Both inputs are non-blank (checked before).
    """
    if a == b:
        return True
    fa = a[0] if not a[0].isspace() else a.lstrip()[:1]
    fb = b[0] if not b[0].isspace() else b.lstrip()[:1]
    if fa != fb:
        return False
    la = a[-1] if not a[-1].isspace() else a.rstrip()[-1:]
    lb = b[-1] if not b[-1].isspace() else b.rstrip()[-1:]
    if la != lb:
        return False
    # A word from a short slice is only known whole when the slice holds two words or the whole string.
    k = _EDGE
    ta = a[-k:].rsplit(None, 1)
    tb = b[-k:].rsplit(None, 1)
    if (len(ta) == 2 or len(a) <= k) and (len(tb) == 2 or len(b) <= k) and ta[-1] != tb[-1]:
        return False
    ha = a[:k].split(None, 1)
    hb = b[:k].split(None, 1)
    if (len(ha) == 2 or len(a) <= k) and (len(hb) == 2 or len(b) <= k) and ha[0] != hb[0]:
        return False
    return a.split() == b.split()


def _missing(rec: dict[str, Any], names: tuple[str, ...]) -> Problem:
    absent = next(n for n in names if n not in rec)
    quoted = [f'"{n}"' for n in names]
    needs = ", ".join(quoted[:-1]) + " and " + quoted[-1]
    return MISSING_FIELD, f'"{absent}": missing (a record needs {needs})'


# --- the built-in kinds


def check_sft(rec: dict[str, Any]) -> Problem | None:
    """``{"prompt": str, "completion": str}`` or ``{"messages": [...]}``: at least two messages, the last an
    assistant message."""
    if "messages" in rec:
        if "prompt" in rec or "completion" in rec:
            return AMBIGUOUS_RECORD, 'has both "messages" and "prompt"/"completion"; use one form per record'
        msgs = rec["messages"]
        if type(msgs) is not list:
            return WRONG_TYPE, f'"messages": expected a list of messages, got {_tname(msgs)}'
        problem = _check_messages("messages", msgs, last="assistant")
        if problem is None and len(msgs) < 2:
            # The answer alone has no prompt to condition on; the trainer needs one to place the loss.
            return INVALID_MESSAGES, '"messages": needs at least one message before the assistant\'s answer'
        return problem
    try:
        prompt = rec["prompt"]
        completion = rec["completion"]
    except KeyError:
        if "prompt" not in rec and "completion" not in rec:
            return MISSING_FIELD, 'expected "prompt" and "completion", or "messages"'
        return _missing(rec, ("prompt", "completion"))
    if type(prompt) is not str or not prompt or prompt.isspace():
        return _text_problem("prompt", prompt, "a string")
    if type(completion) is not str or not completion or completion.isspace():
        return _text_problem("completion", completion, "a string")
    if "\x00" in prompt:
        return _nul_problem("prompt")
    return _nul_problem("completion") if "\x00" in completion else None


def check_preference(rec: dict[str, Any]) -> Problem | None:
    """``{"prompt", "chosen", "rejected"}``.

    The prompt is a string or messages; each response a string or a list of assistant messages.
    """
    try:
        prompt = rec["prompt"]
        chosen = rec["chosen"]
        rejected = rec["rejected"]
    except KeyError:
        return _missing(rec, ("prompt", "chosen", "rejected"))
    problem = _check_prompt(prompt)
    if problem is not None:
        return problem
    c = _response_text("chosen", chosen)
    if not isinstance(c, str):
        return c
    r = _response_text("rejected", rejected)
    if not isinstance(r, str):
        return r
    if _same_text(c, r):
        return IDENTICAL_PAIR, '"chosen" and "rejected" are the same text (after normalising whitespace)'
    return None


def check_prompts(rec: dict[str, Any]) -> Problem | None:
    """``{"prompt": str | messages}`` or ``{"messages": [...]}`` ending with a user message."""
    if "prompt" in rec:
        if "messages" in rec:
            return AMBIGUOUS_RECORD, 'has both "prompt" and "messages"; use one form per record'
        return _check_prompt(rec["prompt"])
    if "messages" in rec:
        msgs = rec["messages"]
        if type(msgs) is not list:
            return WRONG_TYPE, f'"messages": expected a list of messages, got {_tname(msgs)}'
        return _check_messages("messages", msgs, last="user")
    return MISSING_FIELD, '"prompt": missing (a record needs "prompt", a string or a list of messages)'


def _normalised(text: str) -> str:
    return " ".join(text.split())


def ranking_responses(rec: dict[str, Any]) -> list[str] | Problem:
    """The ``prompt`` and ``responses`` part shared by ``ranking`` and ``candidates`` records.

    Returns the responses' texts (each a string, or assistant messages joined by newlines), or a Problem:
    2..16 non-blank responses, no two the same after normalising whitespace (a ranking between identical
    answers would teach the reward model a preference that is not in the text).
    """
    if "prompt" not in rec:
        return MISSING_FIELD, '"prompt": missing (a record needs "prompt" and "responses")'
    problem = _check_prompt(rec["prompt"])
    if problem is not None:
        return problem
    if "responses" not in rec:
        return MISSING_FIELD, '"responses": missing (a record needs "prompt" and "responses")'
    responses = rec["responses"]
    if type(responses) is not list:
        return WRONG_TYPE, f'"responses": expected a list of responses, got {_tname(responses)}'
    if len(responses) < MIN_RESPONSES:
        return TOO_FEW_RESPONSES, f'"responses": needs at least {MIN_RESPONSES}, got {len(responses)}'
    if len(responses) > MAX_RESPONSES:
        return TOO_MANY_RESPONSES, f'"responses": at most {MAX_RESPONSES} are allowed, got {len(responses)}'
    texts: list[str] = []
    seen: dict[str, int] = {}
    for i, value in enumerate(responses):
        text = _response_text(f"responses[{i}]", value)
        if not isinstance(text, str):
            return text
        key = _normalised(text)
        if key in seen:
            return (
                DUPLICATE_RESPONSE,
                f'"responses[{i}]": the same text as "responses[{seen[key]}]" (after normalising whitespace)',
            )
        seen[key] = i
        texts.append(text)
    return texts


def check_candidates(rec: dict[str, Any]) -> Problem | None:
    """``{"prompt": str | messages, "responses": [str | assistant messages, ...]}``: 2 to 16 distinct
    answers to one prompt, not yet judged (what a ``generate`` job writes and a feedback set is made from)."""
    texts = ranking_responses(rec)
    return None if isinstance(texts, list) else texts


def check_ranking(rec: dict[str, Any]) -> Problem | None:
    """``{"prompt", "responses", "ranking": [int, ...]}`` (a permutation of the response indices, best first) or
    ``{"prompt", "responses", "scores": [number, ...]}`` (one per response, higher is better, ties allowed)."""
    texts = ranking_responses(rec)
    if not isinstance(texts, list):
        return texts
    k = len(texts)
    has_ranking, has_scores = "ranking" in rec, "scores" in rec
    if has_ranking and has_scores:
        return AMBIGUOUS_RECORD, 'has both "ranking" and "scores"; use one per record'
    if has_ranking:
        ranking = rec["ranking"]
        if type(ranking) is not list:
            return WRONG_TYPE, f'"ranking": expected a list of response indices, got {_tname(ranking)}'
        for i, index in enumerate(ranking):
            if type(index) is not int:  # bool is not int here: type() identity, not isinstance
                return WRONG_TYPE, f'"ranking[{i}]": expected an integer response index, got {_tname(index)}'
        if len(ranking) != k:
            return (
                INVALID_RANKING,
                f'"ranking": must order all {k} responses (a permutation of 0..{k - 1}), got {len(ranking)}',
            )
        if sorted(ranking) != list(range(k)):
            return INVALID_RANKING, f'"ranking": must be a permutation of 0..{k - 1}, got {_show(ranking)}'
        return None
    if has_scores:
        scores = rec["scores"]
        if type(scores) is not list:
            return WRONG_TYPE, f'"scores": expected a list of numbers, got {_tname(scores)}'
        for i, score in enumerate(scores):
            if type(score) is not int and type(score) is not float:
                return WRONG_TYPE, f'"scores[{i}]": expected a number, got {_tname(score)}'
        if len(scores) != k:
            return SCORES_LENGTH_MISMATCH, f'"scores": expected one per response ({k}), got {len(scores)}'
        return None
    return MISSING_FIELD, '"ranking": missing (a record needs "ranking" or "scores")'


register_kind("sft", check_sft, description=check_sft.__doc__ or "")
register_kind("preference", check_preference, description=check_preference.__doc__ or "")
register_kind("prompts", check_prompts, description=check_prompts.__doc__ or "")
register_kind("ranking", check_ranking, description=check_ranking.__doc__ or "")
register_kind("candidates", check_candidates, description=check_candidates.__doc__ or "")


# --- the reader


def _no_constants(name: str) -> NoReturn:
    # Python's json accepts NaN/Infinity; JSON does not, and other readers (and the trainer's) would choke.
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e999 is valid JSON syntax but no double: Python reads it as inf, which no JSON writer can write back.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range for a 64-bit float")
    return value


# raw_decode skips the module-level loads() wrapper and its two regex whitespace matches per call; the rare
# lines it rejects (leading whitespace, errors) are re-parsed by the full decoder for the exact outcome.
_DECODER: Final = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite_float)
_raw_decode: Final = _DECODER.raw_decode


try:  # optional (the SDK stays pure Python; the server installs it): parses a line 2-3x faster than json
    from msgspec.json import Decoder as _MsgspecDecoder

    _fast_decode: Callable[[bytes], Any] | None = _MsgspecDecoder().decode
except ImportError:  # pragma: no cover - depends on the installed extras
    _fast_decode = None

# "Not parsed yet": a line the fast decoder refused (or no fast decoder) takes the stdlib path, which gives
# the exact outcome and message, so both paths report the same for every line.
_UNPARSED: Final = object()


def _json_error(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"invalid JSON: {exc}"


class _Bad:
    """A line that holds no JSON value: the issue the reader found (invalid JSON or UTF-8, too long)."""

    __slots__ = ("code", "message")

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message


_BLANK: Final = object()  # an empty or whitespace-only line: not a record


# A \uD800-\uDFFF escape without its partner decodes to a lone surrogate: not a character, so the text can
# never be written as UTF-8 again (the 422 body quoting it, the database, the tokenizer all fail on it).
# msgspec refuses such strings itself; the stdlib parser takes them, so its path looks for them.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE: Final = (
    "invalid JSON: a \\u escape encodes a lone UTF-16 surrogate, which is not a character"
)


def _without_lone_surrogates(s: str, obj: Any) -> Any:
    """``obj``, or a :class:`_Bad` when one of its strings holds a lone surrogate (only escapes make one)."""
    if _SURROGATE_ESCAPE.search(s) is None:
        return obj
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return _Bad(INVALID_JSON, _LONE_SURROGATE)
    except RecursionError:
        return _Bad(INVALID_JSON, "invalid JSON: nested too deeply")
    return obj


def _parse_slow(raw: bytes) -> Any:
    """The stdlib path for one line: the parsed value, a :class:`_Bad`, or ``_BLANK``."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _Bad(INVALID_UTF8, f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1}")
    try:
        obj, end = _raw_decode(s)
        if end != len(s) and not s[end:].isspace():  # CRLF leaves "\r" here: JSON whitespace
            raise ValueError  # trailing data: let the full decoder say what it is
        return _without_lone_surrogates(s, obj)
    except (ValueError, RecursionError):
        if not s or s.isspace():
            return _BLANK
        try:
            obj = _DECODER.decode(s)  # handles leading whitespace; otherwise the exact error
        except (ValueError, RecursionError) as exc:
            return _Bad(INVALID_JSON, _json_error(exc))
        return _without_lone_surrogates(s, obj)


# (line number, parsed JSON value or _Bad) for each non-blank line of one chunk
_Batch = Iterator[tuple[int, Any]]


class _Lines:
    """The one JSONL reader: a binary stream, read in chunks, as numbered parsed lines.

    :meth:`batches` yields, per chunk, an iterator over the chunk's non-blank lines as ``(line number,
    value)``, where value is the parsed JSON value (of any type: objects are the caller's rule) or a
    :class:`_Bad`. Consume each batch before asking for the next (line numbers carry over). The validator and
    :func:`iter_records` both read through it, so a file reads the same everywhere.
    """

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.lineno = 0  # number of lines completed so far
        self.size = 0  # bytes read so far

    def _too_long(self, size: int | None) -> _Bad:
        got = f" ({size} bytes)" if size is not None else ""
        return _Bad(LINE_TOO_LONG, f"line is longer than the limit of {self.max_line_bytes} bytes{got}")

    def parse(self, body: bytes) -> _Batch:
        """Complete lines (``\\n``-separated, no trailing terminator), parsed one by one.

        Lines are split as bytes and decoded one at a time: decoding a whole chunk at once is slower on real
        data, because one emoji anywhere turns the whole chunk's str (and every line sliced from it) into
        4 bytes per character; per line, ASCII lines stay compact. It also names each bad-UTF-8 line.
        A generator, not a list: each parsed line is checked and freed before the next is parsed, which
        keeps the work in the CPU cache (a list per chunk measured ~8% slower).
        """
        lines = body.split(b"\n")
        if self.lineno == 0 and lines[0].startswith(b"\xef\xbb\xbf") and len(lines[0]) <= self.max_line_bytes:
            # The BOM counts toward line 1's length, as it does when :meth:`batches` streams a long line.
            lines[0] = lines[0][3:]
        # Hot loop: locals only, no regex, messages built only for bad lines.
        fast_decode = _fast_decode
        cap = self.max_line_bytes
        lineno = self.lineno
        for raw in lines:
            lineno += 1
            if len(raw) > cap:
                yield lineno, self._too_long(len(raw))
                continue
            obj: Any = _UNPARSED
            if fast_decode is not None:
                try:
                    obj = fast_decode(raw)  # checks UTF-8 itself, straight from the bytes
                except Exception:  # refused: the stdlib path says exactly why
                    obj = _UNPARSED
            if obj is _UNPARSED:
                obj = _parse_slow(raw)
                if obj is _BLANK:
                    continue
            yield lineno, obj
        self.lineno = lineno

    def batches(self, stream: Readable, chunk_size: int, hasher: Any = None) -> Iterator[_Batch]:
        """Reads ``stream`` to its end; ``hasher`` (``update(bytes)``), if given, sees every byte read."""
        read = stream.read
        cap = self.max_line_bytes
        carry: list[bytes] = []  # pieces of the current, unfinished line
        carry_len = 0
        skipping = False  # inside a line already reported as too long: drop bytes until its newline
        while True:
            chunk = read(chunk_size)
            if not chunk:
                break
            if hasher is not None:
                hasher.update(chunk)
            self.size += len(chunk)
            if skipping:
                first_nl = chunk.find(b"\n")
                if first_nl < 0:
                    continue
                self.lineno += 1
                skipping = False
                chunk = chunk[first_nl + 1 :]
            nl = chunk.rfind(b"\n")
            if nl < 0:
                carry.append(chunk)
                carry_len += len(chunk)
                if carry_len > cap:
                    # Report now and stop buffering: a 10 GB file with no newline must not fill memory.
                    yield iter([(self.lineno + 1, self._too_long(None))])
                    carry, carry_len, skipping = [], 0, True
                continue
            if carry:
                carry.append(chunk[:nl])
                body = b"".join(carry)
            else:
                body = chunk[:nl]
            yield self.parse(body)
            rest = chunk[nl + 1 :]
            carry, carry_len = ([rest], len(rest)) if rest else ([], 0)
        if skipping:
            self.lineno += 1
        elif carry:
            yield self.parse(b"".join(carry))  # the last line had no newline


class _Reader:
    """State of one validation run: the issues found in the lines :class:`_Lines` reads."""

    def __init__(self, kind: str, check: RecordCheck, *, max_line_bytes: int, max_issues: int) -> None:
        self.report = ValidationReport(kind=kind)
        self.check = check
        self.max_issues = max_issues
        self.lines = _Lines(max_line_bytes)

    def issue(self, line: int, code: str, message: str) -> None:
        report = self.report
        report.num_issues += 1
        if len(report.issues) < self.max_issues:
            report.issues.append({"line": line, "code": code, "message": message})

    def check_batch(self, batch: _Batch) -> None:
        # Hot loop: type() identity checks; every non-blank line is a record, good or bad.
        check = self.check
        issue = self.issue
        records = 0
        for lineno, obj in batch:
            records += 1
            if type(obj) is dict:
                problem = check(obj)
                if problem is not None:
                    issue(lineno, problem[0], problem[1])
            elif type(obj) is _Bad:
                issue(lineno, obj.code, obj.message)
            else:
                issue(lineno, NOT_AN_OBJECT, f"expected a JSON object, got {_tname(obj)}")
        self.report.num_records += records

    def run(self, stream: Readable, chunk_size: int) -> ValidationReport:
        # Hashing inline: a hashing thread (hashlib drops the GIL) measured slower on this 2-core machine
        # whenever the other core was busy, and a server's other core usually is.
        hasher = hashlib.sha256()
        for batch in self.lines.batches(stream, chunk_size, hasher):
            self.check_batch(batch)
        report = self.report
        report.size_bytes = self.lines.size
        report.sha256 = hasher.hexdigest()
        if report.num_records == 0:
            report.num_issues += 1
            report.issues.append(
                {
                    "line": 0,
                    "code": EMPTY_DATASET,
                    "message": "the file has no records (only blank lines or nothing)",
                }
            )
        return report


def validate_stream(
    stream: Readable,
    kind: str,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_issues: int = DEFAULT_MAX_ISSUES,
    chunk_size: int = _CHUNK_SIZE,
) -> ValidationReport:
    """Validate a JSONL dataset read from a binary stream (anything with ``read(n) -> bytes``).

    Reads to the end (so ``size_bytes`` and ``sha256`` cover the whole stream) and never raises for bad
    content: problems are in the report. Raises :class:`UnknownKindError` for an unknown ``kind``; exceptions
    raised by ``stream.read`` (e.g. a size cap enforced by the caller's wrapper) propagate unchanged.
    """
    spec = get_kind(kind)
    if max_line_bytes < 1 or max_issues < 0 or chunk_size < 1:
        raise ValueError("max_line_bytes and chunk_size must be positive, max_issues non-negative")
    reader = _Reader(spec.name, spec.check, max_line_bytes=max_line_bytes, max_issues=max_issues)
    return reader.run(stream, chunk_size)


def validate_path(
    path: str | os.PathLike[str],
    kind: str,
    *,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    max_issues: int = DEFAULT_MAX_ISSUES,
) -> ValidationReport:
    """Validate a JSONL file on disk; see :func:`validate_stream`."""
    get_kind(kind)  # fail on a bad kind before touching the file
    # Unbuffered: we read big chunks ourselves, so a buffer layer would only add a copy.
    with open(path, "rb", buffering=0) as f:
        return validate_stream(f, kind, max_line_bytes=max_line_bytes, max_issues=max_issues)


class DatasetLineError(ValueError):
    """The first bad line :func:`iter_records` met: its 1-based ``line``, and the ``code`` and ``message``
    the validator reports for that line."""

    def __init__(self, line: int, code: str, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.code = code
        self.message = message


def _records(
    source: str | os.PathLike[str] | Readable, check: RecordCheck | None, max_line_bytes: int
) -> Iterator[tuple[int, dict[str, Any]]]:
    if isinstance(source, str | os.PathLike):
        # Unbuffered: we read big chunks ourselves, so a buffer layer would only add a copy.
        with open(source, "rb", buffering=0) as f:
            yield from _records(f, check, max_line_bytes)
        return
    for batch in _Lines(max_line_bytes).batches(source, _CHUNK_SIZE):
        for lineno, obj in batch:
            if type(obj) is not dict:
                if type(obj) is _Bad:
                    raise DatasetLineError(lineno, obj.code, obj.message)
                raise DatasetLineError(lineno, NOT_AN_OBJECT, f"expected a JSON object, got {_tname(obj)}")
            if check is not None:
                problem = check(obj)
                if problem is not None:
                    raise DatasetLineError(lineno, problem[0], problem[1])
            yield lineno, obj


def iter_records(
    source: str | os.PathLike[str] | Readable,
    *,
    kind: str | None = None,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line of a JSONL file (a path, or a binary stream).

    Read exactly as the validator reads (a leading BOM skipped, ``\\n`` line ends, CRLF fine, blank lines
    skipped but counted, the same JSON parser), streaming. With ``kind``, each record is also checked
    by that kind's rules. The first bad line raises :class:`DatasetLineError` (after the good lines before
    it were yielded) with the validator's code and message for it. An empty file yields nothing: whether
    that is an error is the caller's call. Raises :class:`UnknownKindError` at once for an unknown ``kind``.
    """
    check = get_kind(kind).check if kind is not None else None
    if max_line_bytes < 1:
        raise ValueError("max_line_bytes must be positive")
    return _records(source, check, max_line_bytes)
