"""Data parallelism inside one training child started by torchrun (``resources.processes`` > 1).

Every rank runs the same trainer on the same spec. What differs, and why it is correct:

- **Data**: every rank draws the same seeded batch order (``(seed, epoch)`` alone) and takes its share of each
  step's batch, ``batch[rank::world_size]`` (DistributedSampler's strided split, applied to the project's
  own order, so the fixed-seed order is kept and ``batch_size`` stays the examples of one step over all
  ranks). A step's loss is summed over the rank's share and divided by the *whole* step's weight (tokens,
  pairs), which every rank computes from the full batch.
- **Gradients**: after the backward passes of a step, :meth:`Dist.reduce_gradients` sums the trainable
  (LoRA, head) gradients of all ranks in one flat all-reduce, so every rank holds exactly the single-process
  gradient (up to float summation order), clips it the same way and takes the same optimizer step: the
  replicas stay identical without broadcasting weights. This is DDP's reduction done once per optimizer
  step instead of by ``DistributedDataParallel``'s hooks: a step may run several forwards per backward
  (PPO's roles on one shared base, the reward model's two sides) or none on a rank whose share of a small
  last batch is empty, which the DDP wrapper does not allow.
- **Metrics**: sums of a logging window (loss, tokens, correct pairs) are added over ranks
  (:meth:`Dist.sum_values`) before rank 0 reports them: the reported values are global.
- **Outputs**: rank 0 alone writes protocol lines, checkpoints and artifacts (``is_main``); the others
  write their progress lines to stderr, the attempt's log.
- **Cancel**: SIGTERM reaches every rank; whether to stop is decided collectively at each step boundary
  (:meth:`Dist.any`), so all ranks stop after the same step and none waits forever in an all-reduce.

Backend: nccl when CUDA is available (one GPU per rank, ``LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from workers.training.errors import INVALID_SPEC, TrainingError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size; a world of one makes every method a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    # resources.strategy "fsdp": the decoder layers are sharded (sharding.py), so every forward is a
    # collective and the ranks must run the same number of them (lockstep_fillers).
    sharded: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (strided, as DistributedSampler without padding)."""
        return list(items[self.rank :: self.world_size])

    def lockstep_fillers(self, items: Sequence[T], passes: Callable[[list[T]], int]) -> int:
        """How many extra forward passes this rank runs so that every rank runs as many as the busiest one:
        ``passes(share)`` is how many a rank runs on its share of ``items`` (every rank can compute every
        other's, as all hold ``items``). Always 0 unless the layers are sharded (fsdp)."""
        if not (self.enabled and self.sharded):
            return 0
        counts = [passes(list(items[rank :: self.world_size])) for rank in range(self.world_size)]
        return max(counts) - counts[self.rank]

    def lockstep_batch_fillers(self, items: Sequence[T], batch_size: int) -> int:
        """:meth:`lockstep_fillers` for a rank that scores its share in batches of ``batch_size``."""
        return self.lockstep_fillers(items, lambda share: math.ceil(len(share) / batch_size))

    def _device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a collective: every rank must call it)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self._device())
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item() > 0)

    def all(self, flag: bool) -> bool:
        """True on every rank when it is True on all of them (a collective)."""
        return not self.any(not flag)

    def finished_everywhere(self) -> Callable[[bool], bool] | None:
        """For :func:`rollout.sample_responses`: under fsdp, decode until every rank's answers ended."""
        return self.all if self.enabled and self.sharded else None

    def sum_values(self, values: Mapping[str, float]) -> dict[str, float]:
        """``values`` added over ranks, key by key (a key missing on a rank counts 0 there)."""
        if not self.enabled:
            return dict(values)
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, dict(values))
        total: dict[str, float] = {}
        for part in gathered:
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + float(value)
        return total

    def mean_values(self, values: Mapping[str, float]) -> dict[str, float]:
        """``values`` averaged over ranks (each rank's value over an equal share)."""
        if not self.enabled:
            return dict(values)
        return {key: value / self.world_size for key, value in self.sum_values(values).items()}

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order (picklable values)."""
        if not self.enabled:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, value)
        return gathered

    def sum_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over ranks (a new tensor; the input is left as it is)."""
        if not self.enabled:
            return value
        total = value.detach().clone()
        torch_dist.all_reduce(total)
        return total

    def reduce_gradients(self, params: Sequence[torch.nn.Parameter], *, mean: bool = False) -> None:
        """Sum (``mean``: average) the gradients of ``params`` over ranks, in one flat all-reduce. A parameter
        without a gradient on this rank (its share was empty) contributes zeros. A sharded parameter's
        gradient (fsdp) is already FSDP's average over ranks: scaled to the sum, not reduced again."""
        if not self.enabled or not params:
            return
        if self.sharded:
            from torch.distributed.tensor import DTensor

            for param in params:
                if isinstance(param, DTensor) and param.grad is not None and not mean:
                    param.grad.mul_(self.world_size)
            params = [p for p in params if not isinstance(p, DTensor)]
            if not params:
                return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch_dist.all_reduce(flat)
        if mean:
            flat /= self.world_size
        offset = 0
        for param in params:
            count = param.numel()
            param.grad = flat[offset : offset + count].view_as(param).clone()
            offset += count

    def broadcast_parameters(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's values of ``params`` on every rank (the replicas start equal whatever each rank drew)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for param in params:
                torch_dist.broadcast(param.data, src=0)

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (picklable values)."""
        if not self.enabled:
            return value
        box: list[Any] = [value]
        torch_dist.broadcast_object_list(box, src=0)
        result: T = box[0]
        return result

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()


SINGLE = Dist()


def from_environment(environ: Mapping[str, str] | None = None) -> Dist:
    """The Dist torchrun's variables describe (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), the process group
    initialised; a plain child (no ``WORLD_SIZE`` or 1) gets :data:`SINGLE`."""
    env = os.environ if environ is None else environ
    world_size = int(env.get("WORLD_SIZE", "1") or 1)
    if world_size <= 1:
        return SINGLE
    rank, local_rank = int(env["RANK"]), int(env.get("LOCAL_RANK", env["RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            # nccl needs a GPU per rank; two ranks on one device fail later with an obscure nccl error.
            raise TrainingError(
                INVALID_SPEC,
                f"{env.get('LOCAL_WORLD_SIZE', world_size)} processes need as many GPUs, CUDA sees {visible}: "
                "set ALIGND_WORKER_GPUS on this worker (each process then gets its own GPU) or ask for fewer "
                "processes",
            )
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
