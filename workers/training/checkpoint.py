"""Resumable checkpoints: atomic save, announce to the runner, restore on a resumed attempt.

A checkpoint is a folder in ``spec.checkpoint_dir``:

- ``trainable.safetensors``: every parameter with ``requires_grad`` of the modules handed in (LoRA weights,
  ``modules_to_save`` copies, value/score heads), keyed ``<module key>.<parameter name>``;
- ``state.pt``: optimizer, scheduler and RNG states (python, numpy, torch, CUDA, and any extra generator of
  the loop), loaded back with ``weights_only=True`` (plain tensors and containers, no pickled code);
- ``checkpoint.json``: stage, step, epoch and position in that epoch's batch order, the loop's own JSON
  state (``extra``), written **last**: a folder without it is incomplete and never announced.

It is written under a temporary name and renamed into place (atomic on one filesystem), then announced with a
``checkpoint`` protocol line; the runner packs it into storage and keeps the newest few per job. A resumed
attempt gets the newest complete one back as ``spec.resume_from``.

Data order: every loop here draws its batch order from ``(seed, epoch)`` alone, so restoring ``epoch`` and
skipping the ``position`` batches already done reproduces the uninterrupted run's order exactly.

The API a training loop needs (the SFT, reward model, DPO and PPO loops use it)::

    ckpt = Checkpointer(ctx, stage=STAGE, every=hp.checkpoint_steps, modules={"model": model},
                        optimizer=optimizer, scheduler=scheduler)
    resumed = ckpt.restore()  # None, or ResumeState(step, epoch, position, extra): skip what was done
    ...after each optimizer step: ckpt.maybe_save(step, epoch=epoch, position=batches_done_in_epoch)
    ...after the loop: ckpt.save(step, epoch=epoch, position=position, final=True)
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from contract.protocol import CHECKPOINT_META_FILE
from workers.training import sharding
from workers.training.context import RunContext
from workers.training.errors import INVALID_SPEC, TrainingError

META_FILE = CHECKPOINT_META_FILE
WEIGHTS_FILE = "trainable.safetensors"
STATE_FILE = "state.pt"
FORMAT_VERSION = 1

# An extra RNG the loop owns besides the global ones (PPO's sampling generator, a prompt-order Random).
ExtraRng = torch.Generator | random.Random


@dataclass
class ResumeState:
    """What a restored checkpoint tells the loop: where to continue."""

    stage: str
    step: int
    epoch: int
    position: int  # batches of ``epoch`` already consumed
    final: bool  # taken after the stage's last step: the loop has nothing left to run
    extra: dict[str, Any] = field(default_factory=dict)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _numpy_state() -> list[Any] | None:
    try:
        import numpy
    except ImportError:
        return None
    name, keys, pos, has_gauss, cached = numpy.random.get_state()
    # Plain lists and numbers, so torch.load(weights_only=True) accepts them.
    return [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]


def _set_numpy_state(state: list[Any] | None) -> None:
    if state is None:
        return
    try:
        import numpy
    except ImportError:
        return
    name, keys, pos, has_gauss, cached = state
    numpy.random.set_state((name, numpy.asarray(keys, dtype=numpy.uint32), pos, has_gauss, cached))


def rng_state(extra: Mapping[str, ExtraRng] | None = None) -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "extra": {},
    }
    for name, generator in (extra or {}).items():
        state["extra"][name] = (
            generator.get_state() if isinstance(generator, torch.Generator) else generator.getstate()
        )
    return state


def set_rng_state(state: Mapping[str, Any], extra: Mapping[str, ExtraRng] | None = None) -> None:
    python_state = state["python"]
    # torch.load turns the inner tuple into a list; random.setstate wants tuples.
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    _set_numpy_state(state.get("numpy"))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved_extra = state.get("extra") or {}
    for name, generator in (extra or {}).items():
        if name not in saved_extra:
            raise TrainingError(INVALID_SPEC, f"checkpoint has no state for the RNG {name!r}")
        if isinstance(generator, torch.Generator):
            generator.set_state(saved_extra[name])
        else:
            value = saved_extra[name]
            generator.setstate((value[0], tuple(value[1]), value[2]))


def trainable_state(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for key, module in modules.items():
        for name, param in module.named_parameters():
            if param.requires_grad:
                # clone: safetensors refuses tensors that share storage (tied or viewed weights); a shard
                # (fsdp) is gathered whole, so the checkpoint resumes on any number of processes
                whole = sharding.full_tensor(param.detach())
                tensors[f"{key}.{name}"] = whole.to("cpu").contiguous().clone()
    return tensors


def load_trainable_state(modules: Mapping[str, torch.nn.Module], tensors: Mapping[str, torch.Tensor]) -> None:
    params = {
        f"{key}.{name}": param
        for key, module in modules.items()
        for name, param in module.named_parameters()
        if param.requires_grad
    }
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise TrainingError(
            INVALID_SPEC,
            "checkpoint does not match this run's trainable parameters "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})",
        )
    for name, param in params.items():
        sharding.load_into(param, tensors[name])


def read_meta(folder: str | Path) -> dict[str, Any] | None:
    """The checkpoint's metadata, or None when the folder is not a complete checkpoint."""
    try:
        meta: dict[str, Any] = json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and "stage" in meta and "step" in meta else None


