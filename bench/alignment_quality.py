"""Alignment quality on a real model: alignd's PPO and GRPO against TRL 1.9's PPO, judged by an independent
reward model.

    .venv-bench/bin/python bench/alignment_quality.py --model smollm2 --seconds 600   # make bench-alignment
    .venv-bench/bin/python bench/alignment_quality.py --model tiny --seconds 20 --max-updates 2   # quick

One invocation, every stage its own process (``bench/alignment_child.py``):

1. Preference pairs from the base's own answers: four sampled answers per prompt; of every two, the one a labeler who likes
   concise, ended answers picks (ended beats unended, then the shorter) is ``chosen``. Two disjoint prompt
   sets on disjoint subjects give two pair sets.
2. Two reward models trained by alignd (``reward_model``), one per pair set: the **training** reward model
   that PPO optimises, and the **judge**, which no run ever trains against.
3. PPO runs, each for the same wall-clock budget from its first update (same prompts, threads, LoRA, batch,
   answer length, temperature, learning rate, missing-EOS penalty): alignd's PPO job as shipped (its
   defaults), any alignd variants asked for (``alignd_grpo``: alignd's GRPO job against the same reward
   model, 2 prompts x 4 answers per update), and TRL 1.9's ``PPOTrainer``.
4. Held-out evaluation on prompts about subjects neither reward model nor any policy saw: every policy and the
   base sample ``eval_samples`` answers per prompt through the same code; the judge scores them; the KL to the
   base is measured on the same samples (summed per answer, tempered as sampled).

Figures per policy: the judge's held-out gain over the base (paired by prompt, with its standard error), KL
per answer, end-of-answer (EOS) rate, mean answer tokens, the training reward model's (proxy) gain beside the
judge's, updates done in the budget, peak RSS.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, WORK, bench_python, loadavg, machine_stamp, run_child, write_results
from grpo_vs_trl import write_prompts  # the same four asks per subject as the GRPO benchmark
from ppo_vs_trl import model_dir

CHILD = str(REPO / "bench" / "alignment_child.py")

# Three disjoint subject sets: the training reward model's pairs (and PPO's prompts), the judge's pairs, and the
# held-out prompts. No held-out prompt shares a subject with anything trained on.
_TRAIN_TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "binary search", "the French revolution",
    "black holes", "vaccines", "supply and demand", "recursion", "plate tectonics", "the immune system",
    "climate change", "electric cars", "the stock market", "neural networks", "volcanoes",
]  # fmt: skip
_JUDGE_TOPICS = [
    "democracy", "the moon landing", "prime numbers", "coffee brewing", "sleep", "solar panels",
    "the printing press", "gravity", "glaciers", "the human heart", "origami", "tea ceremonies",
]  # fmt: skip
_HELDOUT_TOPICS = [
    "bread baking", "blockchains", "rainbows", "earthquakes", "jazz", "chess openings", "the Roman empire",
    "tides", "honeybees", "lighthouses", "the Olympic games", "submarines",
]  # fmt: skip

# alignd runs by name: "alignd" is the PPO job as shipped (every setting its default, the shared ones equal to
# them); the others change what their hyperparameters say.
VARIANTS: dict[str, dict[str, Any]] = {
    "alignd": {},
    "alignd_adaptive": {
        # A horizon of 16 episodes lets the coefficient move up to 10% per update of 8: a 10-minute run has
        # about 30 updates, against the 10,000-episode default's 0.016% (made for runs of 100,000+ episodes).
        "hyperparameters": {"kl_control": "adaptive", "kl_coef": 0.05, "kl_target": 1.5, "kl_horizon": 16}
    },
    "alignd_grpo": {
        # GRPO against the same reward model: 2 prompts x a group of 4 answers is PPO's 8 episodes per update.
        # Group sampling is the third lever for learning to end (some answers of a group end, so the
        # missing-EOS penalty gives contrast). beta 0.04 (TRL's default before it went to 0) keeps a KL term,
        # since the target is a small KL; every other setting is GRPO's default or the shared one above.
        "method": "grpo",
        "hyperparameters": {"batch_size": 2, "num_generations": 4, "beta": 0.04},
    },
    "alignd_grpo_beta02": {
        # The same GRPO run with five times the KL weight: beta 0.04 let the KL reach 8.29 nats per answer on
        # 2026-12-02, where the target is at most half of TRL PPO's (4.78).
        "method": "grpo",
        "hyperparameters": {"batch_size": 2, "num_generations": 4, "beta": 0.2},
    },
}


def build_config(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    train_prompts = str(write_prompts(work / "train_prompts.jsonl", _TRAIN_TOPICS))
    return {
        "model": str(model_dir(args.model)),
        "prompts": train_prompts,
        "heldout_prompts": str(write_prompts(work / "heldout_prompts.jsonl", _HELDOUT_TOPICS)),
        "pair_sets": {
            "train": [train_prompts, str(work / "pairs_train.jsonl")],
            "judge": [
                str(write_prompts(work / "judge_prompts.jsonl", _JUDGE_TOPICS)),
                str(work / "pairs_judge.jsonl"),
            ],
        },
        "pairs": {"train": str(work / "pairs_train.jsonl"), "judge": str(work / "pairs_judge.jsonl")},
        "pair_max_tokens": args.max_new_tokens,
        "pair_samples": 4,  # answers per prompt; every pair of them the labeler is not indifferent about
        "threads": args.threads,
        "seed": args.seed,
        "seconds": args.seconds,
        "max_updates": args.max_updates,
        "batch_size": 8,
        "max_new_tokens": args.max_new_tokens,
        "max_prompt_length": 256,
        # alignd's PPO defaults, given to TRL too (TRL's own lr 3e-6 leaves a LoRA policy unchanged in 30
        # updates: shared/NOTES.md; TRL's missing_eos_penalty is off by default and set to alignd's here).
        "learning_rate": 1e-4,
        "temperature": 0.7,
        "missing_eos_penalty": 1.0,
        "trl_kl_coef": 0.05,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "reward_hp": {
            "epochs": 3,
            "batch_size": 8,
            "learning_rate": 2e-4,
            "max_length": 512,
            "eval_fraction": 0.2,
            "eval_steps": 1000,
            "max_steps": args.reward_max_steps,
        },
        "eval_samples": args.eval_samples,
        "variants": VARIANTS,
    }


def _stage(
    stage: str, cfg_path: Path, work: Path, env: dict[str, str], label: str, args: argparse.Namespace
) -> Any:
    """Run one stage in its own process; with ``--resume``, a stage whose result is in ``work`` is read back
    instead (its process figures from the ``.run.json`` beside it, when that exists)."""
    result_file = work / f"{label}.json"
    run_file = work / f"{label}.run.json"
    if args.resume and result_file.exists():
        print(f"[alignment] {label}: reusing {result_file.name}", flush=True)
        reused.append(label)
        saved = json.loads(run_file.read_text()) if run_file.exists() else {}
        return SimpleNamespace(result=json.loads(result_file.read_text()), **{**_UNKNOWN_RUN, **saved})
    print(f"[alignment] {label} (load {loadavg()})", flush=True)
    run = run_child(
        [bench_python(), CHILD, stage, str(cfg_path), str(result_file), str(work / "out" / label)],
        result_file=result_file,
        env=env,
        timeout=args.timeout,
    )
    if run.returncode != 0 or not run.result:
        raise SystemExit(f"{label} failed (rc {run.returncode}):\n{run.stderr_tail}")
    run_file.write_text(json.dumps({k: getattr(run, k) for k in _UNKNOWN_RUN}))
    return run


reused: list[str] = []  # the stages --resume read back, named in the results

# What a reused stage without its .run.json cannot say (the runs of the first invocation that wrote none).
_UNKNOWN_RUN: dict[str, Any] = {
    "seconds": None, "peak_rss_bytes": None, "cpu_seconds": None, "loadavg_before": None, "loadavg_after": None,
}  # fmt: skip


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return mean, se


def _per_prompt(values: list[float], samples: int) -> list[float]:
    return [statistics.mean(values[i : i + samples]) for i in range(0, len(values), samples)]


def policy_rows(evaluation: dict[str, Any], runs: dict[str, Any]) -> list[dict[str, Any]]:
    samples = evaluation["samples_per_prompt"]
    results = evaluation["results"]
    base_judge = _per_prompt(results["base"]["judge"], samples)
    base_proxy = _per_prompt(results["base"]["proxy"], samples)
    rows = []
    for label, res in results.items():
        gain, gain_se = _mean_se(
            [a - b for a, b in zip(_per_prompt(res["judge"], samples), base_judge, strict=True)]
        )
        proxy_gain, _ = _mean_se(
            [a - b for a, b in zip(_per_prompt(res["proxy"], samples), base_proxy, strict=True)]
        )
        kl, kl_se = _mean_se(res["kl"])
        run = runs.get(label)
        child = run.result if run is not None else {}
        marks = child.get("step_marks", [])
        rows.append(
            {
                "policy": label,
                "updates": max(0, len(marks) - 1),
                "train_s": round(marks[-1] - marks[0], 1) if len(marks) > 1 else 0.0,
                "judge_gain": round(gain, 3),
                "judge_gain_se": round(gain_se, 3),
                "kl_per_answer": round(kl, 2),
                "kl_se": round(kl_se, 2),
                "eos_rate": round(sum(res["ended"]) / len(res["ended"]), 3),
                "mean_tokens": round(statistics.mean(res["tokens"]), 1),
                "proxy_gain": round(proxy_gain, 3),
                # the process's own peak (VmHWM; each PPO run is one process)
                "peak_rss_gib": round(child["hwm_gib"], 2) if child else None,
            }
        )
    return rows


def targets_of(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["policy"]: r for r in rows}
    trl, base = by.get("trl"), by["base"]
    targets: list[dict[str, Any]] = []
    for name in (r["policy"] for r in rows if r["policy"].startswith("alignd")):
        row = by[name]
        if trl is not None:
            targets += [
                {
                    "target": f"{name}: held-out judge gain >= TRL's (same run)",
                    "measured": f"{row['judge_gain']} (SE {row['judge_gain_se']}) vs {trl['judge_gain']} "
                    f"(SE {trl['judge_gain_se']})",
                    "met": row["judge_gain"] >= trl["judge_gain"],
                },
                {
                    "target": f"{name}: KL per answer <= half TRL's",
                    "measured": f"{row['kl_per_answer']} vs {trl['kl_per_answer']}",
                    "met": row["kl_per_answer"] <= 0.5 * trl["kl_per_answer"],
                },
            ]
        targets.append(
            {
                "target": f"{name}: held-out EOS rate >= 0.5",
                "measured": f"{row['eos_rate']} (base {base['eos_rate']}"
                + (f", TRL {trl['eos_rate']})" if trl is not None else ")"),
                "met": row["eos_rate"] >= 0.5,
            }
        )
    return targets


def run_rows(runs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for label, run in runs.items():
        child = run.result
        kl = [x for x in child.get("kl", []) if not math.isnan(x)]
        rows.append(
            {
                "run": label,
                "updates": max(0, len(child["step_marks"]) - 1),
                "s_per_update": round(
                    statistics.median(b - a for a, b in itertools.pairwise(child["step_marks"])), 1
                )
                if len(child["step_marks"]) > 1
                else None,
                "train_reward_first": round(child["reward_mean"][0], 3) if child["reward_mean"] else None,
                "train_reward_last": round(child["reward_mean"][-1], 3) if child["reward_mean"] else None,
                "train_kl_last": round(kl[-1], 2) if kl else None,
                "kl_coef_last": round(child["kl_coef"][-1], 4) if child.get("kl_coef") else None,
                "setup_s": round(child["setup_seconds"], 1),
                "cpu_share": round(run.cpu_seconds / run.seconds / child["threads"], 2)
                if run.cpu_seconds is not None
                else None,
                "load_before": run.loadavg_before,
                "load_after": run.loadavg_after,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--seconds", type=float, default=600.0, help="training wall-clock budget per PPO run")
    parser.add_argument("--max-updates", type=int, default=1000, help="cap on updates per run (quick runs)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length, training and held-out")
    parser.add_argument("--reward-max-steps", type=int, default=None, help="cap on reward-model steps")
    parser.add_argument("--eval-samples", type=int, default=2, help="held-out answers per prompt and policy")
    parser.add_argument(
        "--runs",
        default="alignd,alignd_grpo,trl",
        help="training runs: alignd variants (VARIANTS: PPO, or GRPO where a variant says so) and trl (PPO)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file stem (default alignment_quality[_tiny])")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--resume", action="store_true", help="reuse the stages whose results the work folder already holds"
    )
    args = parser.parse_args()

    work = WORK / f"alignment-{args.model}-s{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    cfg = build_config(args, work)
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    stamp = machine_stamp(["trl", "accelerate", "datasets"])

    pairs = _stage("pairs", cfg_path, work, env, "pairs", args).result
    reward_models: dict[str, Any] = {}
    for which in ("train", "judge"):
        stage_cfg = work / f"reward_{which}_config.json"
        stage_cfg.write_text(json.dumps({**cfg, "reward_which": which}))
        reward_models[which] = _stage("reward", stage_cfg, work, env, f"reward_{which}", args).result
    cfg.update(
        reward_model=reward_models["train"]["adapter_dir"], judge_model=reward_models["judge"]["adapter_dir"]
    )
    cfg_path.write_text(json.dumps(cfg, indent=2))

    runs: dict[str, Any] = {}
    for name in args.runs.split(","):
        stage = "trl" if name == "trl" else "alignd"
        if stage == "alignd" and name not in VARIANTS:
            raise SystemExit(f"unknown run {name!r}: one of {sorted(VARIANTS)} or trl")
        stage_cfg = work / f"{name}_config.json"
        stage_cfg.write_text(json.dumps({**cfg, "variant": name}))
        runs[name] = _stage(stage, stage_cfg, work, env, name, args)
        print(json.dumps(run_rows({name: runs[name]})), flush=True)

    eval_cfg = work / "eval_config.json"
    adapters = {"base": None, **{name: run.result["adapter_dir"] for name, run in runs.items()}}
    eval_cfg.write_text(json.dumps({**cfg, "eval_adapters": adapters}))
    evaluation = _stage("eval", eval_cfg, work, env, "eval", args).result
    rows = policy_rows(evaluation, runs)
    targets = targets_of(rows)
    reward_rows = [
        {
            "reward_model": which,
            "pairs": pairs[which]["pairs"],
            "ties_dropped": pairs[which]["ties"],
            "steps": rm["steps"],
            "held_out_pair_accuracy": round(rm["eval_accuracy"], 3)
            if rm["eval_accuracy"] is not None
            else None,
            "base_eos_rate": round(pairs[which]["base_eos_rate"], 3),
            "base_mean_tokens": round(pairs[which]["base_mean_tokens"], 1),
        }
        for which, rm in reward_models.items()
    ]
    name = args.name or ("alignment_quality" if args.model == "smollm2" else "alignment_quality_tiny")
    settings = {k: v for k, v in cfg.items() if k not in ("pair_sets", "pairs", "variants")}
    settings["model"] = args.model
    settings["variants"] = {k: VARIANTS[k] for k in runs if k in VARIANTS}
    write_results(
        name,
        title=f"Alignment quality: alignd PPO and GRPO vs TRL 1.9 PPO ({args.model}, {args.seconds:g} s of training each)",
        stamp=stamp,
        tables={
            "Held-out, judged by the independent reward model": rows,
            "Targets": targets,
            "Training runs": run_rows(runs),
            "Reward models (trained by alignd on disjoint pair sets)": reward_rows,
        },
        data={
            "settings": settings,
            "evaluation": evaluation,
            "raw": {k: {"child": r.result, "wall_s": r.seconds} for k, r in runs.items()},
            "reused_stages": sorted(reused),
        },
        notes=_notes(args, evaluation)
        + (
            [
                f"Resumed: {', '.join(reused)} were read back from an earlier invocation in the same work folder "
                "(same code and settings); the other stages ran in this one."
            ]
            if reused
            else []
        ),
    )
    print(json.dumps({"heldout": rows, "targets": targets}))


def _notes(args: argparse.Namespace, evaluation: dict[str, Any]) -> list[str]:
    return [
        f"One seed ({args.seed}); each training run trains {args.seconds:g} s of wall time from its first update "
        "(checked at each update's end, so the last may run past it); loading is apart.",
        f"Held-out: {evaluation['prompts']} prompts on subjects no reward model or policy saw, "
        f"{evaluation['samples_per_prompt']} sampled answers each (temperature 0.7, no top-k/top-p, "
        f"{args.max_new_tokens} new tokens at most), the same code for the base and every adapter (transformers "
        "+ peft). judge_gain: the judge's mean score minus the base's, paired by prompt; its SE is over prompts.",
        "kl_per_answer: on each policy's own held-out samples, sum over the answer's tokens of log pi - log base "
        "(both at the sampling temperature): an unbiased estimate of KL(pi || base) per answer, the same code "
        "for every policy.",
        "eos_rate: the share of held-out answers that ended (EOS) within the token limit.",
        "proxy_gain: the same as judge_gain, scored by the reward model PPO trained against.",
        "TRL 1.9 PPOTrainer: reward model = alignd's training reward model merged into a sequence classifier, "
        "value model initialised from it, LoRA policy (reference = adapter disabled), 4 PPO epochs, 1 "
        "minibatch, lr constant; alignd's lr, temperature, kl_coef (0.05) and missing-EOS penalty (1.0), "
        "which are alignd's defaults.",
        "alignd_grpo: alignd's GRPO job (no value model) against the same training reward model, 2 prompts x 4 "
        "answers per update (PPO's 8 episodes), beta 0.04 (k3 KL to the base in the loss), the shared lr, "
        "temperature, answer length and missing-EOS penalty; its train_kl_last sums the k3 estimate over each "
        "answer's tokens, where PPO's sums its kl_estimator's (k1 by default); the held-out kl_per_answer is one "
        "measure for every policy. alignd_grpo_beta02: the same with beta 0.2.",
    ]


if __name__ == "__main__":
    main()
