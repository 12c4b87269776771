"""Leaner autograd for the frozen base's norms and MLP activations: the same forward, fewer saved tensors.

A LoRA step keeps, for its backward, what every op of the base's forward saved. Counted with
``saved_tensors_hooks`` on SmolLM2-135M (GRPO's training forward, 8 answers x 75 tokens, fp32), those were
800 MB; two patterns keep tensors no backward formula needs once the ops are taken together:

- **RMSNorm** (``weight * (x * rsqrt(mean(x^2) + eps))``, transformers' Llama/Qwen2/Mistral norms): for a
  bf16 base autograd keeps the fp32 copy of ``x`` (twice the size of ``x``) and, where the weight trains,
  the normalized ``x * rsqrt(...)``; :class:`RMSNormFunction` keeps ``x`` in its own dtype and the per-row
  ``rsqrt`` (one number a row) and rebuilds the rest. (For an fp32 base with a frozen weight autograd keeps
  no more than that: the SmolLM2 count above did not move with this one.)
- **SwiGLU** (``down(silu(gate(x)) * up(x))``): autograd keeps ``gate(x)``, ``silu(gate(x))`` and ``up(x)``
  (three tensors of the intermediate size); :class:`SiluMulFunction` keeps ``gate(x)`` and ``up(x)`` and
  recomputes the sigmoid in the backward (an elementwise pass, no matmul).

The forwards run the very ops, in the same order and dtypes, as transformers' modules, so outputs are
bit-identical (asserted in tests/training/test_fused.py, with the gradients against autograd's). Only the
module classes named in :data:`NORM_CLASSES` and :data:`SWIGLU_MLP_CLASSES`, whose forwards are those
formulas, are patched; any other model runs as transformers wrote it.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# transformers' RMSNorm classes computing ``weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)``
# with the epsilon in ``variance_epsilon`` (Gemma's ``1 + weight`` norm is deliberately absent).
NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})
# transformers' MLP classes computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.
SWIGLU_MLP_CLASSES = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


class RMSNormFunction(torch.autograd.Function):
    """``weight * normalize(x)`` saving ``x`` and the per-row reciprocal RMS only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(input_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # the forward multiplied the weight by the normalized input cast to the input's dtype
            rows = grad * normed.to(x.dtype)
            grad_weight = rows.reshape(-1, rows.size(-1)).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # y_i = w_i * n_i with n = x * rstd: dx = rstd * (g*w - n * mean(g*w * n)) over the hidden size
            gw = (grad * weight).to(torch.float32)
            grad_x = (rstd * (gw - normed * (gw * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


class SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up`` saving ``gate`` and ``up``; the sigmoid is recomputed in the backward."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_up = grad * silu if ctx.needs_input_grad[1] else None
        # d silu / d gate = sig * (1 + gate * (1 - sig))
        grad_gate = grad * up * (sig * (1 + gate * (1 - sig))) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # nothing is saved without a graph: transformers' own ops are as lean
        return _ORIGINAL_FORWARD[type(self)](self, hidden_states)
    out: torch.Tensor = RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    return out


def _swiglu_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return _ORIGINAL_FORWARD[type(self)](self, x)
    activated: torch.Tensor = SiluMulFunction.apply(self.gate_proj(x), self.up_proj(x))
    out: torch.Tensor = self.down_proj(activated)
    return out


_ORIGINAL_FORWARD: dict[type, Any] = {}


@dataclass(frozen=True)
class Patched:
    norms: int
    mlps: int


def _silu(module: torch.nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


def patch_base_model(model: torch.nn.Module) -> Patched:
    """Route the known RMSNorm and SwiGLU modules of ``model`` through the lean functions; returns counts."""
    norms = mlps = 0
    for module in model.modules():
        name = type(module).__name__
        if name in NORM_CLASSES and hasattr(module, "variance_epsilon"):
            _ORIGINAL_FORWARD.setdefault(type(module), type(module).forward)
            module.forward = types.MethodType(_norm_forward, module)
            norms += 1
        elif name in SWIGLU_MLP_CLASSES and _silu(module):
            _ORIGINAL_FORWARD.setdefault(type(module), type(module).forward)
            module.forward = types.MethodType(_swiglu_forward, module)
            mlps += 1
    return Patched(norms=norms, mlps=mlps)


# Answer positions whose vocabulary-wide logits exist at once in :class:`TokenLogprobsFunction` (64 x 49,152
# fp32 logits are 12 MiB, against 48 MiB for GRPO's 8 x 32 answer tokens at once).
LOGIT_ROWS = 64


class TokenLogprobsFunction(torch.autograd.Function):
    """log p(token) and the entropy at each position from hidden states and a frozen LM head, a chunk of
    positions at a time: the (positions x vocabulary) logits never exist whole.

    The gradient needs no logits either. With ``l = h W^T / T`` and ``log p_t = l_t - logsumexp(l)``,
    ``d log p_t / d h = (W_t - softmax(l) W) / T``: one vector of the hidden size per position, whatever the
    loss upstream. The forward computes it from each chunk's probabilities while they exist and keeps only it
    (positions x hidden); the backward scales it by the incoming gradient. So the head's product runs once
    more than a forward without a graph (``softmax(l) W``), where recomputing the logits in the backward would
    run it twice more. The entropy is a metric and gets no gradient."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = hidden.size(0)
        logprobs = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        slope = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, rows, LOGIT_ROWS):
            part = slice(start, start + LOGIT_ROWS)
            logits = _chunk_logits(hidden[part], weight, temperature)
            lse = torch.logsumexp(logits, dim=-1)
            chosen = tokens[part]
            logprobs[part] = logits.gather(-1, chosen.unsqueeze(-1)).squeeze(-1) - lse
            probs = torch.exp(logits - lse.unsqueeze(-1))
            entropy[part] = lse - (probs * logits).sum(dim=-1)
            if slope is not None:
                expected = (probs.to(weight.dtype) @ weight).float()
                slope[part] = ((weight[chosen].float() - expected) / temperature).to(hidden.dtype)
        ctx.save_for_backward(slope)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logprobs: torch.Tensor | None, _grad_entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, None, None, None]:
        (slope,) = ctx.saved_tensors
        if grad_logprobs is None or slope is None:
            return None, None, None, None
        return (grad_logprobs.unsqueeze(-1) * slope).to(slope.dtype), None, None, None


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    # the same ops as the whole-batch path: the head's product in the model's dtype, then fp32 / temperature
    return F.linear(hidden, weight).float() / temperature


def token_logprobs_and_entropy(
    lm_head: torch.nn.Module, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(log-probs (B, T), entropy (B, T)) of ``tokens`` (B, T) after ``hidden`` (B, T, H) through a frozen
    bias-free ``Linear`` head, chunked (:class:`TokenLogprobsFunction`); None for any other head."""
    if type(lm_head) is not torch.nn.Linear or lm_head.bias is not None or lm_head.weight.requires_grad:
        return None
    batch, width, size = hidden.shape
    logprobs, entropy = TokenLogprobsFunction.apply(
        hidden.reshape(batch * width, size), lm_head.weight, tokens.reshape(-1), temperature
    )
    return logprobs.view(batch, width), entropy.view(batch, width)
