"""Base model loading, LoRA adapters, and saving an adapter folder that plain ``peft`` can load.

Single-base multi-adapter roles (the shape the RLHF work builds on): one frozen copy of the base weights,
wrapped once in a ``PeftModel``; each role is a named adapter on it.

- policy: the adapter named ``"default"`` (:data:`POLICY_ADAPTER`), the one SFT, DPO and PPO train and save;
- reference: the same model inside ``with model.disable_adapter():`` (no weights of its own);
- reward / value: further adapters added with ``model.add_adapter(name, config)`` or
  ``model.load_adapter(path, adapter_name=name)``, each with a small head module kept beside the PeftModel
  (a head is a plain ``nn.Linear`` on the last hidden state, so it does not need a second base).

So nothing here assumes one adapter: functions take an ``adapter_name``, :func:`save_adapter` saves exactly
one named adapter at the folder root, and :func:`load_base_model` takes the model class (a reward model loads
as a sequence classifier from the same folder when it must have its own base).
"""

from __future__ import annotations

import json
import shutil
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as _PeftLoraLinear

from contract.hyperparameters import LoraSettings
from workers.training import fused, kv_cache, sharding
from workers.training.errors import (
    INVALID_ADAPTER,
    MODEL_LOAD_FAILED,
    REMOTE_CODE_NOT_ALLOWED,
    TrainingError,
)
from workers.training.precision import attention_implementation, base_dtype, keep_trainable_heads_fp32

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_PEFT_LINEAR_FORWARD = _PeftLoraLinear.forward

POLICY_ADAPTER = "default"  # peft's default name; peft saves it at the folder root


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    try:
        config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainingError(MODEL_LOAD_FAILED, f"cannot read {config_file}: {exc}") from None
    return config


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise TrainingError(MODEL_LOAD_FAILED, f"cannot load the tokenizer from {path}: {exc}") from None


