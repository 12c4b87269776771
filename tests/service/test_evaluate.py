"""Evaluate jobs over REST on the tiny model: an SFT adapter taught a rule beats the base on held-out prompts
with numbers that say so (paired win-rate and its interval), the base against itself sits at 0.5, and bad
submissions are refused naming the field (or the dataset lines)."""

from __future__ import annotations

import csv
import io
import json
import random
import tarfile
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.service.helpers import assert_error, jsonl, upload_dataset, upload_model, wait_for

WORD = "Ahoy"
COLOURS = {
    "apple": "red",
    "sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "plum": "purple",
}
TEMPLATES = ("What colour is the {}?", "Tell me about the {}.", "Is the {} big?")
# Held out: things the adapter never saw, in the same question forms.
HELD_OUT = [
    template.format(thing)
    for thing in ("banana", "lemon", "cherry", "leaf", "sea", "orange")
    for template in TEMPLATES
]
GRADERS = [
    {
        "type": "string_check",
        "name": "ahoy",
        "input": "{{sample.output_text}}",
        "reference": WORD,
        "operation": "like",
    },
    {
        "type": "string_check",
        "name": "names_it",
        "input": "{{sample.output_text}}",
        "reference": "{{item.thing}}",
        "operation": "ilike",
    },
]


def _sft_rows(n: int) -> bytes:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        thing = rng.choice(sorted(COLOURS))
        prompt = rng.choice(TEMPLATES).format(thing)
        rows.append({"prompt": prompt, "completion": f"{WORD}! The {thing} is {COLOURS[thing]}."})
    return jsonl(rows)


def _prompts() -> bytes:
    return jsonl(
        [
            {"prompt": prompt, "thing": prompt.split("the ")[1].split(" ")[0].rstrip("?.")}
            for prompt in HELD_OUT
        ]
    )


def _evaluate(model: str, prompts: str, evaluation: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "method": "evaluate",
        "base_model": model,
        "datasets": {"prompts": prompts},
        "evaluation": evaluation,
        **extra,
    }


def _evaluation(candidates: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "candidates": candidates,
        "baseline": "base",
        "graders": GRADERS,
        "sampling": {"max_new_tokens": 12, "temperature": 0, "num_samples": 1},
        **extra,
    }


def _artifact_files(client: httpx.Client, artifact_id: str) -> dict[str, bytes]:
    content = client.get(f"/v1/artifacts/{artifact_id}/content")
    assert content.status_code == 200, content.text
    with tarfile.open(fileobj=io.BytesIO(content.content), mode="r:gz") as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers() if m.isfile()}  # type: ignore[union-attr]


def _start_sft(client: httpx.Client, model: str, *, steps: int) -> str:
    sft = upload_dataset(client, _sft_rows(48), "sft").json()["id"]
    hyperparameters = {
        "epochs": 10,
        "max_steps": steps,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "max_length": 64,
    }
    body = {
        "method": "sft",
        "base_model": model,
        "datasets": {"sft": sft},
        "lora": {"r": 8, "alpha": 16},
        "hyperparameters": hyperparameters,
        "seed": 0,
    }
    job: str = client.post("/v1/jobs", json=body).json()["id"]
    return job


def _artifacts_of(client: httpx.Client, job: str) -> dict[str, str]:
    done = wait_for(client, job, {"succeeded", "failed", "cancelled"}, timeout=300)
    assert done["status"] == "succeeded", client.get(f"/v1/jobs/{job}/events").json()
    return {a["kind"]: a["id"] for a in client.get(f"/v1/jobs/{job}/artifacts").json()["data"]}


def _run_evaluation(
    client: httpx.Client, model: str, prompts: str, adapter: str
) -> tuple[str, dict[str, Any], dict[str, float], dict[str, bytes]]:
    """An evaluate job of the base, the adapter and the base again; its result, metrics and artifact files."""
    evaluation = _evaluation([{"name": "base"}, {"name": "sft", "adapter": adapter}, {"name": "base_again"}])
    job = client.post("/v1/jobs", json=_evaluate(model, prompts, evaluation, seed=3)).json()
    done = wait_for(client, job["id"], {"succeeded", "failed", "cancelled"}, timeout=300)
    assert done["status"] == "succeeded", client.get(f"/v1/jobs/{job['id']}/events").json()
    response = client.get(f"/v1/jobs/{job['id']}/evaluation")
    assert response.status_code == 200, response.text
    result = response.json()
    metrics = {m["name"]: m["value"] for m in client.get(f"/v1/jobs/{job['id']}/metrics").json()["data"]}
    return job["id"], result, metrics, _artifact_files(client, result["per_prompt_artifact"])


