"""GRPO side by side: alignd's GRPO job and TRL's ``GRPOTrainer`` (peft LoRA, beta 0: no reference model), one
after the other in ONE invocation, each in its own process (peak RSS is each one's own), for the same wall time;
then every trained adapter answers a held-out prompt set greedily and the same grader scores them.

Each side runs twice: with gradient checkpointing on (``alignd_gc`` and ``trl_gc``: each side's default) and
off (``alignd``, with ``gradient_checkpointing: false``, and ``trl``): faster, more memory. The targets are
reported like for like, on against on and off against off.

    .venv-bench-grpo/bin/python bench/grpo_vs_trl.py --model smollm2 --seconds 150   # make bench-grpo
    .venv-bench-grpo/bin/python bench/grpo_vs_trl.py --model tiny --max-steps 4      # make bench-grpo-quick

Same for both: the base folder, the prompts (the same token ids: ``prep`` checks alignd's encoding against
TRL's ``apply_chat_template``), 2 prompts x G 4 = 8 completions per step, 32 new tokens (stop at EOS),
temperature 1, top_p 1, lr 1e-4 constant, Adam eps 1e-5, no weight decay, grad-norm clip 1, epsilon 0.2,
loss_type dapo, scale_rewards group, one iteration per batch, beta 0 (TRL's default), LoRA r16 alpha 32
dropout 0 all-linear, fp32, torch threads, and the reward: one alignd rule grader (``GRADER``), which alignd's
job scores itself and TRL's reward function scores through the same ``contract.grading.grade``. Different by
design: alignd measures the KL to the base every kl_metric_steps (10) updates (one no-grad forward with the
adapter disabled) even at beta 0; TRL computes nothing for the KL at beta 0. bf16 is off (fp32 on both) unless
``--precision bf16``; gradient checkpointing is off in the ``alignd`` and ``trl`` runs and on in the
``alignd_gc`` and ``trl_gc`` runs.

Figures: completions (episodes)/s over steps 2..N (step 1 pays one-off costs: lazy weight reads, allocator
growth) and over all N; peak RSS of the process tree (sampled from /proc every 50 ms, and VmHWM); the share of
step time in the sampling call; and the held-out grader score after the same wall-clock budget (``--seconds``
of training each), greedy, scored by the same code for the base and both adapters (a third process, plain
transformers + peft). The load average is recorded around every run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, WORK, loadavg, machine_stamp, run_child, write_results
from ppo_vs_trl import model_dir

BENCH_GRPO_VENV = REPO / ".venv-bench-grpo"

# Rewarded: the answer ends (EOS within the 32 new tokens) and it mentions water. SmolLM2 ends about a third
# of its answers in 32 tokens and mentions water now and then, so most groups of 4 have a reward spread to learn
# from. (An "ends with '!'" rule, tried first, gave almost no spread: answers cut at 32 tokens never end so.)
GRADER: dict[str, Any] = {
    "type": "multi",
    "name": "ends_water",
    "graders": {
        "ends": {"type": "ends_with_eos", "name": "ends"},
        "water": {"type": "regex", "name": "water", "pattern": "water", "ignore_case": True},
    },
    "calculate_output": "0.5 * ends + 0.5 * water",
}
IMPLS = ("alignd", "alignd_gc", "trl", "trl_gc")
TRLS = ("trl", "trl_gc")

# Training and held-out prompts come from disjoint topics, so no held-out prompt is a training prompt.
_TRAIN_TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "binary search", "the French revolution",
    "black holes", "vaccines", "supply and demand", "recursion", "plate tectonics", "the immune system",
    "climate change", "electric cars", "the stock market", "neural networks", "volcanoes", "democracy",
    "the moon landing", "prime numbers", "coffee brewing", "sleep", "solar panels", "the printing press",
    "gravity",
]  # fmt: skip
_HELDOUT_TOPICS = [
    "bread baking", "blockchains", "rainbows", "earthquakes", "jazz", "chess openings", "the Roman empire",
    "tides",
]  # fmt: skip
_ASKS = [
    "Explain {t} to a ten-year-old in two sentences.",
    "What is the most surprising fact about {t}?",
    "Give me one practical tip related to {t}.",
    "Summarise {t} in a single short paragraph, please.",
]


def write_prompts(path: Path, topics: list[str]) -> Path:
    lines = [
        json.dumps({"messages": [{"role": "user", "content": ask.format(t=topic)}]})
        for topic, ask in itertools.product(topics, _ASKS)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bench_grpo_python() -> str:
    """The GRPO benchmark venv's interpreter (it has TRL's current release) when it exists, else this one."""
    candidate = BENCH_GRPO_VENV / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def summarise(impl: str, run: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    r = run.result
    durations = [b - a for a, b in itertools.pairwise(r["step_marks"])]
    gens = r["generation_seconds"][: len(durations)]
    n = len(durations)
    steady = durations[1:] if n > 1 else durations
    steady_gen = gens[1:] if n > 1 else gens
    per_step = cfg["prompts_per_step"] * cfg["num_generations"]
    refs = r.get("reference_seconds", [])[: len(durations)]
    rewards = r["reward_mean"]
    k = min(3, len(rewards))
    return {
        "impl": impl,
        "steps": n,
        "train_s": round(sum(durations), 1),
        "completions": per_step * n,
        "peak_rss_gib": round(run.peak_rss_bytes / 2**30, 2),
        "episodes_per_s": round(per_step * len(steady) / sum(steady), 3),
        "episodes_per_s_all": round(per_step * n / sum(durations), 3),
        "s_per_step": round(statistics.median(steady), 2),
        "generation_share": round(sum(steady_gen) / sum(steady), 3),
        # alignd's no-grad reference forward (the KL it logs at beta 0 too, every kl_metric_steps updates)
        "reference_share": round(sum(refs[1:] if n > 1 else refs) / sum(steady), 3) if refs else None,
        # RSS when step 1 starts (model loaded, lazily mapped) vs the peak: what the training steps added
        "rss_step1_gib": round(r["rss_at_first_step_gib"], 2),
        # training reward (sampled, temperature 1): mean of the first and of the last 3 steps
        "train_reward_first3": round(statistics.mean(rewards[:k]), 3) if k else None,
        "train_reward_last3": round(statistics.mean(rewards[-k:]), 3) if k else None,
        "trainable_params_m": round(r["trainable_parameters"] / 1e6, 2),
        "setup_s": round(r["setup_seconds"], 1),
        "threads": r["threads"],
        # CPU the run actually got per thread and wall second (1.0 = its threads never waited for a core)
        "cpu_share": round(run.cpu_seconds / run.seconds / r["threads"], 2),
        "load_before": run.loadavg_before,
        "load_after": run.loadavg_after,
    }


def build_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    return {
        "model": str(model_dir(args.model)),
        "prompts": str(write_prompts(work / "prompts.jsonl", _TRAIN_TOPICS)),
        "heldout_prompts": str(write_prompts(work / "heldout.jsonl", _HELDOUT_TOPICS)),
        "grader": GRADER,
        "threads": args.threads,
        "precision": args.precision,
        "seed": 0,
        "seconds": args.seconds,
        "max_steps": args.max_steps,
        "prompts_per_step": 2,
        "num_generations": 4,
        "max_new_tokens": 32,
        "max_prompt_length": 256,
        "learning_rate": 1e-4,
        "temperature": 1.0,
        "top_p": 1.0,
        "beta": 0.0,
        "epsilon": 0.2,
        "scale_rewards": "group",
        "loss_type": "dapo",
        "max_grad_norm": 1.0,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    }


def train_all(
    py: str, cfg_path: Path, work: Path, env: dict[str, str], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, str]]:
    """Every (round, impl) run in its own process; (rows, raw results, adapters by run label)."""
    cfg = json.loads(cfg_path.read_text())
    child = str(REPO / "bench" / "grpo_child.py")
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    adapters: dict[str, str] = {}
    for round_index in range(args.rounds):
        # alternate the order per round, so no side always runs first (cold caches) or last
        order = list(IMPLS) if round_index % 2 == 0 else list(reversed(IMPLS))
        for impl in order:
            label = f"{impl}_r{round_index + 1}"
            result_file = work / f"{label}.json"
            print(f"[grpo] round {round_index + 1}: {impl} (load {loadavg()})", flush=True)
            run = run_child(
                [py, child, impl, str(cfg_path), str(result_file), str(work / "out" / label)],
                result_file=result_file,
                env=env,
                timeout=args.timeout,
            )
            if run.returncode != 0 or not run.result:
                raise SystemExit(f"{impl} failed (rc {run.returncode}):\n{run.stderr_tail}")
            row = {"round": round_index + 1, **summarise(impl, run, cfg)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            raw.append({"impl": impl, "round": round_index + 1, "child": run.result, "wall_s": run.seconds})
            adapters[label] = run.result["adapter_dir"]
    return rows, raw, adapters


def evaluate_all(
    py: str, cfg_path: Path, work: Path, env: dict[str, str], adapters: dict[str, str]
) -> dict[str, Any]:
    cfg = json.loads(cfg_path.read_text())
    eval_cfg = work / "eval_config.json"
    eval_cfg.write_text(json.dumps({**cfg, "eval_adapters": {"base": None, **adapters}}, indent=2))
    print(f"[grpo] held-out evaluation (load {loadavg()})", flush=True)
    result_file = work / "eval.json"
    run = run_child(
        [py, str(REPO / "bench" / "grpo_child.py"), "eval", str(eval_cfg), str(result_file)],
        result_file=result_file,
        env=env,
    )
    if run.returncode != 0 or not run.result:
        raise SystemExit(f"the held-out evaluation failed (rc {run.returncode}):\n{run.stderr_tail}")
    return run.result


def heldout_rows(evaluation: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    train_s = {f"{r['impl']}_r{r['round']}": r["train_s"] for r in rows}
    out = []
    for label, res in evaluation["results"].items():
        out.append(
            {
                "adapter": label,
                "train_s": train_s.get(label, 0.0),
                "heldout_score": round(res["score"], 3),
                "score_se": round(res["score_se"], 3),
                **{f"share_{part}": round(v, 3) for part, v in res["parts"].items()},
                "eos_fraction": round(res["eos_fraction"], 3),
                "mean_len": round(res["mean_length"], 1),
            }
        )
    return out


# (alignd run, TRL run, what is compared): like for like, checkpointing on (each side's default), then off.
PAIRS = (
    ("alignd_gc", "trl_gc", "gradient checkpointing on on both sides (both defaults)"),
    ("alignd", "trl", "gradient checkpointing off on both sides"),
)


def targets_of(rows: list[dict[str, Any]], held: list[dict[str, Any]]) -> tuple[dict[str, float], list[Any]]:
    """Ratios alignd / TRL and the targets for each pair of :data:`PAIRS` (means over rounds)."""

    def mean_of(impl: str, key: str) -> float:
        return statistics.mean(r[key] for r in rows if r["impl"] == impl)

    def held_mean(impl: str) -> float:
        return statistics.mean(h["heldout_score"] for h in held if h["adapter"].startswith(impl + "_r"))

    ratios: dict[str, float] = {}
    targets: list[dict[str, Any]] = []
    for mine, trl, label in PAIRS:
        speed = round(mean_of(mine, "episodes_per_s") / mean_of(trl, "episodes_per_s"), 2)
        memory = round(mean_of(mine, "peak_rss_gib") / mean_of(trl, "peak_rss_gib"), 3)
        held_diff = round(held_mean(mine) - held_mean(trl), 3)
        ratios[f"episodes_per_s_{mine}_over_{trl}"] = speed
        ratios[f"peak_rss_{mine}_over_{trl}"] = memory
        targets += [
            {"target": f"episodes/s >= 1.5x TRL, {label}", "measured": speed, "met": speed >= 1.5},
            {"target": f"peak memory <= 0.6x TRL, {label}", "measured": memory, "met": memory <= 0.6},
            {
                "target": f"held-out score after the same wall time, alignd minus TRL, {label}: not below 0",
                "measured": held_diff,
                "met": held_diff >= 0,
            },
        ]
    return ratios, targets


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--seconds", type=float, default=150.0, help="training wall-clock budget per run")
    parser.add_argument("--max-steps", type=int, default=100000, help="cap on steps per run (quick runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32: every run in fp32; bf16: alignd with resources.precision 'bf16', TRL with bf16=True (autocast)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds of the three runs, order reversed every other round"
    )
    parser.add_argument("--name", default=None, help="results file stem (default grpo_vs_trl[_tiny])")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()

    py = bench_grpo_python()
    work = WORK / f"grpo-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = build_config(args, work)
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    prep_file = work / "prep.json"
    child = str(REPO / "bench" / "grpo_child.py")
    prep = run_child([py, child, "prep", str(cfg_path), str(prep_file)], result_file=prep_file, env=env)
    if prep.returncode != 0:
        raise SystemExit(f"the prompt check failed:\n{prep.stderr_tail}")

    stamp = machine_stamp(["accelerate", "datasets"])
    stamp["python_used"] = py
    rows, raw, adapters = train_all(py, cfg_path, work, env, args)
    evaluation = evaluate_all(py, cfg_path, work, env, adapters)
    held = heldout_rows(evaluation, rows)
    ratios, targets = targets_of(rows, held)
    trl_version = next(r["child"]["trl_version"] for r in raw if r["impl"] in TRLS)
    settings = {k: v for k, v in cfg.items() if k not in ("model", "prompts", "heldout_prompts")}
    settings["model"] = args.model
    settings["prompt_check"] = {k: v for k, v in prep.result.items() if k != "process_seconds"}
    name = args.name or ("grpo_vs_trl" if args.model == "smollm2" else "grpo_vs_trl_tiny")
    write_results(
        name,
        title=f"GRPO: alignd vs TRL {trl_version} GRPOTrainer ({args.model}, {args.seconds:g} s of training each)",
        stamp=stamp,
        tables={
            "Runs (episodes/s = completions/s over steps 2..N)": rows,
            "Held-out grader score after the same wall time (greedy)": held,
            "Targets": targets,
        },
        data={"settings": settings, "ratios": ratios, "evaluation": evaluation, "raw": raw},
        notes=_notes(args, settings, evaluation, raw),
    )
    print(json.dumps({"ratios": ratios, "targets": targets, "heldout": held}))


def _notes(
    args: argparse.Namespace, settings: dict[str, Any], evaluation: dict[str, Any], raw: list[dict[str, Any]]
) -> list[str]:
    check = settings["prompt_check"]
    return [
        "Each run is its own process; peak RSS is the max of the sampled process-tree RSS and VmHWM.",
        f"Every run trains for {args.seconds:g} s of wall time (checked at each step's end, so the last step may run "
        "past it; train_s is the real figure) from the start of their first step; setup (loading) is apart.",
        "episodes/s counts completions (2 prompts x 4 generations per step in every run); generation_share: "
        "time in the sampling call (TRL _generate_single_turn, alignd sample_responses) over step wall time.",
        "alignd runs one extra no-grad forward (the KL to the base, logged at beta 0 too) on the first step, "
        "every kl_metric_steps (10) and the last; its time over the steps' time is reference_share. TRL "
        "computes no KL at beta 0.",
        "rss_step1_gib: the process's RSS when step 1 starts (model loaded; transformers maps the weights "
        "lazily, so not all of them are resident yet); peak_rss_gib is the whole run's.",
        f"Held-out: {evaluation['prompts']} prompts on topics no training prompt has; greedy, "
        f"{settings['max_new_tokens']} new tokens, plain transformers + peft, scored by the same grader code "
        "for the base and every adapter; score_se is the standard error over prompts.",
        "The same prompt token ids on both sides (alignd's encoding vs TRL's apply_chat_template): "
        f"training {check['prompts']['same_ids_as_trl']}, held-out {check['heldout_prompts']['same_ids_as_trl']}; "
        "the order differs (alignd's seeded IndexCycle, TRL's seeded sampler).",
        "TRL gradient checkpointing (active in the trained model, not just configured): "
        + ", ".join(
            f"{r['impl']} r{r['round']}: {r['child']['gradient_checkpointing_active']}"
            for r in raw
            if r["impl"] in TRLS
        )
        + "; alignd_gc runs with gradient_checkpointing true (its default: each decoder layer recomputed in "
        "the backward, activation_checkpointing.py), alignd with false; "
        + (
            "bf16 off everywhere (fp32)."
            if args.precision == "fp32"
            else "bf16: alignd with resources.precision 'bf16' (a bf16 base, fp32 LoRA weights and attention), "
            "TRL with bf16=True (autocast over fp32 weights)."
        ),
        "What alignd's training pass does differently (the same loss on the same answers): each prompt runs once "
        "for its group's answers, which run on its KV cache (grpo.GroupModels.answer_hidden); the answers' "
        "log-probs and entropies come a chunk of positions at a time, never the whole logits "
        "(fused.TokenLogprobsFunction); its norms, SwiGLU activations and grouped-query attention keep fewer "
        "tensors for the backward (fused.py, precision.py); answers whose advantage is exactly 0 (a group of "
        "equal rewards; their loss and gradient are 0 at beta 0) are left out of the training forward and "
        "backward (grpo.GroupTrainer.learn). TRL forwards every completion with its prompt.",
        f"grader: {json.dumps(GRADER)}",
    ]


if __name__ == "__main__":
    main()
