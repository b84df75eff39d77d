from __future__ import annotations

import shutil

import pytest

from app.core.compat import check_recipe, compare_configs
from app.core.problems import Severity
from app.core.recipe import parse_recipe
from tests.models import write_tokenizer

BASE = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32000,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def only_errors(problems):
    return [p for p in problems if p.severity is Severity.ERROR]


def test_identical_configs_are_compatible():
    assert compare_configs(BASE, dict(BASE), "experts.0") == []


@pytest.mark.parametrize(
    ("key", "value", "label"),
    [
        ("hidden_size", 5120, "hidden size"),
        ("intermediate_size", 11008, "intermediate size"),
        ("num_hidden_layers", 40, "layer count"),
        ("num_attention_heads", 64, "attention heads"),
        ("num_key_value_heads", 32, "KV heads"),
        ("head_dim", 64, "head dim"),
        ("vocab_size", 32768, "vocab size"),
        ("tie_word_embeddings", True, "tied embeddings"),
    ],
)
def test_each_shape_mismatch_names_both_values(key, value, label):
    other = {**BASE, key: value}
    (problem,) = compare_configs(BASE, other, "experts.1")
    assert problem.field == "experts.1"
    assert problem.severity is Severity.ERROR
    assert problem.message.startswith(f"{label} differs")
    assert f"base has {BASE[key]}" in problem.message
    assert f"experts.1 has {value}" in problem.message


def test_family_mismatch():
    problems = compare_configs(BASE, {**BASE, "model_type": "mistral"}, "experts.0")
    assert [p.message for p in problems] == ["model family differs: base is llama, experts.0 is mistral"]


def test_unsupported_family():
    problems = compare_configs(BASE, {**BASE, "model_type": "gemma"}, "experts.0")
    assert len(problems) == 1
    assert "'gemma'" in problems[0].message
    assert "Llama, Mistral, Qwen2, Qwen3" in problems[0].message


def test_rope_theta_mismatch():
    (problem,) = compare_configs(BASE, {**BASE, "rope_theta": 500000.0}, "experts.0")
    assert "RoPE settings differ" in problem.message
    assert "rope_theta=10000.0" in problem.message
    assert "rope_theta=500000.0" in problem.message


def test_rope_scaling_mismatch():
    scaled = {**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}}
    (problem,) = compare_configs(BASE, scaled, "experts.0")
    assert "factor=2.0" in problem.message
    assert "rope_type=linear" in problem.message


def test_transformers5_rope_parameters_equal_legacy_keys():
    modern = {k: v for k, v in BASE.items() if k != "rope_theta"}
    modern["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert compare_configs(BASE, modern, "experts.0") == []
    modern["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    assert "RoPE settings differ" in compare_configs(BASE, modern, "experts.0")[0].message


def test_head_dim_is_derived_when_absent():
    implicit = {k: v for k, v in BASE.items() if k != "head_dim"}
    assert compare_configs(BASE, implicit, "experts.0") == []
    problems = compare_configs(BASE, {**implicit, "num_attention_heads": 64}, "x")
    assert [p.message.split(":")[0] for p in problems] == ["attention heads differs", "head dim differs"]
    assert "base has 128, x has 64" in problems[1].message


def test_missing_rope_theta_uses_the_family_default():
    implicit = {k: v for k, v in BASE.items() if k != "rope_theta"}
    assert compare_configs(BASE, implicit, "experts.0") == []


def test_attention_bias_is_refused_for_mixtral():
    problems = compare_configs(BASE, {**BASE, "attention_bias": True}, "experts.0")
    assert [p.field for p in problems] == ["experts.0"]
    assert "attention biases" in problems[0].message


def _recipe_for(base, expert):
    return parse_recipe(
        f"""
base_model: {base}
gate_mode: cheap_embed
experts:
  - source_model: {base}
    positive_prompts: [a]
  - source_model: {expert}
    positive_prompts: [b]
"""
    )


def test_real_donors_are_compatible(llama_donors):
    assert only_errors(check_recipe(_recipe_for(llama_donors["base"], llama_donors["expert0"]))) == []


def test_llama_and_mistral_donors_do_not_mix(llama_donors, mistral_donors):
    problems = check_recipe(_recipe_for(llama_donors["base"], mistral_donors["expert0"]))
    assert any("model family differs" in p.message for p in problems)


def test_different_vocabulary_is_an_error(tmp_path, llama_donors):
    expert = tmp_path / "other-vocab"
    shutil.copytree(llama_donors["expert0"], expert)
    write_tokenizer(expert, extra_text="zebra quagga okapi xylophone " * 5)
    problems = only_errors(check_recipe(_recipe_for(llama_donors["base"], expert)))
    assert [p.field for p in problems] == ["experts.1.source_model"]
    assert "vocabulary differs" in problems[0].message
    assert "renumbered" in problems[0].message


def test_a_tokenizer_changed_on_disk_is_read_again(tmp_path, llama_donors):
    # Fingerprints are kept between checks; a tokenizer saved anew must not be judged by its old one.
    expert = tmp_path / "retrained"
    shutil.copytree(llama_donors["expert0"], expert)
    recipe = _recipe_for(llama_donors["base"], expert)
    assert only_errors(check_recipe(recipe)) == []
    write_tokenizer(expert, extra_text="zebra quagga okapi xylophone " * 5)
    (problem,) = only_errors(check_recipe(recipe))
    assert "vocabulary differs" in problem.message


def test_special_tokens_and_chat_template_differences_are_warnings(tmp_path, llama_donors):
    expert = tmp_path / "other-specials"
    shutil.copytree(llama_donors["expert0"], expert)
    write_tokenizer(expert, chat_template="{{ messages[0]['content'] }}", eos_token="<pad>")
    problems = check_recipe(_recipe_for(llama_donors["base"], expert))
    assert only_errors(problems) == []
    messages = [p.message for p in problems]
    assert any(m.startswith("the special token eos_token differs: base has '</s>'") for m in messages)
    assert any(m.startswith("chat template differs") for m in messages)


def test_missing_model_is_reported_per_field(tmp_path, llama_donors):
    problems = check_recipe(_recipe_for(llama_donors["base"], tmp_path / "absent"))
    assert [(p.field, "does not exist" in p.message) for p in problems] == [("experts.1.source_model", True)]


def test_missing_mlp_tensors_are_named(tmp_path, llama_donors):
    expert = tmp_path / "incomplete"
    shutil.copytree(llama_donors["expert1"], expert)
    from safetensors.torch import load_file, save_file

    tensors = load_file(expert / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, expert / "model.safetensors", metadata={"format": "pt"})
    problems = only_errors(check_recipe(_recipe_for(llama_donors["base"], expert)))
    assert len(problems) == 1
    assert "model.layers.1.mlp.up_proj.weight" in problems[0].message
