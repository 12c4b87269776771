"""``resources.precision``: a bf16 base on a CPU with fp32 adapters, fp32 heads, fp32 attention and fp32 losses.

What must hold for bf16 to be a precision and not a different algorithm: the fused LoRA path serves a bf16
base with fp32 adapter weights (and matches peft's own path to bf16 rounding), gradients land on fp32 adapter
weights, the reward model's trainable head stays fp32, PPO's first ratio is still exactly 1, the frozen base is
untouched, and PPO still learns the tiny model's ending task in a bounded number of updates.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AttentionInterface, AutoModelForSequenceClassification

from contract.hyperparameters import LoraSettings
from contract.resources import Resources
from tests.training.test_fused_lora import _pair
from tests.training.test_ppo import FAST_HP, ctx_for, ends_early_reward, make_spec
from workers.training import lora, ppo_job, precision
from workers.training.errors import TrainingError

CPU = torch.device("cpu")


# In-process training runs torch on one thread (conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_thread")


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 90, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on one row: the mask path of the attention, not only the causal one
    return ids, mask


def test_precision_picks_the_dtype_and_the_cpu_attention(tiny_model_dir: Path) -> None:
    assert precision.base_dtype("auto", CPU) == torch.float32
    assert precision.base_dtype("fp32", CPU) == torch.float32
    assert precision.base_dtype("bf16", CPU) == torch.bfloat16
    with pytest.raises(TrainingError) as refused:
        precision.base_dtype("fp8", CPU)
    assert refused.value.code == "invalid_spec"

    fp32 = lora.load_base_model(tiny_model_dir, device=CPU, precision="fp32")
    bf16 = lora.load_base_model(tiny_model_dir, device=CPU, precision="bf16")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert fp32.config._attn_implementation == precision.CPU_ATTENTION
    assert bf16.config._attn_implementation == precision.CPU_ATTENTION
    assert AttentionInterface._global_mapping[precision.CPU_ATTENTION] is precision._cpu_sdpa
    ids, mask = _padded_batch()
    with torch.no_grad():
        expected = fp32(input_ids=ids, attention_mask=mask).logits
        got = bf16(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    # bf16 keeps 8 bits of mantissa: logits agree to a few percent of their scale, not bit for bit
    # (measured on the tiny model: 0.27 at most, a scale of 7.9).
    scale = float(expected[real].abs().max())
    error = (got.float() - expected)[real].abs()
    assert float(error.max()) < 0.06 * scale and float(error.mean()) < 0.01 * scale
    assert not torch.equal(got.float(), expected)  # it did run in bf16


def test_fp32_attention_matches_sdpa_on_the_same_bf16_inputs() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, dtype=torch.bfloat16) for _ in range(3))
    keep = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    keep[0, :, :, :3] = False  # padded keys on the first row
    keep[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)  # (a padded query still attends to itself)
    module = torch.nn.Module()
    module.is_causal = False
    out, _ = precision._cpu_sdpa(module, q, k, v, keep, dropout=0.0, scaling=None)
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=keep
    ).transpose(1, 2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_attention_skips_the_key_value_copies_with_the_same_result(dtype: torch.dtype) -> None:
    """Several query positions under a padding mask: enable_gqa instead of transformers' repeat_kv, the same
    outputs and gradients, and smaller saved tensors for the backward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q = torch.randn(2, 6, 9, 8, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    keep = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril()
    keep[0, :, :, :3] = False
    keep[0, :, :3, :3] = torch.eye(3, dtype=torch.bool)
    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 3

    def run(attend: Any) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        saved: list[int] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, _ = attend(module, q, k, v, keep, dropout=0.0, scaling=None)
        grads = torch.autograd.grad(out.float().square().sum(), [q, k, v])
        return out, list(grads), sum(saved)

    if dtype == torch.float32:
        expected, expected_grads, expected_saved = run(sdpa_attention_forward)
    else:  # the reference in fp32, as _cpu_sdpa computes a bf16 base's attention

        def upcast(module: Any, q: Any, k: Any, v: Any, mask: Any, **kw: Any) -> Any:
            out, w = sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, **kw)
            return out.to(dtype), w

        expected, expected_grads, expected_saved = run(upcast)
    got, got_grads, got_saved = run(precision._cpu_sdpa)
    assert got.dtype == dtype
    torch.testing.assert_close(got, expected)
    for mine, reference in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(mine, reference)
    assert got_saved < expected_saved


