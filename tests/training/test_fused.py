"""workers/training/fused.py and rollout.sample_from_probs: the same numbers as the plain ops, less kept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from contract.hyperparameters import LoraSettings
from workers.training import fused, lora, rollout

CPU = torch.device("cpu")


def _saved_elements(run: Any) -> tuple[Any, int]:
    """(what ``run()`` returns, the elements of the distinct tensors it saved for the backward)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trainable_weight", [False, True])
def test_rmsnorm_gives_transformers_outputs_and_gradients(dtype: torch.dtype, trainable_weight: bool) -> None:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16) * 0.5 + 1)
    norm.weight.requires_grad_(trainable_weight)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    upstream = torch.randn(3, 5, 16, dtype=dtype)

    expected = norm(x)
    expected_grads = torch.autograd.grad(expected, [x, norm.weight] if trainable_weight else [x], upstream)
    got = fused.RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    got_grads = torch.autograd.grad(got, [x, norm.weight] if trainable_weight else [x], upstream)

    assert torch.equal(got, expected)  # the very same forward ops
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    for mine, reference in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(mine, reference, **tolerance)


def test_silu_mul_gives_autograd_gradients_and_keeps_two_tensors_of_three() -> None:
    torch.manual_seed(0)
    gate = torch.randn(4, 7, 32, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 7, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused.SiluMulFunction.apply, (gate, up))

    plain, plain_saved = _saved_elements(lambda: torch.nn.functional.silu(gate) * up)
    mine, mine_saved = _saved_elements(lambda: fused.SiluMulFunction.apply(gate, up))
    assert torch.equal(mine, plain)
    assert mine_saved == 2 * gate.untyped_storage().nbytes() < plain_saved


def test_patched_llama_gives_the_same_logits_and_gradients_keeping_less(tiny_model_dir: Path) -> None:
    """The tiny Llama with its norms and MLPs patched (as lora.load_base_model does) against transformers'
    modules: identical logits, LoRA gradients equal to float precision, fewer bytes saved for the backward."""
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    plain.requires_grad_(False)
    loaded = lora.load_base_model(tiny_model_dir, device=CPU, precision="fp32")
    assert not any(isinstance(m, LlamaRMSNorm) and "forward" not in vars(m) for m in loaded.modules())
    patched_counts = fused.patch_base_model(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)))
    assert patched_counts == fused.Patched(norms=2 * 2 + 1, mlps=2)
    settings = LoraSettings(r=4, alpha=8, dropout=0.0)
    peft_plain = lora.attach_adapter(plain, settings)
    peft_fused = lora.attach_adapter(loaded, settings)
    with torch.no_grad():  # the same adapter weights, B non-zero so every gradient flows
        for (name, a), (_, b) in zip(
            peft_plain.named_parameters(), peft_fused.named_parameters(), strict=True
        ):
            if "lora_" in name:
                a.copy_(torch.randn_like(a) * 0.1)
                b.copy_(a)
    ids = torch.randint(3, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def loss_of(model: Any) -> Any:
        return lambda: model(input_ids=ids, attention_mask=mask).logits.square().mean()

    plain_loss, plain_saved = _saved_elements(loss_of(peft_plain))
    fused_loss, fused_saved = _saved_elements(loss_of(peft_fused))
    assert torch.allclose(fused_loss, plain_loss, rtol=1e-6)
    plain_loss.backward()
    fused_loss.backward()
    grads = [
        (p.grad, q.grad)
        for (n, p), (_, q) in zip(peft_plain.named_parameters(), peft_fused.named_parameters(), strict=True)
        if "lora_" in n
    ]
    assert grads and all(a is not None and b is not None for a, b in grads)
    for a, b in grads:
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert fused_saved < plain_saved


def test_mlp_without_silu_is_left_alone() -> None:
    from transformers import LlamaConfig

    mlp = LlamaMLP(
        LlamaConfig(
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_key_value_heads=2,
            hidden_act="gelu",
        )
    )
    assert fused.patch_base_model(mlp) == fused.Patched(norms=0, mlps=0)
    assert "forward" not in vars(mlp)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_the_whole_logits(temperature: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "LOGIT_ROWS", 4)  # several chunks, the last one short
    torch.manual_seed(0)
    head = torch.nn.Linear(12, 50, bias=False).requires_grad_(False)
    hidden = torch.randn(3, 5, 12, requires_grad=True)
    tokens = torch.randint(0, 50, (3, 5))
    upstream = torch.randn(3, 5)

    logits = head(hidden).float() / temperature
    expected = rollout.token_logprobs(logits, tokens)
    expected_entropy = rollout.entropy_from_logits(logits.detach())
    (expected_grad,) = torch.autograd.grad(expected, hidden, upstream)

    result = fused.token_logprobs_and_entropy(head, hidden, tokens, temperature)
    assert result is not None
    got, entropy = result
    (got_grad,) = torch.autograd.grad(got, hidden, upstream)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(entropy, expected_entropy)
    torch.testing.assert_close(got_grad, expected_grad)
    assert not entropy.requires_grad


def test_chunked_logprobs_refuse_heads_they_do_not_cover() -> None:
    hidden, tokens = torch.randn(1, 2, 4), torch.zeros(1, 2, dtype=torch.long)
    with_bias = torch.nn.Linear(4, 6).requires_grad_(False)
    trainable = torch.nn.Linear(4, 6, bias=False)
    assert fused.token_logprobs_and_entropy(with_bias, hidden, tokens, 1.0) is None
    assert fused.token_logprobs_and_entropy(trainable, hidden, tokens, 1.0) is None


def test_sampling_follows_the_probabilities_and_never_draws_a_zero() -> None:
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0]]).repeat(20_000, 1)
    generator = torch.Generator().manual_seed(0)
    tokens = rollout.sample_from_probs(probs, generator).view(20_000, 2)
    first = torch.bincount(tokens[:, 0], minlength=4).float() / 20_000
    # 3 standard errors of a share p from 20,000 draws is at most 0.011
    torch.testing.assert_close(first, torch.tensor([0.5, 0.0, 0.3, 0.2]), rtol=0, atol=0.011)
    assert int(first[1] * 20_000) == 0
    assert bool((tokens[:, 1] == 2).all())
    again = rollout.sample_from_probs(probs, torch.Generator().manual_seed(0)).view(20_000, 2)
    assert torch.equal(again, tokens)  # seeded: the same draws
