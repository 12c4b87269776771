"""Prefixed, unguessable resource ids (``model_``, ``ds_``, ``job_``, ``art_``, ``key_``, ``file_``), as Stripe uses."""

from __future__ import annotations

import secrets
import time

PREFIXES = {
    "model": "model",
    "dataset": "ds",
    "job": "job",
    "artifact": "art",
    "feedback_set": "fbs",
    "feedback_item": "fbi",
    "label": "lbl",
    "api_key": "key",
    "openai_file": "file",  # the OpenAI facade's files (OpenAI spells them file-...)
}


def new_id(kind: str) -> str:
    # 20 random base32-ish characters: ~100 bits, URL-safe and case-insensitive-friendly.
    return f"{PREFIXES[kind]}_{secrets.token_hex(12)}"


def now() -> int:
    """Unix seconds, the contract's time unit."""
    return int(time.time())
