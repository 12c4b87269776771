"""FSDP (``resources.strategy: "fsdp"``): the frozen base's decoder layers sharded across the processes.

With ``ddp`` every process holds the whole base; with ``fsdp`` each decoder layer is ``fully_shard``-ed
(PyTorch's FSDP2: per-parameter sharding on dim 0 over a 1-D device mesh of all ranks), so a process holds
1/N of every layer's weights (the frozen base and the LoRA weights inside the layer alike) and gathers a
layer's full weights only for that layer's forward and backward. What stays whole on every rank: the
embeddings, the final norm and the LM head (or the reward model's score head). They are a small part of a
large model (a 7B Llama's embeddings and head are about 4% of it), and an LM head tied to the embeddings
would otherwise be read outside any layer's forward, where FSDP has not gathered it.

What the rest of the trainer does differently, each in one place:

- gradients: FSDP reduce-scatters the layers' LoRA gradients after each backward, averaged over ranks; the
  trainers' losses are each rank's share of the whole step's, meant to be *summed*
  (``distributed.py``), so :meth:`Dist.reduce_gradients` multiplies those gradients by N (gloo has no
  pre-multiplied sum) and all-reduces the unsharded ones (a score head) as with ddp;
- the gradient norm for clipping (:func:`clip_grad_norm`) adds the shards' squares over ranks;
- lock-step forwards: every forward of a sharded layer is a collective, so every rank must run the same
  number of forwards and backwards. Where the ranks' shares differ in size (a batch that does not split
  evenly, held-out sets), the rank with fewer runs extra passes on a filler whose result it drops
  (:meth:`Dist.lockstep_fillers`); the online methods' shares are equal (whole groups, ``uneven_split``);
- checkpoints and adapters hold full tensors (:func:`full_tensor`, :func:`full_optimizer_state`), gathered
  on every rank, so a checkpoint resumes on any number of processes, ddp or fsdp, and the adapter loads
  with plain ``peft``; loading puts each rank's shard back (:func:`load_into`,
  :func:`shard_optimizer_state`).

- sampling (PPO, GRPO, RLOO): a rank whose answers all ended keeps decoding pads until every rank's have
  (``Dist.finished_everywhere``), so the ranks run the same decoding steps. A ``score_model`` judge grader
  decodes its own answers inside the reward and is refused with fsdp.

The decoder body (the module holding the layers) is FSDP's root with no parameters of its own: every role's
forward goes through it, and without a root each layer would be a root that keeps its weights gathered after
a forward.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from workers.training.distributed import Dist
from workers.training.errors import INVALID_SPEC, TrainingError


def _dtensor_type() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: Any) -> bool:
    return isinstance(tensor, _dtensor_type())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (an all-gather: every rank must call it, in the same order), or ``tensor``."""
    if is_sharded(tensor):
        whole: torch.Tensor = tensor.full_tensor()  # type: ignore[attr-defined]  # DTensor's method
        return whole
    return tensor


def load_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full ``value`` into ``param``: into this rank's shard of it when ``param`` is sharded."""
    with torch.no_grad():
        if is_sharded(param):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(
                value.to(device=param.device, dtype=param.dtype),
                param.device_mesh,  # type: ignore[attr-defined]
                param.placements,  # type: ignore[attr-defined]
            )
            param.copy_(value)
        else:
            param.copy_(value.to(device=param.device, dtype=param.dtype))


def _layer_class_names(model: torch.nn.Module) -> set[str]:
    """The decoder layer classes of a transformers model (its ``_no_split_modules``: the blocks that must
    stay whole on one device, which is exactly FSDP's unit)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def _common_parent(names: Iterable[str]) -> str:
    """The module holding the list of layers ``names`` (``a.b.layers.0``, ``a.b.layers.1`` -> ``a.b``)."""
    parts = [name.split(".") for name in names]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    if len(parts) == 1:  # one layer: its full name; its list is the parent
        common = common[:-1]
    return ".".join(common[:-1])


@dataclass(frozen=True)
class ShardedBase:
    layers: int
    local_numel: int  # this rank's elements of every parameter (shards, plus the unsharded parameters)
    total_numel: int  # the whole model's

    def describe(self, world_size: int) -> str:
        share = self.local_numel / max(self.total_numel, 1)
        return (
            f"fsdp: {self.layers} decoder layers sharded across {world_size} processes; this process holds "
            f"{self.local_numel:,} of the model's {self.total_numel:,} parameter elements ({share:.0%}; the "
            "embeddings, final norm and head stay whole on every process)"
        )


def load_device(dist: Dist, device: torch.device) -> torch.device:
    """Where a job loads its base: under fsdp the host (CPU) memory, so that a base too large for one GPU
    reaches the GPU only as this rank's shards (:func:`shard_layers` moves them); elsewhere ``device``."""
    return torch.device("cpu") if dist.sharded else device


