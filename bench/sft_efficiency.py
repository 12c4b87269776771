"""SFT with LoRA: achieved FLOP/s as a fraction of the fp32 matmul peak measured in the same run, and useful
(non-pad) tokens/s side by side with TRL's ``SFTTrainer``, on a generated dataset of varied lengths.

    .venv-bench/bin/python bench/sft_efficiency.py --model smollm2        # make bench-sft
    .venv-bench/bin/python bench/sft_efficiency.py --model tiny --examples 64   # bench-quick

FLOP count per useful token (frozen base, LoRA adapters, AdamW on the adapters only):

    4N                  2N forward + 2N activation gradients through the frozen linear layers (no weight
                        gradients); N = non-embedding parameters
  + 6 d_attn L^2 / L    causal attention (QK^T and AV over the lower triangle: 2 d_attn L^2 forward per layer,
                        twice that backward), per layer, summed over the actual example lengths L
  + 6 r (d_in + d_out)  per adapted linear: forward, activation gradient and weight gradient of A and B
  [+ 4 V d]             the LM head (tied to the embeddings, so not in N): forward + activation gradient;
                        reported separately ("with head")

Useful tokens are the non-pad input tokens (prompt + completion). Padding computes but is not counted, so
padding waste shows as a lower fraction. The steady-state rate excludes the first optimizer step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, WORDS, WORK, bench_python, loadavg, machine_stamp, run_child, write_results
from ppo_vs_trl import model_dir

_WORDS = [
    *WORDS,
    "system",
    "memory",
    "learning",
    "network",
    "training",
    "language",
    "simple",
    "clear",
    "useful",
    "short",
    "long",
    "small",
    "large",
]


def write_dataset(path: Path, n: int, seed: int = 0, mu: float = math.log(140), sigma: float = 0.7) -> Path:
    """``n`` single-turn conversations whose lengths (in words, ~1.2 tokens each) follow a lognormal clipped
    to 20..512, 15-40% of it prompt. Deterministic in ``seed``."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        total = int(min(512, max(20, rng.lognormvariate(mu, sigma))) / 1.2)
        prompt_words = max(4, int(total * rng.uniform(0.15, 0.4)))
        answer_words = max(4, total - prompt_words)
        prompt = " ".join(rng.choices(_WORDS, k=prompt_words)).capitalize() + "?"
        answer = " ".join(rng.choices(_WORDS, k=answer_words)).capitalize() + "."
        lines.append(
            json.dumps(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            )
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def flop_model(model_path: str, dataset: Path, max_length: int, r: int) -> dict[str, Any]:
    """Per-useful-token FLOPs of one training step over the whole dataset (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from workers.training import data, lora

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    tied = head is emb
    n_non_embedding = total - emb.numel() - (0 if tied else head.numel())
    lora_per_token = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            lora_per_token += 6 * r * (module.in_features + module.out_features)
    d_attn = config.num_attention_heads * getattr(
        config, "head_dim", config.hidden_size // config.num_attention_heads
    )
    layers = config.num_hidden_layers
    vocab, hidden = head.shape

    tokenizer = lora.load_tokenizer(model_path)
    examples, stats = data.tokenize_sft(tokenizer, data.read_sft_records(dataset), max_length=max_length)
    lengths = [e.length for e in examples]
    tokens = sum(lengths)
    attention = sum(6 * d_attn * L * L * layers for L in lengths) / tokens
    base = 4 * n_non_embedding + attention + lora_per_token
    return {
        "non_embedding_params": n_non_embedding,
        "total_params": total,
        "tied_head": tied,
        "lora_flops_per_token": lora_per_token,
        "attention_flops_per_token": round(attention),
        "lm_head_flops_per_token": 4 * vocab * hidden,
        "flops_per_token": round(base),
        "flops_per_token_with_head": round(base + 4 * vocab * hidden),
        "examples": len(lengths),
        "tokens": tokens,
        "length_min_median_max": [min(lengths), int(statistics.median(lengths)), max(lengths)],
        "truncated": stats.truncated,
    }


def peak_in_child(py: str, threads: int, out: Path) -> dict[str, Any]:
    code = (
        "import json,sys; sys.path.insert(0, 'bench'); from common import matmul_peak_gflops; "
        f"print(json.dumps(matmul_peak_gflops(2048, repeat=5, threads={threads})))"
    )
    import subprocess

    result = subprocess.run([py, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def summarise(impl: str, run: Any, flops: dict[str, Any], peak: float) -> dict[str, Any]:
    r = run.result
    marks, toks = r["marks"], r["step_tokens"]
    durations = [b - a for a, b in itertools.pairwise(marks)]
    n = min(len(durations), len(toks))
    durations, toks = durations[:n], toks[:n]
    steady_t = sum(durations[1:]) if n > 1 else sum(durations)
    steady_tok = sum(toks[1:]) if n > 1 else sum(toks)
    tps = steady_tok / steady_t
    achieved = tps * flops["flops_per_token"] / 1e9
    achieved_head = tps * flops["flops_per_token_with_head"] / 1e9
    return {
        "impl": impl,
        "steps": n,
        "useful_tokens_per_s": round(tps, 1),
        "useful_tokens_per_s_all_steps": round(sum(toks) / sum(durations), 1),
        "gflops": round(achieved, 1),
        "fraction_of_peak": round(achieved / peak, 3),
        "fraction_of_peak_with_head": round(achieved_head / peak, 3),
        "s_per_step": round(statistics.median(durations[1:] or durations), 2),
        "peak_rss_gib": round(run.peak_rss_bytes / 2**30, 2),
        "threads": r["threads"],
        # CPU the run actually got per thread and wall second (1.0 = its threads never waited for a core)
        "cpu_share": round(run.cpu_seconds / run.seconds / r["threads"], 2),
        "load_before": run.loadavg_before,
        "load_after": run.loadavg_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--examples", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--skip-trl", action="store_true", help="alignd only (no .venv-bench needed)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--lora-dropout", type=float, default=0.0, help="both sides (alignd's default is 0; 0.05 was before)"
    )
    parser.add_argument("--name", default=None)
    args = parser.parse_args()

    py = bench_python()
    work = WORK / f"sft-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    base = model_dir(args.model)
    dataset = write_dataset(work / "sft.jsonl", args.examples)
    cfg = {
        "model": str(base),
        "dataset": str(dataset),
        "output_dir": str(work / "out"),
        "threads": args.threads,
        "seed": 0,
        "batch_size": 8,
        "max_length": 512,
        "learning_rate": 2e-4,
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora": {"r": 16, "alpha": 32, "dropout": args.lora_dropout, "target_modules": "all-linear"},
    }
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    flops = flop_model(str(base), dataset, 512, 16)
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    child = str(REPO / "bench" / "sft_child.py")
    stamp = machine_stamp(["accelerate", "datasets"])
    peaks = [peak_in_child(py, args.threads, work)]
    rows: list[dict[str, Any]] = []
    raw = []
    impls = ["alignd"] if args.skip_trl else ["alignd", "trl"]
    for round_index in range(args.rounds):
        order = impls if round_index % 2 == 0 else impls[::-1]
        for impl in order:
            result_file = work / f"{impl}.json"
            print(f"[sft] round {round_index + 1}: {impl} (load {loadavg()})", flush=True)
            run = run_child(
                [py, child, impl, str(cfg_path), str(result_file)], result_file=result_file, env=env
            )
            if run.returncode != 0 or not run.result:
                raise SystemExit(f"{impl} failed (rc {run.returncode}):\n{run.stderr_tail}")
            raw.append({"impl": impl, "round": round_index + 1, "child": run.result})
            rows.append({"round": round_index + 1, "run": run})
        peaks.append(peak_in_child(py, args.threads, work))
    peak = max(p["best_gflops"] for p in peaks)
    table = [
        {"round": row["round"], **summarise(raw[i]["impl"], row["run"], flops, peak)}
        for i, row in enumerate(rows)
    ]
    for row in table:
        print(json.dumps(row))
    targets = []
    ours = [r for r in table if r["impl"] == "alignd"]
    frac = statistics.mean(r["fraction_of_peak"] for r in ours)
    targets.append(
        {
            "target": ">= 60% of the fp32 matmul peak (4N + attention + LoRA)",
            "measured": frac,
            "met": frac >= 0.6,
        }
    )
    theirs = [r for r in table if r["impl"] == "trl"]
    if theirs:
        ratio = statistics.mean(r["useful_tokens_per_s"] for r in ours) / statistics.mean(
            r["useful_tokens_per_s"] for r in theirs
        )
        targets.append(
            {
                "target": "useful tokens/s >= 1.2x TRL SFTTrainer",
                "measured": round(ratio, 2),
                "met": ratio >= 1.2,
            }
        )
    name = args.name or ("sft_efficiency" if args.model == "smollm2" else "sft_efficiency_tiny")
    write_results(
        name,
        title=f"SFT with LoRA: alignd vs TRL SFTTrainer ({args.model}, {flops['examples']} examples, batch 8)",
        stamp=stamp,
        tables={
            "Runs (steady state: steps 2..N)": table,
            "fp32 matmul peak, 2048^3 (same run; before and after each round)": peaks,
            "Targets": targets,
        },
        data={"flop_model": flops, "settings": cfg, "raw": raw, "peak_gflops_used": peak},
        notes=[
            f"FLOPs per useful token: 4N + attention + LoRA = {flops['flops_per_token']:,} "
            f"(N = {flops['non_embedding_params']:,} non-embedding parameters, attention "
            f"{flops['attention_flops_per_token']:,}, LoRA {flops['lora_flops_per_token']:,}); with the tied LM head "
            f"(4Vd = {flops['lm_head_flops_per_token']:,}) {flops['flops_per_token_with_head']:,}.",
            f"Dataset: {flops['examples']} conversations, {flops['tokens']:,} tokens after the chat template, lengths "
            f"min/median/max {flops['length_min_median_max']} (lognormal, clipped to 20..512 words/1.2).",
            f"Peak used: the best of the matmul measurements in this run, {peak} GFLOP/s.",
            "alignd batches by length inside random chunks (data.length_bucketed_batches); TRL's SFTTrainer pads "
            "each random batch to its longest member (packing and padding_free off: its defaults).",
        ],
    )
    print(json.dumps({"targets": targets, "peaks": peaks}))


if __name__ == "__main__":
    main()
