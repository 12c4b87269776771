"""A seeded, fast mutator and random-JSON maker: the volume behind each Hypothesis example (see budget.py).

Everything takes a ``random.Random`` so an input is reproducible from the example's seed.
"""

from __future__ import annotations

import json
import random
from typing import Any

# Bytes and tokens that sit on parser and reader edges.
TOKENS = [
    b'"',
    b"\\",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\n",
    b"\r",
    b"\r\n",
    b" ",
    b"\t",
    b"\x00",
    b"\x7f",
    b"\xef\xbb\xbf",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"\\u0000",
    b"\\ud800",
    b"\\udc00",
    b"\\ud83d\\ude00",
    b"\\n",
    b'\\"',
    b"1e999",
    b"-0",
    b"0.0",
    b"18446744073709551616",
    b"1" * 30,
    b"null",
    b"true",
    b"NaN",
    b"Infinity",
    b'""',
    b"[]",
    b"{}",
    b'{"a":1}',
    b"[[[[[[[[",
    b"]]]]",
    b'"role"',
    b'"user"',
    b'"assistant"',
    b'"content"',
    b'"prompt"',
    b'"responses"',
    b'"ranking"',
    b'"scores"',
]
_CHARS = [
    "a",
    "Z",
    " ",
    "\t",
    "\n",
    '"',
    "\\",
    "/",
    "\x00",
    "\x1f",
    "\u2028",
    "\ufeff",
    "é",
    "\U0001f600",
    "{",
    ",",
]


def mutate(rng: random.Random, data: bytes, rounds: int | None = None) -> bytes:
    """A few byte-level edits: flip a bit, overwrite, insert a token, delete, duplicate, truncate."""
    buf = bytearray(data)
    for _ in range(rounds if rounds is not None else rng.randint(1, 4)):
        pos = rng.randint(0, len(buf))
        op = rng.randrange(7)
        if op == 0 and buf and pos < len(buf):
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1 and buf and pos < len(buf):
            buf[pos] = rng.randrange(256)
        elif op in (2, 3):
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 4:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 5 and buf:
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 32)]
        else:
            del buf[pos:]
    return bytes(buf)


def random_string(rng: random.Random) -> str:
    return "".join(
        rng.choice(_CHARS) if rng.random() < 0.7 else chr(rng.randrange(0x30000))
        for _ in range(rng.randint(0, 8))
    )


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value, small, nested at most 4 deep."""
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**63, 2**64, 2**64 - 1, 2**65, -(2**64), rng.randint(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e300, 5e-324, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return random_string(rng)
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {random_string(rng): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def encode(rng: random.Random, value: Any) -> bytes:
    """``value`` as JSON bytes; strings with lone surrogates come out as escapes or as invalid UTF-8."""
    text = json.dumps(value, ensure_ascii=rng.random() < 0.3)
    return text.encode("utf-8", "surrogatepass")


def mutate_value(rng: random.Random, value: Any) -> Any:
    """One structural edit somewhere inside ``value``: drop a key, retype a value, or replace an element."""
    if isinstance(value, dict) and value:
        key = rng.choice(list(value))
        if rng.random() < 0.3:
            return {k: v for k, v in value.items() if k != key}
        inner = mutate_value(rng, value[key]) if rng.random() < 0.5 else random_json(rng)
        return {**value, key: inner}
    if isinstance(value, list) and value:
        index = rng.randrange(len(value))
        inner = mutate_value(rng, value[index]) if rng.random() < 0.5 else random_json(rng)
        return [*value[:index], inner, *value[index + 1 :]]
    return random_json(rng)


# --- valid records of every dataset kind (each must be accepted), fast enough to make thousands a second

KNOWN_FIELDS = frozenset(
    {"prompt", "completion", "messages", "chosen", "rejected", "responses", "ranking", "scores"}
)


def clean_string(rng: random.Random) -> str:
    """Text a valid record may hold: no NUL (invalid_characters), no lone surrogate (invalid_json)."""
    return "".join(c for c in random_string(rng) if c != "\x00" and not "\ud800" <= c <= "\udfff")


def text(rng: random.Random) -> str:
    value = clean_string(rng)
    return value if value and not value.isspace() else value + "x"


def clean_json(rng: random.Random, depth: int = 0) -> Any:
    value = random_json(rng, depth)
    if isinstance(value, str):
        return clean_string(rng)
    if isinstance(value, list):
        return [clean_json(rng, depth + 1) for _ in value]
    if isinstance(value, dict):
        return {clean_string(rng): clean_json(rng, depth + 1) for _ in value}
    return value


def _with_extras(rng: random.Random, record: dict[str, Any], known: frozenset[str]) -> dict[str, Any]:
    """Unknown fields are allowed and ignored, at the record and the message level: add some."""
    extras = {key: clean_json(rng) for key in (clean_string(rng) for _ in range(rng.choice([0, 0, 1, 2])))}
    return {**{k: v for k, v in extras.items() if k not in known}, **record}


def messages(
    rng: random.Random, *, last: str | None, count: int, only: str | None = None
) -> list[dict[str, Any]]:
    roles = [only or rng.choice(["system", "user", "assistant"]) for _ in range(count)]
    if last is not None:
        roles[-1] = last
    return [
        _with_extras(rng, {"role": role, "content": text(rng)}, frozenset({"role", "content"}))
        for role in roles
    ]


def prompt(rng: random.Random) -> Any:
    return text(rng) if rng.random() < 0.6 else messages(rng, last="user", count=rng.randint(1, 3))


def response(rng: random.Random, tag: int) -> Any:
    """A string or assistant messages, distinct from responses with another ``tag`` after normalising."""
    if rng.random() < 0.6:
        return f"{text(rng)} r{tag}"
    turns = messages(rng, last=None, count=rng.randint(1, 2), only="assistant")
    turns[-1]["content"] += f" r{tag}"
    return turns


def valid_record(rng: random.Random, kind: str) -> dict[str, Any]:
    if kind == "sft":
        if rng.random() < 0.5:
            record: dict[str, Any] = {"prompt": text(rng), "completion": text(rng)}
        else:
            record = {"messages": messages(rng, last="assistant", count=rng.randint(2, 4))}
    elif kind == "preference":
        record = {"prompt": prompt(rng), "chosen": response(rng, 0), "rejected": response(rng, 1)}
    elif kind == "prompts":
        record = (
            {"prompt": prompt(rng)}
            if rng.random() < 0.7
            else {"messages": messages(rng, last="user", count=2)}
        )
    else:
        k = rng.choice([2, 2, 3, 5, 16])
        record = {"prompt": prompt(rng), "responses": [response(rng, i) for i in range(k)]}
        if kind == "ranking" and rng.random() < 0.5:
            record["ranking"] = rng.sample(range(k), k)
        elif kind == "ranking":
            record["scores"] = [rng.choice([rng.randint(-5, 5), rng.uniform(-1e9, 1e9)]) for _ in range(k)]
    return _with_extras(rng, record, KNOWN_FIELDS)
