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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from service.core.jobs import LoraSettings
from workers.training.errors import (
    INVALID_ADAPTER,
    MODEL_LOAD_FAILED,
    REMOTE_CODE_NOT_ALLOWED,
    TrainingError,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

POLICY_ADAPTER = "default"  # peft's default name; peft saves it at the folder root


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # bf16 halves memory and is fast on recent GPUs; CPUs train in fp32 (bf16 matmuls are slow or emulated).
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


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
    dtype: torch.dtype | None = None,
    model_class: Any = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a frozen base model (every parameter ``requires_grad=False``) onto ``device``.

    ``trust_remote_code`` is never set: a config with ``auto_map`` is refused before anything is imported.
    ``model_class`` defaults to ``AutoModelForCausalLM``; extra kwargs (``num_labels=1``) go to it.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if _read_config(folder).get("auto_map"):
        raise TrainingError(REMOTE_CODE_NOT_ALLOWED, f"{folder}/config.json asks for remote code (auto_map)")
    cls = model_class or AutoModelForCausalLM
    try:
        model = cls.from_pretrained(
            str(folder), dtype=dtype or default_dtype(device), trust_remote_code=False, **kwargs
        )
    except (OSError, ValueError, KeyError) as exc:
        raise TrainingError(MODEL_LOAD_FAILED, f"cannot load the base model from {folder}: {exc}") from None
    model.requires_grad_(False)
    model = model.to(device)  # type: ignore[arg-type]  # transformers' decorator hides Module.to's signature
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
) -> PeftModel:
    """Wrap ``base`` with a trainable LoRA adapter: fresh from ``settings``, or loaded from ``init_adapter``.

    A loaded adapter keeps its own shape (r, alpha, targets), since its weights fix it; ``settings`` then only
    matter for new adapters.
    """
    model: PeftModel
    if init_adapter is None:
        try:
            model = get_peft_model(base, lora_config(settings), adapter_name=adapter_name)
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
    return model


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
