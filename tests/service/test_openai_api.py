"""The OpenAI-compatible facade (/openai/v1, docs/openai.md) driven by the real ``openai`` package (pinned in
the dev extra) against a live embedded server with two tenants: files, supervised / DPO / reinforcement jobs
on the tiny model, events, checkpoints, cancel, models, graders, and the errors in OpenAI's shape.

docs/openai.md's migration script runs here as a subprocess, only its base URL pointed at this server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import API_KEYS, UvicornThread, free_port, make_settings, pg_database
from tests.service.helpers import jsonl, upload_model

ROOT = Path(__file__).resolve().parents[2]
FACTS = {"apple": "red", "sky": "blue", "grass": "green", "snow": "white", "coal": "black", "plum": "purple"}
DONE = ("succeeded", "failed", "cancelled")


@dataclass
class Facade:
    base_url: str
    model_id: str

    def client(self, tenant: str = "tenant-a") -> OpenAI:
        return OpenAI(base_url=f"{self.base_url}/openai/v1", api_key=API_KEYS[tenant], max_retries=0)


@pytest.fixture(scope="module")
def facade(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Facade]:
    from alignd_server.embedded import create_app

    settings = make_settings(tmp_path_factory.mktemp("openai") / "alignd")
    with UvicornThread(create_app(settings)) as server:
        headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as client:
            model = upload_model(client, tiny_model_dir, name="tiny").json()["id"]
        yield Facade(server.base_url, model)


def _chat(n: int = 16) -> bytes:
    things = list(FACTS.items())
    rows = [
        {
            "messages": [
                {"role": "developer", "content": "Answer in one short sentence."},
                {"role": "user", "content": [{"type": "text", "text": f"What colour is the {thing}?"}]},
                {"role": "assistant", "content": f"The {thing} is {colour}."},
            ]
        }
        for thing, colour in (things[i % len(things)] for i in range(n))
    ]
    return jsonl(rows)


def _upload(client: OpenAI, data: bytes, name: str = "data.jsonl") -> str:
    return client.files.create(file=(name, data), purpose="fine-tune").id


def _wait(client: OpenAI, job_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    job = client.fine_tuning.jobs.retrieve(job_id)
    while job.status not in DONE:
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
        job = client.fine_tuning.jobs.retrieve(job_id)
    return job


def _documented_script() -> str:
    text = (ROOT / "docs" / "openai.md").read_text()
    marker = "<!-- tests/service/test_openai_api.py runs the next block against a live server -->"
    block = re.search(re.escape(marker) + r"\n```python\n(.*?)```", text, re.DOTALL)
    assert block is not None, "docs/openai.md lost its tested script"
    return block.group(1)


@pytest.fixture(scope="module")
def supervised(facade: Facade, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """docs/openai.md's script, run as a user would, base URL aside; (job id, its output)."""
    folder = tmp_path_factory.mktemp("script")
    script = _documented_script()
    assert 'OpenAI(base_url="http://127.0.0.1:8000/openai/v1", api_key="key-a")' in script
    (folder / "finetune.py").write_text(script.replace("http://127.0.0.1:8000", facade.base_url))
    (folder / "train.jsonl").write_bytes(_chat())
    (folder / "valid.jsonl").write_bytes(_chat(6))
    done = subprocess.run(
        [sys.executable, "finetune.py", "train.jsonl", "tiny", "valid.jsonl"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    job_id, status, fine_tuned = done.stdout.strip().splitlines()[-1].split()
    assert (status, fine_tuned) == ("succeeded", f"ft:tiny:colours:{job_id}"), done.stdout
    return job_id, done.stdout


def test_the_documented_script_fine_tunes_and_the_job_is_an_alignd_job(
    facade: Facade, supervised: tuple[str, str]
) -> None:
    job_id, output = supervised
    client = facade.client()
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.model == "tiny" and job.hyperparameters.n_epochs == 1 and job.hyperparameters.batch_size == 8
    assert job.method is not None and job.method.type == "supervised"
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.trained_tokens is not None and job.trained_tokens > 16 * 8  # 16 examples, one epoch
    links = job.to_dict()["alignd"]
    assert links["method"] == "sft" and links["adapter_url"] == f"/v1/artifacts/{links['adapter']}/content"

    events = list(client.fine_tuning.jobs.list_events(job_id, limit=3))  # pages of 3, newest first
    assert events[0].message == "Job succeeded." and events[-1].message == "Job queued."
    assert [int(e.id.removeprefix("evt_")) for e in events] == sorted(
        (int(e.id.removeprefix("evt_")) for e in events), reverse=True
    )
    assert "info Job succeeded." in output  # the script's own listing

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job_id).data
    assert len(checkpoints) == 1  # the adapter; alignd drops resumable checkpoints on success
    final = checkpoints[0]
    assert (final.id, final.fine_tuned_model_checkpoint) == (links["adapter"], job.fine_tuned_model)
    assert final.step_number == 2 and final.metrics.train_loss is not None and final.metrics.train_loss > 0
    # The validation file is sft's held-out set: scored whole (valid_* == full_valid_*) at steps 1 and 2.
    metrics = final.metrics
    assert metrics.valid_loss is not None and metrics.valid_loss > 0
    assert metrics.full_valid_loss == metrics.valid_loss
    assert metrics.valid_mean_token_accuracy is not None and 0 <= metrics.valid_mean_token_accuracy <= 1
    assert metrics.train_mean_token_accuracy is not None and 0 <= metrics.train_mean_token_accuracy <= 1
    assert f"2 {metrics.train_loss} {metrics.valid_loss} {job.fine_tuned_model}" in output

    models = {model.id for model in client.models.list()}
    assert {facade.model_id, job.fine_tuned_model} <= models
    assert client.models.retrieve(job.fine_tuned_model).owned_by == "tenant-a"

    headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
    alignd_job = httpx.get(f"{facade.base_url}/v1/jobs/{job_id}", headers=headers).json()
    assert alignd_job["method"] == "sft" and alignd_job["hyperparameters"]["epochs"] == 1
    assert set(alignd_job["datasets"]) == {"sft", "validation"}
    developer = alignd_job["datasets"]["sft"]
    dataset = httpx.get(f"{facade.base_url}/v1/datasets/{developer}", headers=headers).json()
    assert dataset["kind"] == "sft" and dataset["num_records"] == 16
    with pytest.raises(openai.ConflictError) as finished:
        client.fine_tuning.jobs.cancel(job_id)
    assert finished.value.code == "job_finished"


def test_files_upload_list_retrieve_content_delete(facade: Facade) -> None:
    client = facade.client()
    data = _chat(2)
    # An older file of its own: the list below has a second page whichever tests ran before in this worker.
    older = client.files.create(file=("older.jsonl", _chat(1)), purpose="fine-tune")
    created = client.files.create(file=("two.jsonl", data), purpose="fine-tune")
    assert (created.object, created.bytes, created.filename, created.purpose) == (
        "file",
        len(data),
        "two.jsonl",
        "fine-tune",
    )
    assert client.files.retrieve(created.id).id == created.id
    assert client.files.content(created.id).content == data
    listed = client.files.list(limit=1)
    assert listed.data[0].id == created.id and listed.has_more  # newest first; the older one exists
    assert client.files.list(limit=1, after=created.id).data[0].id == older.id
    assert created.id in {f.id for f in client.files.list(order="asc")}
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError) as missing:
        client.files.retrieve(created.id)
    assert missing.value.code == "file_not_found"
    with pytest.raises(openai.BadRequestError) as purpose:
        client.files.create(file=("b.jsonl", data), purpose="batch")
    assert (purpose.value.code, purpose.value.param) == ("unsupported_purpose", "purpose")