def _write_atomically(
    ctx: RunContext, *, stage: str, step: int, meta: dict[str, Any], write: Any = None
) -> Path:
    """Write a checkpoint folder under a temporary name, rename it into place, announce it."""
    assert ctx.spec.checkpoint_dir is not None
    root = Path(ctx.spec.checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(3)
    tmp = root / f".tmp-{stage}-{step}-{token}"
    final = root / f"{stage}-step{step:09d}-{token}"
    tmp.mkdir()
    try:
        if write is not None:
            write(tmp)
        meta_path = tmp / META_FILE
        meta_path.write_text(json.dumps({"version": FORMAT_VERSION, **meta}, default=float), encoding="utf-8")
        for path in tmp.iterdir():
            _fsync_file(path)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ctx.progress.checkpoint(
        str(final), stage=stage, step=step, stage_complete=bool(meta.get("stage_complete"))
    )
    return final


def mark_stage_complete(
    ctx: RunContext, *, stage: str, step: int, extra: dict[str, Any] | None = None
) -> None:
    """A state-free checkpoint saying ``stage`` finished and its artifacts were announced before this line.

    Multi-stage jobs (rlhf) write one after each stage, so a resumed attempt skips the stage and uses the
    stored artifacts instead of training it again. No-op without a checkpoint_dir.
    """
    if ctx.spec.checkpoint_dir is None:
        return
    meta = {"stage": stage, "step": step, "stage_complete": True, "final": True, "extra": extra or {}}
    _write_atomically(ctx, stage=stage, step=step, meta=meta)


class Checkpointer:
    """Saves and restores one training loop's full state; one instance per stage.

    Disabled (every call a no-op, ``restore`` returns None) when the spec has no ``checkpoint_dir``.
    ``every`` is the loop's ``checkpoint_steps``: None saves only the final checkpoint.
    """

    def __init__(
        self,
        ctx: RunContext,
        *,
        stage: str,
        every: int | None,
        modules: Mapping[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        scheduler: Any | None = None,
        extra_rng: Mapping[str, ExtraRng] | None = None,
    ) -> None:
        self.ctx = ctx
        self.stage = stage
        self.every = every
        self.modules = dict(modules)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.extra_rng = dict(extra_rng or {})
        # Under fsdp every rank takes part in a save (the gathers are collectives) and rank 0 alone writes;
        # the other ranks' specs carry no checkpoint_dir (__main__._as_rank), so they ask rank 0.
        self.writes = ctx.spec.checkpoint_dir is not None
        self.enabled = ctx.dist.broadcast(self.writes) if ctx.dist.sharded else self.writes
        self.last_saved_step: int | None = None

    def restore(self) -> ResumeState | None:
        """Load the spec's ``resume_from`` if it belongs to this stage; None means start at step 0.

        Call it after the model, optimizer and scheduler exist and after anything else that draws random
        numbers at start-up (adapter init): the RNG states restored here are the ones of the saved step.
        """
        ref = self.ctx.spec.resume_from
        if ref is None or ref.stage != self.stage:
            return None
        folder = Path(ref.path)
        meta = read_meta(folder)
        if meta is None or meta.get("stage") != self.stage:
            raise TrainingError(
                INVALID_SPEC, f"resume_from {folder} is not a complete {self.stage} checkpoint"
            )
        if meta.get("stage_complete"):
            raise TrainingError(
                INVALID_SPEC, f"resume_from {folder} marks stage {self.stage} complete: nothing to resume"
            )
        load_trainable_state(self.modules, load_file(str(folder / WEIGHTS_FILE)))
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        sharding.shard_optimizer_state(self.optimizer)  # fsdp: the full moments back to each rank's shard
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.extra_rng)
        self.last_saved_step = int(meta["step"])
        resumed = ResumeState(
            stage=self.stage,
            step=int(meta["step"]),
            epoch=int(meta.get("epoch", 0)),
            position=int(meta.get("position", 0)),
            final=bool(meta.get("final", False)),
            extra=dict(meta.get("extra") or {}),
        )
        self.ctx.progress.event(
            f"resumed from checkpoint at step {resumed.step} (epoch {resumed.epoch}, batch {resumed.position} "
            "of that epoch): weights, optimizer, scheduler and RNG states restored",
            stage=self.stage,
        )
        return resumed

    def due(self, step: int) -> bool:
        return self.enabled and self.every is not None and step % self.every == 0

    def maybe_save(
        self, step: int, *, epoch: int, position: int, extra: Mapping[str, Any] | None = None
    ) -> Path | None:
        """Save if ``step`` is a multiple of ``every``; call right after the optimizer (and scheduler) step."""
        if not self.due(step):
            return None
        return self.save(step, epoch=epoch, position=position, extra=extra)

    def save(
        self,
        step: int,
        *,
        epoch: int,
        position: int,
        extra: Mapping[str, Any] | None = None,
        final: bool = False,
    ) -> Path | None:
        # The same step twice (a periodic save on the last step, or a resume at the final step) is one state.
        if not self.enabled or self.last_saved_step == step:
            return None
        state = {
            "optimizer": sharding.full_optimizer_state(self.optimizer),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "rng": rng_state(self.extra_rng),
        }
        tensors = trainable_state(self.modules)
        if not self.writes:  # a rank other than 0 under fsdp: it took part in the gathers
            self.last_saved_step = step
            return None

        def write(folder: Path) -> None:
            save_file(tensors, str(folder / WEIGHTS_FILE))
            torch.save(state, folder / STATE_FILE)

        meta = {
            "stage": self.stage,
            "step": step,
            "epoch": epoch,
            "position": position,
            "final": final,
            "stage_complete": False,
            "extra": dict(extra or {}),
        }
        path = _write_atomically(self.ctx, stage=self.stage, step=step, meta=meta, write=write)
        self.last_saved_step = step
        return path
