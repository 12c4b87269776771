"""One measured GRPO run, alignd's or TRL's, in its own process (so its peak RSS is its own); also the shared
prompt check (``prep``) and the held-out evaluation of the trained adapters (``eval``).

Run by ``bench/grpo_vs_trl.py``; not meant to be called by hand::

    python bench/grpo_child.py {prep,alignd,alignd_gc,trl,trl_gc,eval} CONFIG.json RESULT.json [RUN_DIR]

``alignd_gc`` (the job's default ``gradient_checkpointing: true``) and ``trl_gc`` (TRL's default) run with
gradient checkpointing on; ``alignd`` (``gradient_checkpointing: false``) and ``trl`` with it off.

CONFIG names the base model folder, the training and held-out prompt files, the grader spec (one alignd rule
grader, a JSON object), the wall-clock budget, threads and the GRPO settings. The reward is the same code on
both sides: alignd scores with ``contract.grading.grade`` inside its GRPO job; TRL's reward function calls
:func:`rule_score`, which is that same ``grade`` with the same ``Sample`` fields.

Both runs train until their training clock passes ``seconds`` (checked at the end of every step, so the last
step may run past it; the real training seconds are recorded) or ``max_steps`` steps. The clock starts when
the first step starts: TRL's ``on_step_begin`` callback, alignd's first ``train_step``; each step ends at
TRL's ``on_step_end``, alignd's ``train_step`` return. Generation is the sampling call alone (TRL:
``GRPOTrainer._generate_single_turn``; alignd: the ``generation_seconds`` its GRPO trainer measures around
``rollout.sample_responses``), both with ``time.perf_counter``.
"""

from __future__ import annotations

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
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- shared pieces


def read_messages(path: str) -> list[list[dict[str, str]]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["messages"] for line in lines if line.strip()]


def load_grader(cfg: dict[str, Any]) -> Any:
    from contract.graders import parse_grader

    return parse_grader(cfg["grader"])


def rule_score(grader: Any, text: str, *, ended: bool, n_tokens: int) -> tuple[float, dict[str, float]]:
    """(reward, a multi grader's sub-scores) exactly as alignd's GRPO reward scores one answer: the decoded
    text as ``output_text``, ``stop``/``length`` as the finish reason, the token count with the EOS."""
    from contract.graders import Sample
    from contract.grading import grade

    sample = Sample(output_text=text, finish_reason="stop" if ended else "length", output_tokens=n_tokens)
    result = grade(grader, sample, {})
    return result.reward, {k: float(v) for k, v in result.metadata["scores"].items()}


def status_gib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (the peak so far) of this process, GiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return 0.0


class WallBudget:
    """The training clock both sides stop on: marks at the start of step 1 and at the end of every step.

    It also notes the RSS when step 1 starts (the model loaded, its weights not all read yet: transformers maps
    safetensors lazily), so the results can say how much of the peak the training steps added."""

    def __init__(self, seconds: float, max_steps: int) -> None:
        self.seconds = seconds
        self.max_steps = max_steps
        self.marks: list[float] = []
        self.rss_at_start_gib = 0.0

    def step_begins(self) -> None:
        if not self.marks:
            self.rss_at_start_gib = status_gib("VmRSS")
            self.marks.append(time.perf_counter())

    def step_ends(self) -> None:
        self.marks.append(time.perf_counter())

    @property
    def spent(self) -> bool:
        steps = len(self.marks) - 1
        return steps >= 1 and (self.marks[-1] - self.marks[0] >= self.seconds or steps >= self.max_steps)


# --- prep: the prompts both sides will see


