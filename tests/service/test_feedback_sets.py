"""Feedback sets over the REST API: create, /next, labels (and every bad-label code), ratings, export, tenants."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest

from tests.conftest import API_KEYS
from tests.service.helpers import assert_error, jsonl, upload_dataset

CANDIDATES = [
    {"prompt": "Name a colour.", "responses": ["Red.", "A chair.", "Blue, the sky's colour."]},
    {"prompt": [{"role": "user", "content": "Say hi."}], "responses": ["Hi!", "Go away.", "Hello there!"]},
    {"prompt": "2+2?", "responses": ["4", "Four.", "It is 22."]},  # distinct lengths: the rule is strict
]
OTHER = {"Authorization": f"Bearer {API_KEYS['tenant-b']}"}


@pytest.fixture
def candidates(api: httpx.Client) -> str:
    response = upload_dataset(api, jsonl(CANDIDATES), "candidates")
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    assert body["kind"] == "candidates" and body["job"] is None and body["round"] is None
    return str(body["id"])


def _set(api: httpx.Client, candidates: str, **extra: Any) -> dict[str, Any]:
    response = api.post("/v1/feedback-sets", json={"name": "round 1", "candidates": candidates, **extra})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def _texts(item: dict[str, Any]) -> dict[str, str]:
    return {r["id"]: r["text"] for r in item["responses"]}


def _best_first(item: dict[str, Any]) -> list[str]:
    """A scripted annotator: longer answers are better."""
    return [r["id"] for r in sorted(item["responses"], key=lambda r: -len(r["text"]))]


def test_malformed_ranking_upload_is_422_with_lines_and_stores_nothing(api: httpx.Client) -> None:
    lines = [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 2, 1]},
        {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]},
        {"prompt": "p", "responses": ["a"], "ranking": [0]},
        {"prompt": "p", "responses": ["a", "a"], "scores": [1, 2]},
        {"prompt": "p", "responses": ["a", "b"], "scores": [1]},
    ]
    error = assert_error(upload_dataset(api, jsonl(lines), "ranking"), 422, "invalid_dataset")
    assert [(d["line"], d["code"]) for d in error["details"]] == [
        (2, "invalid_ranking"),
        (3, "too_few_responses"),
        (4, "duplicate_response"),
        (5, "scores_length_mismatch"),
    ]
    assert api.get("/v1/datasets").json()["data"] == []
    ok = upload_dataset(api, jsonl(lines[:1]), "ranking")
    assert ok.status_code == 201 and ok.json()["kind"] == "ranking"


def test_feedback_loop_over_rest(api: httpx.Client, candidates: str) -> None:
    assert_error(
        api.post("/v1/feedback-sets", json={"name": "x", "candidates": "ds_nope"}), 422, "unknown_dataset"
    )
    prompts = upload_dataset(api, jsonl([{"prompt": "p"}]), "prompts").json()["id"]
    assert_error(
        api.post("/v1/feedback-sets", json={"name": "x", "candidates": prompts}), 422, "wrong_dataset_kind"
    )
    fbs = _set(api, candidates, annotations_per_item=2, round=1)
    assert fbs["id"].startswith("fbs_") and fbs["object"] == "feedback_set"
    assert (fbs["num_items"], fbs["annotations_per_item"], fbs["round"]) == (3, 2, 1)
    assert fbs["progress"]["labels"] == 0
    base = f"/v1/feedback-sets/{fbs['id']}"

    first = api.get(f"{base}/next", params={"annotator": "ann"}).json()
    assert first["id"].startswith("fbi_") and len(first["responses"]) == 3
    assert set(_texts(first).values()) in [set(c["responses"]) for c in CANDIDATES]
    again = api.get(f"{base}/next", params={"annotator": "ann"}).json()
    assert again == first  # not labelled yet: the same item, in the same order

    # bad labels: each its code, none stored
    rid = [r["id"] for r in first["responses"]]
    bad: list[tuple[dict[str, Any], str]] = [
        ({"item": "fbi_nope", "ranking": rid}, "unknown_item"),
        ({"item": first["id"], "ranking": [rid[0], rid[1], "r_nope"]}, "unknown_response"),
        ({"item": first["id"], "ranking": [rid[0], rid[1]]}, "invalid_ranking"),
        ({"item": first["id"], "ranking": [rid[0], rid[0], rid[1]]}, "invalid_ranking"),
        ({"item": first["id"], "scores": {rid[0]: 1}}, "scores_length_mismatch"),
        ({"item": first["id"], "a": rid[0], "b": "r_nope", "winner": "a"}, "unknown_response"),
        ({"item": first["id"], "a": rid[0], "b": rid[0], "winner": "a"}, "same_response"),
        ({"item": first["id"]}, "invalid_label"),
        ({"item": first["id"], "ranking": rid, "winner": "a"}, "invalid_label"),
        ({"item": first["id"], "ranking": rid, "skip": True}, "invalid_label"),
    ]
    for body, code in bad:
        assert_error(api.post(f"{base}/labels", json={"annotator": "ann", **body}), 422, code)
    assert_error(
        api.post(f"{base}/labels", json={"annotator": "ann", "item": first["id"], "rank": rid}),
        422,
        "invalid_request",
    )
    assert api.get(f"{base}/ratings").json()["progress"]["labels"] == 0

    label = api.post(
        f"{base}/labels", json={"item": first["id"], "annotator": "ann", "ranking": _best_first(first)}
    )
    assert label.status_code == 201, label.text
    assert label.json()["id"].startswith("lbl_") and label.json()["kind"] == "ranking"
    assert_error(
        api.post(f"{base}/labels", json={"item": first["id"], "annotator": "ann", "ranking": rid}),
        422,
        "already_labelled",
    )
    assert_error(
        api.post(
            f"{base}/labels",
            json={"item": first["id"], "annotator": "ann", "a": rid[0], "b": rid[1], "winner": "b"},
        ),
        422,
        "already_labelled",
    )

    # a scripted round: two annotators, each item twice, never the same item twice to one annotator
    seen: dict[str, list[str]] = {"ann": [first["id"]], "bob": []}
    for annotator in ("ann", "bob", "ann", "bob", "ann", "bob"):
        response = api.get(f"{base}/next", params={"annotator": annotator})
        if response.status_code == 204:
            continue
        item = response.json()
        assert item["id"] not in seen[annotator]
        seen[annotator].append(item["id"])
        if annotator == "bob" and len(seen["bob"]) == 3:  # bob judges his last item pair by pair
            ids = _best_first(item)
            for x, y in ((ids[0], ids[1]), (ids[2], ids[1]), (ids[0], ids[2])):
                winner = "a" if ids.index(x) < ids.index(y) else "b"
                r = api.post(
                    f"{base}/labels",
                    json={"item": item["id"], "annotator": "bob", "a": x, "b": y, "winner": winner},
                )
                assert r.status_code == 201, r.text
            continue
        r = api.post(
            f"{base}/labels", json={"item": item["id"], "annotator": annotator, "ranking": _best_first(item)}
        )
        assert r.status_code == 201, r.text
    assert sorted(seen["ann"]) == sorted(seen["bob"]) and len(set(seen["ann"])) == 3
    assert api.get(f"{base}/next", params={"annotator": "ann"}).status_code == 204
    # a third annotator gets nothing: every item has its 2 annotations
    assert api.get(f"{base}/next", params={"annotator": "cy"}).status_code == 204
    skipper = _set(api, candidates)
    item = api.get(f"/v1/feedback-sets/{skipper['id']}/next", params={"annotator": "cy"}).json()
    skip = api.post(
        f"/v1/feedback-sets/{skipper['id']}/labels",
        json={"item": item["id"], "annotator": "cy", "skip": True},
    )
    assert skip.status_code == 201 and skip.json()["kind"] == "skip"
    assert (
        api.get(f"/v1/feedback-sets/{skipper['id']}/next", params={"annotator": "cy"}).json()["id"]
        != item["id"]
    )

    ratings = api.get(f"{base}/ratings").json()
    assert ratings["progress"] == {
        "items": 3,
        "items_labelled": 3,
        "items_complete": 3,
        "labels": 8,
        "skips": 0,
        "annotators": 2,
    }
    assert ratings["agreement"]["pairwise"] == 1.0 and ratings["agreement"]["overlapping_judgements"] == 9
    assert ratings["agreement"]["kendalls_w"] == pytest.approx(1.0)
    for entry in ratings["items"]:
        assert entry["num_labels"] == 2 and entry["agreement"] == 1.0
        by_id = {r["id"]: r for r in entry["responses"]}
        best = by_id[entry["order"][0]]
        assert best["elo"] > 1000 and best["bradley_terry"] > 0 and best["comparisons"] == 4

    assert_error(api.post(f"{base}/export", json={"min_labels": 3}), 422, "nothing_to_export")
    exported = api.post(f"{base}/export", json={"name": "r1 ranking", "min_labels": 2, "min_agreement": 0.9})
    assert exported.status_code == 201, exported.text
    dataset = exported.json()
    assert (dataset["kind"], dataset["num_records"], dataset["feedback_set"], dataset["round"]) == (
        "ranking",
        3,
        fbs["id"],
        1,
    )
    listed = api.get("/v1/datasets", params={"round": 1}).json()["data"]
    assert [d["id"] for d in listed] == [dataset["id"]]
    assert api.get("/v1/datasets", params={"round": 7}).json()["data"] == []

    # best first = the longest answer (the scripted rule), as a valid ranking dataset
    store_path = api.app_settings.data_dir / "storage" / "datasets" / f"{dataset['id']}.jsonl"  # type: ignore[attr-defined]
    assert store_path.exists()
    for line in store_path.read_text().splitlines():
        record = json.loads(line)
        best = record["responses"][record["ranking"][0]]
        assert len(best) == max(len(r) for r in record["responses"])

    listing = api.get("/v1/feedback-sets").json()
    assert listing["object"] == "list" and {s["id"] for s in listing["data"]} == {fbs["id"], skipper["id"]}
    assert [s["id"] for s in api.get("/v1/feedback-sets", params={"round": 1}).json()["data"]] == [fbs["id"]]


def test_another_tenants_feedback_set_is_404_and_untouched(api: httpx.Client, candidates: str) -> None:
    fbs = _set(api, candidates)
    base = f"/v1/feedback-sets/{fbs['id']}"
    item = api.get(f"{base}/next", params={"annotator": "ann"}).json()
    other = {"headers": OTHER}
    assert_error(api.get(base, **other), 404, "feedback_set_not_found")
    assert_error(api.get(f"{base}/next", params={"annotator": "x"}, **other), 404, "feedback_set_not_found")
    label = {"item": item["id"], "annotator": "x", "ranking": [r["id"] for r in item["responses"]]}
    assert_error(api.post(f"{base}/labels", json=label, **other), 404, "feedback_set_not_found")
    assert_error(api.get(f"{base}/ratings", **other), 404, "feedback_set_not_found")
    assert_error(api.post(f"{base}/export", json={}, **other), 404, "feedback_set_not_found")
    assert_error(api.delete(base, **other), 404, "feedback_set_not_found")
    assert api.get("/v1/feedback-sets", **other).json()["data"] == []
    # tenant B cannot build a set from tenant A's candidates either
    assert_error(
        api.post("/v1/feedback-sets", json={"name": "x", "candidates": candidates}, **other),
        422,
        "unknown_dataset",
    )
    assert api.get(f"{base}/ratings").json()["progress"]["labels"] == 0  # nothing was stored
    assert_error(api.get(f"{base}/next", params={"annotator": ""}), 422, "invalid_request")

    assert api.delete(base).status_code == 204
    assert_error(api.get(base), 404, "feedback_set_not_found")


def test_label_page_is_served(api: httpx.Client) -> None:
    page = api.get("/label/fbs_anything")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # The page's script is a versioned static file (service/api/static/label/label.js).
    script = re.search(r'src="(/ui/assets/[^"]+/label/label\.js)"', page.text)
    assert script is not None, page.text
    code = api.get(script.group(1)).text
    assert "/v1/feedback-sets/" in code and "sessionStorage" in code


def _write_rewards(api: httpx.Client, set_id: str, rewards: dict[int, list[float]]) -> None:
    """Known reward-model scores on the items, written as a score job's read-back writes them (position ->
    rewards), and the set switched to uncertainty ordering (which otherwise needs a trained reward model:
    tests/service/test_feedback_active.py runs that path)."""
    from sqlmodel import Session, create_engine, select

    from service.db.tables import FeedbackItemRow, FeedbackSetRow

    engine = create_engine(api.app_settings.resolved_database_url)  # type: ignore[attr-defined]
    try:
        with Session(engine) as session:
            for item in session.exec(select(FeedbackItemRow).where(FeedbackItemRow.set_id == set_id)):
                item.rewards = rewards[item.position]
                session.add(item)
            row = session.exec(select(FeedbackSetRow).where(FeedbackSetRow.id == set_id)).one()
            row.ordering = "uncertainty"
            session.add(row)
            session.commit()
    finally:
        engine.dispose()


def test_uncertainty_serves_smallest_margins_first_and_gold_flags(api: httpx.Client) -> None:
    rows: list[dict[str, Any]] = [
        {"prompt": f"p{i}", "responses": [f"short {i}", f"a longer answer {i}"]} for i in range(6)
    ]
    rows[5]["gold"] = 1  # the longer answer is the known best
    candidates = upload_dataset(api, jsonl(rows), "candidates").json()["id"]
    fbs = _set(api, candidates, annotations_per_item=2, gold_every=3, guidelines="Prefer *longer* answers.")
    assert (fbs["ordering"], fbs["guidelines"], fbs["gold_every"]) == (
        "random",
        "Prefer *longer* answers.",
        3,
    )
    # uncertainty ordering on known margins (the score job's output, written as its read-back writes it)
    _write_rewards(
        api,
        fbs["id"],
        {0: [0.0, 0.9], 1: [0.5, 0.45], 2: [1.0, -1.0], 3: [0.2, 0.0], 4: [0.3, 0.31], 5: [0, 0]},
    )
    base = f"/v1/feedback-sets/{fbs['id']}"
    positions = {i["item"]: n for n, i in enumerate(api.get(f"{base}/ratings").json()["items"])}
    served: dict[str, list[tuple[int, str, float | None]]] = {"ann": [], "bob": []}
    for annotator in ("ann", "bob", "ann", "bob", "ann", "bob"):
        item = api.get(f"{base}/next", params={"annotator": annotator}).json()
        served[annotator].append((positions[item["id"]], item["reason"], item["margin"]))
        good = [r["id"] for r in sorted(item["responses"], key=lambda r: -len(r["text"]))]
        ranking = good if annotator == "ann" else good[::-1]  # bob labels carelessly: shortest first
        assert (
            api.post(
                f"{base}/labels", json={"item": item["id"], "annotator": annotator, "ranking": ranking}
            ).status_code
            == 201
        )
    # margins 0.01 (item 4), 0.05 (item 1), then every third item is the gold one; overlap 2 holds
    assert [(p, r) for p, r, _ in served["ann"]] == [(4, "margin"), (1, "margin"), (5, "gold")]
    assert [p for p, _, _ in served["bob"]] == [4, 1, 5]
    assert served["ann"][0][2] == pytest.approx(0.01)
    nxt = api.get(f"{base}/next", params={"annotator": "cy"}).json()
    assert positions[nxt["id"]] == 3 and nxt["reason"] == "margin"  # 4 and 1 have their 2 annotators

    report = {a["annotator"]: a for a in api.get(f"{base}/annotators").json()["annotators"]}
    assert (
        report["bob"]["flagged"]
        and report["bob"]["gold_failed"] == 1
        and "gold" in report["bob"]["flag_reasons"][0]
    )
    assert not report["ann"]["flagged"] and report["ann"]["gold_labelled"] == 1
    assert report["ann"]["reasons"] == {"margin": 2, "gold": 1} and report["ann"][
        "mean_margin"
    ] == pytest.approx(0.03)
    assert report["ann"]["agreement_with_majority"] == 0.0 and report["ann"]["agreement_with"] == {"bob": 0.0}
    assert report["cy"]["items_served"] == 1 and report["cy"]["labels"] == 0
    assert report["ann"]["median_seconds_per_label"] >= 0

    ratings = api.get(f"{base}/ratings").json()
    assert ratings["agreement"]["pairwise"] == 0.0 and ratings["judges"] == []
    assert_error(api.post(f"{base}/export", json={"judge_labels": "sometimes"}), 422, "invalid_judge_labels")
    assert_error(
        api.post(f"{base}/export", json={"annotator_weights": "vibes"}), 422, "invalid_annotator_weights"
    )
    weighted = api.post(f"{base}/export", json={"annotator_weights": "agreement", "judge_labels": "exclude"})
    assert_error(
        weighted, 422, "nothing_to_export"
    )  # both disagree with the only other: weight 0, no preference
    assert_error(
        api.post(f"{base}/labels", json={"item": nxt["id"], "annotator": "judge:me", "skip": True}),
        422,
        "reserved_annotator",
    )


def test_bad_feedback_set_options_are_422(api: httpx.Client, candidates: str) -> None:
    def refused(code: str, **extra: Any) -> None:
        assert_error(
            api.post("/v1/feedback-sets", json={"name": "x", "candidates": candidates, **extra}), 422, code
        )

    refused("invalid_ordering", ordering="smart")
    refused("missing_reward_model", ordering="uncertainty")
    refused("unknown_artifact", ordering="uncertainty", reward_model="art_nope")
    refused("invalid_characters", guidelines="a\x00b")  # the input policy, before the rules
    refused("guidelines_too_long", guidelines="x" * 20_001)
    refused("invalid_routing", routing="people")
    refused("unexpected_field", refresh_every_labels=3)
    refused("invalid_request", gold_failure_threshold=2)
    gold = upload_dataset(
        api, jsonl([{"prompt": "p", "responses": ["a", "b"], "gold": [0, 0]}]), "candidates"
    )
    assert_error(
        api.post("/v1/feedback-sets", json={"name": "x", "candidates": gold.json()["id"]}),
        422,
        "invalid_gold",
    )
    # a model artifact of the wrong kind, and another tenant's reward model, are refused the same way
    assert api.get("/v1/feedback-sets").json()["data"] == []
    fbs = _set(api, candidates)
    base = f"/v1/feedback-sets/{fbs['id']}"
    assert_error(api.post(f"{base}/judges", json={"name": "j", "model": "model_nope"}), 422, "unknown_model")
    assert_error(api.post(f"{base}/judges", json={"name": "j", "model": "art_nope"}), 422, "unknown_artifact")
    assert_error(
        api.post(f"{base}/judges", json={"name": "bad name", "model": "model_x"}), 422, "invalid_request"
    )
    assert_error(api.patch(base, json={"guidelines": "\x00"}), 422, "invalid_characters")
    assert_error(api.patch(base, json={"routing": "x"}), 422, "invalid_routing")
    patched = api.patch(base, json={"guidelines": "## Be kind", "routing": "judge_reward_disagree"})
    assert patched.status_code == 200 and patched.json()["guidelines"] == "## Be kind"
    assert_error(
        api.post("/v1/jobs", json={"method": "score", "base_model": "model_x"}), 422, "method_not_available"
    )
    assert_error(api.patch(base, json={"guidelines": "x"}, headers=OTHER), 404, "feedback_set_not_found")
