"""Config values as transformers reads them: a null is a missing value, and a missing size is named, not a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.cli.main import run_cli
from app.core.compat import check_recipe
from app.core.families import config_value, missing_sizes
from app.core.merge.gates import compute_gates
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.problems import FrankenMoEError, ProblemsError
from app.core.progress import run_job
from app.core.recipe import ModelRef, parse_recipe, save_recipe
from tests.models import make_tiny_model, read_config

MISTRAL = {"model_type": "mistral", "hidden_size": 32, "num_attention_heads": 4}


def test_a_null_value_is_a_missing_value():
    assert config_value({**MISTRAL, "head_dim": None}, "head_dim") == 8  # hidden size / heads, as transformers
    assert config_value({**MISTRAL, "head_dim": 16}, "head_dim") == 16
    assert config_value({**MISTRAL, "rope_theta": None}, "rope_theta") == 10000.0
    assert config_value({**MISTRAL, "num_key_value_heads": None}, "num_key_value_heads") == 4
    assert config_value({**MISTRAL, "rms_norm_eps": None}, "rms_norm_eps") == 1e-6
    assert config_value({"model_type": "qwen3", "head_dim": None}, "head_dim") == 128  # Qwen3's own default


def test_missing_sizes_names_absent_null_and_nonsense_values():
    complete = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "vocab_size": 320}
    assert missing_sizes(complete) == []
    broken = {**complete, "num_hidden_layers": None, "vocab_size": "many", "hidden_size": True}
    del broken["intermediate_size"]
    assert missing_sizes(broken) == ["hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"]


def null_head_dim(folder: Path) -> Path:
    """The config.json transformers 4.57 writes for Mistral: "head_dim": null."""
    config = read_config(folder)
    config["head_dim"] = None
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def null_head_dim_donors(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mistral-null-head-dim")
    donors = {"base": null_head_dim(make_tiny_model(root / "base", "mistral", seed=40))}
    for index in range(2):
        donors[f"expert{index}"] = null_head_dim(make_tiny_model(root / f"expert{index}", "mistral", seed=41 + index))
    return donors


def recipe_of(donors: dict[str, Path]):
    lines = [f"base_model: {donors['base']}", "gate_mode: hidden", "dtype: float32", "experts:"]
    lines += [f"  - source_model: {donors['expert0']}", "    positive_prompts: ['What is 2 plus 2?']"]
    lines += [f"  - source_model: {donors['expert1']}", "    positive_prompts: ['def add(a, b):']"]
    lines += ["frankenmoe:", "  experts:", "    - {test_prompts: ['What is 3 plus 4?']}"]
    return parse_recipe("\n".join(lines))


def test_a_mistral_donor_with_a_null_head_dim_checks_merges_and_loads(null_head_dim_donors, tmp_path, capsys):
    recipe = recipe_of(null_head_dim_donors)
    assert [p for p in check_recipe(recipe) if p.is_error] == []
    recipe_path = tmp_path / "recipe.yml"
    save_recipe(recipe, recipe_path)
    # `check` computes the gates with the native decoder, which reads the head dim.
    assert run_cli(["check", str(recipe_path), "--routing", "--device", "cpu"]) == 0
    assert "routing:" in capsys.readouterr().out

    out = tmp_path / "moe"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out, device="cpu")))
    assert read_config(out)["head_dim"] == 8
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9]])).logits).all()


def test_a_null_layer_count_is_one_problem_naming_the_key(null_head_dim_donors, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in null_head_dim_donors["expert1"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    config = read_config(broken)
    config["num_hidden_layers"] = None
    (broken / "config.json").write_text(json.dumps(config))
    recipe = recipe_of({**null_head_dim_donors, "expert1": broken})
    errors = [p for p in check_recipe(recipe) if p.is_error]
    assert [(p.field, "num_hidden_layers" in p.message) for p in errors] == [("experts.1.source_model", True)]
    with pytest.raises(ProblemsError):
        run_job(merge_moe(recipe, MergeOptions(out_dir=tmp_path / "moe", device="cpu")))
    assert not (tmp_path / "moe").exists()
    # The gate preview opens the base without the recipe check: it names the key too.
    with pytest.raises(FrankenMoEError, match="num_hidden_layers"):
        run_job(compute_gates(recipe.model_copy(update={"base_model": ModelRef(path=str(broken))}), device="cpu"))
