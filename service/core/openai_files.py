"""OpenAI's fine-tuning file formats, converted onto alignd's dataset kinds (framework-free, torch-free).

An OpenAI file has no kind; the method of the job that uses it decides how its lines read:

- ``supervised``: ``{"messages": [...]}`` (or the legacy ``{"prompt", "completion"}``) -> an ``sft`` line as is;
- ``dpo``: ``{"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}`` -> a
  ``preference`` line ``{"prompt": <input.messages>, "chosen": ..., "rejected": ...}``;
- ``reinforcement``: ``{"messages": [...], <fields the grader reads>}`` -> a ``prompts`` line as is.

In every message ``developer`` becomes ``system`` (OpenAI treats them alike) and a content list of text parts
becomes its text. What alignd cannot train on (images, tool calls, tools) is refused per line, naming it.

:func:`convert` writes one output line per input line (blank lines too), so the converted file's line numbers
are the uploaded file's, and alignd's own rules (``alignd.validation``) then judge the converted file: a
line the converter cannot read (not UTF-8, not JSON, too long) is copied unchanged for those rules to name.
:func:`file_issues` merges both into one list, in the uploaded format's field names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, BinaryIO

from alignd.validation import DEFAULT_MAX_LINE_BYTES, Issue, ValidationReport

__all__ = ["DATASET_KINDS", "Conversion", "FileFormat", "convert", "file_issues"]


class FileFormat(StrEnum):
    """The OpenAI method whose format a file is read in."""

    supervised = "supervised"
    dpo = "dpo"
    reinforcement = "reinforcement"


DATASET_KINDS: dict[FileFormat, str] = {
    FileFormat.supervised: "sft",
    FileFormat.dpo: "preference",
    FileFormat.reinforcement: "prompts",
}

# alignd's field names in validator messages -> the uploaded format's (the dpo lines were restructured).
_ALIGND_PATHS: dict[FileFormat, tuple[tuple[str, str], ...]] = {
    FileFormat.dpo: (
        ('"prompt', '"input.messages'),
        ('"chosen', '"preferred_output'),
        ('"rejected', '"non_preferred_output'),
    ),
}
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})
# Message fields that change what OpenAI trains on and alignd cannot reproduce: refused, not dropped.
_UNSUPPORTED_MESSAGE_FIELDS = ("tool_calls", "function_call", "audio")
_UNSUPPORTED_RECORD_FIELDS = ("tools", "functions")
_COPY_CHUNK = 1 << 20


class _LineProblem(Exception):
    """A line in the OpenAI format that cannot become an alignd record (code, message)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Conversion:
    """What :func:`convert` found: the lines it refused, and counts behind the job's warning events."""

    issues: list[Issue] = field(default_factory=list)
    # supervised lines with an assistant turn before the last one that OpenAI would train on (no weight 0)
    earlier_assistant_turns: int = 0

    def notes(self) -> dict[str, int]:
        return {"earlier_assistant_turns": self.earlier_assistant_turns}


def _text(content: Any, path: str) -> Any:
    """A message's content as alignd reads it: a list of text parts becomes their text; anything else is
    left for alignd's rules to judge (they name a missing or empty content)."""
    if not isinstance(content, list):
        return content
    texts: list[str] = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            shown = json.dumps(kind) if isinstance(kind, str) else "without a text type"
            raise _LineProblem(
                "unsupported_content",
                f'"{path}[{index}]": a content part {shown} is not text; alignd trains on text only',
            )
        texts.append(part["text"])
    return "".join(texts)


def _messages(value: Any, path: str) -> Any:
    """A messages list with OpenAI's spellings mapped onto alignd's (non-lists are left to alignd's rules)."""
    if not isinstance(value, list):
        return value
    out: list[Any] = []
    for index, message in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(message, dict):
            out.append(message)
            continue
        for name in _UNSUPPORTED_MESSAGE_FIELDS:
            if message.get(name):
                raise _LineProblem(
                    "unsupported_field", f'"{where}.{name}": not supported; alignd trains on text'
                )
        mapped = {key: item for key, item in message.items() if key != "weight"}
        if mapped.get("role") == "developer":
            mapped["role"] = "system"
        if "content" in mapped:
            mapped["content"] = _text(mapped["content"], f"{where}.content")
        out.append(mapped)
    return out


def _refuse_tools(record: dict[str, Any], prefix: str = "") -> None:
    for name in _UNSUPPORTED_RECORD_FIELDS:
        if record.get(name):
            raise _LineProblem(
                "unsupported_field",
                f'"{prefix}{name}": tool definitions are not supported; alignd trains on messages only',
            )


