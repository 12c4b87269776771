"""Where each kind of object lives in the store: one place, so the API and the runner agree."""

from __future__ import annotations


def model_key(model_id: str, filename: str) -> str:
    return f"models/{model_id}/{filename}"


def model_prefix(model_id: str) -> str:
    return f"models/{model_id}/"


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}.jsonl"


def artifact_key(artifact_id: str) -> str:
    return f"artifacts/{artifact_id}.tar.gz"
