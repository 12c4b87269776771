"""The SDK against the real alignd server (uvicorn on a free port, the ``live_server`` fixture)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import alignd
import pytest
from alignd.validation import validate_path


def _client(server: Any, api_key: str | None = None, **kw: Any) -> alignd.Client:
    return alignd.Client(base_url=server.base_url, api_key=api_key or server.api_key, **kw)


def _bad_sft(path: Path) -> Path:
    path.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "Hi", "completion": "Hello."}),
                "{not json",
                json.dumps({"prompt": "Hi"}),
                json.dumps({"prompt": "Hi", "completion": "   "}),
                json.dumps({"prompt": 3, "completion": "x"}),
            ]
        )
        + "\n"
    )
    return path


def test_bad_lines_reported_identically_locally_and_remotely(live_server: Any, tmp_path: Path) -> None:
    path = _bad_sft(tmp_path / "bad.jsonl")
    local = validate_path(path, "sft")
    assert [i["line"] for i in local.issues] == [2, 3, 4, 5]
    with _client(live_server) as client:
        assert client.datasets.validate(path, kind="sft").issues == local.issues
        with pytest.raises(alignd.ValidationError) as info:
            client.datasets.upload(path, kind="sft")
        assert info.value.code == "invalid_dataset"
        assert info.value.request_id
        remote = [{k: d[k] for k in ("line", "code", "message")} for d in info.value.details]
        assert remote == [dict(i) for i in local.issues]
        assert {i["code"] for i in local.issues} >= {
            "invalid_json",
            "missing_field",
            "empty_text",
            "wrong_type",
        }
        # A rejected upload stores nothing.
        assert list(client.datasets.list()) == []


def test_empty_dataset_is_refused(live_server: Any, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with _client(live_server) as client, pytest.raises(alignd.ValidationError) as info:
        client.datasets.upload(empty, kind="sft")
    assert info.value.code == "empty_dataset"


def test_pagination_over_more_than_one_page(live_server: Any) -> None:
    with _client(live_server) as client:
        uploaded = [client.datasets.upload(live_server.sft_jsonl, kind="sft", name=f"d{i}") for i in range(5)]
        page = client.datasets.list(limit=2)
        assert len(page.data) == 2 and page.has_more
        seen = [d.id for d in client.datasets.list(limit=2)]
        pages = list(client.datasets.list(limit=2).iter_pages())
    assert sorted(seen) == sorted(d.id for d in uploaded)
    assert len(seen) == len(set(seen)) == 5
    assert len(pages) == 3


def test_auth_and_tenant_errors(live_server: Any) -> None:
    with _client(live_server) as client:
        dataset = client.datasets.upload(live_server.sft_jsonl, kind="sft")
    with _client(live_server, api_key="wrong-key") as bad, pytest.raises(alignd.AuthenticationError) as info:
        bad.datasets.list()
    assert info.value.status == 401
    with (
        _client(live_server, api_key=live_server.other_api_key) as other,
        pytest.raises(alignd.NotFoundError),
    ):
        other.datasets.get(dataset.id)
    with _client(live_server) as client, pytest.raises(alignd.NotFoundError):
        client.jobs.get("job_doesnotexist")


def test_unsafe_model_weights_are_refused(live_server: Any, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(live_server.tiny_model_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with _client(live_server) as client, pytest.raises(alignd.ValidationError) as info:
        client.models.upload(folder)
    assert info.value.code == "unsafe_weights"


def test_unknown_hyperparameter_is_refused(live_server: Any) -> None:
    with _client(live_server) as client:
        model = client.models.upload(live_server.tiny_model_dir, name="tiny")
        dataset = client.datasets.upload(live_server.sft_jsonl, kind="sft")
        with pytest.raises(alignd.ValidationError) as info:
            client.jobs.create(
                method="sft",
                base_model=model.id,
                datasets={"sft": dataset.id},
                hyperparameters={"no_such_knob": 1},
            )
    assert "no_such_knob" in str(info.value.details) + info.value.message


def test_full_flow_upload_create_wait_events_metrics_download(live_server: Any, tmp_path: Path) -> None:
    with _client(live_server) as client:
        model = client.models.upload(live_server.tiny_model_dir, name="tiny")
        assert model.id.startswith("model_") and model.status == "ready"
        assert client.models.get(model.id).id == model.id
        dataset = client.datasets.upload(live_server.sft_jsonl, kind="sft", name="facts")
        assert dataset.id.startswith("ds_") and dataset.num_records == 48
        assert dataset.sha256 == hashlib.sha256(live_server.sft_jsonl.read_bytes()).hexdigest()

        job = client.jobs.create(
            method="sft",
            base_model=model.id,
            datasets={"sft": dataset.id},
            lora={"r": 4, "alpha": 8},
            hyperparameters={"max_steps": 3, "batch_size": 4, "max_length": 64},
            seed=0,
            name="sdk-flow",
        )
        assert job.status in ("queued", "running")

        # A model in use by an unfinished job cannot be deleted.
        with pytest.raises(alignd.ConflictError) as conflict:
            client.models.delete(model.id)
        assert conflict.value.code == "in_use"

        events = list(client.jobs.stream_events(job.id))
        assert events and all(e.message for e in events)

        finished = client.jobs.wait(job.id, timeout=240, poll_interval=0.5, progress=True)
        assert finished.status == "succeeded" and finished.progress == pytest.approx(1.0)

        # Resuming after the last event yields nothing new once the job is over.
        assert list(client.jobs.stream_events(job.id, last_event_id=events[-1].id)) == []
        assert [e.id for e in client.jobs.events(job.id)][: len(events)] == [e.id for e in events]

        metrics = client.jobs.metrics(job.id)
        series = metrics.as_dict()
        assert "loss" in series and len(series["loss"]["step"]) == len(series["loss"]["value"]) >= 1
        assert "loss" in client.jobs.metrics_csv(job.id)

        artifacts = client.jobs.artifacts(job.id)
        adapter = next(a for a in artifacts if a.kind == "adapter")
        folder = client.artifacts.download(adapter.id, tmp_path / "adapter")
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()

        with pytest.raises(alignd.ConflictError):
            client.jobs.cancel(job.id)
        assert job.id in [j.id for j in client.jobs.list(status="succeeded")]


def test_async_client_against_server(live_server: Any) -> None:
    import asyncio

    async def run() -> tuple[str, list[str]]:
        async with alignd.AsyncClient(base_url=live_server.base_url, api_key=live_server.api_key) as client:
            dataset = await client.datasets.upload(live_server.sft_jsonl, kind="sft")
            ids = [d.id async for d in client.datasets.list(limit=1)]
            got = await client.datasets.get(dataset.id)
            return got.id, ids

    got, ids = asyncio.run(run())
    assert ids == [got]
