"""Labels that count, over REST on the tiny model: a reward model scores a feedback set's items (a ``score``
job), /next serves the smallest margins first, a refresh continues the reward model after N labels and
re-scores, and an AI judge labels every item in both orders beside people: the untrained base (mostly skips)
and an SFT-tuned judge adapter whose every verdict becomes a label in the ratings and the agreement report.
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.conftest import LiveServer
from tests.service.helpers import artifact_of, assert_error, jsonl, run_job, upload_dataset, upload_model

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
WORDS = ["red", "blue", "green", "sky", "tree", "river", "stone", "cloud"]
CANDIDATES = [
    {
        "prompt": f"Say something about {w}.",
        "responses": [f"{w}.", f"The {w} is here, and it is {w}er still."],
    }
    for w in WORDS
]


def _annotate(client: httpx.Client, fbs: str, annotator: str, limit: int) -> list[dict[str, Any]]:
    """A scripted person (longer is better): returns the items they were served, in order."""
    served = []
    for _ in range(limit):
        response = client.get(f"/v1/feedback-sets/{fbs}/next", params={"annotator": annotator})
        if response.status_code == 204:
            break
        item = response.json()
        served.append(item)
        ranking = [r["id"] for r in sorted(item["responses"], key=lambda r: -len(r["text"]))]
        label = client.post(
            f"/v1/feedback-sets/{fbs}/labels",
            json={"item": item["id"], "annotator": annotator, "ranking": ranking},
        )
        assert label.status_code == 201, label.text
    return served


def _until(client: httpx.Client, fbs: str, done: Any, timeout: float = 180) -> dict[str, Any]:
    """GET the set (which reads its finished jobs back) until ``done(set)``."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get(f"/v1/feedback-sets/{fbs}").json()
        if done(body):
            return body
        assert time.monotonic() < deadline, body["events"]
        time.sleep(0.3)


def _reward_model(client: httpx.Client, model: str) -> str:
    preference = [
        {"prompt": c["prompt"], "chosen": c["responses"][1], "rejected": c["responses"][0]}
        for c in CANDIDATES
    ]
    dataset = upload_dataset(client, jsonl(preference), "preference").json()["id"]
    job = {
        "method": "reward_model",
        "base_model": model,
        "datasets": {"preference": dataset},
        "lora": LORA,
        "hyperparameters": {"max_steps": 2, "batch_size": 4, "learning_rate": 5e-3, "max_length": 64},
        "seed": 0,
    }
    return str(artifact_of(client, run_job(client, job, timeout=180), "reward_model")["id"])


def test_uncertainty_ordering_refresh_and_judge(live_server: LiveServer) -> None:
    with live_server.client() as client:
        model = upload_model(client, live_server.tiny_model_dir).json()["id"]
        reward_model = _reward_model(client, model)
        candidates = upload_dataset(client, jsonl(CANDIDATES), "candidates").json()["id"]
        fbs = client.post(
            "/v1/feedback-sets",
            json={
                "name": "active",
                "candidates": candidates,
                "annotations_per_item": 2,
                "ordering": "uncertainty",
                "reward_model": reward_model,
                "refresh_every_labels": 4,
                "refresh_from": "initial",
                "gold_every": 0,
                "guidelines": "# Prefer\n- the **longer** answer",
            },
        ).json()
        assert (fbs["ordering"], fbs["scoring"]["in_flight"]["stage"]) == ("uncertainty", "score")
        with live_server.client(live_server.other_api_key) as other:  # another tenant's reward model: unknown
            theirs = upload_dataset(other, jsonl(CANDIDATES), "candidates").json()["id"]
            body = {
                "name": "x",
                "candidates": theirs,
                "ordering": "uncertainty",
                "reward_model": reward_model,
            }
            assert_error(other.post("/v1/feedback-sets", json=body), 422, "unknown_artifact")
        scored = _until(client, fbs["id"], lambda s: s["scoring"]["scored_by"] == reward_model)
        assert scored["events"][-1]["kind"] == "scored", scored["events"]
        items = client.get(f"/v1/feedback-sets/{fbs['id']}/ratings").json()["items"]
        margins = sorted(abs(i["rewards"][0] - i["rewards"][1]) for i in items)
        assert margins == sorted(i["margin"] for i in items)

        # the known margins, smallest first; every item gets its 2 annotators before a surer one gets any
        first = _annotate(client, fbs["id"], "ann", 2)
        second = _annotate(client, fbs["id"], "bob", 2)
        assert [i["reason"] for i in first + second] == ["margin"] * 4
        assert [round(i["margin"], 5) for i in first] == [round(m, 5) for m in margins[:2]]
        assert {i["id"] for i in first} == {i["id"] for i in second}  # overlap first, then the next margins
        third = _annotate(client, fbs["id"], "cy", 1)
        assert third[0]["id"] not in {i["id"] for i in first}
        assert round(third[0]["margin"], 5) == round(margins[2], 5)

        # 5 labels >= refresh_every_labels: a reward_model job continues the model, then a score job re-scores
        refreshed = _until(
            client, fbs["id"], lambda s: s["scoring"]["refreshes"] == 1 and not s["scoring"]["in_flight"]
        )
        kinds = [e["kind"] for e in refreshed["events"]]
        assert kinds[-3:] == ["refresh", "refreshed", "scored"], refreshed["events"]
        assert refreshed["scoring"]["scored_by"] != reward_model
        assert refreshed["scoring"]["last_refresh_labels"] == 4  # started by cy's /next, after 4 labels
        first_refresh = refreshed["scoring"]["scored_by"]

        # 4 more labels: a second refresh, which (refresh_from "initial") continues the set's own reward model
        # on all 8 labels, not the first refresh's model
        _annotate(client, fbs["id"], "dee", 3)
        again = _until(
            client, fbs["id"], lambda s: s["scoring"]["refreshes"] == 2 and not s["scoring"]["in_flight"]
        )
        assert (again["refresh_from"], again["scoring"]["last_refresh_labels"]) == ("initial", 8)
        assert again["scoring"]["scored_by"] not in (reward_model, first_refresh)
        jobs = [e["job"] for e in again["events"] if e["kind"] == "refresh"]
        continued = [client.get(f"/v1/jobs/{job}").json()["init_reward_model"] for job in jobs]
        assert continued == [reward_model, reward_model]
        bad = {"name": "x", "candidates": candidates, "refresh_from": "newest"}
        assert_error(client.post("/v1/feedback-sets", json=bad), 422, "invalid_refresh_from")


