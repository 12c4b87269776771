"""The torchrun path at the child level: ``python -m workers.training.launch N spec.json``, as the runner starts it.

A checkpoint holds nothing that depends on the number of processes (the global step, epoch and position in
the epoch's seeded batch order; LoRA weights, optimizer and schedule, the same on every rank): a 1-process
run's checkpoint resumed on 2 processes goes on with the same losses the 1-process run had.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.training._child import REPO_ROOT, ChildRun, child_env, run_child, write_spec

HYPERPARAMETERS = {
    "epochs": 10,
    "max_steps": 6,
    "batch_size": 4,
    "learning_rate": 5e-3,
    "max_length": 48,
    "logging_steps": 1,
    "checkpoint_steps": 3,
}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


def _launch(spec_path: Path, processes: int, timeout: float = 240) -> ChildRun:
    proc = subprocess.run(
        [sys.executable, "-m", "workers.training.launch", str(processes), str(spec_path)],
        cwd=REPO_ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return ChildRun(proc.returncode, proc.stdout.splitlines(), proc.stderr)


def _losses(run: ChildRun) -> dict[int, float]:
    return {m["step"]: m["values"]["loss"] for m in run.of_type("metric") if "loss" in m["values"]}


def _with(spec_path: Path, **changes: Any) -> None:
    spec = json.loads(spec_path.read_text())
    spec.update(changes)
    spec_path.write_text(json.dumps(spec))


def test_a_one_process_checkpoint_resumes_on_two_processes_with_the_same_losses(
    tmp_path: Path, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    single = write_spec(
        tmp_path / "one",
        model_dir=tiny_model_dir,
        dataset=sft_jsonl,
        hyperparameters=HYPERPARAMETERS,
        lora=LORA,
    )
    _with(single, checkpoint_dir=str(tmp_path / "one" / "checkpoints"))
    first = run_child(single, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    at_3 = next(m for m in first.of_type("checkpoint") if m["step"] == 3)

    double = write_spec(
        tmp_path / "two",
        model_dir=tiny_model_dir,
        dataset=sft_jsonl,
        hyperparameters=HYPERPARAMETERS,
        lora=LORA,
    )
    _with(
        double,
        checkpoint_dir=str(tmp_path / "two" / "checkpoints"),
        resume_from={"path": at_3["path"], "stage": "sft", "step": 3},
    )
    second = _launch(double, 2)
    assert second.returncode == 0, second.stderr[-3000:]
    events = [m["message"] for m in second.of_type("event")]
    assert any(e.startswith("resumed from checkpoint at step 3") for e in events), events
    assert any(e.startswith("data parallel over 2 processes (gloo") for e in events), events
    resumed, original = _losses(second), _losses(first)
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        assert resumed[step] == pytest.approx(original[step], rel=1e-4), (step, resumed, original)
    # Rank 0 alone wrote: one adapter and one card announced, checkpoints only from rank 0.
    kinds = sorted(m["kind"] for m in second.of_type("artifact"))
    assert kinds == ["adapter", "model_card"], kinds
    assert [m["step"] for m in second.of_type("checkpoint")] == [6]


def test_the_launcher_refuses_a_wrong_command_line(tmp_path: Path) -> None:
    run = _launch(tmp_path / "missing.json", 0, timeout=60)
    assert run.returncode == 2
    assert run.of_type("error")[0]["code"] == "invalid_spec"


FSDP_HYPERPARAMETERS = {
    **HYPERPARAMETERS,
    # 3 examples a step over 2 ranks in 2 micro-batches: rank 0 runs two, rank 1 one and a filler (fsdp's
    # lock-step forwards); 7 held-out examples in batches of 3: rank 0 has two batches, rank 1 one.
    "batch_size": 3,
    "gradient_accumulation_steps": 2,
    "eval_steps": 3,
}


def _checkpoint_tensors(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    from workers.training.checkpoint import WEIGHTS_FILE

    return load_file(str(Path(path) / WEIGHTS_FILE))


def test_fsdp_shards_the_layers_matches_one_process_and_its_checkpoints_resume_across_strategies(
    tmp_path: Path, tiny_model_dir: Path, sft_jsonl: Path
) -> None:
    from tests.helpers.tiny_model import tiny_sft_jsonl

    held_out = tiny_sft_jsonl(tmp_path / "v.jsonl", n=7, seed=1)

    def spec(name: str, **changes: Any) -> Path:
        path = write_spec(
            tmp_path / name,
            model_dir=tiny_model_dir,
            dataset=sft_jsonl,
            hyperparameters=FSDP_HYPERPARAMETERS,
            lora=LORA,
            validation=held_out,
        )
        _with(path, checkpoint_dir=str(tmp_path / name / "checkpoints"), **changes)
        return path

    single = run_child(spec("one"), timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = _launch(spec("fsdp", resources={"processes": 2, "strategy": "fsdp"}), 2)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    events = [m["message"] for m in sharded.of_type("event")]
    assert any("decoder layers sharded (fsdp)" in e for e in events), events
    share = next(
        re.search(r"holds ([\d,]+) of the model's ([\d,]+)", e) for e in events if e.startswith("fsdp:")
    )
    assert share is not None, events
    local, total = (int(share.group(i).replace(",", "")) for i in (1, 2))
    # The tiny model's two layers are half its parameters (the embeddings and the head the rest): each rank
    # holds half of the layers' share.
    print(f"fsdp rank 0 holds {local:,} of {total:,} parameter elements")
    assert local < 0.85 * total

    def metric(run: ChildRun, name: str) -> dict[int, float]:
        return {m["step"]: m["values"][name] for m in run.of_type("metric") if name in m["values"]}

    for name in ("loss", "eval_loss"):
        one, two = metric(single, name), metric(sharded, name)
        assert one and sorted(one) == sorted(two), (name, one, two)
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-4), (name, step, one, two)
    # The checkpoint holds whole tensors (gathered from the shards), the same names and shapes as one
    # process's: it resumes on any number of processes.
    at_3 = [next(m for m in run.of_type("checkpoint") if m["step"] == 3) for run in (single, sharded)]
    whole, gathered = (_checkpoint_tensors(checkpoint["path"]) for checkpoint in at_3)
    assert {k: v.shape for k, v in whole.items()} == {k: v.shape for k, v in gathered.items()}
    resumed = run_child(spec("resumed", resume_from={"path": at_3[1]["path"], "stage": "sft", "step": 3}))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = metric(resumed, "loss")
    assert sorted(after) == [4, 5, 6]
    for step in after:
        assert after[step] == pytest.approx(metric(single, "loss")[step], rel=1e-4), (step, after)
    # And the other way: one process's checkpoint resumed on 2 fsdp ranks (each takes its shard of the
    # weights and of Adam's moments back) goes on with the same losses.
    onto_fsdp = _launch(
        spec(
            "fsdp-resumed",
            resources={"processes": 2, "strategy": "fsdp"},
            resume_from={"path": at_3[0]["path"], "stage": "sft", "step": 3},
        ),
        2,
    )
    assert onto_fsdp.returncode == 0, onto_fsdp.stderr[-3000:]
    after = metric(onto_fsdp, "loss")
    assert sorted(after) == [4, 5, 6]
    for step in after:
        assert after[step] == pytest.approx(metric(single, "loss")[step], rel=1e-4), (step, after)
    # One adapter, from rank 0, that plain peft loads.
    adapters = [m for m in sharded.of_type("artifact") if m["kind"] == "adapter"]
    assert len(adapters) == 1
    _load_adapter_with_plain_peft(tiny_model_dir, Path(adapters[0]["path"]))


def _load_adapter_with_plain_peft(base_dir: Path, adapter_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert lora_b and all(float(p.abs().sum()) > 0 for p in lora_b)  # every layer's B trained (B starts at 0)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