def prepare(cfg: dict[str, Any]) -> dict[str, Any]:
    """alignd's prompt encoding against TRL's (``apply_chat_template(conversation=..., tokenize=True)``, as
    ``GRPOTrainer._tokenize_prompts`` calls it): the benchmark is only fair if these are the same ids."""
    from transformers import AutoTokenizer

    from workers.training import rollout

    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    out: dict[str, Any] = {}
    for key in ("prompts", "heldout_prompts"):
        messages = read_messages(cfg[key])
        ids, cut = rollout.encode_prompts(tokenizer, messages, max_length=cfg["max_prompt_length"])
        trl_ids = tokenizer.apply_chat_template(
            conversation=messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        out[key] = {
            "count": len(ids),
            "tokens_min_max": [min(map(len, ids)), max(map(len, ids))],
            "cut": cut,
            "same_ids_as_trl": [list(x) for x in trl_ids] == ids,
        }
    return out


# --- alignd


def _alignd_spec(cfg: dict[str, Any], run_dir: str, *, gradient_checkpointing: bool) -> Any:
    from contract.hyperparameters import GRPOHyperparameters, LoraSettings
    from contract.protocol import TrainingSpec
    from workers.training import data

    hp = GRPOHyperparameters.model_validate(
        {
            "steps": 100000,  # the wall budget stops it (WallBudget); max_steps caps the quick run
            "batch_size": cfg["prompts_per_step"],
            "num_generations": cfg["num_generations"],
            "max_new_tokens": cfg["max_new_tokens"],
            "max_length": cfg["max_prompt_length"],
            "learning_rate": cfg["learning_rate"],
            "temperature": cfg["temperature"],
            "top_p": cfg["top_p"],
            "beta": cfg["beta"],
            "epsilon": cfg["epsilon"],
            "num_iterations": 1,
            "scale_rewards": cfg["scale_rewards"],
            "loss_type": cfg["loss_type"],
            "max_grad_norm": cfg["max_grad_norm"],
            "gradient_checkpointing": gradient_checkpointing,
            "graders": [cfg["grader"]],
        }
    )
    return TrainingSpec.model_validate(
        {
            "job_id": "job_bench",
            "method": "grpo",
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
            "lora": LoraSettings.model_validate(cfg["lora"]).model_dump(),
            "hyperparameters": hp.model_dump(),
            "seed": cfg["seed"],
            "output_dir": run_dir,
            "resources": {"precision": cfg.get("precision", "fp32")},
        }
    )


def run_alignd(cfg: dict[str, Any], run_dir: str, *, gradient_checkpointing: bool = False) -> dict[str, Any]:
    """alignd's GRPO job itself (``grpo_job.GRPOJob`` on the shared loop: checkpoints off, metrics, the
    published adapter), with the wall budget as its schedule's end."""
    import io

    import torch

    from contract.protocol import ProgressWriter
    from workers.training import grpo, grpo_job
    from workers.training.context import RunContext

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    budget = WallBudget(cfg["seconds"], cfg["max_steps"])
    # alignd measures the KL to the base at beta 0 too, every kl_metric_steps updates (default 10): one no-grad
    # forward with the adapter disabled, which TRL never runs at beta 0. Timed so the results can say what it
    # costs.
    reference_seconds: list[float] = []
    no_grad_logprobs = grpo.GroupTrainer._no_grad_logprobs

    def timed_logprobs(self: Any, batch: Any, *, reference: bool) -> Any:
        t0 = time.perf_counter()
        try:
            return no_grad_logprobs(self, batch, reference=reference)
        finally:
            if reference:
                reference_seconds.append(time.perf_counter() - t0)

    grpo.GroupTrainer._no_grad_logprobs = timed_logprobs  # type: ignore[method-assign]

    class BudgetedGRPOJob(grpo_job.GRPOJob):
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
    spec = _alignd_spec(cfg, run_dir, gradient_checkpointing=gradient_checkpointing)
    job = BudgetedGRPOJob(RunContext(spec=spec, progress=ProgressWriter(io.StringIO())))
    finished = job.run()
    history = job.logger.history
    return {
        "impl": "alignd_gc" if gradient_checkpointing else "alignd",
        "setup_seconds": budget.marks[0] - start,
        "step_marks": budget.marks,
        "generation_seconds": [h["generation_seconds"] for h in history],
        "reference_seconds": reference_seconds,
        "rss_at_first_step_gib": budget.rss_at_start_gib,
        "hwm_gib": status_gib("VmHWM"),
        "reward_mean": [h["reward_mean"] for h in history],
        "completion_length": [h["completion_length"] for h in history],
        "frac_reward_zero_std": [h["frac_reward_zero_std"] for h in history],
        "trainable_parameters": int(finished.metrics["trainable_parameters"]),
        "adapter_dir": str(finished.outputs.model_dir),
        "threads": torch.get_num_threads(),
    }


# --- TRL


def _trl_config(cfg: dict[str, Any], run_dir: str, *, gradient_checkpointing: bool) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=run_dir,
        per_device_train_batch_size=cfg["prompts_per_step"] * cfg["num_generations"],  # completions
        gradient_accumulation_steps=1,
        num_generations=cfg["num_generations"],
        max_completion_length=cfg["max_new_tokens"],
        max_steps=cfg["max_steps"],
        learning_rate=cfg["learning_rate"],
        lr_scheduler_type="constant",  # alignd's GRPO lr is constant
        warmup_steps=0,
        weight_decay=0.0,
        adam_epsilon=1e-5,  # alignd's Adam eps
        max_grad_norm=cfg["max_grad_norm"],
        temperature=cfg["temperature"],
        top_p=cfg["top_p"],
        beta=cfg["beta"],
        epsilon=cfg["epsilon"],
        num_iterations=1,
        scale_rewards=cfg["scale_rewards"],
        loss_type=cfg["loss_type"],
        # TRL defaults to gradient checkpointing and bf16. bf16 follows the run's precision on both sides (TRL:
        # autocast over fp32 weights; alignd: a bf16 base, precision.py); gradient checkpointing is TRL's default
        # in the "trl_gc" run, off in the "trl" run (as alignd's in "alignd_gc" and "alignd").
        gradient_checkpointing=gradient_checkpointing,
        bf16=cfg.get("precision", "fp32") == "bf16",
        use_cpu=True,
        use_vllm=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=cfg["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def trl_reward(grader: Any, eos_token_id: int) -> Any:
    """TRL's reward function: :func:`rule_score` of each completion (its ids end with the EOS when it ended)."""

    def reward(
        prompts: list[Any], completions: list[Any], completion_ids: list[list[int]], **_: Any
    ) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [
            rule_score(grader, text, ended=bool(ids) and ids[-1] == eos_token_id, n_tokens=len(ids))[0]
            for text, ids in zip(texts, completion_ids, strict=True)
        ]

    reward.__name__ = grader.name  # TRL names the reward's log series after the function
    return reward


def trl_clock(budget: WallBudget, history: list[dict[str, float]]) -> Any:
    """A TrainerCallback: the wall budget's marks at TRL's step boundaries, the stop, and the logged metrics."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            budget.step_begins()

        def on_step_end(self, args: Any, state: Any, control: Any, **k: Any) -> None:
            budget.step_ends()
            if budget.spent:
                control.should_training_stop = True

        # HF's callback handler passes the dict as the keyword ``logs``
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **k: Any) -> None:
            if logs:
                history.append({key: v for key, v in logs.items() if isinstance(v, int | float)})

    return Clock()


def run_trl(cfg: dict[str, Any], run_dir: str, *, gradient_checkpointing: bool) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    start = time.perf_counter()
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
    budget = WallBudget(cfg["seconds"], cfg["max_steps"])
    history: list[dict[str, float]] = []
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[trl_reward(load_grader(cfg), int(tokenizer.eos_token_id))],
        args=_trl_config(cfg, run_dir, gradient_checkpointing=gradient_checkpointing),
        train_dataset=Dataset.from_dict({"prompt": read_messages(cfg["prompts"])}),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[trl_clock(budget, history)],
    )
    gen_times: list[float] = []
    generate = trainer._generate_single_turn

    def timed_generate(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            gen_times.append(time.perf_counter() - t0)

    trainer._generate_single_turn = timed_generate
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    adapter_dir = Path(run_dir) / "adapter"
    trainer.save_model(str(adapter_dir))
    steps = [e for e in history if "reward" in e]
    return {
        "impl": "trl_gc" if gradient_checkpointing else "trl",
        "trl_version": trl.__version__,
        "setup_seconds": budget.marks[0] - start,
        "step_marks": budget.marks,
        "generation_seconds": gen_times,
        "rss_at_first_step_gib": budget.rss_at_start_gib,
        "hwm_gib": status_gib("VmHWM"),
        "reward_mean": [e["reward"] for e in steps],
        "completion_length": [e.get("completions/mean_length", math.nan) for e in steps],
        "frac_reward_zero_std": [e.get("frac_reward_zero_std", math.nan) for e in steps],
        "trainable_parameters": trainable,
        "adapter_dir": str(adapter_dir),
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
        # what the model really did, not what the config asked (PPOTrainer 1.9 asked and never enabled it)
        "gradient_checkpointing_active": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "threads": torch.get_num_threads(),
    }


# --- eval: greedy answers to the held-out prompts, every adapter through the same code


def _greedy(model: Any, prompts: list[list[int]], *, pad: int, eos: int, max_new: int) -> list[list[int]]:
    import torch

    from workers.training import rollout

    ids, mask = rollout.left_pad(prompts, pad)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    answers = []
    for row in out[:, ids.size(1) :].tolist():
        # up to and including the first EOS, as both trainers cut their answers
        answers.append(row[: row.index(eos) + 1] if eos in row else row)
    return answers


def evaluate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Score the base and each trained adapter on the held-out prompts: greedy, ``max_new_tokens``, plain
    transformers + peft, the same grader code (:func:`rule_score`) for all."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.training import rollout

    torch.set_num_threads(cfg["threads"])
    tokenizer = AutoTokenizer.from_pretrained(cfg["model"])
    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    grader = load_grader(cfg)
    prompts, _ = rollout.encode_prompts(
        tokenizer, read_messages(cfg["heldout_prompts"]), max_length=cfg["max_prompt_length"]
    )
    results: dict[str, Any] = {}
    for label, adapter in cfg["eval_adapters"].items():
        model = AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        answers = _greedy(model, prompts, pad=pad, eos=eos, max_new=cfg["max_new_tokens"])
        texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        scored = [
            rule_score(grader, t, ended=bool(a) and a[-1] == eos, n_tokens=len(a))
            for t, a in zip(texts, answers, strict=True)
        ]
        rewards = [s[0] for s in scored]
        n = len(rewards)
        mean = sum(rewards) / n
        sd = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0.0
        parts = sorted({k for _, sub in scored for k in sub})
        results[label] = {
            "score": mean,
            "score_se": sd / math.sqrt(n),
            "parts": {p: sum(sub.get(p, 0.0) for _, sub in scored) / n for p in parts},
            "eos_fraction": sum(bool(a) and a[-1] == eos for a in answers) / n,
            "mean_length": sum(map(len, answers)) / n,
            "examples": texts[:3],
            "rewards": rewards,
        }
        del model
    return {"prompts": len(prompts), "results": results}


def main() -> None:
    impl, config_path, result_path = sys.argv[1:4]
    run_dir = sys.argv[4] if len(sys.argv) > 4 else ""
    cfg = json.loads(Path(config_path).read_text())
    t0 = time.perf_counter()
    if impl == "prep":
        out = prepare(cfg)
    elif impl == "eval":
        out = evaluate(cfg)
    elif impl in ("alignd", "alignd_gc"):
        out = run_alignd(cfg, run_dir, gradient_checkpointing=impl == "alignd_gc")
    elif impl in ("trl", "trl_gc"):
        out = run_trl(cfg, run_dir, gradient_checkpointing=impl == "trl_gc")
    else:
        raise SystemExit(f"unknown run {impl!r}")
    out["process_seconds"] = time.perf_counter() - t0
    Path(result_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
