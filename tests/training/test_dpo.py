"""The dpo child as the runner runs it; the reference (base or frozen init adapter) checked in-process."""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract.protocol import ProgressWriter, TrainingSpec
from tests.helpers.tiny_model import tiny_preference_jsonl
from tests.training._child import ChildRun, run_child, write_spec
from tests.training.adapters import random_adapter
from workers.training import data
from workers.training.dpo import completion_logps, dpo_loss

METRICS = {"loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "learning_rate", "grad_norm"}
# Measured with seed 0: margin 0.12 -> 1.98 and accuracy 0.54 -> 1.0 (means over 5-step windows) in 30 steps.
DPO_HP = {
    "epochs": 20,
    "max_steps": 30,
    "batch_size": 16,
    "learning_rate": 5e-3,
    "max_length": 64,
    "logging_steps": 5,
    "beta": 0.1,
}
DPO_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ChildRun]:
    work = tmp_path_factory.mktemp("dpo-run")
    dataset = tiny_preference_jsonl(work / "pref.jsonl", n=64, seed=0, messages=True)
    held_out = tiny_preference_jsonl(work / "held_out.jsonl", n=16, seed=1, messages=True)
    base_sha = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    spec = write_spec(
        work,
        model_dir=tiny_model_dir,
        dataset=dataset,
        method="dpo",
        hyperparameters=DPO_HP,
        lora=DPO_LORA,
        validation=held_out,
    )
    started = time.perf_counter()
    run = run_child(spec)
    print(f"dpo child: {time.perf_counter() - started:.1f} s")
    assert run.returncode == 0, run.stderr[-3000:]
    assert hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest() == base_sha
    return work, run


def test_margin_and_accuracy_rise(dpo_run: tuple[Path, ChildRun]) -> None:
    _, run = dpo_run
    assert not run.of_type("error")
    metrics = [m for m in run.of_type("metric") if "loss" in m["values"]]  # the held-out points aside
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    assert all(m["stage"] == "dpo" and set(m["values"]) >= METRICS for m in metrics)
    first, last = metrics[0]["values"], metrics[-1]["values"]
    print(
        "margin", first["margin"], "->", last["margin"], "accuracy", first["accuracy"], "->", last["accuracy"]
    )
    assert last["margin"] > first["margin"] + 1.0
    assert last["accuracy"] > first["accuracy"] and last["accuracy"] >= 0.9
    assert last["loss"] < first["loss"] < math.log(2) + 1e-3
    assert last["rewards_chosen"] > 0 > last["rewards_rejected"]
    for m in metrics:
        v = m["values"]
        assert v["margin"] == pytest.approx(v["rewards_chosen"] - v["rewards_rejected"], abs=1e-6)


def test_held_out_pairs_are_scored_and_learned(dpo_run: tuple[Path, ChildRun]) -> None:
    # No eval_steps: ten evaluations over the 30 steps; before any step the policy is the reference (ln 2).
    _, run = dpo_run
    evals = [m for m in run.of_type("metric") if "eval_loss" in m["values"]]
    assert [m["step"] for m in evals] == list(range(3, 31, 3)), evals
    first, last = evals[0]["values"], evals[-1]["values"]
    assert last["eval_loss"] < first["eval_loss"] < math.log(2) + 1e-3
    # The tiny pairs are easy: held-out accuracy can be 1.0 after 3 steps already; the margin keeps growing.
    assert last["eval_accuracy"] >= max(first["eval_accuracy"], 0.9)
    assert last["eval_margin"] > first["eval_margin"] + 0.5
    assert last["eval_margin"] == pytest.approx(last["eval_rewards_chosen"] - last["eval_rewards_rejected"])
    adapter = next(m for m in run.of_type("artifact") if m["kind"] == "adapter")
    assert adapter["metadata"]["metrics"]["eval_accuracy"] == last["eval_accuracy"]
    assert adapter["metadata"]["datasets"]["validation"]["id"] == "ds_tiny_validation"