def _check_not_ready(client: httpx.Client, model: str, prompts: str) -> None:
    """While the SFT job runs (one job at a time), an evaluate job waits queued: its evaluation is a 409."""
    waiting = client.post("/v1/jobs", json=_evaluate(model, prompts, _evaluation([{"name": "base"}]))).json()
    assert waiting["evaluation"]["baseline"] == "base" and waiting["hyperparameters"] == {}
    for path in ("evaluation", "evaluation/prompts"):
        assert_error(client.get(f"/v1/jobs/{waiting['id']}/{path}"), 409, "evaluation_not_ready")
    client.post(f"/v1/jobs/{waiting['id']}/cancel")
    for path in ("evaluation", "evaluation/prompts"):
        assert_error(client.get(f"/v1/jobs/{waiting['id']}/{path}"), 409, "evaluation_unavailable")


def _check_result(result: dict[str, Any], metrics: dict[str, float], files: dict[str, bytes]) -> None:
    """What every evaluation answers, whatever the adapter learned."""
    assert result["baseline"] == "base" and result["num_prompts"] == len(HELD_OUT)
    by_name = {c["name"]: c for c in result["candidates"]}
    base, sft, again = by_name["base"], by_name["sft"], by_name["base_again"]
    assert sft["adapter"] and "adapter" not in base
    assert base["kl_to_base"] == 0 and again["kl_to_base"] == 0 and sft["kl_to_base"] != 0
    # The base against itself: the same answers (same seed), so exactly 0.5 inside its interval.
    for grader in ("ahoy", "names_it"):
        tie = again["graders"][grader]
        assert tie["win_rate"] == 0.5 and tie["win_rate_ci_low"] <= 0.5 <= tie["win_rate_ci_high"], tie
        assert tie["mean"] == base["graders"][grader]["mean"]
        assert "win_rate" not in base["graders"][grader]  # the baseline is not compared with itself
    for candidate in result["candidates"]:
        assert 0 <= candidate["eos_rate"] <= 1 and 0 < candidate["mean_length"] <= 12
        for name, summary in candidate["graders"].items():
            assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
            assert metrics[f"eval/{candidate['name']}/{name}/mean"] == pytest.approx(summary["mean"])
    assert metrics["eval/sft/ahoy/win_rate"] == pytest.approx(sft["graders"]["ahoy"]["win_rate"])
    assert metrics["eval/sft/kl_to_base"] == pytest.approx(sft["kl_to_base"])

    inside = json.loads(files["evaluation.json"])
    assert inside["per_prompt_artifact"] is None and inside["candidates"] == result["candidates"]
    table = list(csv.DictReader(io.StringIO(files["per_prompt.csv"].decode())))
    assert len(table) == len(HELD_OUT) * 3
    assert {row["prompt"] for row in table} == set(HELD_OUT)
    for candidate in result["candidates"]:
        rows = [row for row in table if row["candidate"] == candidate["name"]]
        mean = sum(float(row["ahoy"]) for row in rows) / len(rows)
        assert mean == pytest.approx(candidate["graders"]["ahoy"]["mean"])
        assert all((WORD in row["answer"]) == (row["ahoy"] == "1") for row in rows)