def test_bad_files_are_400_naming_the_lines(facade: Facade) -> None:
    client = facade.client()
    good = json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    lines = [good, json.dumps({"messages": [{"role": "user", "content": "no answer"}]}), "", "not json", good]
    bad = _upload(client, ("\n".join(lines) + "\n").encode())
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="tiny", training_file=bad)
    error = refused.value
    assert (error.status_code, error.code, error.param) == (400, "invalid_training_file", "training_file")
    assert error.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert "line 2: invalid_messages" in error.message and "line 4: invalid_json" in error.message
    assert [(d["line"], d["code"]) for d in error.body["details"]] == [
        (2, "invalid_messages"),
        (4, "invalid_json"),
    ]  # type: ignore[index]

    dpo = _upload(
        client, jsonl([{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": []}])
    )
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="tiny", training_file=dpo, method={"type": "dpo"})
    assert '"non_preferred_output": missing' in refused.value.message

    good_file = _upload(client, _chat(4))
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="tiny", training_file=good_file, validation_file=bad)
    assert (refused.value.code, refused.value.param) == ("invalid_validation_file", "validation_file")


def test_bad_requests_name_the_openai_field(facade: Facade) -> None:
    client = facade.client()
    training = _upload(client, _chat(4))
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"model": "gpt-4o-mini"}, "model_not_available", "model"),
        ({"training_file": "file_nope"}, "file_not_found", "training_file"),
        (
            {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
            "invalid_request",
            "method.supervised.hyperparameters.n_epochs",
        ),
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"learning_rate_multiplier": 1e5}}}},
            "invalid_hyperparameters",
            "method.dpo.hyperparameters.learning_rate_multiplier",
        ),
        ({"suffix": "a:b"}, "invalid_request", "suffix"),
        ({"method": {"type": "reinforcement"}}, "missing_grader", "method.reinforcement.grader"),
        ({"method": {"type": "dpo", "supervised": {}}}, "invalid_request", "method"),
    ]
    for change, code, param in cases:
        body = {"model": "tiny", "training_file": training, **change}
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(**body)
        assert (refused.value.code, refused.value.param) == (code, param), refused.value.body
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.list(metadata={"team": "a"})
    assert refused.value.code == "unsupported_parameter"