@pytest.mark.parametrize("shape", [(3, 11), (4, 20)], ids=["decode-sized (fp32 adapter)", "bf16 adapter"])
def test_fused_lora_serves_a_bf16_base_with_fp32_adapters(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both of its low-precision paths: up to lora._FEW_ROWS rows the adapter runs in fp32, above in bf16."""
    assert shape[0] * shape[1] <= lora._FEW_ROWS or shape[0] * shape[1] > lora._FEW_ROWS * 1.2
    plain, fused = _pair(dtype=torch.bfloat16)
    adapters = {n: p for n, p in fused.named_parameters() if "lora_" in n}
    assert len(adapters) == 28 and {p.dtype for p in adapters.values()} == {torch.float32}
    fallbacks = []
    original = lora._PEFT_LINEAR_FORWARD
    monkeypatch.setattr(
        lora, "_PEFT_LINEAR_FORWARD", lambda *a, **k: fallbacks.append(1) or original(*a, **k)
    )
    ids = torch.randint(0, 97, shape, generator=torch.Generator().manual_seed(1))
    out_fused = fused(input_ids=ids, labels=ids)
    assert fallbacks == []  # every LoRA layer took the fused path
    monkeypatch.setattr(lora, "_PEFT_LINEAR_FORWARD", original)
    out_plain = plain(input_ids=ids, labels=ids)  # peft's: x cast up to fp32 for the adapter
    scale = float(out_plain.logits.detach().float().abs().max())
    error = (out_fused.logits.detach().float() - out_plain.logits.detach().float()).abs()
    assert float(error.max()) < 0.06 * scale and float(error.mean()) < 0.01 * scale
    out_fused.loss.backward()
    out_plain.loss.backward()
    plain_grads = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    for name, param in adapters.items():
        assert param.grad is not None and param.grad.dtype == torch.float32, name
        expected = plain_grads[name].float()
        # Same direction to bf16 rounding: cosine similarity, since single elements can differ by more.
        cosine = torch.nn.functional.cosine_similarity(param.grad.flatten(), expected.flatten(), dim=0)
        assert float(cosine) > 0.99, (name, float(cosine))


def test_the_reward_head_stays_fp32_and_trains_on_a_bf16_base(tiny_model_dir: Path) -> None:
    base = lora.load_base_model(
        tiny_model_dir,
        device=CPU,
        precision="bf16",
        model_class=AutoModelForSequenceClassification,
        num_labels=1,
    )
    base.config.pad_token_id = 0
    model = lora.attach_adapter(
        base, LoraSettings(r=4, alpha=8, dropout=0.0), task_type="SEQ_CLS", modules_to_save=["score"]
    )
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert head and {p.dtype for p in head} == {torch.float32}
    ids, mask = _padded_batch()
    scores = lora.score_last_token(model, ids, mask)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    scores.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


def _base_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if "lora_" not in name:
            digest.update(name.encode())
            digest.update(param.detach().float().numpy().tobytes())
    return digest.hexdigest()


def test_ppo_in_bf16_keeps_the_first_ratio_at_one_and_learns_to_end(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The fp32 acceptance (half the achievable reward range within 150 updates, test_ppo.py) in bf16."""
    spec = make_spec(tmp_path, tiny_model_dir, hp=FAST_HP)
    spec = spec.model_copy(update={"resources": Resources(precision="bf16")})
    session = ppo_job.setup_ppo(ctx_for(spec), reward_function=ends_early_reward)
    models = session.trainer.models
    assert {p.dtype for n, p in models.peft.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in models.trainable_parameters} == {torch.float32}
    base_before = _base_digest(models.peft)
    first = session.trainer.step(session.next_prompts())
    assert first.minibatches[0].ratio_max_deviation == 0.0  # the same forward: exactly 1, in bf16 too
    start = first.metrics["reward_mean"]
    target = start + 0.5 * (1.0 - start)
    rewards = [start]
    for _ in range(149):
        rewards.append(session.trainer.step(session.next_prompts()).metrics["reward_mean"])
        if len(rewards) >= 5 and sum(rewards[-5:]) / 5 >= target:
            break
    print(f"bf16: {len(rewards)} updates, reward {start:.3f} -> {rewards[-1]:.3f}")
    assert sum(rewards[-5:]) / 5 >= target, rewards
    assert _base_digest(models.peft) == base_before  # the frozen bf16 base is bit-identical
