"""User-supplied regular expressions, bounded in size and in time.

Python's ``re`` has no match timeout, and a static check alone cannot make it safe: besides the exponential
shapes (``(a+)+b``), adjacent quantifiers backtrack polynomially (``\\d*\\d*x`` took 40 s on 2,000 digits with
``re`` on this project's 2-core machine). So a pattern here is

1. at most :data:`MAX_PATTERN_CHARS` long and written in Python ``re`` syntax (checked with ``re`` itself, and
   compiled by ``regex`` too: the rare spelling only ``re`` accepts, such as ``{{item.x}}``, is refused);
2. refused when a quantifier repeats something that itself holds a quantifier (``(a+)+``, ``(\\w+\\s)*``,
   ``(a{2,})*``): the textbook catastrophic-backtracking shape. A possessive inner quantifier (``(\\w++\\s)*``)
   or an atomic group (``(?>\\w+\\s)*``) cannot backtrack and is allowed;
3. matched with the ``regex`` package (a superset of ``re`` syntax, same semantics for ``re`` patterns) under
   a timeout of :data:`MATCH_TIMEOUT_SECONDS`, on subjects of at most :data:`MAX_SUBJECT_CHARS` characters.

Step 3 is the guarantee; step 2 refuses the common disasters at validation, with a message, instead of
letting every sample time out later.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Iterator
from typing import Any

import regex

MAX_PATTERN_CHARS = 512
MAX_SUBJECT_CHARS = 100_000
MATCH_TIMEOUT_SECONDS = 0.25

# re's own parser (private, untyped in typeshed): it yields the pattern's tree, the only sound way to see
# what a quantifier repeats.
_parser: Any = importlib.import_module("re._parser")
_BACKTRACKING_REPEATS = (_parser.MAX_REPEAT, _parser.MIN_REPEAT)
_ALL_REPEATS = (*_BACKTRACKING_REPEATS, _parser.POSSESSIVE_REPEAT)


class UnsafePattern(ValueError):
    """A pattern refused at validation; ``code`` is stable, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RegexTimeout(Exception):
    """A match ran past :data:`MATCH_TIMEOUT_SECONDS`."""


class SubjectTooLong(Exception):
    """The text to match is longer than :data:`MAX_SUBJECT_CHARS`."""


def _subpatterns(argument: Any) -> Iterator[Any]:
    if isinstance(argument, _parser.SubPattern):
        yield argument
    elif isinstance(argument, list | tuple):
        for part in argument:
            yield from _subpatterns(part)


def _holds_backtracking_repeat(pattern: Any) -> bool:
    for op, argument in pattern:
        if op is _parser.ATOMIC_GROUP:
            continue  # nothing inside an atomic group is retried once it matched
        if op in _BACKTRACKING_REPEATS and argument[1] > 1:
            return True
        if any(_holds_backtracking_repeat(sub) for sub in _subpatterns(argument)):
            return True
    return False


def _nested_repeat(pattern: Any) -> bool:
    for op, argument in pattern:
        if op in _ALL_REPEATS and argument[1] > 1 and _holds_backtracking_repeat(argument[2]):
            return True
        if any(_nested_repeat(sub) for sub in _subpatterns(argument)):
            return True
    return False


def check_pattern(pattern: str) -> None:
    """Raise :class:`UnsafePattern` unless ``pattern`` passes steps 1 and 2 of the module's rules."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UnsafePattern(
            "regex_too_long", f"The pattern has {len(pattern)} characters; at most {MAX_PATTERN_CHARS}."
        )
    try:
        re.compile(pattern)
        tree = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise UnsafePattern("invalid_regex", f"Not a valid regular expression: {exc}") from None
    try:
        regex.compile(pattern)
    except (regex.error, RecursionError, OverflowError) as exc:
        # The few spellings where the two differ, e.g. '{{item.x}}', which re reads as literal braces.
        raise UnsafePattern(
            "invalid_regex", f"Valid for Python's re but not for the matcher (the regex package): {exc}"
        ) from None
    if _nested_repeat(tree):
        raise UnsafePattern(
            "unsafe_regex",
            "The pattern repeats a group that itself holds a quantifier (like '(a+)+' or '(\\w+\\s)*'), which "
            "can backtrack catastrophically; rewrite it without the nesting, or make the inner quantifier "
            "possessive ('\\w++') or the group atomic ('(?>...)').",
        )


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str, flags: int = 0) -> Any:
    """The checked pattern compiled with ``regex`` (``flags`` are ``regex`` flags); cached by pattern."""
    check_pattern(pattern)
    return regex.compile(pattern, flags)


def timed_search(pattern: str, subject: str, *, flags: int = 0, fullmatch: bool = False) -> Any:
    """``search`` (or ``fullmatch``) under the timeout; the match object or None.

    Raises :class:`UnsafePattern`, :class:`SubjectTooLong` or :class:`RegexTimeout`.
    """
    if len(subject) > MAX_SUBJECT_CHARS:
        raise SubjectTooLong(
            f"The text has {len(subject)} characters; at most {MAX_SUBJECT_CHARS} are matched."
        )
    compiled = compile_pattern(pattern, flags)
    try:
        if fullmatch:
            return compiled.fullmatch(subject, timeout=MATCH_TIMEOUT_SECONDS)
        return compiled.search(subject, timeout=MATCH_TIMEOUT_SECONDS)
    except TimeoutError:
        raise RegexTimeout(f"The match ran past {MATCH_TIMEOUT_SECONDS} s and was stopped.") from None
