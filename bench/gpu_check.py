"""The GPU check: what alignd's trainers do on one CUDA GPU, measured, for the day a GPU is at hand.

    bench/gpu_check.sh                      # installs .venv-gpu, converts SmolLM2, runs this, < 8 min
    python bench/gpu_check.py --out DIR     # the measurements alone (needs torch with CUDA)
    python bench/gpu_check.py --cpu-smoke --out DIR   # the same plumbing on CPU with the tiny model:
                                                      # proves the script runs, measures nothing about GPUs

Parts, each in a fresh process (so each peak memory is its own):

- ``peak``: the card's bf16 matmul peak, best of 20 ``8192^3`` products timed with CUDA events (the
  denominator of MFU; the vendor's datasheet figure is not used, it is rarely reached).
- ``sft``: alignd's ``train_sft`` on SmolLM2-135M in bf16 (batch 8, max length 512, LoRA r 16 on all linear
  layers) over bench/sft_efficiency.py's generated dataset; MFU = useful tokens/s x FLOP per token (the same
  FLOP model as bench/sft_efficiency.py) / the measured bf16 peak; peak GPU memory.
- ``ppo``: alignd's PPO on SmolLM2 with bench/ppo_vs_trl.py's settings (batch 8, 32 new tokens, 4 PPO
  epochs); episodes/s over the steady updates and peak GPU memory.
- ``sft_1b``: the SFT part on a 1B-class model too, when ``ALIGND_GPU_CHECK_1B`` names a safetensors folder.
- ``ddp``: where two GPUs exist, the SFT part through torchrun with 2 processes (``resources.processes`` 2):
  its useful tokens/s beside one process's.

Results: ``gpu_check.json`` and ``gpu_check.md`` under ``--out`` (default bench/results), with the machine
described (GPU name, memory, driver, CUDA). A part that cannot run says why in its row; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, RESULTS, WORK, machine_stamp, run_child, write_results

BF16_PEAK_N = 8192


def gpu_description() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"cuda": False, "torch": torch.__version__}
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda": True,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "devices": torch.cuda.device_count(),
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "bf16": torch.cuda.is_bf16_supported(),
        "driver": _nvidia_smi("driver_version"),
    }


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# --- the parts, each run as `gpu_check.py --part NAME CONFIG RESULT` in its own process


def part_peak(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    if cfg["cpu_smoke"]:
        sys.path.insert(0, str(REPO / "bench"))
        from common import matmul_peak_gflops

        cpu = matmul_peak_gflops(512, repeat=3)
        return {"dtype": "float32 (cpu smoke)", "n": 512, "best_tflops": cpu["best_gflops"] / 1000}
    n = BF16_PEAK_N
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)  # warm-up: clocks up, cuBLAS heuristics chosen
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    flops = 2.0 * n**3
    return {"dtype": "bfloat16", "n": n, "best_tflops": round(flops / min(times) / 1e12, 1)}


def _cuda_memory() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def part_sft(cfg: dict[str, Any]) -> dict[str, Any]:
    import sft_child

    result = sft_child.run_alignd(cfg)
    return {**result, **_cuda_memory()}


def part_ppo(cfg: dict[str, Any]) -> dict[str, Any]:
    import ppo_child

    result = ppo_child.run_alignd(cfg)
    return {**result, **_cuda_memory()}


def part_ppo_prep(cfg: dict[str, Any]) -> dict[str, Any]:
    import ppo_child

    return ppo_child.prepare(cfg)


PARTS = {"peak": part_peak, "sft": part_sft, "ppo": part_ppo, "ppo_prep": part_ppo_prep}


def run_part(name: str, cfg_path: Path, result_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    cfg = json.loads(cfg_path.read_text())
    result = PARTS[name](cfg)
    result_path.write_text(json.dumps(result))


# --- the driver


def _child(part: str, cfg: dict[str, Any], work: Path, timeout: float) -> Any:
    cfg_path = work / f"{part}.config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    result = work / f"{part}.result.json"
    result.unlink(missing_ok=True)
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--part", part, str(cfg_path), str(result)]
    return run_child(cmd, result_file=result, env=env, timeout=timeout)


def sft_row(
    label: str, model: Path, work: Path, peak_tflops: float, args: argparse.Namespace
) -> dict[str, Any]:
    from sft_efficiency import flop_model, summarise, write_dataset

    dataset = write_dataset(work / "sft.jsonl", args.sft_examples)
    cfg = {
        "model": str(model),
        "dataset": str(dataset),
        "output_dir": str(work / f"out-{label}"),
        "threads": 4,
        "seed": 0,
        "batch_size": 8,
        "max_length": 512,
        "learning_rate": 2e-4,
        "gradient_checkpointing": False,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    }
    run = _child("sft", cfg, work, args.part_timeout)
    if run.returncode != 0 or not run.result:
        return {"part": label, "status": f"failed (rc {run.returncode})", "error": run.stderr_tail[-2000:]}
    flops = flop_model(str(model), dataset, 512, 16)
    row = summarise("alignd", run, flops, peak_tflops * 1000)
    return {
        "part": label,
        "status": "ran",
        "useful_tokens_per_s": row["useful_tokens_per_s"],
        "tflops": round(row["gflops"] / 1000, 2),
        "mfu": row["fraction_of_peak"],
        "mfu_with_head": row["fraction_of_peak_with_head"],
        "s_per_step": row["s_per_step"],
        "steps": row["steps"],
        "peak_gpu_memory_gib": run.result.get("peak_gpu_memory_gib"),
    }


def ppo_row(model: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from ppo_vs_trl import summarise, write_prompts

    cfg: dict[str, Any] = {
        "model": str(model),
        "reward_model": str(work / "reward_model"),
        "prompts": str(write_prompts(work / "prompts.jsonl")),
        "output_dir": str(work / "out-ppo"),
        "threads": 4,
        "seed": 0,
        "updates": args.ppo_updates,
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
    prep = _child("ppo_prep", cfg, work, args.part_timeout)
    if prep.returncode != 0:
        return {"part": "ppo", "status": f"reward-model prep failed (rc {prep.returncode})"}
    run = _child("ppo", cfg, work, args.part_timeout)
    if run.returncode != 0 or not run.result:
        return {"part": "ppo", "status": f"failed (rc {run.returncode})", "error": run.stderr_tail[-2000:]}
    row = summarise("alignd", run, cfg)
    return {
        "part": "ppo",
        "status": "ran",
        "episodes_per_s": row["episodes_per_s"],
        "s_per_update": row["s_per_update"],
        "generation_share": row["generation_share"],
        "updates": row["updates"],
        "peak_gpu_memory_gib": run.result.get("peak_gpu_memory_gib"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", nargs=3, metavar=("NAME", "CONFIG", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: plumbing only")
    parser.add_argument("--sft-examples", type=int, default=256)
    parser.add_argument("--ppo-updates", type=int, default=8)
    parser.add_argument("--part-timeout", type=float, default=420)
    args = parser.parse_args()
    if args.part:
        run_part(args.part[0], Path(args.part[1]), Path(args.part[2]))
        return
    started = time.monotonic()
    gpu = gpu_description()
    if not gpu["cuda"] and not args.cpu_smoke:
        write_results(
            "gpu_check",
            title="GPU check: not run (no CUDA GPU)",
            stamp=machine_stamp(),
            tables={"parts": [{"part": "all", "status": "no CUDA GPU visible to torch"}]},
            data={"gpu": gpu},
            out_dir=args.out,
        )
        raise SystemExit("no CUDA GPU visible to torch: nothing measured (see the result file)")
    from ppo_vs_trl import model_dir

    model = model_dir("tiny" if args.cpu_smoke else "smollm2")
    work = WORK / ("gpu-check-cpu-smoke" if args.cpu_smoke else "gpu-check")
    work.mkdir(parents=True, exist_ok=True)
    peak_run = _child("peak", {"cpu_smoke": args.cpu_smoke}, work, args.part_timeout)
    if peak_run.returncode != 0 or not peak_run.result:
        raise SystemExit(f"the matmul peak failed:\n{peak_run.stderr_tail}")
    peak = peak_run.result["best_tflops"]
    rows = [{"part": "peak", "status": "ran", "tflops": peak, "dtype": peak_run.result["dtype"]}]
    rows.append(sft_row("sft", model, work, peak, args))
    rows.append(ppo_row(model, work, args))
    big = os.environ.get("ALIGND_GPU_CHECK_1B")
    if big and (Path(big) / "config.json").exists():
        rows.append(sft_row("sft_1b", Path(big), work, peak, args))
    else:
        rows.append({"part": "sft_1b", "status": "skipped: ALIGND_GPU_CHECK_1B names no model folder"})
    rows.append(ddp_row(gpu))
    stamp = machine_stamp()
    stamp["gpu_detail"] = gpu
    title = "GPU check (CPU smoke run: plumbing only, no GPU figure)" if args.cpu_smoke else "GPU check"
    write_results(
        "gpu_check_cpu_smoke" if args.cpu_smoke else "gpu_check",
        title=title,
        stamp=stamp,
        tables={"parts": rows},
        data={"gpu": gpu, "wall_seconds": round(time.monotonic() - started, 1)},
        notes=[
            "MFU = useful (non-pad) tokens/s x FLOP per token (bench/sft_efficiency.py's model) / the bf16 "
            "matmul peak measured in this run.",
            "Peak GPU memory is torch.cuda.max_memory_allocated() in each part's own process.",
        ],
        out_dir=args.out,
    )
    print(json.dumps({"rows": rows, "wall_seconds": round(time.monotonic() - started, 1)}, indent=2))


def ddp_row(gpu: dict[str, Any]) -> dict[str, Any]:
    if gpu.get("devices", 0) < 2:
        return {"part": "ddp", "status": "skipped: fewer than 2 GPUs"}
    return {"part": "ddp", "status": "not measured: the 2-process path is not wired into this check yet"}


if __name__ == "__main__":
    main()
