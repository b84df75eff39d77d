from __future__ import annotations

import pytest

from app.core.problems import ProblemsError, Severity
from app.core.recipe import (
    ModelRef,
    dump_recipe,
    load_recipe,
    parse_recipe,
    recipe_to_dict,
    save_recipe,
    validate_recipe,
)

MERGEKIT_RECIPE = """\
# A recipe as people write them for mergekit-moe
base_model: mistralai/Mistral-7B-Instruct-v0.2
gate_mode: hidden # one of hidden, cheap_embed, random
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: teknium/OpenHermes-2.5-Mistral-7B
    positive_prompts:
      - "chat"
      - "assistant"
    negative_prompts: ["math"]
  - source_model: meta-math/MetaMath-Mistral-7B@v1.0
    positive_prompts: ["reason", "math"]
    noise_scale: 0.01
    residual_scale: 0.5
  - source_model: ./local/coder
    positive_prompts: ["code", "python"]
"""


def fields(problems):
    return [(p.field, p.severity) for p in problems]


def test_mergekit_recipe_round_trips_with_its_meaning():
    recipe = parse_recipe(MERGEKIT_RECIPE)
    assert recipe.base_model == ModelRef(path="mistralai/Mistral-7B-Instruct-v0.2")
    assert recipe.experts[1].source_model == ModelRef(path="meta-math/MetaMath-Mistral-7B", revision="v1.0")
    assert recipe.experts[1].residual_scale == 0.5
    assert recipe.experts[0].negative_prompts == ("math",)
    again = parse_recipe(dump_recipe(recipe))
    assert again == recipe
    # Nothing of ours is added to a plain mergekit recipe.
    assert "frankenmoe" not in recipe_to_dict(recipe)
    assert validate_recipe(recipe) == []


def test_our_additions_live_under_one_key_and_round_trip():
    text = MERGEKIT_RECIPE + (
        "frankenmoe:\n  experts:\n    - label: chat\n      color: '#ff0000'\n      test_prompts: [hi there]\n"
    )
    recipe = parse_recipe(text)
    assert recipe.expert_label(0) == "chat"
    assert recipe.expert_label(2) == "expert 2"
    assert recipe.studio.experts[0].test_prompts == ("hi there",)
    data = recipe_to_dict(recipe)
    assert set(data) - {"base_model", "gate_mode", "dtype", "experts_per_token", "experts"} == {"frankenmoe"}
    assert parse_recipe(dump_recipe(recipe)) == recipe


def test_model_reference_parsing(tmp_path):
    assert ModelRef.parse("org/name@main") == ModelRef(path="org/name", revision="main")
    assert ModelRef.parse("org/name").revision is None
    local = tmp_path / "with@sign"
    local.mkdir()
    assert ModelRef.parse(str(local)) == ModelRef(path=str(local))  # an existing folder is never split
    assert ModelRef.parse("./folder").is_local
    assert not ModelRef.parse("org/name").is_local
    assert str(ModelRef.parse("org/name@abc")) == "org/name@abc"


def recipe_with(**changes):
    base = parse_recipe(MERGEKIT_RECIPE)
    return base.model_copy(update=changes)


def test_unknown_gate_mode():
    problems = validate_recipe(recipe_with(gate_mode="hiden"))
    assert fields(problems) == [("gate_mode", Severity.ERROR)]
    assert "hidden" in problems[0].hint


@pytest.mark.parametrize(("value", "needle"), [(0, "at least one"), (4, "only 3 experts")])
def test_experts_per_token_out_of_range(value, needle):
    problems = validate_recipe(recipe_with(experts_per_token=value))
    assert fields(problems) == [("experts_per_token", Severity.ERROR)]
    assert needle in problems[0].message


def test_prompt_gate_mode_needs_positive_prompts_random_does_not():
    recipe = parse_recipe(MERGEKIT_RECIPE.replace('positive_prompts: ["code", "python"]', "positive_prompts: []"))
    problems = validate_recipe(recipe)
    assert fields(problems) == [("experts.2.positive_prompts", Severity.ERROR)]
    assert "./local/coder" in problems[0].message
    assert validate_recipe(recipe.model_copy(update={"gate_mode": "random"})) == []


def test_identical_prompt_sets_for_all_experts():
    text = """
base_model: a/base
gate_mode: cheap_embed
experts:
  - source_model: a/one
    positive_prompts: [x, y]
  - source_model: a/two
    positive_prompts: [y, x]
"""
    problems = validate_recipe(parse_recipe(text))
    assert fields(problems) == [("experts", Severity.ERROR)]
    assert "same prompts" in problems[0].message


