"""The lease is kept alive by its own thread: a step slower than the lease (an artifact upload here)
must not hand a healthy job to another runner."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine

from service.settings import Settings
from service.storage import ArtifactStore
from service.storage.local import LocalStore
from tests.conftest import UvicornThread, make_settings
from tests.service.helpers import upload_dataset, upload_model, wait_for
from workers.runner import JobRunner


class SlowUploads(LocalStore):
    """The real local store, with artifact uploads taking longer than the lease."""

    def __init__(self, root: Path, delay: float) -> None:
        super().__init__(root)
        self.delay = delay

    def put_file(self, key: str, path: Path) -> int:
        if key.startswith("artifacts/"):
            time.sleep(self.delay)
        return super().put_file(key, path)


def test_slow_upload_does_not_lose_the_lease(tmp_path: Path, tiny_model_dir: Path, sft_jsonl: Path) -> None:
    from alignd_server.embedded import build_runner
    from service.api.app import create_app

    settings = make_settings(
        tmp_path / "alignd", lease_seconds=1.5, heartbeat_seconds=0.25, reconcile_interval_seconds=0.25
    )
    slow = SlowUploads(settings.data_dir / "storage", delay=4.0)  # > 2 leases

    def slow_runner(settings: Settings, engine: Engine, _store: ArtifactStore) -> JobRunner:
        return build_runner(settings, engine, slow)  # the API keeps the plain store; only the runner waits

    app = create_app(settings, runner_factory=slow_runner)
    with (
        UvicornThread(app) as server,
        httpx.Client(
            base_url=server.base_url, headers={"Authorization": "Bearer key-a"}, timeout=60
        ) as client,
    ):
        model = upload_model(client, tiny_model_dir).json()["id"]
        dataset = upload_dataset(client, sft_jsonl, "sft").json()["id"]
        body = {
            "method": "sft",
            "base_model": model,
            "datasets": {"sft": dataset},
            "hyperparameters": {"epochs": 1, "max_steps": 2, "max_length": 64},
        }
        job = client.post("/v1/jobs", json=body).json()
        done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=120)
        assert done["status"] == "succeeded", done
        messages = [e["message"] for e in client.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
        assert not any("stopped heartbeating" in m for m in messages), messages
        assert sum("Job started" in m for m in messages) == 1  # one attempt