def test_another_tenants_ids_are_404_in_openais_shape(facade: Facade, supervised: tuple[str, str]) -> None:
    job_id, _ = supervised
    mine = facade.client()
    file_id = mine.fine_tuning.jobs.retrieve(job_id).training_file
    fine_tuned = mine.fine_tuning.jobs.retrieve(job_id).fine_tuned_model
    theirs = facade.client("tenant-b")
    for call in (
        lambda: theirs.files.retrieve(file_id),
        lambda: theirs.files.content(file_id),
        lambda: theirs.files.delete(file_id),
        lambda: theirs.fine_tuning.jobs.retrieve(job_id),
        lambda: theirs.fine_tuning.jobs.cancel(job_id),
        lambda: theirs.fine_tuning.jobs.pause(job_id),
        lambda: theirs.fine_tuning.jobs.list_events(job_id),
        lambda: theirs.fine_tuning.jobs.checkpoints.list(job_id),
        lambda: theirs.models.retrieve(str(fine_tuned)),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert set(missing.value.body) == {"message", "type", "param", "code", "details"}  # type: ignore[arg-type]
    assert job_id not in {job.id for job in theirs.fine_tuning.jobs.list()}
    assert str(fine_tuned) not in {model.id for model in theirs.models.list()}
    with pytest.raises(openai.BadRequestError) as refused:
        theirs.fine_tuning.jobs.create(model=facade.model_id, training_file=file_id)
    assert refused.value.param in ("model", "training_file")
    with pytest.raises(openai.AuthenticationError) as unauthorised:
        OpenAI(base_url=f"{facade.base_url}/openai/v1", api_key="wrong", max_retries=0).files.list()
    assert unauthorised.value.code == "invalid_api_key"


def test_a_dpo_job_continues_from_the_fine_tuned_model(facade: Facade, supervised: tuple[str, str]) -> None:
    client = facade.client()
    fine_tuned = client.fine_tuning.jobs.retrieve(supervised[0]).fine_tuned_model
    colours = sorted(set(FACTS.values()))
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": f"What colour is the {thing}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"The {thing} is {colour}."}],
            "non_preferred_output": [
                {"role": "assistant", "content": f"The {thing} is {next(c for c in colours if c != colour)}."}
            ],
        }
        for thing, colour in FACTS.items()
    ]
    job = client.fine_tuning.jobs.create(
        model=str(fine_tuned),
        training_file=_upload(client, jsonl(rows)),
        validation_file=_upload(client, jsonl(rows[:3])),
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 6}}},
        seed=7,
    )
    done = _wait(client, job.id)
    assert done.status == "succeeded", list(client.fine_tuning.jobs.list_events(job.id, limit=50))
    # The validation file is the dpo job's held-out pairs: valid_loss at the checkpoint, no token accuracy.
    metrics = client.fine_tuning.jobs.checkpoints.list(job.id).data[0].metrics
    assert metrics.valid_loss is not None and metrics.valid_loss == metrics.full_valid_loss
    assert metrics.valid_mean_token_accuracy is None
    assert done.fine_tuned_model == f"ft:tiny::{job.id}" and done.seed == 7
    headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
    alignd_job = httpx.get(f"{facade.base_url}/v1/jobs/{job.id}", headers=headers).json()
    assert alignd_job["method"] == "dpo" and alignd_job["hyperparameters"]["beta"] == 0.2
    assert (
        alignd_job["init_adapter"]
        == client.fine_tuning.jobs.retrieve(supervised[0]).to_dict()["alignd"]["adapter"]
    )