def _supervised(record: dict[str, Any], conversion: Conversion) -> dict[str, Any]:
    _refuse_tools(record)
    raw = record.get("messages")
    if not isinstance(raw, list):
        return record  # the prompt/completion form, or a shape alignd's rules name
    assistants = [m for m in raw if isinstance(m, dict) and m.get("role") == "assistant"]
    if assistants and raw[-1] is assistants[-1] and assistants[-1].get("weight") == 0:
        raise _LineProblem(
            "unsupported_weight",
            f'"messages[{len(raw) - 1}].weight": 0 on the last assistant message; alignd always trains on '
            "the last assistant message (and only on it)",
        )
    if any(m.get("weight", 1) != 0 for m in assistants[:-1]):
        conversion.earlier_assistant_turns += 1
    return {**record, "messages": _messages(raw, "messages")}


def _dpo(record: dict[str, Any], _conversion: Conversion) -> dict[str, Any]:
    source = record.get("input")
    if not isinstance(source, dict):
        code = "missing_field" if source is None else "wrong_type"
        raise _LineProblem(code, '"input": expected an object with "messages" (the prompt)')
    _refuse_tools(source, "input.")
    for name in ("preferred_output", "non_preferred_output"):
        if name not in record:
            raise _LineProblem(
                "missing_field",
                f'"{name}": missing (a dpo line needs "input", "preferred_output" and "non_preferred_output")',
            )
    if "messages" not in source:
        raise _LineProblem("missing_field", '"input.messages": missing')
    extras = {
        k: v for k, v in record.items() if k not in ("input", "preferred_output", "non_preferred_output")
    }
    return {
        **extras,
        "prompt": _messages(source["messages"], "input.messages"),
        "chosen": _messages(record["preferred_output"], "preferred_output"),
        "rejected": _messages(record["non_preferred_output"], "non_preferred_output"),
    }


def _reinforcement(record: dict[str, Any], _conversion: Conversion) -> dict[str, Any]:
    _refuse_tools(record)
    if "messages" not in record:
        return record  # alignd's prompts rules name what is missing
    return {**record, "messages": _messages(record["messages"], "messages")}


_CONVERTERS = {
    FileFormat.supervised: _supervised,
    FileFormat.dpo: _dpo,
    FileFormat.reinforcement: _reinforcement,
}


def _convert_line(raw: bytes, lineno: int, fmt: FileFormat, conversion: Conversion) -> bytes:
    """The alignd line for one uploaded line; the line itself when it is not a JSON object (alignd's rules
    then say what is wrong with it) or when this format refuses it (the refusal goes into ``conversion``)."""
    body = raw[3:] if lineno == 1 and raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        record = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return raw if raw.endswith(b"\n") else raw + b"\n"
    if not isinstance(record, dict):
        return raw if raw.endswith(b"\n") else raw + b"\n"
    try:
        converted = _CONVERTERS[fmt](record, conversion)
    except _LineProblem as problem:
        conversion.issues.append({"line": lineno, "code": problem.code, "message": problem.message})
        return raw if raw.endswith(b"\n") else raw + b"\n"
    # ASCII escapes: a lone surrogate stays an escape alignd's reader refuses, never an encoding error here.
    return json.dumps(converted, ensure_ascii=True).encode("ascii") + b"\n"


def convert(
    source: BinaryIO, sink: BinaryIO, fmt: FileFormat, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> Conversion:
    """Write ``source`` (an uploaded JSONL file in ``fmt``'s format) to ``sink`` as alignd's dataset kind
    ``DATASET_KINDS[fmt]``, one line per line; validate ``sink`` with alignd's rules afterwards."""
    conversion = Conversion()
    lineno = 0
    while raw := source.readline(max_line_bytes + 2):
        lineno += 1
        if not raw.endswith(b"\n") and len(raw) > max_line_bytes:
            # Longer than alignd's limit: copied through, never held whole, for alignd's rules to refuse.
            sink.write(raw)
            while (rest := source.readline(_COPY_CHUNK)) and not rest.endswith(b"\n"):
                sink.write(rest)
            sink.write(rest if rest else b"\n")
            continue
        if not raw.strip():
            sink.write(b"\n")  # blank: not a record, but it keeps its line number
            continue
        sink.write(_convert_line(raw, lineno, fmt, conversion))
    return conversion


def _in_format(issue: Issue, fmt: FileFormat) -> Issue:
    message = issue["message"]
    for alignd_name, openai_name in _ALIGND_PATHS.get(fmt, ()):
        message = message.replace(alignd_name, openai_name)
    return {"line": issue["line"], "code": issue["code"], "message": message}


def file_issues(conversion: Conversion, report: ValidationReport, fmt: FileFormat) -> list[Issue]:
    """Every bad line, in line order: the converter's refusal where it refused the line, else alignd's rule
    for the converted line, with its field names put back into the uploaded format's."""
    refused = {issue["line"] for issue in conversion.issues}
    found = [_in_format(i, fmt) for i in report.issues if i["line"] not in refused]
    return sorted([*conversion.issues, *found], key=lambda issue: issue["line"])