def _labelled_set(
    client: httpx.Client, live_server: LiveServer, items: list[dict[str, Any]], guidelines: str
) -> tuple[str, dict[str, Any]]:
    """(the tiny model's id, a feedback set of ``items`` with two labels per item: ann's and bob's)."""
    model = upload_model(client, live_server.tiny_model_dir).json()["id"]
    candidates = upload_dataset(client, jsonl(items), "candidates").json()["id"]
    fbs: dict[str, Any] = client.post(
        "/v1/feedback-sets",
        json={
            "name": "judged",
            "candidates": candidates,
            "annotations_per_item": 2,
            "gold_every": 0,
            "guidelines": guidelines,
        },
    ).json()
    for who in ("ann", "bob"):
        _annotate(client, fbs["id"], who, len(items))
    return model, fbs


def test_judge_labels_beside_people(live_server: LiveServer) -> None:
    with live_server.client() as client:
        model, fbs = _labelled_set(client, live_server, CANDIDATES[:4], "Prefer the longer answer.")
        with live_server.client(live_server.other_api_key) as other:  # another tenant's model judges nothing
            theirs = upload_dataset(other, jsonl(CANDIDATES[:1]), "candidates").json()["id"]
            own = other.post("/v1/feedback-sets", json={"name": "b", "candidates": theirs}).json()["id"]
            judge = {"name": "tiny", "model": model}
            assert_error(other.post(f"/v1/feedback-sets/{own}/judges", json=judge), 422, "unknown_model")
            assert_error(
                other.post(f"/v1/feedback-sets/{fbs['id']}/judges", json=judge), 404, "feedback_set_not_found"
            )
        # an AI judge (the base model) labels every item in both presentation orders
        added = client.post(f"/v1/feedback-sets/{fbs['id']}/judges", json={"name": "tiny", "model": model})
        assert added.status_code == 202, added.text
        assert (
            client.post(
                f"/v1/feedback-sets/{fbs['id']}/judges", json={"name": "tiny", "model": model}
            ).status_code
            == 409
        )
        judged = _until(client, fbs["id"], lambda s: s["judges"][0]["status"] != "running")
        judge = judged["judges"][0]
        assert judge["status"] == "done" and judge["asked"] == 4, judge
        assert judge["consistent"] + judge["inconsistent"] + judge["unparsed"] == 4
        ratings = client.get(f"/v1/feedback-sets/{fbs['id']}/ratings").json()
        annotators = client.get(f"/v1/feedback-sets/{fbs['id']}/annotators").json()["annotators"]
        report = {a["annotator"]: a for a in annotators}
        assert report["judge:tiny"]["judge"] and report["judge:tiny"]["labels"] == judge["labels"]
        assert (report["ann"]["reasons"], report["bob"]["reasons"]) == (
            {"random": 4},
            {"overlap": 4},
        ) and report["ann"]["median_seconds_per_label"] is not None
        assert [j["annotator"] for j in ratings["judges"]] == ["judge:tiny"]
        # The untrained base is a poor judge (on this seed it names the same position whatever the order):
        # a pair without a consistent verdict is a skip, one with it a label (the fine-tuned judge's test
        # below has every pair labelled).
        assert report["judge:tiny"]["skips"] == 4 - judge["labels"]
        assert sum(i["num_labels"] for i in ratings["items"]) == 8 + judge["labels"]

        # the same base judging by log-odds: its lean to a position cancels between the two orders, so every
        # pair gets a verdict
        lp = {"name": "tiny-lp", "model": model, "verdict": "logprobs"}
        assert client.post(f"/v1/feedback-sets/{fbs['id']}/judges", json=lp).status_code == 202
        judged = _until(client, fbs["id"], lambda s: s["judges"][1]["status"] != "running")
        by_logprobs = judged["judges"][1]
        assert (by_logprobs["status"], by_logprobs["verdict"], by_logprobs["labels"]) == (
            "done",
            "logprobs",
            4,
        )
        assert isinstance(by_logprobs["position_bias"], float) and judge["verdict"] == "answer"
        report = {
            a["annotator"]: a
            for a in client.get(f"/v1/feedback-sets/{fbs['id']}/annotators").json()["annotators"]
        }
        assert (report["judge:tiny-lp"]["labels"], report["judge:tiny-lp"]["skips"]) == (4, 0)
        bad = {"name": "x", "model": model, "verdict": "vibes"}
        assert client.post(f"/v1/feedback-sets/{fbs['id']}/judges", json=bad).status_code == 422


