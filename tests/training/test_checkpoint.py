"""Checkpoints: atomic save/restore of weights, optimizer, scheduler and RNGs; an interrupted SFT, reward
model, DPO or PPO run resumed from its checkpoint ends bit-identical to the uninterrupted run."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from safetensors.torch import load_file

from contract.protocol import ProgressWriter, ResumeRef, TrainingSpec, parse_line
from tests.helpers.tiny_model import tiny_preference_jsonl, tiny_sft_jsonl
from tests.training._child import write_spec
from workers.training import checkpoint
from workers.training.__main__ import seed_everything
from workers.training.context import CancelToken, RunContext
from workers.training.errors import Cancelled


class Recorder(ProgressWriter):
    """Keeps every protocol line; optionally asks the loop to stop right after the checkpoint of a step."""

    def __init__(self, cancel: CancelToken | None = None, stop_after_checkpoint: int | None = None) -> None:
        super().__init__(io.StringIO())
        self.cancel = cancel
        self.stop_after_checkpoint = stop_after_checkpoint

    @property
    def messages(self) -> list[dict[str, Any]]:
        assert isinstance(self._stream, io.StringIO)
        return [m for m in map(parse_line, self._stream.getvalue().splitlines()) if m is not None]

    def checkpoint(self, path: str, *, stage: str, step: int, stage_complete: bool = False) -> None:
        super().checkpoint(path, stage=stage, step=step, stage_complete=stage_complete)
        if self.cancel is not None and step == self.stop_after_checkpoint:
            self.cancel.request()  # the loop stops at the next step boundary, as SIGTERM would


def _spec(tmp: Path, **fields: Any) -> TrainingSpec:
    base = {
        "job_id": "job_ckpt",
        "method": "sft",
        "base_model": {"id": "m", "name": "m", "path": str(tmp)},
        "datasets": {},
        "lora": {},
        "hyperparameters": {},
        "seed": 0,
        "output_dir": str(tmp / "out"),
        "checkpoint_dir": str(tmp / "ckpt"),
    }
    return TrainingSpec.model_validate({**base, **fields})


def test_save_restore_round_trip_restores_weights_optimizer_scheduler_and_rngs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)  # frozen weights are not part of a checkpoint
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    generator = torch.Generator().manual_seed(5)
    order = random.Random(9)

    def train_step() -> None:
        optimizer.zero_grad()
        model(torch.randn(3, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()

    for _ in range(3):
        train_step()
    recorder = Recorder()
    ctx = RunContext(spec=_spec(tmp_path), progress=recorder)
    rngs: dict[str, checkpoint.ExtraRng] = {"sampling": generator, "order": order}
    saver = checkpoint.Checkpointer(
        ctx,
        stage="sft",
        every=3,
        modules={"m": model},
        optimizer=optimizer,
        scheduler=scheduler,
        extra_rng=rngs,
    )
    path = saver.maybe_save(3, epoch=1, position=2, extra={"note": "x"})
    assert path is not None and path.parent == tmp_path / "ckpt" and not path.name.startswith(".tmp")
    assert sorted(p.name for p in path.iterdir()) == ["checkpoint.json", "state.pt", "trainable.safetensors"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    line = recorder.messages[-1]
    assert line == {
        "type": "checkpoint",
        "stage": "sft",
        "step": 3,
        "path": str(path),
        "stage_complete": False,
    }
    assert set(load_file(str(path / "trainable.safetensors"))) == {"m.0.bias", "m.1.weight", "m.1.bias"}

    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = scheduler.get_last_lr()
    train_step()  # moves weights, optimizer moments, scheduler and every RNG on
    expected_after = {k: v.clone() for k, v in model.state_dict().items()}
    expected_draws = (
        random.random(),
        numpy.random.rand(),
        torch.rand(2),
        torch.rand(2, generator=generator),
        order.random(),
    )

    # A fresh process's view: new model, optimizer, scheduler and RNGs, then restore.
    torch.manual_seed(123)
    random.seed(1)
    numpy.random.seed(1)
    first, first2 = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1)
    model2 = torch.nn.Sequential(first, first2)
    first.weight.requires_grad_(False)
    with torch.no_grad():  # the frozen base is loaded from the model folder
        first.weight.copy_(model.state_dict()["0.weight"])
    optimizer2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=1e-2)
    scheduler2 = torch.optim.lr_scheduler.LambdaLR(optimizer2, lambda s: 1.0 / (1 + s))
    generator2, order2 = torch.Generator().manual_seed(0), random.Random(0)
    ctx2 = RunContext(
        spec=_spec(tmp_path, resume_from=ResumeRef(path=str(path), stage="sft", step=3)), progress=Recorder()
    )
    loader = checkpoint.Checkpointer(
        ctx2,
        stage="sft",
        every=3,
        modules={"m": model2},
        optimizer=optimizer2,
        scheduler=scheduler2,
        extra_rng={"sampling": generator2, "order": order2},
    )
    resumed = loader.restore()
    assert resumed is not None
    assert (resumed.step, resumed.epoch, resumed.position, resumed.extra) == (3, 1, 2, {"note": "x"})
    for key, value in expected_weights.items():
        assert torch.equal(model2.state_dict()[key], value), key
    assert scheduler2.last_epoch == 3 and scheduler2.get_last_lr() == expected_lr
    assert optimizer2.state_dict()["state"][0]["step"] == 3

    # Same RNG, same optimizer moments, same schedule: the next step lands on the same weights, and every
    # RNG (global and the loop's own) continues where the saved run's did.
    model, optimizer, scheduler = model2, optimizer2, scheduler2
    train_step()
    for key, value in expected_after.items():
        assert torch.equal(model2.state_dict()[key], value), key
    draws = (
        random.random(),
        numpy.random.rand(),
        torch.rand(2),
        torch.rand(2, generator=generator2),
        order2.random(),
    )
    assert draws[0] == expected_draws[0] and draws[1] == expected_draws[1] and draws[4] == expected_draws[4]
    assert torch.equal(draws[2], expected_draws[2]) and torch.equal(draws[3], expected_draws[3])

    # A wrong module set is refused with a clear error rather than half-loaded.
    ctx3 = RunContext(spec=ctx2.spec, progress=Recorder())
    other = torch.nn.Linear(2, 2)
    with pytest.raises(Exception, match="does not match"):
        checkpoint.Checkpointer(
            ctx3,
            stage="sft",
            every=None,
            modules={"x": other},
            optimizer=torch.optim.AdamW(other.parameters()),
            extra_rng=rngs,
        ).restore()
    # Another stage's checkpoint is not this loop's to restore.
    assert (
        checkpoint.Checkpointer(
            ctx3, stage="reward_model", every=None, modules={}, optimizer=optimizer2
        ).restore()
        is None
    )


def test_incomplete_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "state.pt").write_bytes(b"")
    assert checkpoint.read_meta(tmp_path / "half") is None
    ctx = RunContext(spec=_spec(tmp_path), progress=Recorder())
    checkpoint.mark_stage_complete(ctx, stage="sft", step=7)
    [folder] = [p for p in (tmp_path / "ckpt").iterdir()]
    meta = checkpoint.read_meta(folder)
    assert meta is not None and meta["stage_complete"] and meta["step"] == 7
    assert ctx.progress.messages[-1]["stage_complete"] is True  # type: ignore[attr-defined]


SFT_HP = {
    "epochs": 3,
    "max_steps": 14,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "max_length": 64,
    "warmup_ratio": 0.1,
    "lr_scheduler": "linear",
    "checkpoint_steps": 4,
}
# Dropout on, so the restored torch RNG matters; 3 epochs of 20 examples at 4 per step: crosses epochs.
SFT_LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}


def _sft_spec(work: Path, model_dir: Path, dataset: Path, **fields: Any) -> TrainingSpec:
    spec_path = write_spec(
        work, model_dir=model_dir, dataset=dataset, hyperparameters=SFT_HP, lora=SFT_LORA, seed=3
    )
    raw = json.loads(spec_path.read_text())
    raw.update({"checkpoint_dir": str(work / "ckpt"), **fields})
    return TrainingSpec.model_validate(raw)


def test_sft_stopped_at_step_k_and_resumed_matches_uninterrupted_run(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from workers.training.sft import train_sft

    torch.set_num_threads(1)
    dataset = tiny_sft_jsonl(tmp_path / "train.jsonl", n=20, seed=1)

    seed_everything(3)
    straight = Recorder()
    full = train_sft(RunContext(spec=_sft_spec(tmp_path / "a", tiny_model_dir, dataset), progress=straight))
    steps = [m["step"] for m in straight.messages if m["type"] == "checkpoint"]
    assert steps == [4, 8, 12, 14]  # every 4 steps, plus the final one

    seed_everything(3)
    cancel = CancelToken()
    stopper = Recorder(cancel, stop_after_checkpoint=8)
    with pytest.raises(Cancelled):  # stopped at the step boundary after step 8's checkpoint
        train_sft(
            RunContext(
                spec=_sft_spec(tmp_path / "b", tiny_model_dir, dataset), progress=stopper, cancel=cancel
            )
        )
    saved = [m for m in stopper.messages if m["type"] == "checkpoint"]
    assert [m["step"] for m in saved] == [4, 8]
    assert not [m for m in stopper.messages if m["type"] == "artifact"]

    seed_everything(3)  # a fresh child seeds as usual; the checkpoint's RNG states win
    resumer = Recorder()
    resume = ResumeRef(path=saved[-1]["path"], stage="sft", step=8)
    spec = _sft_spec(tmp_path / "c", tiny_model_dir, dataset, resume_from=resume.model_dump())
    resumed = train_sft(RunContext(spec=spec, progress=resumer))
    metric_steps = [m["step"] for m in resumer.messages if m["type"] == "metric"]
    assert metric_steps[0] == 9 and metric_steps[-1] == 14  # continues, does not restart at 1
    assert resumed.steps == full.steps == 14

    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical on CPU
    straight_losses = {m["step"]: m["values"]["loss"] for m in straight.messages if m["type"] == "metric"}
    for m in resumer.messages:
        if m["type"] == "metric":
            assert m["values"]["loss"] == straight_losses[m["step"]]
    assert resumed.metrics["first_loss"] == full.metrics["first_loss"]


# --- the same for the other loops, through one helper: a straight run, a run stopped after the checkpoint of
# step k, and a run resumed from that checkpoint, each in its own folder with the same seed.

Train = Callable[[RunContext], Any]


def _method_spec(
    work: Path,
    model_dir: Path,
    dataset: Path,
    *,
    method: str,
    hp: dict[str, Any],
    lora: dict[str, Any],
    **fields: Any,
) -> TrainingSpec:
    spec_path = write_spec(
        work, model_dir=model_dir, dataset=dataset, method=method, hyperparameters=hp, lora=lora, seed=3
    )
    raw = json.loads(spec_path.read_text())
    raw.update({"checkpoint_dir": str(work / "ckpt"), **fields})
    return TrainingSpec.model_validate(raw)


def _stop_and_resume(
    train: Train, spec: Callable[..., TrainingSpec], *, stage: str, stop_after: int, checkpoints: list[int]
) -> tuple[Any, Any, Recorder, Recorder]:
    """(straight result, resumed result, their recorders); checks the checkpoint steps and the stop."""
    seed_everything(3)
    straight = Recorder()
    full = train(RunContext(spec=spec("a"), progress=straight))
    assert [m["step"] for m in straight.messages if m["type"] == "checkpoint"] == checkpoints

    seed_everything(3)
    cancel = CancelToken()
    stopper = Recorder(cancel, stop_after_checkpoint=stop_after)
    with pytest.raises(Cancelled):
        train(RunContext(spec=spec("b"), progress=stopper, cancel=cancel))
    saved = [m for m in stopper.messages if m["type"] == "checkpoint"]
    assert saved[-1]["step"] == stop_after and saved[-1]["stage"] == stage
    assert not [m for m in stopper.messages if m["type"] == "artifact"]

    seed_everything(3)  # a fresh child seeds as usual; the checkpoint's RNG states win
    resumer = Recorder()
    resume = ResumeRef(path=saved[-1]["path"], stage=stage, step=stop_after)
    resumed = train(RunContext(spec=spec("c", resume_from=resume.model_dump()), progress=resumer))
    metric_steps = [m["step"] for m in resumer.messages if m["type"] == "metric"]
    assert metric_steps and metric_steps[0] > stop_after  # continues, does not restart at 1
    return full, resumed, straight, resumer


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit-identical on CPU


def _same_metrics_after(straight: Recorder, resumer: Recorder, names: tuple[str, ...]) -> None:
    points = {m["step"]: m["values"] for m in straight.messages if m["type"] == "metric"}
    for m in resumer.messages:
        if m["type"] == "metric":
            for name in names:
                if name in m["values"]:
                    assert m["values"][name] == points[m["step"]][name], (m["step"], name)


PREF_LORA = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}  # dropout: the RNG matters


def test_reward_model_stopped_and_resumed_matches_uninterrupted_run(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from workers.training.reward import train_reward_model

    torch.set_num_threads(1)
    dataset = tiny_preference_jsonl(tmp_path / "pref.jsonl", n=24, seed=0, messages=True)
    # 18 training pairs at 8 per step: 3 steps an epoch, so 8 steps cross two epoch boundaries.
    hp = {
        "epochs": 5, "max_steps": 8, "batch_size": 8, "learning_rate": 5e-3, "max_length": 64,
        "eval_fraction": 0.25, "eval_steps": 4, "logging_steps": 2, "checkpoint_steps": 3,
    }  # fmt: skip

    def spec(name: str, **fields: Any) -> TrainingSpec:
        return _method_spec(
            tmp_path / name, tiny_model_dir, dataset, method="reward_model", hp=hp, lora=PREF_LORA, **fields
        )

    full, resumed, straight, resumer = _stop_and_resume(
        train_reward_model, spec, stage="reward_model", stop_after=3, checkpoints=[3, 6, 8]
    )
    assert resumed.steps == full.steps == 8
    _assert_same_weights(full.reward_model_dir, resumed.reward_model_dir)  # LoRA and the score head
    _same_metrics_after(straight, resumer, ("eval_accuracy", "eval_margin", "learning_rate"))
    for name in ("eval_accuracy", "eval_margin", "initial_eval_accuracy", "loss", "accuracy"):
        assert resumed.metrics[name] == full.metrics[name], name


def test_dpo_stopped_and_resumed_matches_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    from workers.training.dpo import train_dpo

    torch.set_num_threads(1)
    dataset = tiny_preference_jsonl(tmp_path / "pref.jsonl", n=20, seed=0, messages=True)
    # 20 pairs at 8 per step: 3 steps an epoch; stopped after step 4, mid-way through the second epoch.
    hp = {
        "epochs": 5, "max_steps": 7, "batch_size": 8, "learning_rate": 5e-3, "max_length": 64,
        "logging_steps": 1, "checkpoint_steps": 2, "beta": 0.1,
    }  # fmt: skip

    def spec(name: str, **fields: Any) -> TrainingSpec:
        return _method_spec(
            tmp_path / name, tiny_model_dir, dataset, method="dpo", hp=hp, lora=PREF_LORA, **fields
        )

    full, resumed, straight, resumer = _stop_and_resume(
        train_dpo, spec, stage="dpo", stop_after=4, checkpoints=[2, 4, 6, 7]
    )
    assert resumed.steps == full.steps == 7
    _assert_same_weights(full.adapter_dir, resumed.adapter_dir)
    _same_metrics_after(straight, resumer, ("loss", "margin", "accuracy", "learning_rate"))
    for name in ("loss", "margin", "accuracy", "first_loss", "first_margin"):
        assert resumed.metrics[name] == full.metrics[name], name


def _prefers_token_5(
    prompt_ids: torch.Tensor, response_ids: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """A programmatic reward for the PPO test: the share of response tokens that are id 5."""
    real = mask[:, prompt_ids.size(1) :].float()
    return ((response_ids == 5).float() * real).sum(1) / real.sum(1).clamp(min=1)


# The adaptive KL controller's coefficient is checkpointed state: a short horizon moves it every update.
ADAPTIVE_KL = {"kl_control": "adaptive", "kl_target": 0.05, "kl_horizon": 6, "kl_coef": 0.1}


@pytest.mark.parametrize("kl_hp", [{}, ADAPTIVE_KL], ids=["fixed_kl", "adaptive_kl"])
def test_ppo_stopped_and_resumed_matches_uninterrupted_run(
    tiny_model_dir: Path, tmp_path: Path, kl_hp: dict[str, Any]
) -> None:
    from workers.training.ppo_job import train_ppo

    torch.set_num_threads(1)
    # 7 prompts at 3 per update: the prompt order's passes end mid-update, so the saved rest of a pass matters.
    prompts = tmp_path / "prompts.jsonl"
    things = ("apple", "sky", "grass", "snow", "coal", "plum", "lime")
    prompts.write_text("".join(json.dumps({"prompt": f"What colour is the {t}?"}) + "\n" for t in things))
    hp = {
        "steps": 5, "batch_size": 3, "mini_batch_size": 2, "ppo_epochs": 2, "max_new_tokens": 6,
        "max_length": 64, "learning_rate": 1e-3, "temperature": 1.0, "checkpoint_steps": 2, **kl_hp,
    }  # fmt: skip
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}

    def spec(name: str, **fields: Any) -> TrainingSpec:
        return _method_spec(
            tmp_path / name, tiny_model_dir, prompts, method="ppo", hp=hp, lora=lora, **fields
        )

    def train(ctx: RunContext) -> Any:
        return train_ppo(ctx, reward_function=_prefers_token_5)

    full, resumed, straight, resumer = _stop_and_resume(
        train, spec, stage="ppo", stop_after=2, checkpoints=[2, 4, 5]
    )
    assert resumed.updates == full.updates == 5
    # The policy adapter is the artifact; the value head is trainable too and lives in the final checkpoint.
    _assert_same_weights(full.adapter_dir, resumed.adapter_dir)
    finals = [
        load_file(str(Path(m["path"]) / checkpoint.WEIGHTS_FILE))
        for m in straight.messages + resumer.messages
        if m["type"] == "checkpoint" and m["step"] == 5
    ]
    assert len(finals) == 2 and any(k.startswith("value_head.") for k in finals[0])
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key]), key
    # Sampling continued from the restored generator and prompt order: the same rollouts, the same rewards.
    _same_metrics_after(straight, resumer, ("reward_mean", "kl", "kl_coef", "response_length", "policy_loss"))
    assert [m["step"] for m in resumer.messages if m["type"] == "metric"] == [3, 4, 5]
    assert resumed.metrics["first_reward_mean"] == full.metrics["first_reward_mean"]
    coefs = [m["values"]["kl_coef"] for m in straight.messages if m["type"] == "metric"]
    if kl_hp:  # the coefficient moved, so resuming had to restore it to match
        assert len(set(coefs)) == len(coefs), coefs
        assert all(m["values"]["kl_target"] == 0.05 for m in straight.messages if m["type"] == "metric")


def test_grpo_stopped_and_resumed_matches_uninterrupted_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    from workers.training.grpo_job import train_grpo

    torch.set_num_threads(1)
    # 7 prompts at 3 per update: the prompt order's passes end mid-update, so the saved rest of a pass matters.
    prompts = tmp_path / "prompts.jsonl"
    things = ("apple", "sky", "grass", "snow", "coal", "plum", "lime")
    prompts.write_text("".join(json.dumps({"prompt": f"What colour is the {t}?"}) + "\n" for t in things))
    hp = {
        "steps": 5, "batch_size": 3, "num_generations": 4, "num_iterations": 2, "micro_batch_size": 5,
        "max_new_tokens": 6, "max_length": 64, "learning_rate": 1e-3, "beta": 0.1, "checkpoint_steps": 2,
        "graders": [{"type": "ends_with_eos", "name": "ends"}, {"type": "regex", "name": "e", "pattern": "e"}],
    }  # fmt: skip
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}

    def spec(name: str, **fields: Any) -> TrainingSpec:
        return _method_spec(
            tmp_path / name, tiny_model_dir, prompts, method="grpo", hp=hp, lora=lora, **fields
        )

    full, resumed, straight, resumer = _stop_and_resume(
        train_grpo, spec, stage="grpo", stop_after=2, checkpoints=[2, 4, 5]
    )
    assert resumed.updates == full.updates == 5
    _assert_same_weights(full.adapter_dir, resumed.adapter_dir)
    # Sampling continued from the restored generator and prompt order: the same answers, the same rewards.
    _same_metrics_after(straight, resumer, ("reward_mean", "reward/ends", "kl", "completion_length", "loss"))
    assert [m["step"] for m in resumer.messages if m["type"] == "metric"] == [3, 4, 5]
    assert resumed.metrics["first_reward_mean"] == full.metrics["first_reward_mean"]
