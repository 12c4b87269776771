"""The SFT training child, run as the runner runs it: a subprocess on a spec file, JSON lines on stdout."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from contract.protocol import ProgressWriter, TrainingSpec, parse_line
from tests.helpers.tiny_model import tiny_sft_jsonl
from tests.training._child import REPO_ROOT, child_env, run_child, write_spec
from workers.training import data
from workers.training.sft import token_loss_sum

METRICS = {"loss", "learning_rate", "grad_norm", "tokens_per_second", "mean_token_accuracy", "epoch"}
# Measured with seed 0: loss 6.98 -> ~0.7 over 30 steps; the bar leaves room for BLAS differences.
TRAIN_HP = {
    "epochs": 10,
    "max_steps": 30,
    "batch_size": 8,
    "learning_rate": 5e-3,
    "max_length": 64,
    "warmup_ratio": 0.1,
    "lr_scheduler": "linear",
    "logging_steps": 1,
}
TRAIN_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def _completion_loss(model: torch.nn.Module, tokenizer: object, dataset: Path) -> float:
    """Mean loss per completion token of ``model`` on ``dataset`` (what SFT minimises)."""
    examples, _ = data.tokenize_sft(tokenizer, data.read_sft_records(dataset), max_length=64)  # type: ignore[arg-type]
    batch = data.SFTCollator(0)(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(token_loss_sum(logits, batch["labels"])) / sum(e.num_trainable for e in examples)


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    work = tmp_path_factory.mktemp("sft-run")
    dataset = tiny_sft_jsonl(work / "train.jsonl", n=64, seed=0)
    held_out = tiny_sft_jsonl(work / "held_out.jsonl", n=16, seed=1)
    base_sha = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    spec = write_spec(
        work,
        model_dir=tiny_model_dir,
        dataset=dataset,
        hyperparameters=TRAIN_HP,
        lora=TRAIN_LORA,
        validation=held_out,
    )
    started = time.perf_counter()
    run = run_child(spec)
    metrics = run.of_type("metric")
    speed = sorted(m["values"]["tokens_per_second"] for m in metrics)[len(metrics) // 2]
    print(
        f"sft child: {time.perf_counter() - started:.1f} s, loss {metrics[0]['values']['loss']:.3f} -> "
        f"{metrics[-1]['values']['loss']:.3f}, median {speed:.0f} tokens/s"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # The child never writes the base model's file.
    assert hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest() == base_sha
    return work, dataset, run


def test_protocol_lines_and_metrics(sft_run: tuple[Path, Path, object]) -> None:
    _, _, run = sft_run
    messages = run.messages  # type: ignore[attr-defined]
    assert all(parse_line(line) is not None for line in run.lines)  # type: ignore[attr-defined]
    assert not [m for m in messages if m["type"] == "error"]
    metrics = [m for m in messages if m["type"] == "metric"]
    assert [m["step"] for m in metrics] == list(range(1, 31))  # logging_steps=1, max_steps=30 caps 10 epochs
    for m in metrics:
        assert set(m["values"]) >= METRICS, m
        assert m["stage"] == "sft"
        assert m["values"]["tokens_per_second"] > 0
        assert m["values"]["grad_norm"] > 0
    losses = [m["values"]["loss"] for m in metrics]
    assert losses[-1] < 0.5 * losses[0], losses
    accuracies = [m["values"]["mean_token_accuracy"] for m in metrics]
    assert all(0 <= a <= 1 for a in accuracies) and accuracies[-1] > accuracies[0] + 0.2, accuracies
    # Warm-up (3 steps) ramps the lr up to its peak, the linear schedule then takes it down.
    lrs = [m["values"]["learning_rate"] for m in metrics]
    assert lrs[0] < lrs[2] < lrs[3] == pytest.approx(5e-3)
    assert lrs[-1] < 0.1 * 5e-3
    assert metrics[-1]["values"]["epoch"] == pytest.approx(30 / 8)
    progress = [m["progress"] for m in messages if m["type"] == "progress"]
    assert progress == sorted(progress) and progress[0] == 0.0 and progress[-1] == 1.0


def test_held_out_loss_and_token_accuracy(sft_run: tuple[Path, Path, object]) -> None:
    # No eval_steps: ten evaluations over the 30 steps (every 3rd) on the held-out set, the last at step 30.
    _, _, run = sft_run
    evals = [m for m in run.of_type("metric") if "eval_loss" in m["values"]]  # type: ignore[attr-defined]
    assert [m["step"] for m in evals] == list(range(3, 31, 3)), evals
    first, last = evals[0]["values"], evals[-1]["values"]
    assert last["eval_loss"] < 0.6 * first["eval_loss"], (first, last)
    assert 0 <= first["eval_mean_token_accuracy"] < last["eval_mean_token_accuracy"] <= 1
    adapter = next(m for m in run.of_type("artifact") if m["kind"] == "adapter")  # type: ignore[attr-defined]
    assert adapter["metadata"]["metrics"]["eval_loss"] == last["eval_loss"]
    assert adapter["metadata"]["datasets"]["validation"]["id"] == "ds_tiny_validation"


def test_token_accuracy_counts_argmax_hits_on_labelled_positions_only() -> None:
    from workers.training.sft import correct_tokens

    logits = torch.full((1, 4, 5), -1.0)
    for position, token in enumerate([2, 3, 1, 4]):
        logits[0, position, token] = 1.0  # position p predicts token p+1
    labels = torch.tensor([[9, 2, 0, data.IGNORE_INDEX]])  # predicted 2 (hit), 3 vs 0 (miss), masked
    assert correct_tokens(logits, labels) == 1
    kept = logits[0, :2]  # the 2-D path: the kept positions, already aligned with their labels
    assert correct_tokens(kept, torch.tensor([2, 0])) == 1


def test_artifacts_and_model_card(sft_run: tuple[Path, Path, object]) -> None:
    work, dataset, run = sft_run
    artifacts = {m["kind"]: m for m in run.of_type("artifact")}  # type: ignore[attr-defined]
    assert set(artifacts) == {"adapter", "model_card"}
    adapter_dir = Path(artifacts["adapter"]["path"])
    assert adapter_dir == work / "out" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"):
        assert (adapter_dir / name).is_file(), name
    card_dir = Path(artifacts["model_card"]["path"])
    assert sorted(p.name for p in card_dir.iterdir()) == ["README.md"]
    card = (card_dir / "README.md").read_text()
    assert card == (adapter_dir / "README.md").read_text()
    assert hashlib.sha256(dataset.read_bytes()).hexdigest() in card
    assert "tiny-llama" in card and "PeftModel.from_pretrained" in card and '"learning_rate": 0.005' in card
    assert (
        artifacts["adapter"]["metadata"]["metrics"]["loss"]
        < artifacts["adapter"]["metadata"]["metrics"]["first_loss"]
    )
    # The adapter carries LoRA weights only, and B (zero at init) has moved.
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert weights and all("lora_A" in k or "lora_B" in k for k in weights)
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == "tiny-llama"


def test_adapter_loads_with_plain_peft_and_helps(
    tiny_model_dir: Path, sft_run: tuple[Path, Path, object]
) -> None:
    work, dataset, _ = sft_run
    adapter_dir = work / "out" / "adapter"
    base_file = load_file(str(tiny_model_dir / "model.safetensors"))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter_dir))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)

    # The base layers under the adapter are bit-identical to the file the job started from.
    base_state = {
        k.replace("base_layer.", ""): v
        for k, v in model.get_base_model().state_dict().items()
        if "lora_" not in k
    }
    assert set(base_state) == set(base_file)
    for name, tensor in base_file.items():
        assert torch.equal(base_state[name], tensor), name

    adapted = _completion_loss(model, tokenizer, dataset)
    with model.disable_adapter():
        base_loss = _completion_loss(model, tokenizer, dataset)
    assert adapted < 0.5 * base_loss, (adapted, base_loss)

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What colour is the sky?"}], add_generation_prompt=True, tokenize=False
    )
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert out.shape[1] > ids.shape[1]
    print("generated:", repr(tokenizer.decode(out[0, ids.shape[1] :])))


def test_in_process_base_bit_identical_and_lora_changed(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inspect the live model the loop trained: every LoRA tensor moved, every base tensor did not."""
    from workers.training import lora, sft
    from workers.training.context import RunContext

    snapshots: dict[str, dict[str, torch.Tensor]] = {}
    real_attach = lora.attach_adapter

    def spy_attach(*args: object, **kwargs: object) -> PeftModel:
        model = real_attach(*args, **kwargs)  # type: ignore[arg-type]
        state = {k: v.detach().clone() for k, v in model.named_parameters()}
        snapshots["lora"] = {k: v for k, v in state.items() if "lora_" in k}
        snapshots["base"] = {k: v for k, v in state.items() if "lora_" not in k}
        return model

    monkeypatch.setattr(lora, "attach_adapter", spy_attach)
    dataset = tiny_sft_jsonl(tmp_path / "train.jsonl", n=32, seed=1)
    spec_path = write_spec(
        tmp_path, model_dir=tiny_model_dir, dataset=dataset, lora={**TRAIN_LORA, "dropout": 0.1},
        hyperparameters={**TRAIN_HP, "max_steps": 6, "gradient_accumulation_steps": 2, "logging_steps": 3},
    )  # fmt: skip
    stream = io.StringIO()
    result = sft.train_sft(
        RunContext(spec=TrainingSpec.read(str(spec_path)), progress=ProgressWriter(stream))
    )
    assert result.steps == 6
    assert [json.loads(line)["step"] for line in stream.getvalue().splitlines() if '"metric"' in line] == [
        3,
        6,
    ]

    params = dict(result.model.named_parameters())
    assert snapshots["lora"] and set(snapshots["lora"]) | set(snapshots["base"]) == set(params)
    for name, before in snapshots["lora"].items():
        assert params[name].requires_grad and not torch.equal(params[name], before), name
    for name, before in snapshots["base"].items():
        assert not params[name].requires_grad and torch.equal(params[name], before), name
    base_file = load_file(str(tiny_model_dir / "model.safetensors"))
    live = {k.removeprefix("base_model.model.").replace("base_layer.", ""): v for k, v in params.items()}
    for name, tensor in base_file.items():
        assert torch.equal(live[name], tensor), name