def _cancel_a_queued_job(client: OpenAI, facade: Facade) -> None:
    """While a job runs (one job at a time in this server), another waits queued: paused at once, resumed,
    then cancelled at once; resuming a job that is not paused is refused in OpenAI's shape, and the ignored
    fields said so in warning events. (A running job's pause and resume: tests/service/test_pause_resume.py.)"""
    job = client.fine_tuning.jobs.create(
        model=facade.model_id,
        training_file=_upload(client, _chat(4)),
        metadata={"purpose": "cancel"},
        integrations=[{"type": "wandb", "wandb": {"project": "p"}}],
    )
    assert job.status == "queued" and job.hyperparameters.n_epochs == 3  # "auto"
    jobs = client.fine_tuning.jobs
    with pytest.raises(openai.ConflictError) as refused:
        jobs.resume(job.id)
    assert refused.value.code == "job_not_paused"
    assert jobs.pause(job.id).status == "paused"
    assert jobs.retrieve(job.id).status == "paused"
    assert jobs.resume(job.id).status == "queued"
    cancelled = jobs.cancel(job.id)
    assert (cancelled.status, cancelled.fine_tuned_model, cancelled.metadata) == (
        "cancelled",
        None,
        {"purpose": "cancel"},
    )
    warnings = [e.message for e in jobs.list_events(job.id, limit=100) if e.level == "warn"]
    assert any("integrations are ignored" in message for message in warnings), warnings
    assert job.id in {j.id for j in jobs.list(limit=100)}


