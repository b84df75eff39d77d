from __future__ import annotations

import json
import pickle
import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from app.core.recipe import ModelRef
from app.core.sources import ModelNotDownloaded, ModelSource, ModelSourceError, open_model
from tests.models import make_tiny_model


def test_single_file_and_sharded_models_read_exactly(llama_donors, mistral_donors):
    for folder in (llama_donors["base"], mistral_donors["expert0"]):
        expected = {}
        for file in folder.glob("*.safetensors"):
            expected.update(load_file(file))
        with ModelSource(folder) as source:
            assert sorted(source.tensor_names) == sorted(expected)
            for name, tensor in expected.items():
                read = source.read_tensor(name)
                assert read.dtype == tensor.dtype
                assert torch.equal(read, tensor)
    assert (mistral_donors["expert0"] / "model.safetensors.index.json").exists()


def test_description(llama_donors):
    with ModelSource(llama_donors["base"]) as source:
        assert source.family == "llama"
        assert source.dtype == "float32"
        assert source.size_bytes == 4 * source.parameter_count
        assert {p.name for p in source.tokenizer_files()} >= {"tokenizer.json", "tokenizer_config.json"}


class _Exploit:
    """Unpickling this would create a file: proof that nothing is ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, llama_donors):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(llama_donors["base"] / "config.json", folder)
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ModelSourceError) as caught:
        ModelSource(folder)
    assert "pytorch_model.bin" in caught.value.message
    assert "never unpickles" in caught.value.message
    assert "safetensors" in caught.value.hint
    assert not marker.exists()


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSourceError, match=r"no config\.json"):
        ModelSource(tmp_path)


def test_truncated_safetensors_file(tmp_path, llama_donors):
    folder = tmp_path / "truncated"
    shutil.copytree(llama_donors["base"], folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelSourceError, match="truncated"):
        ModelSource(folder)


def test_missing_shard(tmp_path, mistral_donors):
    folder = tmp_path / "missing"
    shutil.copytree(mistral_donors["expert1"], folder)
    (folder / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(ModelSourceError, match="missing shard"):
        ModelSource(folder)


def test_local_folder_that_does_not_exist(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        open_model(ModelRef(path=str(tmp_path / "nope")))


def test_hub_model_not_downloaded_says_how_to_get_it(tmp_path, monkeypatch):
    with pytest.raises(ModelNotDownloaded) as caught:
        open_model(ModelRef(path="some-org/some-model", revision="main"), cache_dir=tmp_path)
    assert "not downloaded yet" in caught.value.message
    assert "frankenmoe hub download some-org/some-model@main" in caught.value.hint


def test_hub_model_is_read_from_the_standard_cache(tmp_path, llama_donors):
    """A snapshot laid out as huggingface_hub lays it out is found by id and revision."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--some-org--tiny"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(llama_donors["expert0"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with open_model(ModelRef(path="some-org/tiny"), cache_dir=tmp_path) as source:
        assert source.path == snapshot
        assert source.config == json.loads((llama_donors["expert0"] / "config.json").read_text())
    with open_model(ModelRef(path="some-org/tiny", revision=commit), cache_dir=tmp_path) as source:
        assert source.path == snapshot


def test_bf16_model_reads_as_bf16(tmp_path):
    folder = make_tiny_model(tmp_path / "bf16", dtype="bfloat16")
    with ModelSource(folder) as source:
        assert source.dtype == "bfloat16"
        assert source.read_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_reading_into_existing_tensors_converts_and_checks_the_shape(mistral_donors):
    """Mistral donors are stored in bfloat16: a float32 target converts, a bfloat16 one is read straight in."""
    source = open_model(ModelRef(path=str(mistral_donors["base"])))
    name = "model.layers.0.mlp.up_proj.weight"
    stored = source.read_tensor(name)
    assert stored.dtype == torch.bfloat16
    widened = torch.full(stored.shape, float("nan"))
    staging = torch.empty(1, dtype=torch.uint8)  # too small: a bigger one is made for this read
    assert source.read_tensor_into(name, widened, staging) is widened
    assert torch.equal(widened, stored.float())
    same = torch.zeros_like(stored)
    source.read_tensor_into(name, same)
    assert torch.equal(same, stored)
    with pytest.raises(ValueError, match="shaped"):
        source.read_tensor_into(name, torch.empty(3, 3))


def test_threads_reading_one_model_at_once_each_get_their_own_tensor(llama_donors, tmp_path):
    # The merge's workers and the gate computation read the same model concurrently; each read is a
    # seek and a read on one shared file handle, which must not interleave with another thread's.
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(llama_donors["base"] / "config.json", folder / "config.json")
    expected = {f"tensor{index}": torch.full((256, 1024), float(index)) for index in range(8)}
    save_file(expected, folder / "model.safetensors")
    names = sorted(expected)
    mismatches: list[str] = []
    with ModelSource(folder) as source:

        def read_all(offset: int) -> None:
            for round_ in range(30):
                for index in range(len(names)):
                    name = names[(index + offset + round_) % len(names)]
                    if not torch.equal(source.read_tensor(name), expected[name]):
                        mismatches.append(name)

        threads = [threading.Thread(target=read_all, args=(offset,)) for offset in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert mismatches == []