def test_messages_dataset_trains(tiny_model_dir: Path, tmp_path: Path) -> None:
    dataset = tiny_sft_jsonl(tmp_path / "chat.jsonl", n=24, seed=2, messages=True)
    spec = write_spec(
        tmp_path, model_dir=tiny_model_dir, dataset=dataset, lora=TRAIN_LORA,
        hyperparameters={**TRAIN_HP, "max_steps": 12, "lr_scheduler": "cosine", "logging_steps": 4},
    )  # fmt: skip
    run = run_child(spec)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = run.of_type("metric")
    assert [m["step"] for m in metrics] == [4, 8, 12]
    assert metrics[-1]["values"]["loss"] < metrics[0]["values"]["loss"]
    assert "24 records -> 24 examples" in " ".join(m["message"] for m in run.of_type("event"))
    assert {m["kind"] for m in run.of_type("artifact")} == {"adapter", "model_card"}


def test_bad_dataset_line_is_an_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    run = run_child(write_spec(tmp_path, model_dir=tiny_model_dir, dataset=dataset))
    assert run.returncode == 1
    errors = run.of_type("error")
    assert len(errors) == 1 and errors[0]["code"] == "invalid_dataset" and "line 2" in errors[0]["message"]
    assert not run.of_type("artifact")


def test_everything_truncated_is_an_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    dataset = tiny_sft_jsonl(tmp_path / "train.jsonl", n=4)
    run = run_child(
        write_spec(tmp_path, model_dir=tiny_model_dir, dataset=dataset, hyperparameters={"max_length": 8})
    )
    assert run.returncode == 1
    assert [e["code"] for e in run.of_type("error")] == ["no_trainable_examples"]
    warnings = [e["message"] for e in run.of_type("event") if e["level"] == "warning"]
    assert any("dropped 4 of 4 examples" in w for w in warnings), warnings


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda spec: spec.pop("base_model"), "invalid_spec"),
        (lambda spec: spec.update(method="magic"), "method_not_available"),
        (lambda spec: spec["hyperparameters"].update(learning_rate=-1), "invalid_hyperparameters"),
        (lambda spec: spec["base_model"].update(path="/nonexistent/model"), "model_load_failed"),
    ],
    ids=["missing-field", "unknown-method", "bad-hyperparameter", "missing-model"],
)
def test_invalid_spec_is_an_error(tiny_model_dir: Path, tmp_path: Path, mutate: object, code: str) -> None:
    dataset = tiny_sft_jsonl(tmp_path / "train.jsonl", n=4)
    spec_path = write_spec(tmp_path, model_dir=tiny_model_dir, dataset=dataset)
    spec = json.loads(spec_path.read_text())
    mutate(spec)  # type: ignore[operator]
    spec_path.write_text(json.dumps(spec))
    run = run_child(spec_path)
    assert run.returncode == 1, run.stderr[-2000:]
    assert [e["code"] for e in run.of_type("error")] == [code]


def test_sigterm_stops_promptly_without_artifacts(tiny_model_dir: Path, tmp_path: Path) -> None:
    dataset = tiny_sft_jsonl(tmp_path / "train.jsonl", n=64)
    spec = write_spec(
        tmp_path, model_dir=tiny_model_dir, dataset=dataset,
        hyperparameters={**TRAIN_HP, "epochs": 1000, "max_steps": 100_000},
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.training", str(spec)],
        cwd=REPO_ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:  # wait until training is under way
            lines.append(line)
            if '"metric"' in line:
                break
        else:
            pytest.fail(f"child ended before training: {lines}")
        proc.send_signal(signal.SIGTERM)
        # Promptly = at the next step boundary: 100,000 steps would take the best part of an hour, so ending
        # within the wait proves it. (A wall-clock bound of 5 s failed under the parallel suite's load.)
        rc = proc.wait(timeout=30)
        lines.extend(proc.stdout.read().splitlines())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 143
    messages = [parse_line(line) for line in lines]
    assert not [m for m in messages if m and m["type"] == "artifact"]
    assert any(m and m["type"] == "event" and "SIGTERM" in m["message"] for m in messages)
    assert not (tmp_path / "out" / "adapter").exists()
