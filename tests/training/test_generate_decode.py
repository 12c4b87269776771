"""workers/training/generate.py: the decoded candidates are text the dataset rules accept."""

from __future__ import annotations

import torch

from workers.training import generate


def test_generated_candidates_lose_nul_characters() -> None:
    """generate's decoding drops NUL (a byte-level token a model may sample), which the dataset rules refuse."""

    class Bytes:
        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            return bytes(ids).decode()

    tokens = torch.tensor([[104, 0, 105, 0], [0, 0, 0, 0]])
    assert generate._decode(Bytes(), tokens, [3, 4], range(2)) == ["hi", ""]
