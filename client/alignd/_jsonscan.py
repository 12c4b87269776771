"""A bounded-memory pre-scan of JSON bytes: how deep it nests and how many values it holds, before any parser
builds a Python object from it.

Why: ``json.loads`` turns 3 bytes (``{},``) into ~90 bytes of Python objects, so a 50 MB file of empty
objects costs over a gigabyte before any check can look at the result, and a deep ``[[[[...`` reaches code
that recurses. The scan reads the bytes in chunks, skips string contents, and stops as soon as a cap is
passed, so its memory is one chunk whatever the file holds.

What is counted, outside strings:

- depth: the deepest run of open ``[`` / ``{`` brackets;
- nodes: ``[``, ``{`` and ``,``: one per container and one per element after a container's first. Scalars
  at the top level and first elements are not counted; the figure bounds how many Python objects a parser
  makes (at most about twice it), which is what the cap is for.

The scan checks structure only as far as the counts need it (a closing bracket with nothing open is refused);
whether the text is valid JSON is the parser's call afterwards. Bytes are read as UTF-8, where the bytes of
``"``, ``\\``, brackets and commas never occur inside a multi-byte character; callers refuse other encodings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Final, Protocol

__all__ = [
    "JSON_TOO_DEEP",
    "JSON_TOO_LARGE",
    "JSON_UNBALANCED",
    "JsonScanner",
    "JsonShape",
    "JsonStructureError",
    "scan_json",
    "scan_json_stream",
]

JSON_TOO_DEEP: Final = "json_too_deep"
JSON_TOO_LARGE: Final = "json_too_large"
JSON_UNBALANCED: Final = "json_unbalanced"

_CHUNK: Final = 1 << 20

# Everything up to the last complete string of a chunk: runs of non-quote bytes, each followed by a whole
# string (escapes included). Possessive, so a chunk ending inside a string is matched once, in linear time,
# instead of being retried from every later quote (which made the plain pattern quadratic on ``\"\"\"...``).
_UP_TO_LAST_STRING: Final = re.compile(rb'(?:[^"]*+"[^"\\]*+(?:\\.[^"\\]*+)*+")*+', re.DOTALL)
_STRING: Final = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
# The rest of a string that started in an earlier chunk, up to and including its closing quote.
_STRING_TAIL: Final = re.compile(rb'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)

# Brackets to signed steps (+1 open, -1 close, as int8 bytes); every other byte is dropped.
_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[{]}")


class JsonStructureError(ValueError):
    """A cap was passed (``json_too_deep`` / ``json_too_large``) or a bracket closed with nothing open
    (``json_unbalanced``). ``limit`` is the cap passed (0 for ``json_unbalanced``)."""

    def __init__(self, code: str, message: str, *, limit: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.limit = limit


@dataclass(frozen=True)
class JsonShape:
    depth: int
    nodes: int
    size_bytes: int


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class JsonScanner:
    """Feed it chunks in order; it raises :class:`JsonStructureError` as soon as a cap is passed."""

    def __init__(self, *, max_depth: int, max_nodes: int) -> None:
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.depth = 0
        self.max_seen = 0
        self.nodes = 0
        self.size = 0
        self._in_string = False
        self._escaped = False  # inside a string, the previous chunk ended on an unpaired backslash

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        start = self._skip_open_string(chunk)
        if start < 0:
            return
        end = _UP_TO_LAST_STRING.match(chunk, start).end()  # type: ignore[union-attr]  # `*+` always matches
        quote = chunk.find(b'"', end)
        structure = _STRING.sub(b"", chunk[start:end]) + chunk[end : len(chunk) if quote < 0 else quote]
        if quote >= 0:
            self._in_string = True
            self._escaped = _ends_on_unpaired_backslash(chunk, quote + 1)
        self._count(structure)

    def _skip_open_string(self, chunk: bytes) -> int:
        """Where structure resumes in ``chunk``, or -1 when the whole chunk lies inside a string."""
        if not self._in_string:
            return 0
        pos = 0
        if self._escaped:
            if not chunk:
                return -1
            pos, self._escaped = 1, False
        found = _STRING_TAIL.match(chunk, pos)
        if found is None:
            self._escaped = _ends_on_unpaired_backslash(chunk, pos)
            return -1
        self._in_string = False
        return found.end()

    def _count(self, structure: bytes) -> None:
        self.nodes += structure.count(b",") + structure.count(b"[") + structure.count(b"{")
        if self.nodes > self.max_nodes:
            raise JsonStructureError(
                JSON_TOO_LARGE,
                f"more than {self.max_nodes} JSON values (counted as brackets and commas)",
                limit=self.max_nodes,
            )
        steps = memoryview(structure.translate(_STEPS, _NOT_BRACKETS)).cast("b")
        if not steps:
            return
        deepest = max(accumulate(steps, initial=self.depth))
        if min(accumulate(steps, initial=self.depth)) < 0:
            raise JsonStructureError(JSON_UNBALANCED, "a closing bracket with no open bracket before it")
        self.depth += sum(steps)
        self.max_seen = max(self.max_seen, deepest)
        if deepest > self.max_depth:
            raise JsonStructureError(
                JSON_TOO_DEEP,
                f"nested more than {self.max_depth} levels deep",
                limit=self.max_depth,
            )

    def shape(self) -> JsonShape:
        return JsonShape(depth=self.max_seen, nodes=self.nodes, size_bytes=self.size)


def _ends_on_unpaired_backslash(chunk: bytes, string_start: int) -> bool:
    # Inside a string, backslashes pair up left to right, and any other byte ends an escape; so only the
    # trailing run of backslashes decides whether the next chunk's first byte is escaped.
    run = len(chunk) - len(chunk.rstrip(b"\\"))
    return min(run, len(chunk) - string_start) % 2 == 1


def scan_json(data: bytes, *, max_depth: int, max_nodes: int) -> JsonShape:
    """Scan bytes held in memory (a dataset line, a safetensors header)."""
    scanner = JsonScanner(max_depth=max_depth, max_nodes=max_nodes)
    if len(data) <= _CHUNK:
        scanner.feed(data)  # the usual case: no copy
        return scanner.shape()
    view = memoryview(data)
    for begin in range(0, len(data), _CHUNK):
        scanner.feed(bytes(view[begin : begin + _CHUNK]))
    return scanner.shape()


def scan_json_stream(
    stream: _Readable, *, max_depth: int, max_nodes: int, chunk_size: int = _CHUNK
) -> JsonShape:
    """Scan a binary stream to its end, one chunk in memory at a time."""
    scanner = JsonScanner(max_depth=max_depth, max_nodes=max_nodes)
    while chunk := stream.read(chunk_size):
        scanner.feed(chunk)
    return scanner.shape()
