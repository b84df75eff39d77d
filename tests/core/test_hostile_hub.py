"""Hostile Hub repositories, served by the local Hub: file names are names, never patterns."""

from __future__ import annotations

import pytest

from app.core.hub import HubError, cached_snapshot, download_model, fetch_config
from app.core.progress import run_job
from app.core.recipe import ModelRef
from app.core.sources import MAX_CONFIG_JSON_BYTES, ModelSource

pytest_plugins = ["tests.hubserver"]


def test_a_file_named_like_a_pattern_downloads_only_itself(hub, hub_config, tiny_hub_files):
    files = dict(tiny_hub_files["llama-a"])
    weights = files.pop("model.safetensors")
    files["*.safetensors"] = weights
    # Other formats in subfolders, which "*.safetensors" as an fnmatch pattern would match too.
    files["original/consolidated.safetensors"] = tiny_hub_files["llama-b"]["model.safetensors"]
    files["onnx/[x].safetensors"] = tiny_hub_files["llama-wide"]["model.safetensors"]
    hub.add_model("acme/star-names", files)

    folder = run_job(download_model("acme/star-names", config=hub_config))

    assert (folder / "*.safetensors").read_bytes() == weights
    assert hub.file_requests("original/consolidated.safetensors") == []
    assert hub.file_requests("onnx/[x].safetensors") == []
    assert not (folder / "original").exists() and not (folder / "onnx").exists()
    assert cached_snapshot(ModelRef.parse("acme/star-names"), hub_config) == folder
    with ModelSource(folder) as source:
        assert source.size_bytes == len(weights) - 8 - int.from_bytes(weights[:8], "little")


def test_an_oversized_config_on_the_hub_is_refused_unparsed(hub, hub_config, tiny_hub_files):
    files = dict(tiny_hub_files["llama-a"])
    files["config.json"] = b'{"padding": "' + b"x" * MAX_CONFIG_JSON_BYTES + b'"}'
    hub.add_model("acme/huge-config", files)
    with pytest.raises(HubError) as caught:
        fetch_config(ModelRef.parse("acme/huge-config"), hub_config)
    assert f"past the {MAX_CONFIG_JSON_BYTES // 2**20} MB limit for config.json" in caught.value.message
    assert caught.value.hint