def test_a_reinforcement_job_with_a_string_check_grader_and_a_queued_job_cancelled(facade: Facade) -> None:
    client = facade.client()
    rows = [
        {"messages": [{"role": "user", "content": f"What colour is the {t}?"}], "thing": t}
        for t in list(FACTS)[:2]
    ]
    grader = {
        "type": "string_check",
        "name": "names the thing",
        "input": "{{sample.output_text}}",
        "reference": "{{item.thing}}",
        "operation": "ilike",
    }
    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=_upload(client, jsonl(rows)),
        method={
            "type": "reinforcement",
            "reinforcement": {
                "grader": grader,
                "hyperparameters": {"batch_size": 2, "reasoning_effort": "low"},
            },
        },
    )
    _cancel_a_queued_job(client, facade)
    done = _wait(client, job.id)
    assert done.status == "succeeded", list(client.fine_tuning.jobs.list_events(job.id, limit=50))
    assert done.method is not None and done.method.reinforcement is not None
    assert done.method.reinforcement.grader.name == "names the thing"  # as sent
    warnings = [
        e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.level == "warn"
    ]
    assert any("reported as 'names_the_thing'" in w for w in warnings), warnings
    assert any("reasoning_effort='low' is ignored" in w for w in warnings), warnings
    headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
    metrics = httpx.get(f"{facade.base_url}/v1/jobs/{job.id}/metrics", headers=headers).json()["data"]
    steps = {p["step"] for p in metrics if p["name"] == "reward/names_the_thing"}
    assert steps == {1}  # n_epochs 1 over 2 lines, 2 prompts per update: one update

    missing = _upload(client, jsonl([{"messages": [{"role": "user", "content": "q"}]}]))
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model="tiny",
            training_file=missing,
            method={"type": "reinforcement", "reinforcement": {"grader": grader}},
        )
    assert (refused.value.code, refused.value.param) == ("missing_item_field", "training_file")
    python = {"type": "python", "name": "p", "source": "def grade(s, i): return 1"}
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(
            model="tiny",
            training_file=missing,
            method={"type": "reinforcement", "reinforcement": {"grader": python}},
        )
    assert (refused.value.code, refused.value.param) == (
        "grader_kind_not_allowed",
        "method.reinforcement.grader.type",
    )


def test_graders_validate_and_run(facade: Facade) -> None:
    graders = facade.client().fine_tuning.alpha.graders
    exact = {
        "type": "string_check",
        "name": "exact",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "eq",
    }
    assert graders.validate(grader=exact).grader.name == "exact"  # type: ignore[arg-type,union-attr]
    ran = graders.run(grader=exact, model_sample="Paris", item={"answer": "Paris"})  # type: ignore[arg-type]
    assert (
        ran.reward == 1.0 and ran.metadata.name == "exact" and not ran.metadata.errors.invalid_variable_error
    )
    ran = graders.run(grader=exact, model_sample="Paris", item={})  # type: ignore[arg-type]
    assert ran.reward == 0.0 and ran.metadata.errors.invalid_variable_error
    with pytest.raises(openai.BadRequestError) as refused:
        graders.validate(grader={"type": "python", "name": "p", "source": "x"})  # type: ignore[arg-type,typeddict-item]
    assert (refused.value.code, refused.value.param) == ("grader_kind_not_allowed", "grader.type")


QUESTION = [
    {"role": "developer", "content": "Answer in one short sentence."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "What colour is the "}, {"type": "text", "text": "sky?"}],
    },
]


def test_a_chat_completion_from_the_base_model_is_an_alignd_chat_job(facade: Facade) -> None:
    client = facade.client()
    answer = client.chat.completions.create(
        model="tiny",
        messages=QUESTION,
        max_completion_tokens=8,
        temperature=0,
        n=2,
        seed=11,  # type: ignore[arg-type]
    )
    assert (answer.object, answer.model, len(answer.choices)) == ("chat.completion", "tiny", 2)
    first, second = answer.choices
    assert (first.index, second.index, first.message.role) == (0, 1, "assistant")
    assert first.message.content == second.message.content  # greedy: one answer, twice
    assert first.finish_reason in ("stop", "length") and first.message.content is not None
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens > 10  # the developer line and the template count
    assert (
        usage.completion_tokens <= 16 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )

    headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
    job = httpx.get(f"{facade.base_url}/v1/jobs/{answer.id}", headers=headers).json()
    assert (job["method"], job["status"], job["seed"], job["base_model"]) == (
        "chat",
        "succeeded",
        11,
        facade.model_id,
    )
    assert job["hyperparameters"]["messages"] == [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What colour is the sky?"},
    ]
    refused = httpx.post(
        f"{facade.base_url}/v1/jobs", headers=headers, json={"method": "chat", "base_model": facade.model_id}
    )
    assert (refused.status_code, refused.json()["error"]["code"]) == (422, "method_not_available")


