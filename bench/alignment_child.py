"""One stage of the alignment-quality benchmark in its own process (so each run's peak RSS is its own).

Run by ``bench/alignment_quality.py``; not meant to be called by hand::

    python bench/alignment_child.py {pairs,reward,alignd,trl,eval} CONFIG.json RESULT.json [RUN_DIR]

- ``pairs``: the base samples two answers to every prompt of a prompt set; a labeler who likes concise, ended
  answers picks one (an ended answer beats an unended one, then the shorter wins): preference pairs.
- ``reward``: alignd's reward-model trainer (``workers.training.reward``) on one set of those pairs: the PPO
  reward model from one set, the independent judge from a disjoint one.
- ``alignd``: alignd's PPO job (``ppo_job.PPOJob`` on the shared loop) against the training reward model,
  until its training clock passes ``seconds``; a variant with ``"method": "grpo"`` runs alignd's GRPO job
  (``grpo_job.GRPOJob``: groups of answers per prompt, no value model) against the same reward model.
- ``trl``: TRL 1.9's ``trl.experimental.ppo.PPOTrainer`` (peft LoRA policy, reference = adapter disabled), the
  same reward model merged into a sequence classifier, its value model initialised from that reward model (as
  TRL's examples do), the same wall budget.
- ``eval``: every policy (and the base) answers the held-out prompts through the same code (plain
  transformers + peft); the judge scores each answer; the KL to the base is measured on the same samples.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from grpo_child import WallBudget, read_messages, status_gib  # noqa: E402


def _tokenizer(cfg: dict[str, Any]) -> Any:
    from workers.training import lora

    return lora.load_tokenizer(cfg["model"])  # alignd's: pad = <|endoftext|>, as every run here sees it


def _prompt_ids(tokenizer: Any, path: str, max_length: int) -> list[list[int]]:
    from workers.training import rollout

    ids, _ = rollout.encode_prompts(tokenizer, read_messages(path), max_length=max_length)
    return ids


def _sample(
    model: Any, prompts: list[list[int]], *, pad: int, eos: int, cfg: dict[str, Any], batch: int = 32
) -> list[list[int]]:
    """Sampled answers (temperature ``cfg['temperature']``, no top-k/top-p), cut after the first EOS."""
    import torch

    from workers.training import rollout

    answers: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        ids, mask = rollout.left_pad(prompts[start : start + batch], pad)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=cfg["temperature"],
                top_k=0,
                top_p=1.0,
                max_new_tokens=cfg["max_new_tokens"],
                eos_token_id=eos,
                pad_token_id=pad,
            )
        for row in out[:, ids.size(1) :].tolist():
            answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def _causal_lm(cfg: dict[str, Any], adapter: str | None) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def _sequence_classifier(cfg: dict[str, Any], adapter: str) -> Any:
    """alignd's reward_model artifact (LoRA + ``score`` head) as a plain sequence classifier, merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    tokenizer = _tokenizer(cfg)
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg["model"], num_labels=1, dtype=torch.float32
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


# --- pairs


def _text(decoded: str) -> str:
    """Control characters dropped: the tiny test model's byte-level samples contain NULs, which alignd's
    dataset reader rightly refuses as text (SmolLM2's answers have none)."""
    return "".join(ch for ch in decoded if ch in "\n\t" or ord(ch) >= 32)


def concise_preference(a: list[int], b: list[int], eos: int) -> tuple[list[int], list[int]] | None:
    """The labeler's (chosen, rejected): an ended answer beats an unended one, then the one with fewer tokens
    wins; None when the two are equal on both counts (no preference)."""
    key_a, key_b = (eos in a, -len(a)), (eos in b, -len(b))
    if key_a == key_b:
        return None
    return (a, b) if key_a > key_b else (b, a)


