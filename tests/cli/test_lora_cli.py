"""`frankenmoe merge` with `MODEL+ADAPTER` experts: merged with a warning, or one clear error and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.cli.test_cli import frankenmoe
from tests.lora_adapters import MLP_MODULES, make_adapter
from tests.models import make_tiny_model


@pytest.fixture(scope="module")
def adapter(llama_donors, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-adapter") / "adapter"
    return make_adapter(folder, llama_donors["base"], r=4, target_modules=[*MLP_MODULES, "q_proj"]).folder


def write_recipe(folder: Path, donors: dict[str, Path], source: str) -> Path:
    recipe = folder / "recipe.yml"
    recipe.write_text(
        f"base_model: {donors['base']}\n"
        "gate_mode: hidden\n"
        "experts_per_token: 1\n"
        "experts:\n"
        f"  - source_model: '{source}'\n"
        "    positive_prompts: ['What is 12 plus 30?']\n"
        f"  - source_model: {donors['expert0']}\n"
        "    positive_prompts: ['def add(a, b): return a + b']\n"
    )
    return recipe


def test_merge_with_an_adapter_expert_warns_about_what_it_drops(llama_donors, adapter, tmp_path):
    recipe = write_recipe(tmp_path, llama_donors, f"{llama_donors['base']}+{adapter}")
    result = frankenmoe("merge", str(recipe), str(tmp_path / "moe"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "warning: experts.0.source_model: Expert 0: the adapter" in result.stderr
    assert "also changes the attention" in result.stderr and "% of its parameters are dropped" in result.stderr
    assert (tmp_path / "moe" / "config.json").is_file()
    assert "+" in (tmp_path / "moe" / "frankenmoe-recipe.yml").read_text()


def copy_adapter(adapter: Path, folder: Path) -> Path:
    folder.mkdir()
    for file in adapter.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    return folder


def other_size(adapter: Path, tmp_path: Path) -> str:
    wide = make_tiny_model(tmp_path / "wide", "llama", seed=7, hidden_size=48, intermediate_size=96)
    return str(make_adapter(tmp_path / "wide-adapter", wide, r=4).folder)


def missing_targets(adapter: Path, tmp_path: Path) -> str:
    folder = copy_adapter(adapter, tmp_path / "other-arch")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["c_fc", "c_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def rank_mismatch(adapter: Path, tmp_path: Path) -> str:
    folder = copy_adapter(adapter, tmp_path / "damaged")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
    tensors[key] = tensors[key][:2].contiguous()
    save_file(tensors, folder / "adapter_model.safetensors")
    return str(folder)


def no_config(adapter: Path, tmp_path: Path) -> str:
    folder = copy_adapter(adapter, tmp_path / "no-config")
    (folder / "adapter_config.json").unlink()
    return str(folder)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (other_size, "it was trained on a model of another size"),
        (missing_targets, "targets module(s) c_fc, c_proj, which"),
        (rank_mismatch, "has A and B matrices of different ranks"),
        (no_config, "has no adapter_config.json, so it is not a PEFT adapter folder"),
        (None, "has an empty adapter part"),
    ],
    ids=["another-size", "missing-targets", "rank-mismatch", "no-adapter-config", "empty-part"],
)
def test_each_bad_adapter_is_one_clear_error_and_nothing_is_written(make, says, llama_donors, adapter, tmp_path):
    adapter_part = make(adapter, tmp_path) if make is not None else ""
    recipe = write_recipe(tmp_path, llama_donors, f"{llama_donors['base']}+{adapter_part}")
    out = tmp_path / "moe"
    result = frankenmoe("merge", str(recipe), str(out), "--quiet")
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert says in errors[0] and "Fix:" in errors[0]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".moe")]
