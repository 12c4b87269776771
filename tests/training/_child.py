"""Helpers to run the training child as the runner does: write a spec, spawn it, parse its stdout."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_spec(
    folder: Path,
    *,
    model_dir: Path,
    dataset: Path,
    hyperparameters: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    method: str = "sft",
    seed: int = 0,
    init_adapter: Path | None = None,
    validation: Path | None = None,
) -> Path:
    """A TrainingSpec as the runner writes it: hyperparameters and LoRA resolved by the service's models.

    The dataset's role (and kind) is the one ``method`` needs; hyperparameters go through that method's model.
    """
    from contract.hyperparameters import HYPERPARAMETER_MODELS, LoraSettings, SFTHyperparameters
    from contract.methods import REQUIRED_DATASETS, Method

    known = method in Method.__members__
    role = REQUIRED_DATASETS[Method(method)][0] if known else "sft"
    hp_model = HYPERPARAMETER_MODELS.get(Method(method), SFTHyperparameters) if known else SFTHyperparameters
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "job_id": "job_test",
        "method": method,
        "base_model": {"id": "model_tiny", "name": "tiny-llama", "path": str(model_dir)},
        "datasets": {
            role: {
                "id": "ds_tiny",
                "name": "tiny-colours",
                "kind": role,
                "sha256": hashlib.sha256(dataset.read_bytes()).hexdigest(),
                "num_records": sum(1 for line in dataset.read_text().splitlines() if line.strip()),
                "path": str(dataset),
            }
        },
        "lora": LoraSettings.model_validate(lora or {}).model_dump(),
        "hyperparameters": hp_model.model_validate(hyperparameters or {}).model_dump(),
        "seed": seed,
        "output_dir": str(folder / "out"),
    }
    if init_adapter is not None:
        spec["init_adapter"] = {"id": "adapter_init", "path": str(init_adapter)}
    if validation is not None:  # the optional held-out set (sft or dpo), of the training set's kind
        spec["datasets"]["validation"] = {  # type: ignore[index]
            "id": "ds_tiny_validation",
            "name": "tiny-colours-held-out",
            "kind": role,
            "sha256": hashlib.sha256(validation.read_bytes()).hexdigest(),
            "num_records": sum(1 for line in validation.read_text().splitlines() if line.strip()),
            "path": str(validation),
        }
    path = folder / "spec.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def child_env() -> dict[str, str]:
    # One thread: on a shared 2-core machine (other test processes running) two OpenMP threads spin at every
    # op barrier while the other is descheduled; measured 8x slower per step than one thread under load.
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "ALIGND_TORCH_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


@dataclass
class ChildRun:
    returncode: int
    lines: list[str]
    stderr: str

    @property
    def messages(self) -> list[dict[str, Any]]:
        from contract.protocol import parse_line

        parsed = [parse_line(line) for line in self.lines]
        assert all(m is not None for m in parsed), f"non-protocol line on stdout: {self.lines}"
        return [m for m in parsed if m is not None]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]


def run_child(spec_path: Path, *, timeout: float = 120) -> ChildRun:
    proc = subprocess.run(
        [sys.executable, "-m", "workers.training", str(spec_path)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return ChildRun(proc.returncode, proc.stdout.splitlines(), proc.stderr)
