"""One human-feedback round with the SDK: generate -> feedback set -> (scripted) annotators -> export ->
reward model -> PPO from the previous policy.

    python examples/feedback_round.py --base-url http://127.0.0.1:8000 --model model_... [--api-key KEY]
        [--policy art_...] [--reward-model art_...] [--round 1] [--annotate-in-browser]

Needs a running server (``alignd-server serve``) and a base model uploaded to it (SmolLM2-135M-Instruct via
``examples/prepare_base_model.py``, or any small causal LM; the test suite's tiny random Llama works too).
``--policy`` is the previous round's policy adapter (e.g. the SFT adapter of round 0): candidates are sampled
from it and PPO continues it. ``--reward-model`` continues the previous round's reward model.

PPO runs only on a reward model that passes its quality gate (held-out pair accuracy >= its
``min_eval_accuracy``, 0.6 by default, on >= ``min_eval_pairs`` held-out pairs, 20 by default): the server
refuses the PPO job with ``reward_model_too_weak`` otherwise, and the round says so and keeps the previous
policy. ``--allow-weak-reward-model`` runs PPO anyway (with a printed warning). Each prompt's ranking is held
out whole, so the held-out pairs are about ``eval_fraction`` x prompts x K(K-1)/2 (K answers per prompt): the
default 6 prompts at K=4 hold out about 6, too few; ``--reward-eval-fraction`` and more prompts raise it.

The annotators here are a script: "a shorter answer that ends in a full stop is better", a simple rule that
stands in for people so that the round runs unattended. With ``--annotate-in-browser`` the script prints the
labeling page's URL and waits until people have labelled every item (``GET /label/{feedback_set_id}``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import alignd

PROMPTS = [
    "What is the capital of Italy?",
    "How many legs does a dog have?",
    "What colour is a banana?",
    "Name a planet.",
    "What do bees make?",
    "Which animal says moo?",
]
SCRIPTED_ANNOTATORS = ("rule-a", "rule-b")


def scripted_preference(text: str) -> tuple[int, int]:
    """Sort key, best first: answers that end a sentence first, then shorter ones."""
    return (0 if text.rstrip().endswith((".", "!", "?")) else 1, len(text))


def annotate(client: alignd.Client, feedback_set_id: str, annotator: str) -> int:
    """Label every item /next hands this annotator; returns how many."""
    labelled = 0
    while (item := client.feedback_sets.next(feedback_set_id, annotator=annotator)) is not None:
        ranking = [r.id for r in sorted(item.responses, key=lambda r: scripted_preference(r.text))]
        client.feedback_sets.label(feedback_set_id, item=item.id, annotator=annotator, ranking=ranking)
        labelled += 1
    return labelled


def wait_for_people(client: alignd.Client, feedback_set_id: str, base_url: str) -> None:
    print(f"label at {base_url.rstrip('/')}/label/{feedback_set_id}  (waiting until every item is labelled)")
    while True:
        progress = client.feedback_sets.get(feedback_set_id).progress
        if progress is not None and progress.items_complete >= progress.items:
            return
        time.sleep(5)


def run_job(client: alignd.Client, **body: object) -> alignd.Job:
    job = client.jobs.create(**body)
    print(f"{job.method} job {job.id} submitted")
    return client.jobs.wait(job.id, progress=True)


@dataclass
class RoundResult:
    policy: str | None  # the new PPO policy, or the round's input policy when PPO was refused
    reward_model: str
    reward_accuracy: float | None
    agreement: float | None
    ppo_refused: str | None = None  # the server's reward_model_too_weak message, when PPO did not run


def run_ppo(
    client: alignd.Client,
    body: dict[str, Any],
    hyperparameters: dict[str, Any],
    *,
    allow_weak_reward_model: bool,
) -> alignd.Job | str:
    """The round's PPO job, or the server's refusal (a reward model too weak to drive PPO) as text."""
    if allow_weak_reward_model:
        print(
            "WARNING: allow_weak_reward_model is set: PPO runs even if the reward model fails its quality "
            "gate, and may optimise noise"
        )
        hyperparameters = {**hyperparameters, "allow_weak_reward_model": True}
    try:
        return run_job(client, **body, hyperparameters=hyperparameters)
    except alignd.ValidationError as exc:
        if exc.code != "reward_model_too_weak":
            raise
        return exc.message


def run_round(
    client: alignd.Client,
    *,
    model: str,
    prompts: list[str],
    policy: str | None,
    reward_model: str | None,
    round: int,
    num_responses: int = 4,
    max_new_tokens: int = 48,
    ppo_steps: int = 4,
    ppo_epochs: int = 4,
    reward_epochs: int = 4,
    reward_eval_fraction: float = 0.2,
    lora: dict[str, object] | None = None,
    annotate_in_browser: bool = False,
    allow_weak_reward_model: bool = False,
) -> RoundResult:
    """One round: candidates from ``policy`` -> feedback -> ranking -> reward model -> PPO from ``policy``
    (PPO only when the reward model passes its quality gate, unless ``allow_weak_reward_model``)."""
    lora = lora or {"r": 8, "alpha": 16, "dropout": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        prompts_path = Path(tmp) / "prompts.jsonl"
        prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        prompt_set = client.datasets.upload(prompts_path, kind="prompts", name=f"round {round} prompts")

    # 1. candidates from the current policy
    generate = run_job(
        client,
        method="generate",
        base_model=model,
        datasets={"prompts": prompt_set.id},
        init_adapter=policy,
        hyperparameters={
            "num_responses": num_responses,
            "max_new_tokens": max_new_tokens,
            "temperature": 1.0,
        },
        extra_body={"round": round},
        seed=round,
    )
    candidates = client.datasets.list(job=generate.id).data[0]
    print(f"candidates: {candidates.id} ({candidates.num_records} prompts)")

    # 2. a feedback set; 3. annotators
    feedback = client.feedback_sets.create(
        name=f"round {round}", candidates=candidates.id, annotations_per_item=2
    )
    if annotate_in_browser:
        wait_for_people(client, feedback.id, client.base_url)
    else:
        for annotator in SCRIPTED_ANNOTATORS:
            print(f"{annotator} labelled {annotate(client, feedback.id, annotator)} items")
    ratings = client.feedback_sets.ratings(feedback.id)
    agreement = ratings.agreement.pairwise if ratings.agreement else None
    print(f"agreement between annotators: {agreement}")

    # 4. export the rated items as a ranking dataset
    ranking = client.feedback_sets.export(feedback.id, min_labels=2, min_agreement=0.5)
    print(f"ranking dataset: {ranking.id} ({ranking.num_records} prompts)")

    # 5. the reward model (continuing last round's, if given)
    reward = run_job(
        client,
        method="reward_model",
        base_model=model,
        datasets={"preference": ranking.id},
        lora=lora,
        hyperparameters={
            "epochs": reward_epochs,
            "batch_size": 12,
            "learning_rate": 1e-4,
            "eval_fraction": reward_eval_fraction,
        },
        extra_body={"round": round, **({"init_reward_model": reward_model} if reward_model else {})},
    )
    accuracy = client.jobs.metrics(reward.id).latest("eval_accuracy")
    print(f"reward model held-out pair accuracy: {accuracy.value if accuracy else 'n/a'}")
    new_reward_model = next(a for a in client.jobs.artifacts(reward.id) if a.kind == "reward_model")
    result = RoundResult(
        policy=policy,
        reward_model=new_reward_model.id,
        reward_accuracy=accuracy.value if accuracy else None,
        agreement=agreement,
    )

    # 6. PPO from the previous policy against the new reward model (if the server lets it drive PPO)
    ppo = run_ppo(
        client,
        {
            "method": "ppo",
            "base_model": model,
            "datasets": {"prompts": prompt_set.id},
            "init_adapter": policy,
            "reward_model": new_reward_model.id,
            "lora": lora,
            "extra_body": {"round": round},
        },
        {"steps": ppo_steps, "ppo_epochs": ppo_epochs, "batch_size": 4, "max_new_tokens": max_new_tokens},
        allow_weak_reward_model=allow_weak_reward_model,
    )
    if isinstance(ppo, str):
        print(f"PPO refused by the server (reward_model_too_weak): {ppo}")
        print(
            "this round keeps the previous policy; label more items or hold out more pairs and run it again"
        )
        result.ppo_refused = ppo
        return result
    result.policy = next(a for a in client.jobs.artifacts(ppo.id) if a.kind == "adapter").id
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--model", required=True, help="base model id (model_...)")
    parser.add_argument("--policy", help="previous round's policy adapter (art_...)")
    parser.add_argument("--reward-model", help="previous round's reward model to continue (art_...)")
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--num-responses", type=int, default=4)
    parser.add_argument("--ppo-steps", type=int, default=4)
    parser.add_argument("--reward-eval-fraction", type=float, default=0.2)
    parser.add_argument("--annotate-in-browser", action="store_true")
    parser.add_argument(
        "--allow-weak-reward-model",
        action="store_true",
        help="run PPO even on a reward model that fails its quality gate (prints a warning)",
    )
    args = parser.parse_args()
    with alignd.Client(base_url=args.base_url, api_key=args.api_key) as client:
        result = run_round(
            client,
            model=args.model,
            prompts=PROMPTS,
            policy=args.policy,
            reward_model=args.reward_model,
            round=args.round,
            num_responses=args.num_responses,
            ppo_steps=args.ppo_steps,
            reward_eval_fraction=args.reward_eval_fraction,
            annotate_in_browser=args.annotate_in_browser,
            allow_weak_reward_model=args.allow_weak_reward_model,
        )
    policy = f" --policy {result.policy}" if result.policy else ""
    print(
        f"round {args.round} done{' without PPO' if result.ppo_refused else ''}: policy {result.policy}, "
        f"reward model {result.reward_model}\n"
        f"next round: --round {args.round + 1}{policy} --reward-model {result.reward_model}"
    )


if __name__ == "__main__":
    main()