def shard_layers(model: torch.nn.Module, dist: Dist, device: torch.device | None = None) -> ShardedBase:
    """``fully_shard`` every decoder layer of ``model`` over all ranks (call after the adapters are attached
    and the replicas made equal, before the optimizer is built: the parameters become new DTensors).

    FSDP moves the shards to the mesh's device (``device``, the rank's GPU; on a CPU nothing moves); what it
    does not manage (the embeddings, norms and heads, kept whole) is moved there here."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = _layer_class_names(model)
    named = [(name, module) for name, module in model.named_modules() if type(module).__name__ in names]
    if not named:
        raise TrainingError(
            INVALID_SPEC,
            "strategy 'fsdp' needs a transformers model that names its decoder layers (_no_split_modules); "
            "this base names none: use 'ddp'",
        )
    layers = [module for _, module in named]
    device_type = "cuda" if dist.backend == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (dist.world_size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The decoder body (the module holding the layers: every forward of every role goes through it) is the
    # root, holding none of its own parameters (the embeddings and the final norm stay whole, like the head).
    # Without a root each layer would be a root of its own, and FSDP keeps a root's weights gathered after its
    # forward (for the backward that follows): after a no-grad pass every layer would stay whole.
    body = model.get_submodule(_common_parent(name for name, _ in named))
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    own = {p for p in body.parameters() if id(p) not in in_layers}
    fully_shard(body, mesh=mesh, ignored_params=own)
    if device is not None:
        _place_whole(model, device)
    local = total = 0
    for param in model.parameters():
        total += param.numel()
        local += param.to_local().numel() if is_sharded(param) else param.numel()  # type: ignore[attr-defined]
    return ShardedBase(layers=len(layers), local_numel=local, total_numel=total)


def _place_whole(model: torch.nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer FSDP left where it was (the whole ones) to ``device``."""
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if not is_sharded(param) and param.device != device:
                    param.data = param.data.to(device)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.device != device:
                    setattr(module, name, buffer.to(device))


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """torch's ``clip_grad_norm_`` (total L2 norm over every gradient, then scaled to ``max_norm``) for a mix
    of sharded and whole parameters: a shard's squares are summed over ranks, a whole gradient (the same on
    every rank after its all-reduce) counted once. Returns the norm before clipping."""
    import torch.distributed as torch_dist

    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    local = [g.to_local() for g in grads if is_sharded(g)]  # type: ignore[attr-defined]
    whole = [g for g in grads if not is_sharded(g)]
    sharded_sq = torch.stack([g.detach().float().pow(2).sum() for g in local]).sum()
    torch_dist.all_reduce(sharded_sq)
    whole_sq = (
        torch.stack([g.detach().float().pow(2).sum() for g in whole]).sum()
        if whole
        else sharded_sq.new_zeros(())
    )
    total = float((sharded_sq + whole_sq).sqrt())
    coefficient = max_norm / (total + 1e-6)  # torch's epsilon
    if coefficient < 1.0:
        for grad in [*local, *whole]:
            grad.mul_(coefficient)
    return total


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor (Adam's moments) gathered whole."""
    state = optimizer.state_dict()  # its per-parameter dicts are the live ones: build new ones
    state["state"] = {
        index: {key: full_tensor(value).cpu() if is_sharded(value) else value for key, value in per.items()}
        for index, per in state["state"].items()
    }
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict`` of full tensors: each sharded parameter's state back to its shard."""
    from torch.distributed.tensor import distribute_tensor

    for group in optimizer.param_groups:
        for param in group["params"]:
            if not is_sharded(param):
                continue
            per_param = optimizer.state.get(param, {})
            for key, value in list(per_param.items()):
                if isinstance(value, torch.Tensor) and not is_sharded(value) and value.shape == param.shape:
                    per_param[key] = distribute_tensor(
                        value.to(param.device), param.device_mesh, param.placements
                    )
