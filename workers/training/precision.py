"""A job's ``resources.precision``: the dtype of the frozen base, and what must stay fp32 beside it.

``auto`` keeps what alignd always did: bf16 on a CUDA GPU that supports it, fp32 elsewhere. ``bf16`` on a CPU
is the fast path on CPUs that multiply bf16 matrices natively (Intel AMX): on a 2-core Intel Xeon VM with AMX,
a 608 x 576 x 1536 product ran at 602 GFLOP/s in bf16 against 197 in fp32, and a SmolLM2 PPO update took
0.705x the fp32 time (``make bench-precision``, bench/results/precision_profile.md). Only the frozen base is
bf16:

- LoRA weights stay fp32 (peft's ``autocast_adapter_dtype``) and are cast to bf16 for their products
  (``lora._fused_lora_forward``), so Adam's small steps are not rounded away;
- a trainable head saved through ``modules_to_save`` (the reward model's ``score``) is made fp32 here, for
  the same reason, and fed fp32 inputs;
- on a CPU, attention runs in fp32 (:data:`CPU_ATTENTION`, which also skips grouped-query copies):
  PyTorch's bf16 flash-attention backward on CPU took 15.9 ms a call where fp32 took 3.3 ms in a profile
  (SmolLM2, 8 x 76 tokens), and SmolLM2's forward + backward is 1.24 s with fp32 attention against 1.68 s with bf16 sdpa (the same results file);
- log-probs, losses, values and rewards are computed from ``.float()`` logits and hidden states by the
  trainers, as on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from workers.training.errors import INVALID_SPEC, TrainingError

# The attention implementation a base gets on a CPU (registered with transformers on first use).
CPU_ATTENTION = "alignd_cpu_sdpa"
_registered = False


def base_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype for ``precision`` on ``device``."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError(INVALID_SPEC, "resources.precision 'bf16': this GPU does not support bf16")
        return torch.bfloat16
    if precision != "auto":
        raise TrainingError(INVALID_SPEC, f"unknown resources.precision {precision!r}")
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def attention_implementation(dtype: torch.dtype, device: torch.device) -> str | None:
    """``attn_implementation`` for ``from_pretrained``: :data:`CPU_ATTENTION` on a CPU, else None
    (transformers' default: sdpa)."""
    if device.type != "cpu":
        return None
    _register_cpu_attention()
    return CPU_ATTENTION


def _cpu_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' sdpa attention with two changes on a CPU.

    - A low-precision base's attention runs in fp32 (the module docstring says why).
    - Several query positions at once (a prefill, a training forward) attend to the key/value heads of
      grouped-query attention directly (``enable_gqa``). transformers repeats each key/value head for every
      query head sharing it (``repeat_kv``) unless no mask is given, and the flash kernel's backward then
      keeps the repeated copies: on SmolLM2 (9 query heads, 3 key/value heads; GRPO's forward, 8 x 75
      tokens) 158 MB of saved key/value/query tensors become 105 MB, for the same outputs. A single query
      position (a decoding step) keeps transformers' path, which already avoids the copies there.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if dtype != torch.float32:
        query, key, value = query.float(), key.float(), value.float()
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    groups = int(getattr(module, "num_key_value_groups", 1))
    plain = not any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "sinks"))
    if groups > 1 and query.shape[2] > 1 and attention_mask is not None and plain:
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=float(kwargs.get("dropout", 0.0)),
            scale=kwargs.get("scaling"),
            enable_gqa=True,
        )
        out, weights = out.transpose(1, 2).contiguous(), None
    else:
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return out.to(dtype), weights


def _register_cpu_attention() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(CPU_ATTENTION, _cpu_sdpa)
    # The masks it takes are sdpa's (transformers picks the mask builder by the implementation's name).
    AttentionMaskInterface.register(CPU_ATTENTION, sdpa_mask)
    _registered = True


def _cast_inputs_to_fp32(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def keep_trainable_heads_fp32(model: torch.nn.Module) -> int:
    """Make every trainable low-precision module that peft saves whole (``modules_to_save``: the reward
    model's score head) fp32, its inputs cast up; returns how many were changed."""
    from peft.utils.other import ModulesToSaveWrapper

    changed = 0
    for module in model.modules():
        if not isinstance(module, ModulesToSaveWrapper):
            continue
        for copy in module.modules_to_save.values():
            params = list(copy.parameters())
            if params and all(p.dtype in (torch.bfloat16, torch.float16) for p in params):
                copy.float()
                copy.register_forward_pre_hook(_cast_inputs_to_fp32)
                changed += 1
    return changed