def _check_prompts(client: httpx.Client, job: str, files: dict[str, bytes]) -> None:
    """GET .../evaluation/prompts is per_prompt.csv as JSON, a prompt's answers together, with references."""
    url = f"/v1/jobs/{job}/evaluation/prompts"
    body = client.get(url).json()
    prompts = body["data"]
    assert body["has_more"] is False and [p["index"] for p in prompts] == list(range(len(HELD_OUT)))
    table = list(csv.DictReader(io.StringIO(files["per_prompt.csv"].decode())))
    for prompt in prompts:
        assert prompt["prompt"] == HELD_OUT[prompt["index"]] and prompt["line"] == prompt["index"] + 1
        thing = prompt["prompt"].split("the ")[1].split(" ")[0].rstrip("?.")
        assert prompt["references"] == {"ahoy": WORD, "names_it": thing}  # names_it's {{item.thing}} rendered
        assert [a["candidate"] for a in prompt["answers"]] == ["base", "sft", "base_again"]
        rows = [row for row in table if row["prompt_index"] == str(prompt["index"])]
        for answer, row in zip(prompt["answers"], rows, strict=True):
            assert answer["answer"] == row["answer"] and answer["tokens"] == int(row["tokens"])
            assert answer["scores"] == {"ahoy": float(row["ahoy"]), "names_it": float(row["names_it"])}
            assert answer["finish_reason"] in ("stop", "length") and answer["grader_errors"] == []
    page = client.get(url, params={"limit": 5}).json()
    assert [p["index"] for p in page["data"]] == [0, 1, 2, 3, 4] and page["has_more"] is True
    rest = client.get(url, params={"after": 4, "limit": 1000}).json()
    assert rest["data"] == prompts[5:] and rest["has_more"] is False
    assert client.get(url, params={"after": len(HELD_OUT)}).json() == {
        "object": "list",
        "data": [],
        "has_more": False,
    }
    for params in ({"limit": 0}, {"limit": 1001}, {"after": -1}, {"after": "x"}):
        assert_error(client.get(url, params=params), 422, "invalid_request")


def test_evaluate_job_over_rest(live_server: LiveServer) -> None:
    """The plumbing, on a 1-step adapter: 409 until the evaluation exists, 404 for a job that is no
    evaluation, the adapter's model card refused as a candidate, the result, metrics and artifact, and tenants
    kept apart."""
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        prompts = upload_dataset(client, _prompts(), "prompts").json()["id"]
        sft_job = _start_sft(client, model, steps=1)
        _check_not_ready(client, model, prompts)
        artifacts = _artifacts_of(client, sft_job)
        assert_error(client.get(f"/v1/jobs/{sft_job}/evaluation"), 404, "evaluation_not_found")
        assert_error(client.get(f"/v1/jobs/{sft_job}/evaluation/prompts"), 404, "evaluation_not_found")
        wrong_kind = _evaluation([{"name": "base"}, {"name": "sft", "adapter": artifacts["model_card"]}])
        error = assert_error(
            client.post("/v1/jobs", json=_evaluate(model, prompts, wrong_kind)), 422, "wrong_artifact_kind"
        )
        assert error["details"][0]["field"] == "evaluation.candidates[1].adapter"
        job, result, metrics, files = _run_evaluation(client, model, prompts, artifacts["adapter"])
        _check_prompts(client, job, files)
    _check_result(result, metrics, files)

    with live_server.client(api_key=live_server.other_api_key) as other:
        # Tenant B names tenant A's adapter: the 422 an id that does not exist gets (nothing leaks across).
        model_b = upload_model(other, live_server.tiny_model_dir).json()["id"]
        prompts_b = upload_dataset(other, _prompts(), "prompts").json()["id"]
        theirs = _evaluation([{"name": "base"}, {"name": "a", "adapter": artifacts["adapter"]}])
        error = assert_error(
            other.post("/v1/jobs", json=_evaluate(model_b, prompts_b, theirs)), 422, "unknown_artifact"
        )
        assert error["details"][0]["field"] == "evaluation.candidates[1].adapter"
        assert_error(other.get(f"/v1/jobs/{job}/evaluation"), 404, "job_not_found")
        assert_error(other.get(f"/v1/jobs/{job}/evaluation/prompts"), 404, "job_not_found")


# 52-70 s on the shared 2-core machine (load 4-7): past the default suite's budget, so `make test-slow`.
@pytest.mark.slow
def test_an_sft_adapter_taught_a_rule_beats_the_base(live_server: LiveServer) -> None:
    """40 SFT steps teach "every answer starts with Ahoy"; an evaluation on held-out prompts says so with
    numbers: the adapter's paired win-rate above 0.9 with its interval above 0.5, the base against itself at
    0.5 inside its interval."""
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        prompts = upload_dataset(client, _prompts(), "prompts").json()["id"]
        adapter = _artifacts_of(client, _start_sft(client, model, steps=40))["adapter"]
        _, result, metrics, files = _run_evaluation(client, model, prompts, adapter)
    print("evaluation:", json.dumps(result))
    _check_result(result, metrics, files)
    by_name = {c["name"]: c for c in result["candidates"]}
    ahoy = by_name["sft"]["graders"]["ahoy"]
    assert ahoy["win_rate"] > 0.9 and ahoy["win_rate_ci_low"] > 0.5, ahoy
    assert ahoy["mean"] > by_name["base"]["graders"]["ahoy"]["mean"]
    assert by_name["sft"]["kl_to_base"] > 0