def make_pairs(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    tokenizer = _tokenizer(cfg)
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    model = _causal_lm(cfg, None)
    out: dict[str, Any] = {}
    per_prompt = cfg["pair_samples"]
    sampling = {**cfg, "max_new_tokens": cfg["pair_max_tokens"]}
    for name, (prompts_path, pairs_path) in cfg["pair_sets"].items():
        messages = read_messages(prompts_path)
        ids = _prompt_ids(tokenizer, prompts_path, cfg["max_prompt_length"])
        flat = _sample(
            model, [p for p in ids for _ in range(per_prompt)], pad=pad, eos=eos, cfg=sampling, batch=32
        )
        written = ties = 0
        with open(pairs_path, "w", encoding="utf-8") as handle:
            for index, prompt in enumerate(messages):
                answers = flat[index * per_prompt : (index + 1) * per_prompt]
                for a, b in itertools.combinations(answers, 2):
                    preferred = concise_preference(a, b, eos)
                    if preferred is None:
                        ties += 1
                        continue
                    chosen, rejected = preferred
                    record = {
                        "prompt": prompt,
                        "chosen": _text(tokenizer.decode(chosen, skip_special_tokens=True)),
                        "rejected": _text(tokenizer.decode(rejected, skip_special_tokens=True)),
                    }
                    handle.write(json.dumps(record) + "\n")
                    written += 1
        out[name] = {
            "prompts": len(ids),
            "pairs": written,
            "ties": ties,
            "base_eos_rate": sum(eos in a for a in flat) / len(flat),
            "base_mean_tokens": sum(map(len, flat)) / len(flat),
        }
    return out


# --- reward models


def train_reward(cfg: dict[str, Any], run_dir: str) -> dict[str, Any]:
    import torch

    from contract.hyperparameters import LoraSettings, RewardModelHyperparameters
    from contract.protocol import ProgressWriter, TrainingSpec
    from workers.training import data
    from workers.training.context import RunContext
    from workers.training.reward import train_reward_model

    torch.set_num_threads(cfg["threads"])
    which = cfg["reward_which"]
    pairs = cfg["pairs"][which]
    spec = TrainingSpec.model_validate(
        {
            "job_id": f"job_rm_{which}",
            "method": "reward_model",
            "base_model": {"id": "model_bench", "name": "bench-base", "path": cfg["model"]},
            "datasets": {
                "preference": {
                    "id": f"ds_{which}",
                    "name": f"pairs-{which}",
                    "kind": "preference",
                    "sha256": data.sha256_file(pairs),
                    "num_records": sum(1 for line in Path(pairs).read_text().splitlines() if line.strip()),
                    "path": pairs,
                }
            },
            "lora": LoraSettings.model_validate(cfg["lora"]).model_dump(),
            "hyperparameters": RewardModelHyperparameters.model_validate(cfg["reward_hp"]).model_dump(),
            "seed": cfg["seed"] + (0 if which == "train" else 1000),
            "output_dir": run_dir,
        }
    )
    result = train_reward_model(RunContext(spec=spec, progress=ProgressWriter(io.StringIO())))
    return {
        "adapter_dir": str(result.reward_model_dir),
        "steps": result.steps,
        "eval_accuracy": result.eval_accuracy,
        "hwm_gib": status_gib("VmHWM"),
    }


# --- alignd's PPO


def _alignd_hp(cfg: dict[str, Any], variant: dict[str, Any]) -> dict[str, Any]:
    shared = {
        "steps": cfg["max_updates"],  # the wall budget stops it first (WallBudget)
        "batch_size": cfg["batch_size"],
        "max_new_tokens": cfg["max_new_tokens"],
        "max_length": cfg["max_prompt_length"],
        "learning_rate": cfg["learning_rate"],
        "temperature": cfg["temperature"],
        "missing_eos_penalty": cfg["missing_eos_penalty"],
    }
    if variant.get("method", "ppo") == "ppo":
        shared["allow_weak_reward_model"] = True  # the benchmark reports the reward model's accuracy itself
    return {**shared, **variant.get("hyperparameters", {})}


def run_alignd(cfg: dict[str, Any], run_dir: str) -> dict[str, Any]:
    import torch

    from contract.hyperparameters import GRPOHyperparameters, LoraSettings, PPOHyperparameters
    from contract.protocol import ProgressWriter, TrainingSpec
    from workers.training import data, grpo_job, ppo_job
    from workers.training.context import RunContext

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    variant = cfg["variants"][cfg["variant"]]
    method = variant.get("method", "ppo")
    hp_model, job_class = {
        "ppo": (PPOHyperparameters, ppo_job.PPOJob),
        "grpo": (GRPOHyperparameters, grpo_job.GRPOJob),
    }[method]
    hp = hp_model.model_validate(_alignd_hp(cfg, variant))
    spec = TrainingSpec.model_validate(
        {
            "job_id": "job_bench",
            "method": method,
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
            "output_dir": run_dir,
        }
    )
    budget = WallBudget(cfg["seconds"], cfg["max_updates"])

    class BudgetedJob(job_class):  # type: ignore[valid-type,misc]  # either job, one budget
        def schedule(self, step: int, resumed: Any) -> Iterator[tuple[int, int, None]]:
            for item in super().schedule(step, resumed):
                if budget.spent:
                    return
                yield item

        def train_step(self, step: int, batch: None) -> None:
            budget.step_begins()
            super().train_step(step, batch)
            budget.step_ends()

    start = time.perf_counter()
    job = BudgetedJob(RunContext(spec=spec, progress=ProgressWriter(io.StringIO())))
    finished = job.run()
    history = job.logger.history
    return {
        "impl": cfg["variant"],
        "method": method,
        "hyperparameters": {k: v for k, v in hp.model_dump().items() if k in _REPORTED_HP},
        "setup_seconds": budget.marks[0] - start,
        "step_marks": budget.marks,
        "reward_mean": [h.get("reward_mean", math.nan) for h in history],
        "kl": [h.get("kl", math.nan) for h in history],
        "kl_coef": [h.get("kl_coef", math.nan) for h in history],
        "eos_rate": [h.get("eos_fraction", math.nan) for h in history],
        "response_length": [h.get("response_length", h.get("completion_length", math.nan)) for h in history],
        "adapter_dir": str(finished.outputs.model_dir),
        "hwm_gib": status_gib("VmHWM"),
        "threads": torch.get_num_threads(),
    }


_REPORTED_HP = {
    "learning_rate", "kl_coef", "kl_control", "kl_target", "kl_horizon", "kl_estimator", "max_new_tokens",
    "stop", "missing_eos_penalty", "temperature", "batch_size", "ppo_epochs", "num_generations", "beta",
    "loss_type", "scale_rewards",
}  # fmt: skip


# --- TRL's PPO


class _BudgetSpent(Exception):
    """Raised at the end of the update that spent the wall budget."""


def run_trl(cfg: dict[str, Any], run_dir: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    tokenizer = _tokenizer(cfg)
    tokenizer.padding_side = "left"
    dataset = Dataset.from_dict(
        {"input_ids": _prompt_ids(tokenizer, cfg["prompts"], cfg["max_prompt_length"])}
    )
    policy = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
    reward = _sequence_classifier(cfg, cfg["reward_model"])
    value = _sequence_classifier(cfg, cfg["reward_model"])
    lora = cfg["lora"]
    args = PPOConfig(
        output_dir=run_dir,
        per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        num_ppo_epochs=4,
        response_length=cfg["max_new_tokens"],
        total_episodes=cfg["batch_size"] * cfg["max_updates"],
        local_rollout_forward_batch_size=cfg["batch_size"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="constant",  # alignd's PPO lr is constant; a wall budget has no schedule end
        temperature=cfg["temperature"],
        kl_coef=cfg["trl_kl_coef"],
        missing_eos_penalty=cfg["missing_eos_penalty"],
        stop_token="eos",
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        num_sample_generations=0,
        logging_steps=1,
        seed=cfg["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    budget = WallBudget(cfg["seconds"], cfg["max_updates"])
    logs: list[dict[str, float]] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        # TRL 1.9's PPO loop calls no on_step_begin: its clock starts at on_train_begin, right before update 1.
        def on_train_begin(self, args: Any, state: Any, control: Any, **k: Any) -> None:
            budget.step_begins()

        def on_step_end(self, args: Any, state: Any, control: Any, **k: Any) -> None:
            budget.step_ends()
            if budget.spent:
                # TRL 1.9's PPO loop never reads control.should_training_stop: leave it after this update (its
                # optimizer step is done) by an exception that run_trl catches.
                raise _BudgetSpent

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **k: Any) -> None:
            if logs:
                history.append(dict(logs))

    history = logs
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        peft_config=LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
            bias="none",
            task_type="CAUSAL_LM",
        ),
        callbacks=[Clock()],
    )
    start = time.perf_counter()
    with contextlib.suppress(_BudgetSpent):
        trainer.train()
    adapter_dir = Path(run_dir) / "adapter"
    # the peft policy inside TRL's policy + value wrapper
    trainer.model.policy.save_pretrained(str(adapter_dir))
    return {
        "impl": "trl",
        "setup_seconds": budget.marks[0] - start if budget.marks else 0.0,
        "step_marks": budget.marks,
        "reward_mean": [e["objective/scores"] for e in logs if "objective/scores" in e],
        "kl": [e["objective/kl"] for e in logs if "objective/kl" in e],
        "adapter_dir": str(adapter_dir),
        "hwm_gib": status_gib("VmHWM"),
        "threads": torch.get_num_threads(),
    }


# --- eval


def _right_padded(
    prompts: list[list[int]], answers: list[list[int]], pad: int, size: int = 16
) -> Iterator[tuple[int, Any, Any]]:
    """(first row, ids, attention mask) of ``prompt + answer`` rows, ``size`` at a time, padded on the right
    (so every row's positions are its own, with no position ids needed)."""
    import torch

    for start in range(0, len(answers), size):
        rows = [
            p + a for p, a in zip(prompts[start : start + size], answers[start : start + size], strict=True)
        ]
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        yield start, ids, mask


def _judge_scores(judge: Any, prompts: list[list[int]], answers: list[list[int]], pad: int) -> list[float]:
    """The judge's score of each (prompt, answer), read at the last token as alignd's scorer reads it."""
    import torch

    scores: list[float] = []
    for _, ids, mask in _right_padded(prompts, answers, pad):
        with torch.no_grad():
            hidden = judge.model(input_ids=ids, attention_mask=mask).last_hidden_state
            last = mask.sum(dim=1) - 1
            scores += judge.score(hidden[torch.arange(ids.size(0)), last]).squeeze(-1).tolist()
    return scores


def _kl_per_answer(
    model: Any, prompts: list[list[int]], answers: list[list[int]], pad: int, temperature: float
) -> list[float]:
    """sum over the answer's tokens of log pi(y) - log ref(y), both tempered as sampled (k1 on the policy's
    own samples: an unbiased estimate of KL(pi || ref) per answer). The base's KL is 0 by definition."""
    import torch

    if not hasattr(model, "disable_adapter"):
        return [0.0] * len(answers)
    out: list[float] = []
    for start, ids, mask in _right_padded(prompts, answers, pad):

        def logprobs(ids: Any = ids, mask: Any = mask) -> Any:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1] / temperature
            return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)

        with torch.no_grad():
            policy = logprobs()
            with model.disable_adapter():
                reference = logprobs()
        for i, (p, a) in enumerate(
            zip(prompts[start : start + 16], answers[start : start + 16], strict=True)
        ):
            span = slice(len(p) - 1, len(p) - 1 + len(a))  # positions predicting the answer's tokens
            out.append(float((policy[i, span] - reference[i, span]).sum()))
    return out


