from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.models import make_tiny_model

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# No test may reach the real Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def llama_donors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Llama base and five Llama experts with distinct weights."""
    root = tmp_path_factory.mktemp("llama")
    donors = {"base": make_tiny_model(root / "base", "llama", seed=0)}
    for index in range(5):
        donors[f"expert{index}"] = make_tiny_model(root / f"expert{index}", "llama", seed=index + 1)
    return donors


@pytest.fixture(scope="session")
def mistral_donors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mistral")
    donors = {"base": make_tiny_model(root / "base", "mistral", seed=10, dtype="bfloat16")}
    for index in range(3):
        donors[f"expert{index}"] = make_tiny_model(
            root / f"expert{index}", "mistral", seed=11 + index, dtype="bfloat16", max_shard_size="20KB"
        )
    return donors
