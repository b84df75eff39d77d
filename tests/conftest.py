from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tests.models import make_tiny_model

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
# No test may reach the real Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Merges remember their output folders in the app's state folder: not the user's, in tests.
os.environ.setdefault("FRANKENMOE_STATE_DIR", tempfile.mkdtemp(prefix="frankenmoe-test-state-"))


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


@pytest.fixture(scope="session")
def qwen2_donors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Qwen2 base, three experts and a shared expert with a larger MLP (q/k/v biases throughout)."""
    root = tmp_path_factory.mktemp("qwen2")
    donors = {"base": make_tiny_model(root / "base", "qwen2", seed=20)}
    for index in range(3):
        donors[f"expert{index}"] = make_tiny_model(root / f"expert{index}", "qwen2", seed=21 + index)
    donors["shared"] = make_tiny_model(root / "shared", "qwen2", seed=25, intermediate_size=96)
    return donors


@pytest.fixture(scope="session")
def qwen3_donors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Qwen3 base and three experts: q/k norms, tied embeddings, head dim unlike hidden size / heads."""
    root = tmp_path_factory.mktemp("qwen3")
    overrides = {"tie_word_embeddings": True, "head_dim": 16, "rope_theta": 1000000.0}
    donors = {"base": make_tiny_model(root / "base", "qwen3", seed=30, config_overrides=overrides)}
    for index in range(3):
        donors[f"expert{index}"] = make_tiny_model(
            root / f"expert{index}", "qwen3", seed=31 + index, config_overrides=overrides
        )
    return donors


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Mixtral (4 experts, top-2) with a chat template, for chat and CLI tests."""
    from tests.chat_models import make_tiny_moe

    return make_tiny_moe(tmp_path_factory.mktemp("mixtral") / "moe", "mixtral", seed=5)


@pytest.fixture
def offline_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's `datasets` reads the eval tests' local task files without asking the Hub."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
