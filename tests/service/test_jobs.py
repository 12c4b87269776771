"""Jobs over the REST API: validation, the training run end to end, events, metrics, artifacts, cancel."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.service.helpers import assert_error, jsonl, upload_dataset, upload_model, wait_for

PREFS = jsonl([{"prompt": "p", "chosen": "good answer", "rejected": "bad answer"}] * 2)


@pytest.fixture
def uploaded(api: httpx.Client, tiny_model_dir: Path, sft_jsonl: Path) -> dict[str, str]:
    return {
        "model": upload_model(api, tiny_model_dir).json()["id"],
        "sft": upload_dataset(api, sft_jsonl, "sft").json()["id"],
        "preference": upload_dataset(api, PREFS, "preference").json()["id"],
    }


def test_job_validation_errors(
    api: httpx.Client, uploaded: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"method": "sft", "base_model": uploaded["model"], "datasets": {"sft": uploaded["sft"]}}

    wrong_kind = {**base, "datasets": {"sft": uploaded["preference"]}}
    error = assert_error(api.post("/v1/jobs", json=wrong_kind), 422, "wrong_dataset_kind")
    assert uploaded["preference"] in error["message"]

    unknown_hp = {**base, "hyperparameters": {"epochs": 1, "learning_rte": 0.1}}
    error = assert_error(api.post("/v1/jobs", json=unknown_hp), 422, "unknown_hyperparameter")
    assert "learning_rte" in error["message"]
    assert error["details"][0]["field"] == "hyperparameters.learning_rte"

    bad_value = {**base, "hyperparameters": {"batch_size": 0}}
    assert_error(api.post("/v1/jobs", json=bad_value), 422, "invalid_value")

    missing = {**base, "datasets": {}}
    assert_error(api.post("/v1/jobs", json=missing), 422, "missing_dataset")

    unknown_ds = {**base, "datasets": {"sft": "ds_doesnotexist"}}
    error = assert_error(api.post("/v1/jobs", json=unknown_ds), 422, "unknown_dataset")
    assert "ds_doesnotexist" in error["message"]

    unknown_model = {**base, "base_model": "model_nope"}
    assert_error(api.post("/v1/jobs", json=unknown_model), 422, "unknown_model")

    # Every method is available now; a server built without one refuses it, before looking at the datasets.
    from contract.methods import AVAILABLE_METHODS, Method

    monkeypatch.setattr("service.core.submission.AVAILABLE_METHODS", AVAILABLE_METHODS - {Method.rlhf})
    not_yet = {
        "method": "rlhf",
        "base_model": uploaded["model"],
        "datasets": {"sft": uploaded["sft"], "preference": uploaded["preference"]},
    }
    assert_error(api.post("/v1/jobs", json=not_yet), 422, "method_not_available")
    monkeypatch.undo()

    assert_error(api.post("/v1/jobs", json={**base, "method": "magic"}), 422, "invalid_request")
    assert_error(api.post("/v1/jobs", json={**base, "lora": {"rank": 8}}), 422, "invalid_request")
    assert_error(api.post("/v1/jobs", json={**base, "lora": {"r": 0}}), 422, "invalid_value")

    broken = api.post("/v1/jobs", content=b'{"method": ', headers={"Content-Type": "application/json"})
    assert_error(broken, 400, "invalid_json")
    assert_error(
        api.post("/v1/jobs", content=b"method=sft", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert_error(api.get("/v1/jobs/job_nope"), 404, "job_not_found")
    assert api.get("/v1/jobs").json()["data"] == []  # nothing was accepted


def test_oversized_json_body_is_413(api: httpx.Client) -> None:
    huge = {"method": "sft", "base_model": "m", "name": "x" * (2 << 20)}
    assert_error(api.post("/v1/jobs", json=huge), 413, "payload_too_large")


def _sft_job(model: str, dataset: str, **hyper: Any) -> dict[str, Any]:
    hyperparameters = {"epochs": 1, "batch_size": 4, "learning_rate": 3e-3, "max_length": 64, **hyper}
    return {
        "method": "sft",
        "base_model": model,
        "datasets": {"sft": dataset},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": hyperparameters,
        "seed": 7,
        "name": "colours",
    }


def test_sft_job_end_to_end(
    api: httpx.Client, uploaded: dict[str, str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    response = api.post("/v1/jobs", json=_sft_job(uploaded["model"], uploaded["sft"], epochs=3))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["id"].startswith("job_") and job["object"] == "job"
    assert job["status"] in ("queued", "running")
    assert job["hyperparameters"]["epochs"] == 3
    assert job["hyperparameters"]["warmup_ratio"] == 0.03  # defaults are resolved and shown
    assert job["lora"] == {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"}
    assert job["seed"] == 7 and job["datasets"] == {"sft": uploaded["sft"]}

    done = wait_for(api, job["id"], {"succeeded", "failed", "cancelled"}, timeout=240)
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0 and done["error"] is None
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]

    metrics = api.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]
    names = {m["name"] for m in metrics}
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second"} <= names
    losses = [m["value"] for m in metrics if m["name"] == "loss"]
    assert losses[-1] < losses[0] * 0.8, losses
    table = list(
        csv.DictReader(io.StringIO(api.get(f"/v1/jobs/{job['id']}/metrics", params={"format": "csv"}).text))
    )
    assert len(table) == len(metrics) and table[0].keys() == {"stage", "step", "name", "value"}

    events = api.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert events[0]["message"] == "Job queued." and events[-1]["message"] == "Job succeeded."
    assert all(set(e) == {"id", "object", "created_at", "level", "stage", "message"} for e in events)

    artifacts = api.get(f"/v1/jobs/{job['id']}/artifacts").json()["data"]
    adapter = next(a for a in artifacts if a["kind"] == "adapter")
    assert {a["kind"] for a in artifacts} >= {"adapter", "model_card"}
    assert api.get(f"/v1/artifacts/{adapter['id']}").json() == adapter
    content = api.get(f"/v1/artifacts/{adapter['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "application/gzip"
    import hashlib

    assert hashlib.sha256(content.content).hexdigest() == adapter["sha256"]
    assert len(content.content) == adapter["size_bytes"]
    folder = tmp_path / "adapter"
    with tarfile.open(fileobj=io.BytesIO(content.content), mode="r:gz") as archive:
        names_in_archive = archive.getnames()
        archive.extractall(folder, filter="data")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(
        names_in_archive
    )
    card = (folder / "README.md").read_text()
    assert uploaded["sft"] in card or "sha256" in card

    # The adapter loads with plain peft on the original base, and the base weights are untouched.
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    tuned = PeftModel.from_pretrained(base, folder)
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it trained
    state = tuned.get_base_model().state_dict()
    for name, tensor in original.items():
        key = (
            name.replace(".weight", ".base_layer.weight")
            if name.replace(".weight", ".base_layer.weight") in state
            else name
        )
        assert torch.equal(state[key], tensor), name


def test_sse_streams_until_the_job_ends(live_server: LiveServer) -> None:
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        dataset = upload_dataset(client, live_server.sft_jsonl, "sft").json()["id"]
        job = client.post("/v1/jobs", json=_sft_job(model, dataset, max_steps=3)).json()
        seen: list[dict[str, Any]] = []
        ended = None
        with client.stream(
            "GET", f"/v1/jobs/{job['id']}/events", headers={"Accept": "text/event-stream"}
        ) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            event_name = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    event_name = line[7:]
                elif line.startswith("data: ") and event_name == "event":
                    seen.append(json.loads(line[6:]))
                elif line.startswith("data: ") and event_name == "end":
                    ended = json.loads(line[6:])
        assert ended == {"status": "succeeded"}
        assert seen[0]["message"] == "Job queued." and seen[-1]["message"] == "Job succeeded."
        # Resuming with Last-Event-ID replays only what came after.
        later = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": seen[-2]["id"]}).json()[
            "data"
        ]
        assert [e["id"] for e in later] == [seen[-1]["id"]]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; /proc says so.
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") == -1
    except FileNotFoundError:
        return False


def test_cancel_running_job_leaves_no_child(live_server: LiveServer) -> None:
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        dataset = upload_dataset(client, live_server.sft_jsonl, "sft").json()["id"]
        job = client.post("/v1/jobs", json=_sft_job(model, dataset, epochs=1000)).json()
        deadline = time.monotonic() + 60
        pid = None
        while pid is None and time.monotonic() < deadline:
            for event in client.get(f"/v1/jobs/{job['id']}/events").json()["data"]:
                found = re.search(r"pid (\d+)", event["message"])
                if found:
                    pid = int(found.group(1))
            time.sleep(0.1)
        assert pid is not None and _pid_alive(pid)
        # Let it reach training proper, then cancel.
        wait_metrics = time.monotonic() + 60
        while (
            not client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"] and time.monotonic() < wait_metrics
        ):
            time.sleep(0.2)
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200
        final = wait_for(client, job["id"], {"cancelled", "failed", "succeeded"}, timeout=30)
        assert final["status"] == "cancelled"
        assert not _pid_alive(pid)
        assert_error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "job_finished")


def test_cancel_queued_job_and_queue_limit(tmp_path: Path, tiny_model_dir: Path, sft_jsonl: Path) -> None:
    from alignd_server.embedded import create_app
    from tests.conftest import UvicornThread, make_settings

    settings = make_settings(tmp_path / "alignd", max_queued_jobs_per_tenant=1, worker_concurrency=1)
    with (
        UvicornThread(create_app(settings)) as server,
        httpx.Client(
            base_url=server.base_url, headers={"Authorization": "Bearer key-a"}, timeout=60
        ) as client,
    ):
        model = upload_model(client, tiny_model_dir).json()["id"]
        dataset = upload_dataset(client, sft_jsonl, "sft").json()["id"]
        long_job = client.post("/v1/jobs", json=_sft_job(model, dataset, epochs=1000)).json()
        wait_for(client, long_job["id"], {"running"})
        waiting = client.post("/v1/jobs", json=_sft_job(model, dataset)).json()
        assert waiting["status"] == "queued"
        refused = client.post("/v1/jobs", json=_sft_job(model, dataset))
        assert_error(refused, 429, "too_many_queued_jobs")
        assert refused.headers["retry-after"]
        # Deleting a model an unfinished job uses is refused.
        assert_error(client.delete(f"/v1/models/{model}"), 409, "in_use")
        cancelled = client.post(f"/v1/jobs/{waiting['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        assert client.get("/v1/jobs", params={"status": "cancelled"}).json()["data"][0]["id"] == waiting["id"]
        client.post(f"/v1/jobs/{long_job['id']}/cancel")
        assert wait_for(client, long_job["id"], {"cancelled"}, timeout=30)["status"] == "cancelled"
        # The cancelled queued job never ran.
        messages = [e["message"] for e in client.get(f"/v1/jobs/{waiting['id']}/events").json()["data"]]
        assert not any("started" in m for m in messages)


def test_dataset_over_the_cap_is_413(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from alignd_server.embedded import create_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "alignd", max_dataset_bytes=1000)
    with TestClient(create_app(settings), headers={"Authorization": "Bearer key-a"}) as client:
        big = jsonl([{"prompt": "p" * 100, "completion": "c"}] * 20)
        assert_error(upload_dataset(client, big, "sft"), 413, "dataset_too_large")
        small = jsonl([{"prompt": "p", "completion": "c"}])
        assert upload_dataset(client, small, "sft").status_code == 201


def test_storage_down_is_503_and_nothing_is_lost(tmp_path: Path) -> None:
    import shutil

    from fastapi.testclient import TestClient

    from alignd_server.embedded import create_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path / "alignd")
    with TestClient(create_app(settings), headers={"Authorization": "Bearer key-a"}) as client:
        kept = upload_dataset(client, jsonl([{"prompt": "p", "completion": "c"}]), "sft").json()
        storage = settings.data_dir / "storage"
        backup = tmp_path / "storage-backup"
        shutil.move(storage, backup)
        storage.write_text("not a folder")  # the store can no longer write
        response = upload_dataset(client, jsonl([{"prompt": "p", "completion": "c"}]), "sft")
        assert_error(response, 503, "storage_unavailable")
        assert response.headers["retry-after"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["storage"].startswith("unavailable")
        storage.unlink()
        shutil.move(backup, storage)
        assert client.get("/readyz").status_code == 200
        assert [d["id"] for d in client.get("/v1/datasets").json()["data"]] == [kept["id"]]
