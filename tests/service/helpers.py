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


def trained_artifact(client: httpx.Client, job: dict[str, Any], kind: str, timeout: float = 300) -> str:
    """POST the job, wait for it to succeed, and return the id of its artifact of ``kind``."""
    created = client.post("/v1/jobs", json=job).json()
    assert "id" in created, created
    done = wait_for(client, created["id"], {"succeeded", "failed"}, timeout=timeout)
    assert done["status"] == "succeeded", done
    artifacts = client.get(f"/v1/jobs/{created['id']}/artifacts").json()["data"]
    return next(a["id"] for a in artifacts if a["kind"] == kind)
