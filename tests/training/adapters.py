"""Adapters made in-process for tests that need one to start from (no training run): random but non-zero."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification


def random_adapter(
    model_dir: Path, dest: Path, *, seed: int, reward: bool = False, scale: float = 0.5
) -> Path:
    """Save a LoRA adapter on ``model_dir`` whose B matrices (and score head) are random, so it changes outputs.

    ``reward=True`` makes a reward-model adapter (sequence classifier, ``score`` in modules_to_save), as the
    reward_model method saves it.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if reward:
            base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
            config = LoraConfig(
                r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS", modules_to_save=["score"]
            )
        else:
            base = AutoModelForCausalLM.from_pretrained(model_dir)
            config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        model = get_peft_model(base, config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    param.normal_(std=scale)
        model.save_pretrained(str(dest))
    return dest
