"""``client.feedback_sets`` and ``alignd feedback ...`` against the real server (the ``live_server`` fixture)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import alignd
import pytest
from alignd.cli import main

CANDIDATES = [
    {"prompt": "Name a colour.", "responses": ["Red.", "A chair.", "Blue, the colour of the sky."]},
    {"prompt": "Say hi.", "responses": ["Hi!", "Hello there, friend."]},
]


def test_sdk_feedback_round_and_cli(
    live_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "candidates.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CANDIDATES))
    with alignd.Client(base_url=live_server.base_url, api_key=live_server.api_key) as client:
        dataset = client.datasets.upload(path, kind="candidates", name="cands")
        fbs = client.feedback_sets.create(name="sdk", candidates=dataset.id, round=2)
        assert isinstance(fbs, alignd.FeedbackSet) and fbs.id.startswith("fbs_") and fbs.round == 2
        while (item := client.feedback_sets.next(fbs.id, annotator="sdk")) is not None:
            best_first = [r.id for r in sorted(item.responses, key=lambda r: -len(r.text))]
            label = client.feedback_sets.label(fbs.id, item=item.id, annotator="sdk", ranking=best_first)
            assert label.kind == "ranking"
        with pytest.raises(alignd.ValidationError) as info:
            client.feedback_sets.label(fbs.id, item="fbi_nope", annotator="sdk", ranking=["x"])
        assert info.value.code == "unknown_item"
        ratings = client.feedback_sets.ratings(fbs.id)
        assert ratings.progress is not None and ratings.progress.items_complete == 2
        exported = client.feedback_sets.export(fbs.id, min_labels=1)
        assert (exported.kind, exported.feedback_set, exported.round) == ("ranking", fbs.id, 2)
        assert [d.id for d in client.datasets.list(round=2)] == [exported.id]
        assert [s.id for s in client.feedback_sets.list(round=2)] == [fbs.id]
        assert client.feedback_sets.get(fbs.id).progress.labels == 2  # type: ignore[union-attr]
        # the set's newer fields: guidelines, the annotator report, export weighting, judges' refusals
        updated = client.feedback_sets.update(fbs.id, guidelines="# Be *kind*", gold_every=0)
        assert (updated.guidelines, updated.gold_every, updated.ordering) == ("# Be *kind*", 0, "random")
        report = client.feedback_sets.annotators(fbs.id)
        assert [a["annotator"] for a in report.annotators] == ["sdk"] and report.annotators[0]["labels"] == 2
        weighted = client.feedback_sets.export(
            fbs.id, judge_labels="down_weight", annotator_weights="agreement"
        )
        assert weighted.kind == "ranking"
        with pytest.raises(alignd.ValidationError) as info:
            client.feedback_sets.add_judge(fbs.id, name="j", model="model_nope", verdict="logprobs")
        assert info.value.code == "unknown_model"
        with pytest.raises(
            alignd.ValidationError
        ) as info:  # the SDK sends refresh_from; the server checks it
            client.feedback_sets.create(name="x", candidates=dataset.id, refresh_from="newest")
        assert info.value.code == "invalid_refresh_from"
        assert fbs.refresh_from == "latest"
        with pytest.raises(alignd.ValidationError) as info:
            client.feedback_sets.create(name="x", candidates=dataset.id, ordering="uncertainty")
        assert info.value.code == "missing_reward_model"

    async def async_side() -> None:
        async with alignd.AsyncClient(base_url=live_server.base_url, api_key=live_server.api_key) as client:
            assert (await client.feedback_sets.get(fbs.id)).id == fbs.id
            assert await client.feedback_sets.next(fbs.id, annotator="sdk") is None
            assert [s.id async for s in client.feedback_sets.list()] == [fbs.id]
            assert (await client.feedback_sets.update(fbs.id, routing="all")).routing == "all"
            with pytest.raises(alignd.ValidationError) as info:
                await client.feedback_sets.create(name="x", candidates=dataset.id, refresh_from="newest")
            assert info.value.code == "invalid_refresh_from"
            assert (await client.feedback_sets.annotators(fbs.id)).annotators[0]["annotator"] == "sdk"

    asyncio.run(async_side())

    cli = ["--base-url", live_server.base_url, "--api-key", live_server.api_key]
    assert main([*cli, "feedback", "ratings", fbs.id]) == 0
    assert "agreement" in capsys.readouterr().out
    assert main([*cli, "--json", "feedback", "list"]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)] == [fbs.id]
    assert main([*cli, "feedback", "next", fbs.id, "--annotator", "new"]) == 0
    assert "nothing left" in capsys.readouterr().out  # each item wanted one label and has it
    item_id = ratings.items[0].item
    assert main([*cli, "feedback", "label", fbs.id, "--item", item_id, "--annotator", "new", "--skip"]) == 0
    capsys.readouterr()
    assert main([*cli, "feedback", "label", fbs.id, "--item", "fbi_nope", "--annotator", "x", "--skip"]) == 3
    assert main([*cli, "feedback", "delete", fbs.id]) == 0
    assert main([*cli, "feedback", "get", fbs.id]) == 4
