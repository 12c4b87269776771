"""bench/gpu_check.py: where no GPU is it measures nothing and says so; its CPU smoke run goes through every
part (peak, SFT, PPO) with the tiny model, so the day a GPU is lent the script is not debugged on its clock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_without_a_gpu_it_writes_not_run_and_fails(tmp_path: Path) -> None:
    if _cuda():
        pytest.skip("a CUDA GPU is here: the check would measure it")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode != 0
    assert "no CUDA GPU" in run.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["gpu"]["cuda"] is False
    assert result["tables"]["parts"] == [{"part": "all", "status": "no CUDA GPU visible to torch"}]


def test_cpu_smoke_runs_every_part(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(tmp_path), "--sft-examples", "16",
         "--ppo-updates", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())
    rows = {row["part"]: row for row in result["tables"]["parts"]}
    assert rows["peak"]["status"] == rows["sft"]["status"] == rows["ppo"]["status"] == "ran"
    assert rows["sft"]["useful_tokens_per_s"] > 0 and 0 < rows["sft"]["mfu"] < 1
    assert rows["ppo"]["episodes_per_s"] > 0 and rows["ppo"]["updates"] == 2
    assert "CPU smoke" in (tmp_path / "gpu_check_cpu_smoke.md").read_text()
