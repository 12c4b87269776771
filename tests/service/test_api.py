"""The REST contract, run both in-process and over real HTTP (the `api` fixture is parametrised)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import assert_error, jsonl, upload_dataset, upload_model

SFT_OK = jsonl([{"prompt": "What colour is the sky?", "completion": "The sky is blue."}] * 3)


def test_health_and_readiness(api: httpx.Client) -> None:
    assert api.get("/healthz").json()["status"] == "ok"
    ready = api.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "storage": "ok", "queue": "ok"}


def test_auth_missing_and_wrong_key(api: httpx.Client) -> None:
    anonymous = api.get("/v1/models", headers={"Authorization": ""})
    assert_error(anonymous, 401, "missing_api_key")
    assert anonymous.headers["www-authenticate"] == "Bearer"
    assert_error(api.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    assert_error(api.get("/v1/models", headers={"Authorization": "Basic a2V5LWE="}), 401, "missing_api_key")


def test_model_upload_list_get_delete(api: httpx.Client, tiny_model_dir: Path) -> None:
    created = upload_model(api, tiny_model_dir, name="tiny llama")
    assert created.status_code == 201, created.text
    model = created.json()
    assert model["id"].startswith("model_")
    assert model["object"] == "model"
    assert model["architecture"] == "LlamaForCausalLM"
    assert model["status"] == "ready"
    assert model["num_parameters"] > 10_000
    assert model["size_bytes"] == sum(p.stat().st_size for p in tiny_model_dir.iterdir() if p.is_file())
    assert isinstance(model["created_at"], int)
    assert api.get(f"/v1/models/{model['id']}").json() == model
    listed = api.get("/v1/models").json()
    assert listed["object"] == "list" and listed["has_more"] is False
    assert [m["id"] for m in listed["data"]] == [model["id"]]
    assert api.delete(f"/v1/models/{model['id']}").status_code == 204
    assert_error(api.get(f"/v1/models/{model['id']}"), 404, "model_not_found")
    assert_error(api.delete(f"/v1/models/{model['id']}"), 404, "model_not_found")


def _model_files(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("files", (p.name, p.read_bytes(), "application/octet-stream"))
        for p in sorted(folder.iterdir())
        if p.is_file()
    ]


def test_model_upload_refuses_pickles_and_remote_code(api: httpx.Client, tiny_model_dir: Path) -> None:
    files = [
        *_model_files(tiny_model_dir),
        ("files", ("pytorch_model.bin", b"\x80\x04pickle", "application/octet-stream")),
    ]
    assert_error(api.post("/v1/models", data={"name": "x"}, files=files), 422, "unsafe_weights")

    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    files = [f for f in _model_files(tiny_model_dir) if f[1][0] != "config.json"]
    files.append(("files", ("config.json", json.dumps(config).encode(), "application/json")))
    assert_error(api.post("/v1/models", data={"name": "x"}, files=files), 422, "remote_code_not_allowed")
    assert api.get("/v1/models").json()["data"] == []  # a rejected upload stores nothing


def test_model_upload_needs_multipart(api: httpx.Client) -> None:
    assert_error(api.post("/v1/models", json={"name": "x"}), 415, "unsupported_media_type")


def test_dataset_upload_ok(api: httpx.Client) -> None:
    import hashlib

    created = upload_dataset(api, SFT_OK, "sft", name="colours.jsonl")
    assert created.status_code == 201, created.text
    dataset = created.json()
    assert dataset["id"].startswith("ds_")
    assert dataset["object"] == "dataset"
    assert dataset["kind"] == "sft"
    assert dataset["name"] == "colours.jsonl"
    assert dataset["num_records"] == 3
    assert dataset["size_bytes"] == len(SFT_OK)
    assert dataset["sha256"] == hashlib.sha256(SFT_OK).hexdigest()
    assert dataset["status"] == "ready"
    assert api.get(f"/v1/datasets/{dataset['id']}").json() == dataset
    assert api.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert_error(api.get(f"/v1/datasets/{dataset['id']}"), 404, "dataset_not_found")


@pytest.mark.parametrize(
    ("kind", "lines", "expected"),
    [
        ("sft", [b'{"prompt": "a", "completion": "b"}', b"{not json"], [(2, "invalid_json")]),
        ("sft", [b'{"prompt": "a"}'], [(1, "missing_field")]),
        ("sft", [b'{"prompt": "a", "completion": 3}'], [(1, "wrong_type")]),
        ("sft", [b'{"prompt": "a", "completion": "  "}'], [(1, "empty_text")]),
        ("preference", [b'{"prompt": "p", "chosen": "same", "rejected": "same"}'], [(1, "identical_pair")]),
        (
            "preference",
            [
                b'{"prompt": "p", "chosen": "a", "rejected": "b"}',
                b"",
                b'{"prompt": "p", "chosen": "a"}',
                b"[1]",
            ],
            [(3, "missing_field"), (4, "not_an_object")],
        ),
        (
            "prompts",
            [b'{"prompt": ""}', b'{"prompt": "ok"}', b'{"text": "x"}'],
            [(1, "empty_text"), (3, "missing_field")],
        ),
    ],
)
def test_dataset_errors_have_line_numbers(
    api: httpx.Client, kind: str, lines: list[bytes], expected: list[tuple[int, str]]
) -> None:
    response = upload_dataset(api, b"\n".join(lines) + b"\n", kind)
    error = assert_error(response, 422, "invalid_dataset")
    assert [(d["line"], d["code"]) for d in error["details"]] == expected
    assert all(d["message"] for d in error["details"])
    assert api.get("/v1/datasets").json()["data"] == []  # nothing stored


def test_empty_dataset(api: httpx.Client) -> None:
    assert_error(upload_dataset(api, b"\n\n", "sft"), 422, "empty_dataset")


def test_unknown_dataset_kind_is_422(api: httpx.Client) -> None:
    response = upload_dataset(api, SFT_OK, "poetry")
    assert_error(response, 422, "invalid_request")


def test_pagination(api: httpx.Client) -> None:
    ids = [upload_dataset(api, SFT_OK, "sft", name=f"d{i}").json()["id"] for i in range(5)]
    first = api.get("/v1/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = api.get("/v1/datasets", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    third = api.get("/v1/datasets", params={"limit": 2, "after": second["data"][-1]["id"]}).json()
    assert [d["id"] for d in second["data"] + third["data"]] == ids[::-1][2:]
    assert third["has_more"] is False
    assert_error(api.get("/v1/datasets", params={"limit": 0}), 422, "invalid_request")
    assert_error(api.get("/v1/datasets", params={"limit": 101}), 422, "invalid_request")
    assert_error(api.get("/v1/datasets", params={"after": "ds_missing"}), 422, "invalid_cursor")


def test_tenant_isolation(api: httpx.Client, tiny_model_dir: Path) -> None:
    model = upload_model(api, tiny_model_dir).json()
    dataset = upload_dataset(api, SFT_OK, "sft").json()
    other = {"Authorization": "Bearer key-b"}
    assert_error(api.get(f"/v1/models/{model['id']}", headers=other), 404, "model_not_found")
    assert_error(api.get(f"/v1/datasets/{dataset['id']}", headers=other), 404, "dataset_not_found")
    assert_error(api.delete(f"/v1/datasets/{dataset['id']}", headers=other), 404, "dataset_not_found")
    assert api.get("/v1/models", headers=other).json()["data"] == []
    # Another tenant cannot train on tenant A's resources either: the ids are unknown to it.
    response = api.post(
        "/v1/jobs",
        json={"method": "sft", "base_model": model["id"], "datasets": {"sft": dataset["id"]}},
        headers=other,
    )
    error = assert_error(response, 422, "unknown_model")
    assert {d["code"] for d in error["details"]} == {"unknown_model", "unknown_dataset"}
