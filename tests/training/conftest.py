"""Fixtures for the training tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_model import shared_tiny_llama

    return shared_tiny_llama(tmp_path_factory.getbasetemp(), "training-tiny-llama/model", seed=0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread for a module's in-process training. On a 2-core box shared with other jobs, two
    threads on a tiny model spend most of their time waiting for each other (measured: ~0.3 s per PPO update on
    one thread, 1-7 s on two under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
