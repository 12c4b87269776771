"""The SDK's evals and graders resources, sync and async, and ``alignd evals``, against the real server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import alignd
import pytest
from alignd.cli import EXIT_OK, EXIT_VALIDATION, main

LIKE_YES = {
    "type": "string_check",
    "name": "yes",
    "input": "{{sample.output_text}}",
    "reference": "yes",
    "operation": "like",
}
NAMES_IT = {**LIKE_YES, "name": "names_it", "reference": "{{item.thing}}", "operation": "ilike"}
PROMPTS = [{"prompt": f"Is the {thing} red?", "thing": thing} for thing in ("apple", "sky", "coal", "plum")]


def _client(server: Any) -> alignd.Client:
    return alignd.Client(base_url=server.base_url, api_key=server.api_key)


def _inputs(client: alignd.Client, server: Any, tmp_path: Path) -> tuple[str, str]:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in PROMPTS))
    return client.models.upload(server.tiny_model_dir).id, client.datasets.upload(path, kind="prompts").id


def test_graders_validate_and_run(live_server: Any) -> None:
    with _client(live_server) as client:
        checked = client.graders.validate(grader=NAMES_IT)
        assert checked.item_fields == ["thing"] and checked.model_backed == []
        assert checked.grader["operation"] == "ilike"
        run = client.graders.run(grader=NAMES_IT, model_sample="The Apple is red.", item={"thing": "apple"})
        assert run.reward == 1.0 and run.metadata.errors == []
        sample = {"output_text": "no", "finish_reason": "length", "output_tokens": 1}
        assert client.graders.run(grader=LIKE_YES, model_sample=sample).reward == 0.0
        with pytest.raises(alignd.ValidationError) as info:
            client.graders.validate(grader={"type": "python", "name": "p", "source": "x"})
        assert info.value.code == "grader_kind_not_allowed"


def test_async_graders(live_server: Any) -> None:
    async def go() -> tuple[float, list[str]]:
        async with alignd.AsyncClient(base_url=live_server.base_url, api_key=live_server.api_key) as client:
            run = await client.graders.run(grader=LIKE_YES, model_sample="yes sir")
            checked = await client.graders.validate(grader=NAMES_IT)
            return run.reward, checked.item_fields

    assert asyncio.run(go()) == (1.0, ["thing"])


def test_evals_create_retrieve_and_table(live_server: Any, tmp_path: Path) -> None:
    with _client(live_server) as client:
        model, prompts = _inputs(client, live_server, tmp_path)
        job = client.evals.create(
            base_model=model,
            prompts=prompts,
            candidates=[{"name": "base"}, {"name": "again"}],
            graders=[LIKE_YES, NAMES_IT],
            sampling={"max_new_tokens": 6},
            seed=1,
        )
        assert job.method == "evaluate" and job.evaluation is not None
        assert job.evaluation["baseline"] == "base" and job.evaluation["sampling"]["temperature"] == 0
        with pytest.raises(alignd.ConflictError):
            client.evals.retrieve(job.id)  # queued or running: no evaluation yet
        client.jobs.wait(job.id, timeout=240, poll_interval=0.5)
        evaluation = client.evals.retrieve(job.id)
        rows = client.evals.prompts(job.id)
        metrics = client.jobs.metrics(job.id)
        assert [m.seq for m in client.jobs.metrics(job.id, after=metrics[0].seq)] == [
            m.seq for m in metrics[1:]
        ]
    assert [p.index for p in rows] == list(range(len(PROMPTS)))
    assert all([a.candidate for a in p.answers] == ["base", "again"] for p in rows)
    assert all(
        set(a.scores) == {"yes", "names_it"} and a.answer == p.answers[0].answer
        for p in rows
        for a in p.answers
    )
    assert evaluation.baseline == "base" and evaluation.num_prompts == len(PROMPTS)
    again = evaluation.candidate("again").graders["yes"]
    assert again.win_rate == 0.5 and again.win_rate_ci_low == 0.5 == again.win_rate_ci_high
    assert evaluation.candidate("base").graders["yes"].win_rate is None
    assert evaluation.per_prompt_artifact and evaluation.per_prompt_artifact.startswith("art_")
    table = evaluation.table()
    assert "win rate vs base" in table and "0.500 [0.500, 0.500]" in table
    assert [line.split()[:2] for line in table.splitlines() if line.startswith("again ")][-2:] == [
        ["again", "yes"],
        ["again", "names_it"],
    ]

    # The CLI prints the same table, or the object with --json; a refused spec exits 3.
    base = ["--base-url", live_server.base_url, "--api-key", live_server.api_key]
    printed = tmp_path / "out.txt"
    with printed.open("w") as out:
        assert main(["evals", "show", job.id, *base], stdout=out) == EXIT_OK
    assert printed.read_text() == table
    with printed.open("w") as out:
        assert main(["evals", "show", job.id, "--json", *base], stdout=out) == EXIT_OK
    assert json.loads(printed.read_text())["candidates"][1]["name"] == "again"
    bad = ["evals", "create", "--base-model", model, "--prompts", prompts, "--candidate", "base"]
    bad += ["--baseline", "nope", "--grader", json.dumps(LIKE_YES), *base]
    assert main(bad) == EXIT_VALIDATION


def test_cli_evals_create_waits_and_prints_the_table(
    live_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _client(live_server) as client:
        model, prompts = _inputs(client, live_server, tmp_path)
    graders = tmp_path / "graders.json"
    graders.write_text(json.dumps([LIKE_YES, NAMES_IT]))
    argv = ["evals", "create", "--base-model", model, "--prompts", prompts, "--candidate", "base"]
    argv += ["--candidate", "twin", "--grader", f"@{graders}", "--max-new-tokens", "4", "--wait"]
    argv += ["--no-progress", "--poll-interval", "0.5", "--base-url", live_server.base_url]
    assert main([*argv, "--api-key", live_server.api_key]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith(f"{len(PROMPTS)} prompts x 1 samples; baseline base")
    assert "twin" in out and "names_it" in out
    assert (
        main(
            ["evals", "create", "--base-model", model, "--prompts", prompts, "--candidate", "x=", *argv[-4:]]
        )
        == 2
    )
