"""One measured SFT run (alignd's ``train_sft`` or TRL's ``SFTTrainer``) in its own process.

Run by ``bench/sft_efficiency.py``::

    python bench/sft_child.py {alignd,trl} CONFIG.json RESULT.json

Both read the same messages-format JSONL (one user turn, one assistant turn), apply the model's chat template,
train LoRA (same r, alpha, dropout, targets) on completion tokens only, batch 8, max length 512, AdamW, one
epoch. RESULT: per-step time marks and cumulative non-pad input tokens, so the caller can take a steady-state
rate over steps 2..N.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_alignd(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from contract.hyperparameters import LoraSettings, SFTHyperparameters
    from contract.protocol import ProgressWriter, TrainingSpec
    from workers.training import data, sft
    from workers.training.context import RunContext

    torch.set_num_threads(cfg["threads"])
    marks: list[float] = []
    tokens: list[float] = []

    class Recorder(ProgressWriter):
        def metric(self, *, stage: str, step: int, values: dict[str, float]) -> None:
            now = time.perf_counter()
            # tokens_per_second is the window's non-pad input tokens over the window's wall time
            window = now - marks[-1]
            tokens.append(values["tokens_per_second"] * window)
            marks.append(now)

        def progress(self, fraction: float, *, stage: str) -> None:
            if fraction == 0.0 and not marks:
                marks.append(time.perf_counter())

        def _emit(self, payload: dict[str, Any]) -> None:
            pass

    hp = SFTHyperparameters.model_validate(
        {
            "epochs": 1,
            "batch_size": cfg["batch_size"],
            "max_length": cfg["max_length"],
            "learning_rate": cfg["learning_rate"],
            "logging_steps": 1,
            "gradient_checkpointing": cfg.get("gradient_checkpointing", False),
        }
    )
    spec = TrainingSpec.model_validate(
        {
            "job_id": "job_bench",
            "method": "sft",
            "base_model": {"id": "model_bench", "name": "bench-base", "path": cfg["model"]},
            "datasets": {
                "sft": {
                    "id": "ds_bench",
                    "name": "bench-sft",
                    "kind": "sft",
                    "sha256": data.sha256_file(cfg["dataset"]),
                    "num_records": 1,
                    "path": cfg["dataset"],
                }
            },
            "lora": LoraSettings.model_validate(cfg["lora"]).model_dump(),
            "hyperparameters": hp.model_dump(),
            "seed": cfg["seed"],
            "output_dir": cfg["output_dir"] + "/alignd",
        }
    )
    import io

    start = time.perf_counter()
    sft.train_sft(RunContext(spec=spec, progress=Recorder(io.StringIO())))
    return {
        "impl": "alignd",
        "setup_seconds": marks[0] - start,
        "marks": marks,
        "step_tokens": tokens,
        "threads": torch.get_num_threads(),
    }


def run_trl(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(cfg["threads"])
    rows = [json.loads(line) for line in Path(cfg["dataset"]).read_text().splitlines() if line.strip()]
    # Conversational prompt/completion: TRL applies the chat template and takes the loss on the completion.
    dataset = Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    )
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    lora = cfg["lora"]
    peft_config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    args = SFTConfig(
        output_dir=cfg["output_dir"] + "/trl",
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_length=cfg["max_length"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=0.03,  # a float is a ratio in transformers 5
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=cfg["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=cfg.get("gradient_checkpointing", False),
    )
    marks: list[float] = []
    cumulative: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **k: Any) -> None:
            if logs and "num_tokens" in logs:
                cumulative.append(float(logs["num_tokens"]))

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    start = time.perf_counter()
    trainer.train()
    step_tokens = [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]
    return {
        "impl": "trl",
        "setup_seconds": marks[0] - start if marks else 0.0,
        "marks": marks,
        "step_tokens": step_tokens,
        "threads": torch.get_num_threads(),
        "packing": bool(args.packing),
        "padding_free": bool(getattr(args, "padding_free", False)),
    }


def main() -> None:
    impl, config_path, result_path = sys.argv[1:4]
    cfg = json.loads(Path(config_path).read_text())
    t0 = time.perf_counter()
    out = run_alignd(cfg) if impl == "alignd" else run_trl(cfg)
    out["process_seconds"] = time.perf_counter() - t0
    Path(result_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