def test_all_experts_the_same_model_needs_the_upcycling_flag():
    text = """
base_model: a/base
gate_mode: random
experts:
  - source_model: a/one
  - source_model: a/one
"""
    problems = validate_recipe(parse_recipe(text))
    assert fields(problems) == [("experts", Severity.ERROR)]
    assert "allow_identical_experts" in problems[0].hint
    allowed = parse_recipe(text + "frankenmoe:\n  allow_identical_experts: true\n")
    assert validate_recipe(allowed) == []


def test_bad_dtype():
    problems = validate_recipe(recipe_with(dtype="float8"))
    assert fields(problems) == [("dtype", Severity.ERROR)]
    assert recipe_with(dtype="bf16").canonical_dtype == "bfloat16"


SHARED = "shared_experts:\n  - source_model: a/shared\n"


@pytest.mark.parametrize("architecture", ["mixtral", "qwen3"])
def test_shared_experts_are_refused_for_architectures_without_one(architecture):
    recipe = parse_recipe(MERGEKIT_RECIPE + SHARED + f"architecture: {architecture}\n")
    problems = [p for p in validate_recipe(recipe) if p.field == "shared_experts"]
    assert [p.severity for p in problems] == [Severity.ERROR]
    assert "architecture: qwen" in problems[0].hint


def test_one_shared_expert_is_valid_for_qwen_and_two_are_not():
    recipe = parse_recipe(MERGEKIT_RECIPE + SHARED + "architecture: qwen\n")
    assert validate_recipe(recipe) == []
    two = parse_recipe(MERGEKIT_RECIPE + SHARED + "  - source_model: b/shared\narchitecture: qwen\n")
    (problem,) = validate_recipe(two)
    assert (problem.field, problem.message) == ("shared_experts", "2 shared experts, but a MoE layer holds at most one")
    assert dump_recipe(recipe).endswith("shared_experts:\n- source_model: a/shared\narchitecture: qwen\n")


def test_malformed_yaml_names_its_line():
    text = "base_model: a/b\nexperts:\n  - source_model: x\n   positive_prompts: [a\n"
    with pytest.raises(ProblemsError) as caught:
        parse_recipe(text)
    (problem,) = caught.value.problems
    assert problem.line == 4
    assert "malformed" in problem.message


def test_wrong_type_names_its_field_and_line():
    text = "base_model: a/b\nexperts_per_token: many\nexperts:\n  - source_model: x\n"
    with pytest.raises(ProblemsError) as caught:
        parse_recipe(text)
    (problem,) = caught.value.problems
    assert problem.field == "experts_per_token"
    assert problem.line == 2


def test_missing_experts_key():
    with pytest.raises(ProblemsError) as caught:
        parse_recipe("base_model: a/b\n")
    assert caught.value.problems[0].field == "experts"
    assert caught.value.problems[0].hint == "add this key to the recipe"


def test_unknown_keys_are_ignored_like_mergekit_but_warned_about():
    text = MERGEKIT_RECIPE.replace("    noise_scale: 0.01", "    noise_scale: 0.01\n    postive_prompts: [oops]")
    recipe = parse_recipe(text + "temperature: 3\n")
    problems = validate_recipe(recipe)
    assert fields(problems) == [("temperature", Severity.WARNING), ("experts.1.postive_prompts", Severity.WARNING)]
    assert "ignored_keys" not in dump_recipe(recipe)


def test_save_is_atomic_and_loads_back(tmp_path):
    recipe = parse_recipe(MERGEKIT_RECIPE)
    target = tmp_path / "recipe.yml"
    save_recipe(recipe, target)
    assert load_recipe(target) == recipe
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yml"]


def test_unreadable_recipe_file(tmp_path):
    with pytest.raises(ProblemsError) as caught:
        load_recipe(tmp_path / "missing.yml")
    assert "cannot read" in caught.value.problems[0].message


def test_extras_can_be_given_by_field_name_in_code():
    recipe = parse_recipe(MERGEKIT_RECIPE)
    from app.core.recipe import Recipe, StudioExtras

    rebuilt = Recipe(
        base_model=recipe.base_model, experts=recipe.experts, studio=StudioExtras(allow_identical_experts=True)
    )
    assert rebuilt.studio.allow_identical_experts
    assert rebuilt.ignored_keys == ()
