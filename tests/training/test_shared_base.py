"""One base, several roles (as the trainers build them): storage counting, role outputs against standalone
models, padding helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from contract.hyperparameters import LoraSettings
from tests.training.adapters import random_adapter
from workers.training import lora, ppo


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("adapters")
    return {
        "sft": random_adapter(tiny_model_dir, work / "sft", seed=1),
        "reward": random_adapter(tiny_model_dir, work / "reward", seed=2, reward=True),
    }


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 40, 41, 42, 43, 2], [1, 50, 51, 2, 0, 0]])
    return ids, (ids != 0).long()


def test_one_copy_of_each_base_weight_across_roles(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    """The roles as the trainers build them: the policy continued from the SFT adapter with a frozen copy as
    the reference (DPO's attach_adapter + add_frozen_adapter, switched with use_adapter), and the reward model
    adapter with its score head on the same body (PPO's load_scalar_adapter, scored by AdapterRewardModel)."""
    base = lora.load_base_model(tiny_model_dir, device=torch.device("cpu"))
    model = lora.attach_adapter(base, LoraSettings(r=4, alpha=8, dropout=0.0), init_adapter=adapters["sft"])
    lora.add_frozen_adapter(model, lora.REFERENCE_ADAPTER, adapters["sft"])
    reward_head = ppo.load_scalar_adapter(model, adapters["reward"], ppo.REWARD_ADAPTER, trainable=False)
    roles = ppo.SharedBaseModel(
        model,
        value_head=torch.nn.Linear(reward_head.in_features, 1),
        reward_head=reward_head,
        reference_adapter=lora.REFERENCE_ADAPTER,
        reward_adapter=ppo.REWARD_ADAPTER,
        value_adapter=None,
    )
    base_file = load_file(str(tiny_model_dir / "model.safetensors"))
    adapter_markers = ("lora_", "modules_to_save", "original_module")
    base_params = {n: p for n, p in model.named_parameters() if not any(m in n for m in adapter_markers)}
    # Every weight of the file exists exactly once: as many distinct storages as tensors in the file.
    assert len(base_params) == len(base_file)
    assert len(lora.storage_pointers(base_params.values())) == len(base_file)
    # A second model (what a separate reference or reward model would be) would double that count.
    second = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    both = [*base_params.values(), *second.parameters()]
    assert len(lora.storage_pointers(both)) == 2 * len(base_file)

    # Only the policy adapter trains; reference, reward (LoRA and head) and the base are frozen.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n and "lora_" in n for n in trainable), sorted(trainable)[:5]
    reward_params = [n for n in dict(model.named_parameters()) if ".reward." in n]
    assert reward_params and all("lora_" in n for n in reward_params)
    assert not any(p.requires_grad for p in reward_head.parameters())

    ids, mask = _batch()
    model.eval()
    with torch.no_grad():
        policy = model(input_ids=ids, attention_mask=mask).logits
        with lora.use_adapter(model, lora.REFERENCE_ADAPTER):
            reference = model(input_ids=ids, attention_mask=mask).logits
        rewards = ppo.AdapterRewardModel(roles)(ids, ids[:, :0], mask)
        with lora.use_adapter(model, None):
            bare = model(input_ids=ids, attention_mask=mask).logits
    # Switching roles left the trainability as it was.
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert model.active_adapter == "default"

    # Each role matches the standalone model it stands for.
    plain_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    plain_sft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapters["sft"]
    )
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    plain_reward = PeftModel.from_pretrained(classifier, adapters["reward"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(bare, plain_base(input_ids=ids, attention_mask=mask).logits)
        sft_logits = plain_sft.eval()(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(policy, sft_logits)
        torch.testing.assert_close(reference, sft_logits)
        # transformers pools at the last non-pad token (pad id 0 here), as the reward role does by mask.
        torch.testing.assert_close(rewards, plain_reward(input_ids=ids, attention_mask=mask).logits[:, 0])
    assert not torch.allclose(policy, bare)


def test_last_token_and_positions_for_left_and_right_padding() -> None:
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert lora.last_token_index(right).tolist() == [2, 1, 3]
    assert lora.last_token_index(left).tolist() == [3, 3, 3]
    assert lora.position_ids_from_mask(left).tolist() == [[0, 0, 1, 2], [0, 0, 0, 1], [0, 1, 2, 3]]
    assert lora.position_ids_from_mask(right)[:, :2].tolist() == [[0, 1], [0, 1], [0, 1]]


def test_reward_is_the_same_with_left_or_right_padding(
    tiny_model_dir: Path, adapters: dict[str, Path]
) -> None:
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model = PeftModel.from_pretrained(classifier, adapters["reward"]).eval()
    rows = [[1, 40, 41, 42, 43, 2], [1, 50, 51, 2]]
    width = max(map(len, rows))
    right = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    left = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    with torch.no_grad():
        from_right = lora.score_last_token(model, right, (right != 0).long())
        from_left = lora.score_last_token(model, left, (left != 0).long())
        alone = torch.stack(
            [lora.score_last_token(model, torch.tensor([r]), torch.ones(1, len(r))) for r in rows]
        )
    torch.testing.assert_close(from_right, alone[:, 0])
    torch.testing.assert_close(from_left, alone[:, 0], atol=1e-5, rtol=1e-4)
