"""One measured PPO run, alignd's or TRL's, in its own process (so its peak RSS is its own).

Run by ``bench/ppo_vs_trl.py``; not meant to be called by hand::

    python bench/ppo_child.py {alignd,trl} CONFIG.json RESULT.json

CONFIG names the base model folder, the reward-model adapter folder (LoRA + ``score`` head, alignd's
reward_model artifact format), the prompts file, threads and the PPO settings. Both sides get the same token
ids for the prompts (alignd's chat-template encoder), the same reward (the same score-head weights on the
same base), the same batch sizes, response length, epochs and number of updates.

RESULT gets per-update wall seconds and generation seconds, measured the same way on both sides: the update
clock runs from the start of one update to the end of the next (TRL: ``on_step_end`` callbacks; alignd: the
``on_update`` hook), generation is the sampling call alone (TRL: ``batch_generation``; alignd:
``sample_responses``), both wrapped with ``time.perf_counter``.
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


def _prompt_ids(tokenizer: Any, prompts_file: str, max_length: int) -> list[list[int]]:
    from workers.training import rollout

    records = rollout.read_prompt_records(prompts_file)
    ids, _ = rollout.encode_prompts(tokenizer, records, max_length=max_length)
    return ids


def run_alignd(cfg: dict[str, Any]) -> dict[str, Any]:
    import io

    import torch

    from contract.hyperparameters import LoraSettings, PPOHyperparameters
    from contract.protocol import ProgressWriter, TrainingSpec
    from workers.training import data, ppo_job, rollout
    from workers.training.context import RunContext

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    gen_times: list[float] = []
    original = rollout.sample_responses

    def timed_sample(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            gen_times.append(time.perf_counter() - t0)

    rollout.sample_responses = timed_sample  # type: ignore[assignment]
    hp = PPOHyperparameters.model_validate(
        {
            "steps": cfg["updates"],
            "epochs": 1000,
            "batch_size": cfg["batch_size"],
            "mini_batch_size": cfg["batch_size"] // cfg["num_mini_batches"],
            "ppo_epochs": cfg["ppo_epochs"],
            "max_new_tokens": cfg["response_length"],
            "learning_rate": cfg["learning_rate"],
            "temperature": cfg["temperature"],
            "kl_coef": cfg["kl_coef"],
            "missing_eos_penalty": cfg["missing_eos_penalty"],
            "value_model": cfg.get("alignd_value_model", "head"),
        }
    )
    spec = TrainingSpec.model_validate(
        {
            "job_id": "job_bench",
            "method": "ppo",
            "base_model": {"id": "model_bench", "name": "bench-base", "path": cfg["model"]},
            "datasets": {
                "prompts": {
                    "id": "ds_bench",
                    "name": "bench-prompts",
                    "kind": "prompts",
                    "sha256": data.sha256_file(cfg["prompts"]),
                    "num_records": 1,
                    "path": cfg["prompts"],
                }
            },
            "reward_model": {"id": "rm_bench", "path": cfg["reward_model"]},
            "lora": LoraSettings.model_validate(cfg["lora"]).model_dump(),
            "hyperparameters": hp.model_dump(),
            "seed": cfg["seed"],
            "output_dir": cfg["output_dir"] + "/alignd",
            "resources": {"precision": cfg.get("precision", "fp32")},
        }
    )
    marks: list[float] = []
    metrics: list[dict[str, float]] = []

    def on_update(update: int, result: Any) -> None:
        marks.append(time.perf_counter())
        metrics.append({k: float(v) for k, v in result.metrics.items()})

    start = time.perf_counter()
    result = ppo_job.train_ppo(
        RunContext(spec=spec, progress=ProgressWriter(io.StringIO())), on_update=on_update
    )
    trainable = int(result.metrics["trainable_parameters"])
    response_tokens = [float(cfg["batch_size"] * cfg["response_length"])] * len(metrics)
    # update i's clock: from the end of update i-1 (or, for the first, from the first update's own start)
    first_start = marks[0] - metrics[0]["update_seconds"]
    return {
        "impl": "alignd",
        "setup_seconds": first_start - start,
        "update_marks": [first_start, *marks],
        "generation_seconds": gen_times,
        "response_tokens": response_tokens,
        "trainable_parameters": trainable,
        "reward_mean": [m["reward_mean"] for m in metrics],
        "mean_response_length": [m["response_length"] for m in metrics],
        "kl": [m["kl"] for m in metrics],
        "threads": torch.get_num_threads(),
    }


def run_trl(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    tokenizer.padding_side = "left"
    prompt_ids = _prompt_ids(tokenizer, cfg["prompts"], 256)
    dataset = Dataset.from_dict({"input_ids": prompt_ids})

    policy = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(
        cfg["model"], num_labels=1, dtype=torch.float32
    )
    value = AutoModelForSequenceClassification.from_pretrained(
        cfg["model"], num_labels=1, dtype=torch.float32
    )
    # The same score head as alignd's reward adapter (its LoRA B is zero, so body = base).
    head = {
        k.split("score.")[-1].replace("modules_to_save.default.", ""): v
        for k, v in load_file(str(Path(cfg["reward_model"]) / "adapter_model.safetensors")).items()
        if "lora_" not in k
    }
    with torch.no_grad():
        for model in (reward, value):
            model.score.weight.copy_(head["weight"])
            model.config.pad_token_id = tokenizer.pad_token_id
    lora = cfg["lora"]
    peft_config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        bias="none",
        task_type="CAUSAL_LM",
    )
    args = PPOConfig(
        output_dir=cfg["output_dir"] + "/trl",
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=cfg["num_mini_batches"],
        num_ppo_epochs=cfg["ppo_epochs"],
        response_length=cfg["response_length"],
        total_episodes=cfg["batch_size"] * cfg["updates"],
        local_rollout_forward_batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"],
        temperature=cfg["temperature"],
        kl_coef=cfg["kl_coef"],
        missing_eos_penalty=cfg["missing_eos_penalty"],
        stop_token="eos",
        use_cpu=True,
        # TRL's mixed precision (accelerate's autocast): fp32 weights and optimizer, bf16 products.
        bf16=cfg.get("precision", "fp32") == "bf16",
        report_to="none",
        save_strategy="no",
        num_sample_generations=0,
        logging_steps=1,
        seed=cfg["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    gen_times: list[float] = []
    original = trl_ppo.batch_generation

    def timed_generation(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            gen_times.append(time.perf_counter() - t0)

    trl_ppo.batch_generation = timed_generation
    marks: list[float] = []
    response_tokens: list[float] = []
    logs: list[dict[str, float]] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            marks.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs_: Any = None, **k: Any) -> None:
            if logs_:
                logs.append(dict(logs_))

    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        peft_config=peft_config,
        callbacks=[Clock()],
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    start = time.perf_counter()
    trainer.train()
    # TRL logs no response length: both sides count the token budget (batch x response_length) for tokens/s,
    # and alignd's real mean length is reported beside it.
    response_tokens = [float(cfg["batch_size"] * cfg["response_length"])] * (len(marks) - 1)
    return {
        "impl": "trl",
        "setup_seconds": marks[0] - start if marks else 0.0,
        "update_marks": marks,
        "generation_seconds": gen_times,
        "response_tokens": response_tokens,
        "trainable_parameters": trainable,
        "reward_mean": [e.get("objective/scores", float("nan")) for e in logs if "objective/scores" in e],
        "kl": [e.get("objective/kl", float("nan")) for e in logs if "objective/kl" in e],
        "threads": torch.get_num_threads(),
    }


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """The shared reward model: a sequence classifier on the base with a seeded score head, saved as alignd's
    reward_model artifact (SEQ_CLS LoRA, zero B, plus ``score`` via modules_to_save)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(cfg["seed"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg["model"], num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0 / model.config.hidden_size**0.5)
    lora = cfg["lora"]
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        bias="none",
        task_type="SEQ_CLS",
        modules_to_save=["score"],
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(cfg["reward_model"], save_embedding_layers=False)
    tokenizer.save_pretrained(cfg["reward_model"])
    ids = _prompt_ids(tokenizer, cfg["prompts"], 256)
    return {"prompt_tokens": [len(x) for x in ids]}


def main() -> None:
    impl, config_path, result_path = sys.argv[1:4]
    cfg = json.loads(Path(config_path).read_text())
    t0 = time.perf_counter()
    out = prepare(cfg) if impl == "prep" else run_alignd(cfg) if impl == "alignd" else run_trl(cfg)
    out["process_seconds"] = time.perf_counter() - t0
    Path(result_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
