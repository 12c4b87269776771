"""Activation checkpointing for the decoder layers of a model in eval mode, with a KV cache that is written.

transformers' own gradient checkpointing needs the model in training mode and turns the cache off: a layer
that writes the cache would write it a second time when the backward replays it. GRPO's training pass runs
the base in eval mode (no dropout in the frozen base) and needs the cache: a group's prompt runs once and its
answers run on the prompt's keys and values (``grpo.GroupModels.answer_hidden``).

:func:`checkpointed_layers` runs each decoder layer under ``torch.utils.checkpoint`` (non-reentrant): a
layer keeps only its inputs for the backward, and its activations are recomputed, one layer at a time, when
the backward reaches it. The replay must compute what the forward computed, so while a layer is replayed its
cache layer's ``update`` writes nothing and returns the keys and values the forward saw: the positions the
cache held before that call (a slice of what it holds now, since later calls only appended) followed by the
replayed new ones. On the GRPO benchmark's training pass (SmolLM2-135M, 2 prompts x 4 answers, fp32) the
activations kept for the backward, counted with saved-tensor hooks, were 351 MiB without it; with it the peak
RSS of an update fell from about 1.55 to 1.26 GiB in a development run, for one more forward of the layers
(docs/performance.md has the benchmark's figures).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

_FORWARD = "forward"


def decoder_layers(body: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a transformers base model (its ``layers`` list), or an empty list."""
    layers = getattr(body, "layers", None)
    return list(layers) if isinstance(layers, torch.nn.ModuleList) else []


@contextmanager
def checkpointed_layers(body: torch.nn.Module) -> Iterator[int]:
    """Within the block, every decoder layer of ``body`` recomputes its activations in the backward instead
    of keeping them (only under grad mode: a no-grad forward runs as it is). Yields how many layers that is
    (0: the model has no ``layers`` list, and nothing changes)."""
    layers = decoder_layers(body)
    replaced: list[tuple[torch.nn.Module, Any]] = []
    try:
        for index, layer in enumerate(layers):
            own = layer.__dict__.get(_FORWARD)  # an instance-level forward (a hook library's), put back after
            layer.forward = _checkpointed(layer.forward, index)
            replaced.append((layer, own))
        yield len(layers)
    finally:
        for layer, own in replaced:
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _checkpointed(forward: Callable[..., Any], index: int) -> Callable[..., Any]:
    def run(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return forward(hidden_states, *args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = _cached_length(cache, index)

        def contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
            return nullcontext(), _replaying(cache, index, seen)

        return checkpoint(forward, hidden_states, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    return run


def _cache_layer(cache: Any, index: int) -> Any:
    """Layer ``index`` of ``cache``, or None (no cache, or not that many layers yet)."""
    layers = getattr(cache, "layers", None)
    return layers[index] if layers is not None and index < len(layers) else None


def _cached_length(cache: Any, index: int) -> int:
    """How many positions layer ``index`` of ``cache`` holds now (0 without a cache or before its first
    write)."""
    layer = _cache_layer(cache, index)
    return int(layer.get_seq_length()) if getattr(layer, "is_initialized", False) else 0


@contextmanager
def _replaying(cache: Any, index: int, seen: int) -> Iterator[None]:
    """During a replay: layer ``index``'s cache ``update`` returns the first ``seen`` cached positions and the
    new ones, as the forward's update did, and changes nothing."""
    layer = _cache_layer(cache, index)
    if layer is None:
        yield
        return

    def update(key_states: torch.Tensor, value_states: torch.Tensor, *_: Any, **__: Any) -> Any:
        if seen == 0:
            return key_states, value_states
        keys = torch.cat([layer.keys[..., :seen, :], key_states], dim=-2)
        values = torch.cat([layer.values[..., :seen, :], value_states], dim=-2)
        return keys, values

    layer.update = update
    try:
        yield
    finally:
        del layer.update