def test_adapter_loads_with_peft_and_prefers_chosen_on_new_pairs(
    tiny_model_dir: Path, dpo_run: tuple[Path, ChildRun], tmp_path: Path
) -> None:
    _, run = dpo_run
    artifacts = {m["kind"]: Path(m["path"]) for m in run.of_type("artifact")}
    assert set(artifacts) == {"adapter", "model_card"}
    folder = artifacts["adapter"]
    card = (folder / "README.md").read_text()
    assert "DPO" in card and "the base model (adapter disabled)" in card and '"beta": 0.1' in card
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    assert all(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder)
    ).eval()
    base_file = load_file(str(tiny_model_dir / "model.safetensors"))
    live = {
        k.replace("base_layer.", ""): v
        for k, v in model.get_base_model().state_dict().items()
        if "lora_" not in k
    }
    assert set(live) == set(base_file)
    assert all(torch.equal(live[k], v) for k, v in base_file.items())

    # Pairs 64..83 of the same order were not in the training file: the implicit reward margin
    # beta * ((log pi - log ref)(chosen) - (...)(rejected)) is positive on most of them.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    held_out = tiny_preference_jsonl(tmp_path / "new.jsonl", n=20, seed=0, offset=64)
    pairs, _ = data.tokenize_preference(tokenizer, data.read_preference_records(held_out), max_length=64)
    batch = data.collate_pairs(pairs, int(tokenizer.pad_token_id))
    with torch.no_grad():
        policy = completion_logps(
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch["labels"]
        )
        with model.disable_adapter():
            reference = completion_logps(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                batch["labels"],
            )
    n = len(pairs)
    _, chosen, rejected = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=0.1)
    accuracy = float((chosen > rejected).float().mean())
    print("held-out implicit-reward accuracy", accuracy, "margin", float((chosen - rejected).mean()))
    assert accuracy >= 0.8 and float((chosen - rejected).mean()) > 0.5


@pytest.mark.parametrize("reference_model", ["init_adapter", "base"])
def test_init_adapter_reference(tiny_model_dir: Path, tmp_path: Path, reference_model: str) -> None:
    """Continuing from an SFT adapter: with the frozen-copy reference, the policy starts *equal* to the
    reference (loss ln 2, rewards 0 at step 1); with the base as reference it does not. Base weights and the
    reference adapter stay untouched; the policy's LoRA moves."""
    from workers.training.context import RunContext
    from workers.training.dpo import train_dpo

    init = random_adapter(tiny_model_dir, tmp_path / "sft", seed=5, scale=0.3)
    dataset = tiny_preference_jsonl(tmp_path / "pref.jsonl", n=16, seed=1)
    spec_path = write_spec(
        tmp_path, model_dir=tiny_model_dir, dataset=dataset, method="dpo", lora=DPO_LORA, init_adapter=init,
        hyperparameters={**DPO_HP, "max_steps": 3, "batch_size": 8, "logging_steps": 1,
                         "reference_model": reference_model},
    )  # fmt: skip
    stream = io.StringIO()
    result = train_dpo(RunContext(spec=TrainingSpec.read(str(spec_path)), progress=ProgressWriter(stream)))
    first = result.history[0]
    if reference_model == "init_adapter":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert abs(first["rewards_chosen"]) < 1e-5 and abs(first["rewards_rejected"]) < 1e-5
    else:
        assert abs(first["rewards_chosen"]) > 1e-2 and abs(first["loss"] - math.log(2)) > 1e-4
    events = [json.loads(line) for line in stream.getvalue().splitlines() if '"event"' in line]
    expected = (
        "init adapter adapter_init (frozen copy)" if reference_model == "init_adapter" else "adapter disabled"
    )
    assert any(expected in e["message"] for e in events)

    params = dict(result.model.named_parameters())
    saved = load_file(str(init / "adapter_model.safetensors"))
    for name, param in params.items():
        if ".reference." in name:  # the frozen copy of the init adapter did not move
            key = name.replace(".reference.", ".")
            assert not param.requires_grad and torch.equal(param, saved[key]), name
        elif ".default." in name:
            key = name.replace(".default.", ".")
            assert param.requires_grad and not torch.equal(param, saved[key]), name
    assert any(".reference." in n for n in params) == (reference_model == "init_adapter")
    base_file = load_file(str(tiny_model_dir / "model.safetensors"))
    live = {
        k.removeprefix("base_model.model.").replace("base_layer.", ""): v
        for k, v in params.items()
        if "lora_" not in k
    }
    assert set(live) == set(base_file)
    assert all(torch.equal(live[k], v) and not live[k].requires_grad for k, v in base_file.items())


def test_completion_logps_masks_the_prompt() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    logp = torch.log_softmax(logits, dim=-1)
    expected = torch.stack([logp[0, 1, 3] + logp[0, 2, 4] + logp[0, 3, 5], logp[1, 0, 1] + logp[1, 1, 2]])
    torch.testing.assert_close(completion_logps(logits, labels), expected)
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5,
        label_smoothing=0.1,
    )  # fmt: skip
    # logits = 2, beta * logits = 1
    expected_loss = -0.9 * torch.nn.functional.logsigmoid(
        torch.tensor(1.0)
    ) - 0.1 * torch.nn.functional.logsigmoid(torch.tensor(-1.0))
    torch.testing.assert_close(loss[0], expected_loss)
    torch.testing.assert_close(chosen, torch.tensor([0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.5]))
