"""Fixtures for the training tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.tiny_model import shared_tiny_llama

    return shared_tiny_llama(tmp_path_factory.getbasetemp(), "training-tiny-llama/model", seed=0)
