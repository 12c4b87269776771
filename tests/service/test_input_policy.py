"""One input policy at the edge (service/api/input_policy.py, contract/inputs.py), on SQLite in-process and over
HTTP, and on PostgreSQL over HTTP (the ``api`` fixture).

Every operation of the OpenAPI document gets a NUL in each path and query parameter and in each string field
of its JSON or form body, a lone surrogate and a non-finite number where JSON can carry them: each answer is a
422 naming the field, never a 5xx. PostgreSQL is where these answered 500 before (NUL in text, surrogates the
driver cannot encode); SQLite stored Infinity as invalid JSON.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlmodel import select

from contract.graders import parse_grader
from contract.hyperparameters import LoraSettings, PPOHyperparameters, SFTHyperparameters
from service.api.deps import SessionDep
from service.db.tables import JobRow
from tests.conftest import API_KEYS, make_settings, pg_database

NUL = "a\x00b"
HTTP_METHODS = ("get", "post", "put", "patch", "delete")
A_JOB = {"method": "sft", "base_model": "model_nope", "datasets": {"sft": "ds_nope"}}


def _spec(api: httpx.Client) -> dict[str, Any]:
    response = api.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = response.json()
    return spec


def _operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method in HTTP_METHODS:
                yield path, method, operation


def _resolved(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _types(spec: dict[str, Any], schema: dict[str, Any]) -> set[str]:
    """The JSON types a (possibly optional, possibly $ref'd) schema allows; 'binary' for a file part."""
    schema = _resolved(spec, schema)
    if "anyOf" in schema:
        return set().union(*(_types(spec, option) for option in schema["anyOf"]))
    if schema.get("format") == "binary" or schema.get("contentMediaType") == "application/octet-stream":
        return {"binary"}
    if schema.get("type") == "array":
        return {"array", *("binary" for t in _types(spec, schema.get("items", {})) if t == "binary")}
    kind = schema.get("type")
    if kind is None and "enum" in schema:
        return {"string"}
    return {kind} if isinstance(kind, str) else set()


def _body_fields(spec: dict[str, Any], operation: dict[str, Any], media: str) -> dict[str, set[str]]:
    content = operation.get("requestBody", {}).get("content", {})
    if media not in content:
        return {}
    schema = _resolved(spec, content[media]["schema"])
    return {name: _types(spec, field) for name, field in schema.get("properties", {}).items()}


def _url(path: str, operation: dict[str, Any], bad: str | None = None, value: str = "%00") -> str:
    for param in operation.get("parameters", []):
        if param["in"] == "path":
            filler = f"x{value}y" if param["name"] == bad else "x"
            path = path.replace("{" + param["name"] + "}", filler)
    return path


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field name, filename or None, bytes) parts, and its Content-Type."""
    boundary = "input-policy-test"
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _refused(response: httpx.Response, code: str, field: str) -> None:
    # The OpenAI facade answers alignd's 422s as OpenAI does, 400 with a type and a param (docs/openai.md).
    facade = response.request.url.path.startswith("/openai/")
    status = 400 if facade else 422
    assert response.status_code == status, (response.request.method, response.request.url, response.text)
    error = response.json()["error"]
    assert error["code"] == code, error
    assert field in [detail["field"] for detail in error["details"]], error
    if facade:
        assert error["type"] == "invalid_request_error", error
        assert error["param"] == error["details"][0]["field"], error


def test_every_path_and_query_parameter_refuses_nul_and_non_utf8(api: httpx.Client) -> None:
    spec = _spec(api)
    checked = 0
    for path, method, operation in _operations(spec):
        for param in operation.get("parameters", []):
            if param["in"] == "path":
                for value in ("%00", "%ED%A0%80", "%FF"):  # NUL, an encoded surrogate, not UTF-8
                    response = api.request(method, _url(path, operation, param["name"], value))
                    _refused(response, "invalid_characters", "path")
                    checked += 1
            elif param["in"] == "query":
                response = api.request(method, _url(path, operation), params={param["name"]: NUL})
                _refused(response, "invalid_characters", param["name"])
                checked += 1
    assert checked >= 40  # every id, cursor, filter and name the document declares


def test_every_json_body_field_refuses_nul_surrogates_and_non_finite_numbers(api: httpx.Client) -> None:
    spec = _spec(api)
    operations = [(p, m, o) for p, m, o in _operations(spec) if _body_fields(spec, o, "application/json")]
    assert len(operations) >= 6  # jobs, feedback sets, labels, export, graders run and validate
    for path, method, operation in operations:
        url = _url(path, operation)
        for name, types in _body_fields(spec, operation, "application/json").items():
            if "string" in types:
                _refused(api.request(method, url, json={name: NUL}), "invalid_characters", name)
                raw = f'{{"{name}": "\\ud800"}}'  # a lone surrogate escape: json.loads takes it
                response = api.request(method, url, content=raw, headers={"content-type": "application/json"})
                _refused(response, "invalid_characters", name)
            if "number" in types or "integer" in types:
                for literal in ("Infinity", "-Infinity", "NaN", "1e999"):
                    raw = f'{{"{name}": {literal}}}'
                    headers = {"content-type": "application/json"}
                    response = api.request(method, url, content=raw, headers=headers)
                    _refused(response, "non_finite_number", name)
        # Nested and unknown fields too: the check walks the parsed body, whatever model reads it.
        deep = '{"probe": [{"k": "\\udc00"}], "x\\u0000": 1}'
        response = api.request(method, url, content=deep, headers={"content-type": "application/json"})
        _refused(response, "invalid_characters", "probe.0.k")
        _refused(response, "invalid_characters", "x\\x00")


def test_every_form_field_and_filename_refuses_nul(api: httpx.Client) -> None:
    spec = _spec(api)
    operations = [(p, m, o) for p, m, o in _operations(spec) if _body_fields(spec, o, "multipart/form-data")]
    assert len(operations) >= 2  # datasets and models
    for path, method, operation in operations:
        fields = _body_fields(spec, operation, "multipart/form-data")
        file_fields = [name for name, types in fields.items() if "binary" in types]
        assert file_fields, fields
        files = [
            (name, ("part.jsonl", b'{"prompt": "p"}\n', "application/octet-stream")) for name in file_fields
        ]
        for name, types in fields.items():
            if "string" in types and "binary" not in types:
                response = api.request(method, path, data={name: NUL}, files=files)
                _refused(response, "invalid_characters", name)
        for name in file_fields:
            # By hand: httpx writes a NUL in a filename as %00, but a client need not.
            body, content_type = _multipart(
                [("name", None, b"n"), (name, "a\x00b.jsonl", b'{"prompt": "p"}\n')]
            )
            response = api.request(method, path, content=body, headers={"content-type": content_type})
            _refused(response, "invalid_characters", name)


def test_strict_integers_and_booleans_in_json_bodies(api: httpx.Client) -> None:
    for hyperparameters in (
        {"epochs": True},
        {"epochs": "3"},
        {"epochs": 3.0},
        {"gradient_checkpointing": 1},
    ):
        response = api.post("/v1/jobs", json={**A_JOB, "hyperparameters": hyperparameters})
        assert response.status_code == 422, response.text
        fields = [d["field"] for d in response.json()["error"]["details"]]
        assert f"hyperparameters.{next(iter(hyperparameters))}" in fields
    for body, field in (
        ({**A_JOB, "seed": True}, "seed"),
        ({**A_JOB, "round": "1"}, "round"),
        ({**A_JOB, "lora": {"r": "8"}}, "lora.r"),
        ({"name": "fs", "candidates": "ds_x", "annotations_per_item": True}, "annotations_per_item"),
    ):
        path = "/v1/jobs" if "method" in body else "/v1/feedback-sets"
        response = api.post(path, json=body)
        assert response.status_code == 422, response.text
        assert field in [d["field"] for d in response.json()["error"]["details"]], response.text
    sample = {"output_text": "yes", "output_tokens": True}
    grader = {"type": "string_check", "name": "g", "input": "{{sample.output_text}}", "reference": "yes"}
    response = api.post(
        "/v1/graders/run", json={"grader": {**grader, "operation": "eq"}, "model_sample": sample}
    )
    assert response.status_code == 422, response.text
    # A float field still takes an integer: 1 is a number, not a coercion.
    response = api.post("/v1/jobs", json={**A_JOB, "hyperparameters": {"max_grad_norm": 2}})
    fields = [d["field"] for d in response.json()["error"]["details"]]
    assert "hyperparameters.max_grad_norm" not in fields and "base_model" in fields, response.text


def test_form_fields_still_parse_from_strings_and_datasets_refuse_nul_lines(api: httpx.Client) -> None:
    line = b'{"prompt": "p", "completion": "c"}\n'
    response = api.post(
        "/v1/datasets",
        data={"kind": "sft", "round": "3"},
        files={"file": ("d.jsonl", line, "application/jsonl")},
    )
    assert response.status_code == 201, response.text
    assert response.json()["round"] == 3
    bad = line + b'{"prompt": "p\\u0000", "completion": "c"}\n'
    response = api.post(
        "/v1/datasets", data={"kind": "sft"}, files={"file": ("d.jsonl", bad, "application/jsonl")}
    )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0] == {
        "line": 2,
        "code": "invalid_characters",
        "message": '"prompt": contains a NUL character (\\u0000), which is not text',
    }


def test_a_json_body_over_the_cap_sent_in_chunks_is_still_413(api: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}'

    response = api.post("/v1/feedback-sets", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] == "payload_too_large"


def test_contract_models_refuse_non_finite_floats_and_coercion() -> None:
    for model, values in (
        (SFTHyperparameters, {"learning_rate": float("inf")}),
        (PPOHyperparameters, {"kl_coef": float("nan")}),
        (LoraSettings, {"alpha": float("-inf")}),
        (SFTHyperparameters, {"epochs": True}),
        (LoraSettings, {"r": "8"}),
    ):
        with pytest.raises(ValidationError):
            model.model_validate(values)
    spec = {
        "type": "score_model",
        "name": "j",
        "model": "model_x",
        "input": [{"role": "user", "content": "x"}],
    }
    with pytest.raises(ValueError, match="finite"):
        parse_grader({**spec, "range": [0, float("inf")]})
    assert parse_grader({**spec, "range": [0, 1]}).range == (0.0, 1.0)  # a JSON list is the tuple


@pytest.fixture(params=["sqlite", "postgresql"])
def probe_client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    """The real app on each database, with two routes that hand the database what the edge refuses, as a
    route that forgot the policy (or data stored before it) would: the error handlers are the last line."""
    from alignd_server.embedded import create_app

    database: Any = pg_database() if request.param == "postgresql" else contextlib.nullcontext(None)
    with database as database_url:
        overrides = {"database_url": database_url} if database_url else {}
        app = create_app(make_settings(tmp_path / "alignd", **overrides))

        def lookup(value: str) -> Any:
            def route(session: SessionDep) -> dict[str, Any]:
                return {"found": session.exec(select(JobRow.id).where(JobRow.id == value)).first()}

            return route

        app.add_api_route("/v1/probe/nul", lookup("a\x00b"))
        app.add_api_route("/v1/probe/surrogate", lookup("a\ud800b"))
        headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
        with TestClient(app, headers=headers) as client:
            client.database = request.param  # type: ignore[attr-defined]
            yield client


def test_database_refusals_are_4xx_and_logged(
    probe_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.api.errors")
    response = probe_client.get("/v1/probe/surrogate")  # the driver cannot encode it: UnicodeEncodeError
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_characters"
    response = probe_client.get("/v1/probe/nul")
    if probe_client.database == "postgresql":  # type: ignore[attr-defined]
        # psycopg.DataError: PostgreSQL text fields cannot contain NUL (0x00) bytes
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "invalid_data"
        assert "database refused a value" in caplog.text
    else:
        assert response.json() == {"found": None}  # SQLite stores and compares NUL like any character
    assert "unpaired surrogate" in caplog.text
    assert json.dumps(response.json())  # every answer is JSON, none a 500