def evaluate(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(cfg["threads"])
    tokenizer = _tokenizer(cfg)
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    prompts = _prompt_ids(tokenizer, cfg["heldout_prompts"], cfg["max_prompt_length"])
    repeated = [p for p in prompts for _ in range(cfg["eval_samples"])]
    judge = _sequence_classifier(cfg, cfg["judge_model"])
    proxy = _sequence_classifier(cfg, cfg["reward_model"])
    results: dict[str, Any] = {}
    for label, adapter in cfg["eval_adapters"].items():
        model = _causal_lm(cfg, adapter)
        torch.manual_seed(cfg["seed"] + 7)  # every policy samples from the same random stream
        answers = _sample(model, repeated, pad=pad, eos=eos, cfg=cfg)
        kl = _kl_per_answer(model, repeated, answers, pad, cfg["temperature"])
        results[label] = {
            "judge": _judge_scores(judge, repeated, answers, pad),
            "proxy": _judge_scores(proxy, repeated, answers, pad),
            "kl": kl,
            "ended": [bool(a) and a[-1] == eos for a in answers],
            "tokens": [len(a) for a in answers],
            "examples": [tokenizer.decode(a) for a in answers[:: max(1, len(answers) // 4)][:4]],
        }
        del model
    return {"prompts": len(prompts), "samples_per_prompt": cfg["eval_samples"], "results": results}


def main() -> None:
    stage, config_path, result_path = sys.argv[1:4]
    run_dir = sys.argv[4] if len(sys.argv) > 4 else ""
    cfg = json.loads(Path(config_path).read_text())
    t0 = time.perf_counter()
    if stage == "pairs":
        out = make_pairs(cfg)
    elif stage == "reward":
        out = train_reward(cfg, run_dir)
    elif stage == "alignd":
        out = run_alignd(cfg, run_dir)
    elif stage == "trl":
        out = run_trl(cfg, run_dir)
    elif stage == "eval":
        out = evaluate(cfg)
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    out["process_seconds"] = time.perf_counter() - t0
    Path(result_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
