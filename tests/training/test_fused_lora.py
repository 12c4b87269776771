"""The fused LoRA forward (one addmm_ into the base output) against peft's own forward: same outputs, same
gradients, and peft's path wherever the fused one does not apply (adapters off, dropout, mixed batches)."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from workers.training import lora
from workers.training.lora import fuse_lora_linears


def _pair(
    dropout: float = 0.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """peft's model and a fused copy; ``dtype``: the base's (peft keeps the adapter weights fp32)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    lora_config = LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules="all-linear")
    plain = get_peft_model(LlamaForCausalLM(config).to(dtype), lora_config)
    for name, param in plain.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B makes the update visible
            torch.nn.init.normal_(param, std=0.2)
    fused = copy.deepcopy(plain)
    assert fuse_lora_linears(fused) == 14  # 7 linear layers x 2 blocks
    return plain, fused


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_forward_matches_peft_outputs_and_gradients() -> None:
    plain, fused = _pair()
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    out_plain = plain(input_ids=ids, labels=ids)
    out_fused = fused(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_fused.logits, out_plain.logits, rtol=1e-5, atol=1e-5)
    out_plain.loss.backward()
    out_fused.loss.backward()
    grads_plain, grads_fused = _grads(plain), _grads(fused)
    assert grads_plain.keys() == grads_fused.keys() and len(grads_fused) == 28  # A and B of 14 layers
    for name, grad in grads_plain.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_fused[name], grad, rtol=1e-4, atol=1e-6)


def test_adapter_off_is_the_base_and_dropout_falls_back_to_peft() -> None:
    plain, fused = _pair()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), fused.disable_adapter():
        off = fused(input_ids=ids).logits
    with torch.no_grad():
        on = fused(input_ids=ids).logits
        base = plain.get_base_model()
        with plain.disable_adapter():
            reference = base(input_ids=ids).logits
    torch.testing.assert_close(off, reference)
    assert (on - off).abs().max() > 1e-3  # the adapter does something when on

    plain, fused = _pair(dropout=0.5)
    fused.train()
    plain.train()
    torch.manual_seed(3)
    dropped_fused = fused(input_ids=ids).logits
    torch.manual_seed(3)
    dropped_plain = plain(input_ids=ids).logits
    torch.testing.assert_close(dropped_fused, dropped_plain)  # peft's path: same masks from the same seed


def test_dropout_in_eval_mode_takes_the_fused_path_and_matches_peft(monkeypatch: pytest.MonkeyPatch) -> None:
    """PPO and GRPO keep their models in eval mode: a configured dropout is a no-op there, and the fused
    forward serves those layers (counted), with peft's outputs."""
    plain, fused = _pair(dropout=0.05)
    plain.eval()
    fused.eval()
    calls = []
    original = lora._PEFT_LINEAR_FORWARD
    monkeypatch.setattr(lora, "_PEFT_LINEAR_FORWARD", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        got = fused(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls == []  # no layer fell back to peft
    fused.train()  # training mode: the dropout drops, peft's path again
    fused(input_ids=ids)
    assert len(calls) == 14


@pytest.mark.parametrize("adapter_names", [["default", "__base__"]])
def test_mixed_adapter_batches_use_peft(adapter_names: list[str]) -> None:
    plain, fused = _pair()
    plain.eval()  # peft refuses adapter_names in training mode
    fused.eval()
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = plain(input_ids=ids, adapter_names=adapter_names).logits
        got = fused(input_ids=ids, adapter_names=adapter_names).logits
    torch.testing.assert_close(got, expected)