def load_base_model(
    path: str | Path,
    *,
    device: torch.device,
    precision: str = "auto",
    model_class: Any = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a frozen base model (every parameter ``requires_grad=False``) onto ``device``.

    ``precision`` is the job's ``resources.precision`` (``precision.py``: the dtype, and fp32 attention for a
    bf16 base on a CPU). ``trust_remote_code`` is never set: a config with ``auto_map`` is refused before
    anything is imported. ``model_class`` defaults to ``AutoModelForCausalLM``; extra kwargs (``num_labels=1``)
    go to it.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if _read_config(folder).get("auto_map"):
        raise TrainingError(REMOTE_CODE_NOT_ALLOWED, f"{folder}/config.json asks for remote code (auto_map)")
    cls = model_class or AutoModelForCausalLM
    dtype = base_dtype(precision, device)
    attention = attention_implementation(dtype, device)
    if attention is not None:
        kwargs = {"attn_implementation": attention, **kwargs}
    try:
        model = cls.from_pretrained(str(folder), dtype=dtype, trust_remote_code=False, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise TrainingError(MODEL_LOAD_FAILED, f"cannot load the base model from {folder}: {exc}") from None
    model.requires_grad_(False)
    model = model.to(device)  # type: ignore[arg-type]  # transformers' decorator hides Module.to's signature
    fused.patch_base_model(model)  # the same outputs, fewer tensors kept for the backward
    return model


def lora_config(settings: LoraSettings, *, task_type: str = "CAUSAL_LM", **overrides: Any) -> LoraConfig:
    """peft ``LoraConfig`` from the service's LoraSettings (the one definition of the adapter's shape)."""
    # peft annotates lora_alpha as int but only divides by r; keep integral values ints for a tidy config.
    alpha: Any = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return LoraConfig(
        r=settings.r,
        lora_alpha=alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
        task_type=task_type,
        **overrides,
    )


def attach_adapter(
    base: PreTrainedModel,
    settings: LoraSettings,
    *,
    init_adapter: str | Path | None = None,
    adapter_name: str = POLICY_ADAPTER,
    task_type: str = "CAUSAL_LM",
    modules_to_save: list[str] | None = None,
) -> PeftModel:
    """Wrap ``base`` with a trainable LoRA adapter: fresh from ``settings``, or loaded from ``init_adapter``.

    A loaded adapter keeps its own shape (r, alpha, targets), since its weights fix it; ``settings`` then only
    matter for new adapters. ``task_type="SEQ_CLS"`` with ``modules_to_save=["score"]`` makes a reward model:
    LoRA on the body, a trainable copy of the head saved with the adapter.
    """
    model: PeftModel
    if init_adapter is None:
        config = lora_config(settings, task_type=task_type, modules_to_save=modules_to_save)
        try:
            model = get_peft_model(base, config, adapter_name=adapter_name)
        except ValueError as exc:  # e.g. target_modules naming nothing in this model
            raise TrainingError(INVALID_ADAPTER, f"cannot build the LoRA adapter: {exc}") from None
    else:
        try:
            model = PeftModel.from_pretrained(
                base, str(init_adapter), adapter_name=adapter_name, is_trainable=True
            )
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise TrainingError(
                INVALID_ADAPTER, f"cannot load init_adapter {init_adapter} onto this base model: {exc}"
            ) from None
    keep_trainable_heads_fp32(model)  # a bf16 base's reward head (precision.py)
    fuse_lora_linears(model)
    return model


def _fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA ``Linear.forward`` for the common case, with the update added inside one GEMM.

    peft computes ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: besides the matmuls, three passes over
    a (tokens x out_features) tensor (B's output, the scaling multiply, the add), and the same again in the
    backward. Here ``addmm_`` adds ``scaling * (x A^T) B^T`` into the base output in place (BLAS alpha/beta),
    which is the same sum. Anything else (adapters off or merged, several active adapters, mixed-adapter
    batches, dropout that drops (a Dropout in training mode with p > 0), DoRA and other variants, a base layer
    that is not a plain Linear, activations of another dtype than the base) goes to peft's own forward; a
    bf16/fp16 base with fp32 adapter weights (``resources.precision``) stays here. PPO and GRPO run their
    models in eval mode throughout (their ratios need the rollout's forward reproduced), so a configured
    dropout is off there and their LoRA layers take the fused path too.
    """
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (
        args
        or kwargs
        or name is None
        or self.disable_adapters
        or self.merged
        or name not in self.lora_A
        or name in self.lora_variant
        or type(self.base_layer) is not torch.nn.Linear
        or _drops(self.lora_dropout[name])
        or not _fusable_dtypes(x, self.base_layer.weight, self.lora_A[name].weight)
    ):
        return _PEFT_LINEAR_FORWARD(self, x, *args, **kwargs)
    self._check_forward_args(x)
    base: torch.nn.Linear = self.base_layer
    flat = x.reshape(-1, x.shape[-1])
    out = torch.nn.functional.linear(flat, base.weight, base.bias)  # its backward keeps x and W, not out
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    if lora_a.dtype == x.dtype:
        shrunk = torch.nn.functional.linear(flat, lora_a)
        out.addmm_(shrunk, lora_b.t(), alpha=self.scaling[name])
    elif flat.size(0) <= _FEW_ROWS:
        # A few rows (a decoding step): the adapter's two products in fp32 from an fp32 copy of x, added
        # into the bf16 output; measured 195 us a layer against 267 us for the bf16 casts below (8 rows).
        delta = torch.nn.functional.linear(torch.nn.functional.linear(flat.float(), lora_a), lora_b)
        out.add_(delta, alpha=self.scaling[name])
    else:
        # A bf16 base keeps fp32 adapter weights (peft's autocast_adapter_dtype: Adam's small steps survive);
        # they are cast to the activations' dtype for the product, as autocast does, and their gradients flow
        # back to the fp32 weights through the cast. peft instead casts x (a tokens x in_features tensor) up
        # to fp32 and the result back, copies that cost more than the bf16 matmuls save (608 rows: 1.9 ms a
        # layer this way, 5.4 ms from an fp32 copy of x).
        shrunk = torch.nn.functional.linear(flat, lora_a.to(x.dtype))
        out.addmm_(shrunk, lora_b.to(x.dtype).t(), alpha=self.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


# Rows (tokens) up to which a low-precision base's adapter product runs in fp32 (decoding steps).
_FEW_ROWS = 64


def _fusable_dtypes(x: torch.Tensor, base_weight: torch.Tensor, lora_weight: torch.Tensor) -> bool:
    """Same dtype throughout, or bf16/fp16 activations and base with fp32 adapter weights."""
    if x.dtype != base_weight.dtype:
        return False
    return lora_weight.dtype == x.dtype or lora_weight.dtype == torch.float32


def project_to_vocab(lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_head`` over (B, T, H) hidden states as one 2-D matrix product, returning (B, T, V).

    A sliced (non-contiguous) 3-D input makes ``Linear`` fall back to a batched matmul that broadcasts the
    (V, H) weight: measured on SmolLM2 (V = 49,152) at about half the speed of the flat product.
    """
    batch, width, size = hidden.shape
    logits: torch.Tensor = lm_head(hidden.reshape(batch * width, size))
    return logits.view(batch, width, -1)


def project_last_positions(lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_head`` over a decoding step's few rows (B, H) -> (B, V).

    For a plain bias-free head the product runs as ``W h^T`` (then transposed): the (V, H) weight read row
    by row against the few columns of ``h``. Measured on 2 cores for SmolLM2's head (49,152 x 576, 8 rows):
    10.1 ms against 16.6 ms for ``Linear``'s ``h W^T`` in fp32, 1.6 against 3.2 ms in bf16; at a decoding step's
    rows the head's product was 31 calls x 15.4 ms of a 2.5 s GRPO sampling call. (For the decoder's own
    576- to 1,536-wide layers ``Linear`` is the faster of the two, so they are left as they are.)
    """
    if type(lm_head) is torch.nn.Linear and lm_head.bias is None and hidden.dim() == 2:
        return torch.mm(lm_head.weight, hidden.t()).t()
    logits: torch.Tensor = lm_head(hidden)
    return logits


def decoding_step(
    body: torch.nn.Module,
    lm_head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Any,
) -> tuple[torch.Tensor, Any]:
    """One KV-cached step of a decoder body and its head for ``rollout.sample_responses``: the logits of the
    last position and the cache. The prefill (no cache yet) gets one that appends in place where the model
    allows it (``kv_cache.decoding_cache``)."""
    if cache is None:
        cache = kv_cache.decoding_cache(getattr(body, "config", None))
    out = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=True,
    )
    return project_last_positions(lm_head, out.last_hidden_state[:, -1]), out.past_key_values


def _drops(dropout: torch.nn.Module) -> bool:
    """Whether LoRA's dropout module changes its input: not an Identity, and a Dropout only while training."""
    if isinstance(dropout, torch.nn.Identity):
        return False
    return not isinstance(dropout, torch.nn.Dropout) or (dropout.training and dropout.p > 0)


def fuse_lora_linears(model: torch.nn.Module) -> int:
    """Route every LoRA Linear of ``model`` through :func:`_fused_lora_forward`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is _PeftLoraLinear:
            module.forward = types.MethodType(_fused_lora_forward, module)  # type: ignore[method-assign]
            count += 1
    return count


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def save_adapter(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    folder: str | Path,
    *,
    adapter_name: str = POLICY_ADAPTER,
    base_model_name: str | None = None,
) -> Path:
    """Save one adapter (``adapter_config.json``, ``adapter_model.safetensors``) plus tokenizer files.

    The files land at the folder root whatever the adapter's name (peft would put a non-default adapter in a
    subfolder), so ``PeftModel.from_pretrained(base, folder)`` works on it. ``base_model_name`` replaces the
    worker-local base path in ``adapter_config.json``, which would mean nothing on the user's machine.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = model.peft_config[adapter_name]
    original_base = config.base_model_name_or_path
    if base_model_name is not None:
        config.base_model_name_or_path = base_model_name
    try:
        model.save_pretrained(
            str(out),
            selected_adapters=[adapter_name],
            safe_serialization=True,
            # "auto" would look up the base config by name (hub) to guess whether embeddings changed;
            # our adapters never train embeddings.
            save_embedding_layers=False,
            state_dict=_whole_adapter_state(model),
        )
    finally:
        config.base_model_name_or_path = original_base
    if adapter_name != "default":
        nested = out / adapter_name
        for item in nested.iterdir():
            shutil.move(str(item), out / item.name)
        nested.rmdir()
    tokenizer.save_pretrained(str(out))
    return out


def _whole_adapter_state(model: PeftModel) -> dict[str, torch.Tensor] | None:
    """Under fsdp (sharding.py) the adapter weights inside the decoder layers are shards: every rank gathers
    them whole (a collective, in the same order on every rank) and peft saves those. None otherwise: peft
    reads the model's own state dict."""
    state = model.state_dict()
    if not any(sharding.is_sharded(value) for value in state.values()):
        return None
    saved = ("lora_", "modules_to_save")
    return {
        name: sharding.full_tensor(value).cpu()
        for name, value in state.items()
        if any(part in name for part in saved)
    }


# --- sequence positions and scalar heads


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row, whatever side the padding is on.

    Default position ids count from the row's first column; with left padding that shifts every real token by
    the pad count, so a left-padded batch (generation, PPO) must pass these explicitly.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of each row's last real token, for left or right padding (the rightmost 1 in the mask)."""
    columns = torch.arange(attention_mask.size(-1), device=attention_mask.device)
    return (columns * attention_mask.long()).argmax(-1)


def score_last_token(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    head: str = "score",
) -> torch.Tensor:
    """Run the model's transformer body and a scalar head on each row's last real token -> ``[batch]`` floats.

    Works on a sequence classifier (``AutoModelForSequenceClassification``, head ``score``), bare or inside a
    ``PeftModel``: the LoRA layers live in the body's modules, so whichever adapter is active applies. We pick the token from the attention mask
    rather than letting transformers' classifier look for the pad id, which fails when pad == EOS and an
    answer ends with EOS.
    """
    inner: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    body = getattr(inner, inner.base_model_prefix)
    hidden = body(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    rows = torch.arange(hidden.size(0), device=hidden.device)
    last = hidden[rows, last_token_index(attention_mask)]
    scores: torch.Tensor = getattr(inner, head)(last)
    return scores[:, 0].float()


# --- one base, several named adapters (policy, reference, reward)

REFERENCE_ADAPTER = "reference"


def add_frozen_adapter(model: PeftModel, name: str, path: str | Path) -> None:
    """Load the adapter folder ``path`` as a frozen extra adapter ``name`` on the same base (no new base)."""
    active = model.active_adapter
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise TrainingError(INVALID_ADAPTER, f"cannot load adapter {path} as {name!r}: {exc}") from None
    # load_adapter leaves the active adapter as it was; keep every existing parameter's trainability too.
    model.set_adapter(active)
    for p in model.parameters():
        p.requires_grad_(grads.get(p, False))


def attach_policy_and_reference(
    base: PreTrainedModel, settings: LoraSettings, *, init_adapter: str | Path | None, seed: int
) -> tuple[PeftModel, str | None]:
    """The online methods' two policies on one base: the trainable policy adapter (fresh from ``settings``,
    seeded, or the init adapter) and, given an init adapter, a frozen copy of it as the reference (the SFT
    policy the KL is measured against). The reference is None when there is no init adapter: the base itself,
    the adapters disabled."""
    # Adapter initialisation draws from the global RNG; seed it from the spec without disturbing callers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = attach_adapter(base, settings, init_adapter=init_adapter)
        if init_adapter is None:
            return model, None
        add_frozen_adapter(model, REFERENCE_ADAPTER, init_adapter)
    return model, REFERENCE_ADAPTER


@contextmanager
def use_adapter(model: PeftModel, name: str | None) -> Iterator[None]:
    """Run the block with adapter ``name`` active (``None``: every adapter disabled, i.e. the base model).

    peft's ``set_adapter`` also flips ``requires_grad`` (the active adapter becomes trainable, the others
    frozen), which would unfreeze a reference or reward adapter and freeze the policy mid-step, and
    ``disable_adapter`` freezes every adapter; we put every flag back at once and again afterwards, so only
    the caller decides what trains. At once, not only afterwards: under fsdp (sharding.py) the first forward
    fixes which parameters FSDP treats as trainable (and the flag of the gathered copies it reuses), and that
    first forward may be a reference pass inside this block.
    """
    # By name: FSDP swaps a layer's parameter objects (sharded / gathered) around its forwards.
    grads = {n: p.requires_grad for n, p in model.named_parameters()}

    def restore() -> None:
        for n, p in model.named_parameters():
            if n in grads:
                p.requires_grad_(grads[n])

    if name is None:
        try:
            with model.disable_adapter():
                restore()
                yield
        finally:
            restore()
        return
    previous = model.active_adapter
    if name == previous:
        yield
        return
    model.set_adapter(name)
    restore()
    try:
        yield
    finally:
        model.set_adapter(previous)
        restore()


def storage_pointers(tensors: Iterable[torch.Tensor]) -> set[int]:
    """Distinct storages behind ``tensors``: two views of one weight count once, two copies twice."""
    return {t.untyped_storage().data_ptr() for t in tensors}