def test_a_fine_tuned_model_answers_streamed_and_not_with_the_same_text(
    facade: Facade, supervised: tuple[str, str]
) -> None:
    client = facade.client()
    fine_tuned = str(client.fine_tuning.jobs.retrieve(supervised[0]).fine_tuned_model)
    asked: dict[str, Any] = {
        "model": fine_tuned,
        "messages": QUESTION,
        "max_tokens": 200,
        "temperature": 0,
        "seed": 3,
    }
    answer = client.chat.completions.create(**asked)
    text = answer.choices[0].message.content
    assert answer.model == fine_tuned and text
    adapter = client.fine_tuning.jobs.retrieve(supervised[0]).to_dict()["alignd"]["adapter"]
    headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
    job = httpx.get(f"{facade.base_url}/v1/jobs/{answer.id}", headers=headers).json()
    events = httpx.get(f"{facade.base_url}/v1/jobs/{answer.id}/events", headers=headers).json()["data"]
    assert job["init_adapter"] == adapter  # sampled from the base with the fine-tuned adapter on it
    assert f"sampling from the base with adapter {adapter}" in [event["message"] for event in events]

    # Streamed, and named by alignd's extension: the adapter artifact's id (any /v1 job's adapter; this facade
    # job is a /v1 job too) is a model, sampled on the base it was trained on, so the text is the same.
    stream = client.chat.completions.create(
        **{**asked, "model": adapter}, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert {chunk.id for chunk in chunks} == {chunks[0].id} != answer.id  # a second job
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == adapter for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [answer.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == answer.usage  # include_usage: the last chunk
    chat_job = httpx.get(f"{facade.base_url}/v1/jobs/{chunks[0].id}", headers=headers).json()
    assert (chat_job["base_model"], chat_job["init_adapter"]) == (facade.model_id, adapter)
    # An artifact that is no adapter names no model (400); another tenant's adapter is not found (404).
    artifacts = httpx.get(f"{facade.base_url}/v1/jobs/{supervised[0]}/artifacts", headers=headers).json()
    card = next(a["id"] for a in artifacts["data"] if a["kind"] == "model_card")
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{**asked, "model": card})
    assert (refused.value.code, refused.value.param) == ("wrong_artifact_kind", "model")
    with pytest.raises(openai.NotFoundError) as missing:
        facade.client("tenant-b").chat.completions.create(**{**asked, "model": adapter})
    assert missing.value.code == "model_not_found"


def test_chat_completions_refuse_what_alignd_cannot_serve_in_openais_shape(facade: Facade) -> None:
    client = facade.client()
    user = [{"role": "user", "content": "hi"}]
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"n": 9}, "invalid_request", "n"),
        ({"max_completion_tokens": 5000}, "invalid_request", "max_completion_tokens"),
        ({"max_tokens": 8, "max_completion_tokens": 9}, "conflicting_field", "max_tokens"),
        ({"temperature": 2.5}, "invalid_request", "temperature"),
        ({"top_p": 0}, "invalid_request", "top_p"),
        ({"seed": -1}, "invalid_request", "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "invalid_request", "stop"),
        ({"logprobs": True}, "unsupported_parameter", "logprobs"),
        ({"presence_penalty": 0.5}, "unsupported_parameter", "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "unsupported_parameter", "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "unsupported_parameter", "tools"),
        (
            {"messages": [{"role": "tool", "content": "x", "tool_call_id": "c"}]},
            "invalid_request",
            "messages.0.role",
        ),
        ({"messages": []}, "invalid_request", "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "invalid_request",
            "messages.0.content",
        ),
    ]
    for change, code, param in cases:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**{"model": "tiny", "messages": user, **change})
        assert (refused.value.code, refused.value.param) == (code, param), (change, refused.value.body)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o-mini", messages=user)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found" and "does not exist" in missing.value.message
    theirs = facade.client("tenant-b")
    for model in (facade.model_id, "tiny", "ft:tiny:colours:job_0"):
        with pytest.raises(openai.NotFoundError) as missing:
            theirs.chat.completions.create(model=model, messages=user, stream=True)  # type: ignore[arg-type]
        assert missing.value.code == "model_not_found"
    raw = httpx.post(
        f"{facade.base_url}/openai/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEYS['tenant-a']}", "Content-Type": "application/json"},
        content='{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    )
    assert (raw.status_code, raw.json()["error"]["code"], raw.json()["error"]["param"]) == (
        400,
        "non_finite_number",
        "temperature",
    )


