"""Small helpers for API tests: uploads and waiting on jobs, written against the REST contract."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx


def upload_model(client: httpx.Client, folder: Path, name: str = "tiny") -> httpx.Response:
    handles = [open(path, "rb") for path in sorted(folder.iterdir()) if path.is_file()]  # noqa: SIM115
    try:
        files = [("files", (Path(h.name).name, h, "application/octet-stream")) for h in handles]
        return client.post("/v1/models", data={"name": name}, files=files)
    finally:
        for handle in handles:
            handle.close()


def upload_dataset(
    client: httpx.Client, content: bytes | Path, kind: str, name: str = "data.jsonl"
) -> httpx.Response:
    data = content.read_bytes() if isinstance(content, Path) else content
    return client.post("/v1/datasets", data={"kind": kind}, files={"file": (name, data, "application/jsonl")})


def jsonl(records: list[Any]) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def wait_for(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        if time.monotonic() > deadline:
            events = client.get(f"/v1/jobs/{job_id}/events").json()
            raise AssertionError(f"job {job_id} stuck in {job['status']}: {events}")
        time.sleep(0.2)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body["error"]


def run_job(client: httpx.Client, body: dict[str, Any], timeout: float = 240) -> dict[str, Any]:
    """POST the job and wait for it to succeed; a job that did not says why (its error, its last events)."""
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job: dict[str, Any] = wait_for(
        client, response.json()["id"], {"succeeded", "failed", "cancelled"}, timeout
    )
    if job["status"] != "succeeded":
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
        raise AssertionError(f"{body['method']} job {job['status']}: {job['error']} {events[-5:]}")
    return job


def artifact_of(client: httpx.Client, job: dict[str, Any], kind: str) -> dict[str, Any]:
    """The job's one artifact of ``kind``."""
    artifacts = client.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    found = [a for a in artifacts if a["kind"] == kind]
    assert len(found) == 1, artifacts
    return found[0]
