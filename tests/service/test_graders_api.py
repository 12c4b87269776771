"""POST /v1/graders/run and /v1/graders/validate over the app: OpenAI's body shape, every refusal code, and how
long a rule grader takes to answer (printed, not asserted)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEYS, UvicornThread, make_settings
from tests.service.helpers import assert_error

HEADERS = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
ROUGE = {
    "type": "text_similarity",
    "name": "rouge",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "rouge_l",
}


@pytest.fixture(scope="module", params=["in-process", "http"])
def client(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[httpx.Client]:
    """One app per transport for the module: graders touch no table, so SQLite is enough."""
    from fastapi.testclient import TestClient

    from alignd_server.embedded import create_app

    app = create_app(make_settings(tmp_path_factory.mktemp("graders") / "alignd"))
    with contextlib.ExitStack() as stack:
        if request.param == "in-process":
            in_process: Any = stack.enter_context(TestClient(app, headers=HEADERS))  # an httpx.Client
            yield in_process
        else:
            server = stack.enter_context(UvicornThread(app))
            yield stack.enter_context(httpx.Client(base_url=server.base_url, headers=HEADERS, timeout=60))


def run(client: httpx.Client, grader: Any, sample: Any = "Paris", item: Any = None) -> httpx.Response:
    body: dict[str, Any] = {"grader": grader, "model_sample": sample}
    if item is not None:
        body["item"] = item
    return client.post("/v1/graders/run", json=body)


def test_openai_shaped_dry_run(client: httpx.Client) -> None:
    response = run(client, EXACT, "Paris", {"answer": "Paris"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reward"] == 1.0
    assert body["sub_rewards"] == {}
    metadata = body["metadata"]
    assert {k: metadata[k] for k in ("name", "type", "errors", "scores")} == {
        "name": "exact",
        "type": "string_check",
        "errors": [],
        "scores": {},
    }
    assert metadata["execution_time"] >= 0
    assert run(client, EXACT, "Lyon", {"answer": "Paris"}).json()["reward"] == 0.0


def test_a_rule_grader_answers_quickly(client: httpx.Client) -> None:
    grader = {
        "type": "multi",
        "name": "mix",
        "graders": {
            "exact": EXACT,
            "rouge": ROUGE,
            "num": {"type": "numeric", "name": "num", "reference": "{{item.n}}"},
        },
        "calculate_output": "0.2 * exact + 0.3 * rouge + 0.5 * num",
    }
    sample = "The capital of France is Paris, population 2102650."
    item = {"answer": "Paris is the capital of France", "n": 2102650}
    walls = []
    for _ in range(20):
        started = time.perf_counter()
        response = run(client, grader, sample, item)
        walls.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    body = response.json()
    assert body["sub_rewards"]["num"] == 1.0 and body["sub_rewards"]["exact"] == 0.0
    assert body["reward"] == pytest.approx(0.3 * body["sub_rewards"]["rouge"] + 0.5)
    walls.sort()
    print(
        f"\nPOST /v1/graders/run (multi: string_check + rouge_l + numeric), 20 requests: "
        f"median {walls[10] * 1000:.1f} ms, max {walls[-1] * 1000:.1f} ms; "
        f"grading itself {body['metadata']['execution_time'] * 1000:.2f} ms"
    )


def test_sample_object_and_errors_inside_a_grader(client: httpx.Client) -> None:
    eos = {"type": "ends_with_eos", "name": "eos"}
    assert run(client, eos, {"output_text": "Done.", "finish_reason": "stop"}).json()["reward"] == 1.0
    # A plain string has no finish_reason: the grader scores 0 and says why, the request still succeeds.
    response = run(client, eos, "Done.")
    assert response.status_code == 200
    assert response.json()["reward"] == 0.0
    assert [e["code"] for e in response.json()["metadata"]["errors"]] == ["missing_field"]
    missing = run(client, EXACT, "Paris", {})
    assert missing.json()["metadata"]["errors"][0] == {
        "grader": "exact",
        "code": "missing_field",
        "message": "The item has no field 'answer'.",
    }


def test_validate_returns_the_normalized_spec(client: httpx.Client) -> None:
    grader = {"type": "numeric", "name": "n", "reference": "{{item.answer}}"}
    response = client.post("/v1/graders/validate", json={"grader": grader})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["grader"] == {
        **grader,
        "input": "{{sample.output_text}}",
        "extract": "last",
        "rel_tol": 1e-9,
        "abs_tol": 0.0,
    }
    assert body["item_fields"] == ["answer"] and body["model_backed"] == []


@pytest.mark.parametrize(
    ("grader", "code", "field", "detail_code"),
    [
        (
            {"type": "python", "name": "p", "source": "def grade(s, i): return 1"},
            "grader_kind_not_allowed",
            "grader.type",
            "grader_kind_not_allowed",
        ),
        (
            {**EXACT, "reference": "{{item.answer}} {{sample.logprobs}}"},
            "invalid_grader",
            "grader.reference",
            "unknown_template_field",
        ),
        (
            {"type": "regex", "name": "r", "pattern": "(x"},
            "invalid_grader",
            "grader.pattern",
            "invalid_regex",
        ),
        (
            {"type": "regex", "name": "r", "pattern": "^(a|b+)+$"},
            "invalid_grader",
            "grader.pattern",
            "unsafe_regex",
        ),
        (
            {
                "type": "score_model",
                "name": "judge",
                "input": [{"role": "user", "content": "Rate {{sample.output_text}}"}],
            },
            "invalid_grader",
            "grader.model",
            "judge_model_required",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": EXACT},
                "calculate_output": "__import__('os').getpid()",
            },
            "invalid_grader",
            "grader.calculate_output",
            "invalid_formula",
        ),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": {**EXACT, "operation": "regex"}},
                "calculate_output": "a",
            },
            "invalid_grader",
            "grader.graders.a.operation",
            "invalid_value",
        ),
        (
            {**ROUGE, "evaluation_metric": "meteor"},
            "invalid_grader",
            "grader.evaluation_metric",
            "metric_not_supported",
        ),
        (
            {"type": "json_schema", "name": "j", "schema": {"type": 5}},
            "invalid_grader",
            "grader.schema",
            "invalid_json_schema",
        ),
        ({"name": "no type"}, "invalid_grader", "grader.type", "missing_grader_type"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/graders/run", "/v1/graders/validate"])
def test_refusals_name_the_field(
    client: httpx.Client, path: str, grader: Any, code: str, field: str, detail_code: str
) -> None:
    body: dict[str, Any] = {"grader": grader}
    if path.endswith("/run"):
        body["model_sample"] = "x"
    error = assert_error(client.post(path, json=body), 422, code)
    assert [(d["field"], d["code"]) for d in error["details"]] == [(field, detail_code)]


def test_model_backed_graders_need_a_worker(client: httpx.Client) -> None:
    judge = {
        "type": "score_model",
        "name": "judge",
        "model": "model_0123456789abcdef",
        "input": [{"role": "user", "content": "Rate 0-1: {{sample.output_text}}"}],
    }
    combined = {
        "type": "multi",
        "name": "m",
        "graders": {"exact": EXACT, "judge": judge},
        "calculate_output": "exact * judge",
    }
    error = assert_error(run(client, combined), 422, "grader_needs_worker")
    assert "worker" in error["message"] and "m.judge" in error["message"]
    validated = client.post("/v1/graders/validate", json={"grader": combined}).json()
    assert validated["model_backed"] == ["m.judge"]
    reward_model = {"type": "reward_model", "name": "rm", "artifact": "art_00ff"}
    assert_error(run(client, reward_model), 422, "grader_needs_worker")


def test_request_shape_auth_and_content_type(client: httpx.Client) -> None:
    assert_error(client.post("/v1/graders/run", json={"grader": EXACT}), 422, "invalid_request")
    assert_error(
        client.post("/v1/graders/run", json={"grader": EXACT, "model_sample": "x", "extra": 1}),
        422,
        "invalid_request",
    )
    assert_error(run(client, EXACT, {"output_text": "x", "finish_reason": "eos"}), 422, "invalid_request")
    assert_error(
        client.post("/v1/graders/run", content=b"{not json", headers={"Content-Type": "application/json"}),
        400,
        "invalid_json",
    )
    assert_error(
        client.post("/v1/graders/validate", content=b"grader", headers={"Content-Type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    response = client.post(
        "/v1/graders/run",
        json={"grader": EXACT, "model_sample": "x"},
        headers={"Authorization": "Bearer wrong"},
    )
    assert response.status_code == 401
