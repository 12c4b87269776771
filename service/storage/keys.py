"""Where each kind of object lives in the store: one place, so the API and the runner agree."""

from __future__ import annotations


def model_key(model_id: str, filename: str) -> str:
    return f"models/{model_id}/{filename}"


def model_prefix(model_id: str) -> str:
    return f"models/{model_id}/"


def dataset_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}.jsonl"


def job_artifact_prefix(job_id: str) -> str:
    return f"artifacts/{job_id}/"


def artifact_key(job_id: str, artifact_id: str) -> str:
    # Under the job's own prefix so the objects a killed attempt left without a row can be found and
    # swept by listing one folder (rows keep their storage_key: objects written as
    # artifacts/<artifact_id>.tar.gz by earlier versions stay readable).
    return f"{job_artifact_prefix(job_id)}{artifact_id}.tar.gz"


def openai_file_key(file_id: str) -> str:
    """A file uploaded through the OpenAI facade, as sent (it becomes a dataset when a job uses it)."""
    return f"openai_files/{file_id}.jsonl"