def _judge_adapter(client: httpx.Client, model: str, guidelines: str, items: list[dict[str, Any]]) -> str:
    """An SFT adapter that answers the judge's question, in both orders, the way the people do (longer is
    better) on these items: a fine-tuned judge, as a user would train one on their own verdicts."""
    from workers.training.feedback_jobs import JUDGE_QUESTION, JUDGE_SYSTEM

    system = JUDGE_SYSTEM.format(rubric=guidelines)
    examples = []
    for item in items:
        short, long = sorted(item["responses"], key=len)
        for first, second, better in ((short, long, "2"), (long, short, "1")):
            question = JUDGE_QUESTION.format(prompt=item["prompt"], first=first, second=second)
            examples.append(
                {
                    "messages": [
                        {"role": "system", "content": system},
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": better},
                    ]
                }
            )
    dataset = upload_dataset(client, jsonl(examples), "sft").json()["id"]
    job = {
        "method": "sft",
        "base_model": model,
        "datasets": {"sft": dataset},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "hyperparameters": {
            "epochs": 60,  # one step per epoch: accuracy 1.0 from about step 30
            "batch_size": len(examples),
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "max_length": 512,
        },
        "seed": 0,
    }
    return str(artifact_of(client, run_job(client, job, timeout=300), "adapter")["id"])


def test_a_fine_tuned_judge_labels_beside_people_and_its_agreement_is_reported(
    live_server: LiveServer,
) -> None:
    guidelines = "Prefer the longer answer."
    items = CANDIDATES[:4]
    with live_server.client() as client:
        model, fbs = _labelled_set(client, live_server, items, guidelines)
        adapter = _judge_adapter(client, model, guidelines, items)
        added = client.post(f"/v1/feedback-sets/{fbs['id']}/judges", json={"name": "tuned", "model": adapter})
        assert added.status_code == 202, added.text
        judged = _until(client, fbs["id"], lambda s: s["judges"][0]["status"] != "running")
        judge = judged["judges"][0]
        # every pair answered in both orders, the same response named both times: one label per item
        assert judge["status"] == "done", judge
        assert (judge["asked"], judge["consistent"], judge["labels"]) == (4, 4, 4), judge
        assert judge["first_position_share"] == 0.5
        ratings = client.get(f"/v1/feedback-sets/{fbs['id']}/ratings").json()
        assert sum(i["num_labels"] for i in ratings["items"]) == 8 + 4
        (agreement,) = ratings["judges"]
        assert agreement["annotator"] == "judge:tuned"
        # it agrees with both people, and with their majority, on all four items (longer is better to all)
        assert agreement["with_people"] == {"ann": 1.0, "bob": 1.0}, agreement
        assert (agreement["with_majority"], agreement["majority_comparisons"]) == (1.0, 4), agreement
        annotators = client.get(f"/v1/feedback-sets/{fbs['id']}/annotators").json()["annotators"]
        report = {a["annotator"]: a for a in annotators}
        assert report["judge:tuned"]["judge"] and report["judge:tuned"]["labels"] == 4
        assert report["judge:tuned"]["skips"] == 0
