"""workers/training/kv_cache.py: decoding into spare room gives what transformers' concatenating cache gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig

from workers.training import kv_cache, rollout

EOS, PAD = 2, 0


def _sample(model: Any, ids: torch.Tensor, mask: torch.Tensor, *, growing: bool) -> tuple[Any, list[Any]]:
    seen: list[torch.Tensor] = []
    caches: list[Any] = []

    def step(i: torch.Tensor, a: torch.Tensor, p: torch.Tensor, c: Any) -> tuple[torch.Tensor, Any]:
        if c is None and growing:
            c = kv_cache.decoding_cache(model.config)
            assert c is not None
        out = model(input_ids=i, attention_mask=a, position_ids=p, past_key_values=c, use_cache=True)
        caches.append(out.past_key_values)
        seen.append(out.logits[:, -1])
        return out.logits[:, -1], out.past_key_values

    with torch.no_grad():
        raw = rollout.sample_responses(
            step, ids, mask, max_new_tokens=40, temperature=1.0, top_p=1.0, eos_token_id=EOS,
            pad_token_id=PAD, generator=torch.Generator().manual_seed(0), group_size=3,
        )  # fmt: skip
    return raw, [seen, caches]


def test_growing_cache_samples_what_the_dynamic_cache_samples(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [tokenizer(text)["input_ids"] for text in ("What colour is the sky?", "Hi")]
    ids, mask = rollout.left_pad(rows, PAD)
    plain, (plain_logits, _) = _sample(model, ids, mask, growing=False)
    mine, (mine_logits, caches) = _sample(model, ids, mask, growing=True)
    assert torch.equal(mine, plain)  # the same draws from the same logits
    for a, b in zip(mine_logits, plain_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    layer = caches[-1].layers[0]
    assert isinstance(layer, kv_cache.GrowingLayer)
    # group sampling repeated the prefilled rows (2 -> 6); the buffer then kept room past the 40 answers
    assert layer.keys.shape[0] == 6 and layer._buffers is not None
    assert layer._buffers[0].shape[-2] > layer.keys.shape[-2] == ids.size(1) + mine.size(1) - 1


def test_no_growing_cache_under_grad_or_with_a_sliding_window(tiny_model_dir: Path) -> None:
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir).config
    with torch.enable_grad():
        assert kv_cache.decoding_cache(config) is None  # in-place writes would corrupt a backward
    with torch.no_grad():
        assert kv_cache.decoding_cache(config) is not None
        sliding = MistralConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, sliding_window=8,
        )  # fmt: skip
        assert not kv_cache.plain_growing_cache(sliding)
        assert kv_cache.decoding_cache(sliding) is None
        assert kv_cache.decoding_cache(None) is None
