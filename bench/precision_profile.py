"""Where ``resources.precision: "bf16"`` gains on this CPU, part by part (``make bench-precision``).

    .venv-bench/bin/python bench/precision_profile.py --model smollm2

Three measurements, each in its own process, on the same machine in one invocation:

1. **matmul**: a 608 x 576 x 1536 product (SmolLM2's MLP on a PPO minibatch of 8 x 76 tokens) cycling
   through 30 weight matrices, as a forward (``linear``) and as a backward (grad_output @ W), fp32 vs bf16.
2. **forward + backward** of SmolLM2's decoder over 8 x 76 tokens (4 rows left-padded), frozen weights, the
   gradient taken to the input embeddings: fp32 with sdpa, bf16 with sdpa, bf16 with alignd's fp32 attention
   (``workers/training/precision.py``).
3. **PPO phases**: alignd's PPO update on ``make bench-ppo``'s setup (its reward model and prompts), fp32 vs
   bf16, with wall-clock timers around the trainer's calls (sampling, the policy forward, the LM head, the
   reward pass, the minibatch forward/backward, Adam), per update over updates 2..N.

The GFLOP/s and seconds are this machine's; the ratios between the rows are the point.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, WORK, bench_python, loadavg, machine_stamp, run_child, write_results

sys.path.insert(0, str(REPO))


def matmul_rows(threads: int) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(threads)
    rows = []
    m, k, n = 608, 576, 1536
    for dtype in (torch.float32, torch.bfloat16):
        weights = [torch.randn(n, k, dtype=dtype) for _ in range(30)]
        x = torch.randn(m, k, dtype=dtype)
        grad = torch.randn(m, n, dtype=dtype)
        for label, fn in (
            ("forward: linear(x, W)", lambda w, x=x: torch.nn.functional.linear(x, w)),
            ("backward: grad @ W", lambda w, grad=grad: grad @ w),
        ):
            for w in weights:  # warm-up: oneDNN primitives, page faults
                fn(w)
            started = time.perf_counter()
            for _ in range(3):
                for w in weights:
                    fn(w)
            seconds = (time.perf_counter() - started) / 90
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "product": label,
                    "shape": f"{m} x {k} x {n}",
                    "gflops": round(2 * m * k * n / seconds / 1e9, 1),
                }
            )
    return rows


def decoder_rows(model: str, threads: int) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    from workers.training import lora

    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    ids = torch.randint(0, 49000, (8, 76), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[:4, :5] = 0
    rows = []
    settings = [
        ("fp32", "sdpa", lambda: lora.load_base_model(model, device=cpu, precision="fp32")),
        (
            "bf16",
            "sdpa (PyTorch's bf16 kernels)",
            lambda: AutoModelForCausalLM.from_pretrained(
                model, dtype=torch.bfloat16, attn_implementation="sdpa"
            ),
        ),
        (
            "bf16",
            "fp32 attention (alignd)",
            lambda: lora.load_base_model(model, device=cpu, precision="bf16"),
        ),
    ]
    for dtype, attention, load in settings:
        net = load()
        net.eval()
        net.requires_grad_(False)
        embed = net.get_input_embeddings()

        def once(net: Any = net, embed: Any = embed) -> None:
            inputs = embed(ids).detach().requires_grad_(True)
            hidden = net.model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
            hidden.float().pow(2).mean().backward()

        once()
        times = []
        for _ in range(3):
            started = time.perf_counter()
            once()
            times.append(time.perf_counter() - started)
        rows.append(
            {
                "dtype": dtype,
                "attention": attention,
                "tokens": "8 x 76 (4 rows padded)",
                "fwd_bwd_median_s": round(statistics.median(times), 3),
                "fwd_bwd_min_s": round(min(times), 3),
            }
        )
        del net
    return rows


# The trainer calls timed in the PPO child: (object path, attribute, label).
_PHASES = [
    ("rollout", "sample_responses", "sampling"),
    ("ppo.PPOTrainer", "_policy_forward", "policy forward (rollout + minibatches)"),
    ("ppo.SharedBaseModel", "response_logits", "LM head"),
    ("ppo.AdapterRewardModel", "__call__", "reward pass"),
    ("ppo.PPOTrainer", "_minibatch_backward", "minibatch forward + backward"),
    ("ppo.PPOTrainer", "learn", "learn (all minibatches + Adam)"),
    ("ppo.PPOTrainer", "rollout", "rollout (sampling + no-grad passes)"),
]


def ppo_phases(cfg_path: str, precision: str, updates: int) -> dict[str, Any]:
    import ppo_child
    import torch

    from workers.training import ppo, rollout

    cfg = json.loads(Path(cfg_path).read_text())
    cfg.update(updates=updates, precision=precision)
    per_update: list[dict[str, float]] = []
    current: dict[str, float] = collections.defaultdict(float)
    owners = {"rollout": rollout, "ppo": ppo}

    def timed(owner: Any, attribute: str, label: str) -> None:
        original = getattr(owner, attribute)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                current[label] += time.perf_counter() - started

        setattr(owner, attribute, wrapper)

    for path, attribute, label in _PHASES:
        module, _, cls = path.partition(".")
        owner = getattr(owners[module], cls) if cls else owners[module]
        timed(owner, attribute, label)
    original_step = ppo.PPOTrainer.step

    def step(self: Any, prompts: Any) -> Any:
        current.clear()
        started = time.perf_counter()
        result = original_step(self, prompts)
        per_update.append({"update": time.perf_counter() - started, **current})
        return result

    ppo.PPOTrainer.step = step  # type: ignore[method-assign]
    result = ppo_child.run_alignd(cfg)
    steady = per_update[1:] if len(per_update) > 1 else per_update
    keys = ["update", *(label for _, _, label in _PHASES)]
    return {
        "precision": precision,
        "updates": len(per_update),
        "seconds_per_update": {k: round(statistics.mean(u.get(k, 0.0) for u in steady), 3) for k in keys},
        "per_update": per_update,
        "kl": result["kl"],
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["smollm2"], default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, out, *rest = args.child
        if kind == "matmul":
            result: Any = matmul_rows(args.threads)
        elif kind == "decoder":
            result = decoder_rows(rest[0], args.threads)
        else:
            result = ppo_phases(rest[0], rest[1], args.updates)
        Path(out).write_text(json.dumps(result))
        return

    from ppo_vs_trl import SMOLLM2

    work = WORK / "ppo-smollm2"
    cfg_path = work / "config.json"
    if not (work / "reward_model" / "adapter_model.safetensors").exists() or not cfg_path.exists():
        raise SystemExit("run make bench-ppo first: this profile uses its reward model and prompts")
    py = bench_python()
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    me = str(Path(__file__).resolve())
    stamp = machine_stamp(["accelerate"])
    results: dict[str, Any] = {}
    jobs = [
        ("matmul", []),
        ("decoder", [str(SMOLLM2)]),
        ("ppo-fp32", [str(cfg_path), "fp32"]),
        ("ppo-bf16", [str(cfg_path), "bf16"]),
    ]
    for label, extra in jobs:
        out = work / f"precision-{label}.json"
        kind = label.split("-")[0]
        print(f"[precision] {label} (load {loadavg()})", flush=True)
        command = [py, me, "--threads", str(args.threads), "--updates", str(args.updates), "--child", kind]
        run = run_child([*command, str(out), *extra], result_file=out, env=env, timeout=1800)
        if run.returncode != 0 or run.result is None:
            raise SystemExit(f"{label} failed (rc {run.returncode}):\n{run.stderr_tail}")
        results[label] = {"result": run.result, "peak_rss_gib": round(run.peak_rss_bytes / 2**30, 2)}
    phases = [
        {
            "phase": phase,
            **{
                f"{p}_s": results[f"ppo-{p}"]["result"]["seconds_per_update"][phase] for p in ("fp32", "bf16")
            },
        }
        for phase in results["ppo-fp32"]["result"]["seconds_per_update"]
    ]
    for row in phases:
        row["bf16_over_fp32"] = round(row["bf16_s"] / row["fp32_s"], 3) if row["fp32_s"] else None
    peaks = {p: results[f"ppo-{p}"]["peak_rss_gib"] for p in ("fp32", "bf16")}
    write_results(
        "precision_profile",
        title="bf16 vs fp32 on this CPU: matmuls, SmolLM2 forward + backward, alignd's PPO phases",
        stamp=stamp,
        tables={
            "Matrix products (30 weights cycled)": results["matmul"]["result"],
            "SmolLM2 decoder forward + backward": results["decoder"]["result"],
            "alignd PPO update by phase (seconds per update, mean over updates 2..N)": phases,
        },
        data={
            "peak_rss_gib": peaks,
            "ratios": {f"bf16_over_fp32 {row['phase']}": row["bf16_over_fp32"] for row in phases},
            "raw": results,
        },
        notes=[
            "Phases nest: the policy forward and the LM head run inside the rollout and the minibatch passes; "
            "learn holds every minibatch forward + backward and Adam; update = rollout + learn.",
            f"PPO peak RSS of the child process: fp32 {peaks['fp32']} GiB, bf16 {peaks['bf16']} GiB.",
            "The PPO setup is make bench-ppo's (bench/ppo_vs_trl.py): 8 prompts, 32 new tokens, 4 PPO epochs, "
            "1 minibatch; each precision in its own process.",
        ],
    )


if __name__ == "__main__":
    main()