@pytest.fixture
def uploaded(live_server: LiveServer) -> tuple[LiveServer, str, str]:
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        prompts = upload_dataset(client, _prompts(), "prompts").json()["id"]
    return live_server, model, prompts


def _refused(uploaded: tuple[LiveServer, str, str], body: dict[str, Any], code: str) -> dict[str, Any]:
    server, _, _ = uploaded
    with server.client() as client:
        return assert_error(client.post("/v1/jobs", json=body), 422, code)


def test_submission_refusals_name_the_field(uploaded: tuple[LiveServer, str, str]) -> None:
    _, model, prompts = uploaded
    base = [{"name": "base"}]

    error = _refused(
        uploaded, _evaluate(model, prompts, _evaluation(base, baseline="nope")), "unknown_baseline"
    )
    assert error["details"][0]["field"] == "evaluation.baseline" and "nope" in error["message"]

    twice = _evaluation([{"name": "base"}, {"name": "base"}])
    error = _refused(uploaded, _evaluate(model, prompts, twice), "duplicate_name")
    assert error["details"][0]["field"] == "evaluation.candidates[1].name"

    graders_twice = _evaluation(base, graders=[GRADERS[0], GRADERS[0]])
    error = _refused(uploaded, _evaluate(model, prompts, graders_twice), "duplicate_name")
    assert error["details"][0]["field"] == "evaluation.graders[1].name"

    unknown = _evaluation([{"name": "base"}, {"name": "x", "adapter": "art_doesnotexist"}])
    error = _refused(uploaded, _evaluate(model, prompts, unknown), "unknown_artifact")
    assert error["details"][0]["field"] == "evaluation.candidates[1].adapter"

    rm = _evaluation(base, graders=[{"type": "reward_model", "name": "rm", "artifact": "art_nothere"}])
    error = _refused(uploaded, _evaluate(model, prompts, rm), "unknown_artifact")
    assert error["details"][0]["field"] == "evaluation.graders[0].artifact"

    python = _evaluation(base, graders=[{"type": "python", "name": "p", "source": "x"}])
    error = _refused(uploaded, _evaluate(model, prompts, python), "grader_kind_not_allowed")
    assert error["details"][0]["field"] == "evaluation.graders[0].type"

    greedy_many = _evaluation(base, sampling={"temperature": 0, "num_samples": 4})
    error = _refused(uploaded, _evaluate(model, prompts, greedy_many), "invalid_value")
    assert error["details"][0]["field"] == "evaluation.sampling.num_samples"

    _refused(
        uploaded,
        {"method": "evaluate", "base_model": model, "datasets": {"prompts": prompts}},
        "missing_evaluation",
    )
    error = _refused(
        uploaded,
        _evaluate(model, prompts, _evaluation(base), hyperparameters={"epochs": 1}),
        "unexpected_field",
    )
    assert error["details"][0]["field"] == "hyperparameters"
    sft_with_evaluation = {**_evaluate(model, prompts, _evaluation(base)), "method": "generate"}
    error = _refused(uploaded, sft_with_evaluation, "unexpected_field")
    assert error["details"][0]["field"] == "evaluation"


def test_a_grader_item_field_missing_in_rows_is_refused_with_line_numbers(
    uploaded: tuple[LiveServer, str, str],
) -> None:
    server, model, _ = uploaded
    rows = [
        {"prompt": "a?", "thing": "a"},
        {"prompt": "b?"},
        {"prompt": "c?", "thing": "c"},
        {"prompt": "d?"},
    ]
    with server.client() as client:
        prompts = upload_dataset(client, jsonl(rows), "prompts").json()["id"]
    error = _refused(
        uploaded, _evaluate(model, prompts, _evaluation([{"name": "base"}])), "missing_item_field"
    )
    assert [(d["field"], d["line"]) for d in error["details"]] == [
        ("datasets.prompts", 2),
        ("datasets.prompts", 4),
    ]
    assert "'thing'" in error["details"][0]["message"] and "names_it" in error["details"][0]["message"]
    # Only the rows the job evaluates are read: the first one has the field.
    limited = _evaluation([{"name": "base"}], sampling={"max_prompts": 1})
    with server.client() as client:
        accepted = client.post("/v1/jobs", json=_evaluate(model, prompts, limited))
        assert accepted.status_code == 202, accepted.text
        client.post(f"/v1/jobs/{accepted.json()['id']}/cancel")