def test_the_facade_on_postgresql_with_jobs_left_queued(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The facade's tables and queries on PostgreSQL: an API-only server (arq mode, its Redis unreachable, so
    accepted jobs stay queued and train nowhere) takes files, converts them, makes jobs and cancels them."""
    from service.api.app import create_app

    with pg_database() as database_url:
        redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens: jobs stay queued
        settings = make_settings(
            tmp_path / "alignd", database_url=database_url, queue="arq", redis_url=redis_url
        )
        with UvicornThread(create_app(settings)) as server:
            headers = {"Authorization": f"Bearer {API_KEYS['tenant-a']}"}
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
                assert upload_model(http, tiny_model_dir, name="tiny").status_code == 201
                assert upload_model(http, tiny_model_dir, name="tiny").status_code == 201
            client = OpenAI(
                base_url=f"{server.base_url}/openai/v1", api_key=API_KEYS["tenant-a"], max_retries=0
            )
            training = _upload(client, _chat(4))
            with pytest.raises(openai.BadRequestError) as ambiguous:
                client.fine_tuning.jobs.create(model="tiny", training_file=training)
            assert (ambiguous.value.code, ambiguous.value.param) == ("model_ambiguous", "model")
            model = client.models.list().data[0].id
            bad = _upload(client, b'{"messages": []}\n')
            with pytest.raises(openai.BadRequestError) as refused:
                client.fine_tuning.jobs.create(model=model, training_file=bad)
            assert refused.value.body["details"][0]["line"] == 1  # type: ignore[index]
            job = client.fine_tuning.jobs.create(model=model, training_file=training, metadata={"k": "v"})
            again = client.fine_tuning.jobs.create(
                model=model, training_file=training, suffix="b"
            )  # reuses the dataset
            listed = client.fine_tuning.jobs.list(limit=1)
            assert [j.id for j in listed.data] == [again.id] and listed.has_more
            assert [j.id for j in client.fine_tuning.jobs.list(after=again.id)] == [job.id]
            assert client.fine_tuning.jobs.retrieve(job.id).metadata == {"k": "v"}
            assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
            assert [e.message for e in client.fine_tuning.jobs.list_events(job.id)][:2] == [
                "Job cancelled.",
                "Job queued.",
            ]
            assert client.fine_tuning.jobs.checkpoints.list(job.id).data == []
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=60) as http:
                datasets = http.get("/v1/datasets").json()["data"]
                assert [d["kind"] for d in datasets] == ["sft"]  # one conversion for both jobs
                assert client.files.delete(training).deleted
                assert [d["id"] for d in http.get("/v1/datasets").json()["data"]] == [
                    datasets[0]["id"]
                ]  # in use
