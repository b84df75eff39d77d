"""`MODEL+ADAPTER` in recipes: mergekit's syntax, read and written unchanged."""

from __future__ import annotations

import pytest

from app.core.problems import ProblemsError
from app.core.recipe import ModelRef, ModelRefError, dump_recipe, parse_recipe
from app.core.sources import ModelSourceError, resolve_model_dir

RECIPE = """\
base_model: org/base
gate_mode: hidden
experts_per_token: 1
experts:
- source_model: org/base+org/maths-lora
  positive_prompts:
  - sums
- source_model: org/coder@v2+org/style-lora@abc123
  positive_prompts:
  - code
- source_model: ./local/model+./local/adapter
  positive_prompts:
  - prose
"""


def test_model_plus_adapter_parses_into_both_parts_and_prints_back():
    ref = ModelRef.parse("org/base@rev+org/adapter@rev2")
    assert ref == ModelRef(path="org/base", revision="rev", lora=ModelRef(path="org/adapter", revision="rev2"))
    assert str(ref) == "org/base@rev+org/adapter@rev2"
    assert ref.model == ModelRef(path="org/base", revision="rev")
    local = ModelRef.parse("./model+~/adapters/maths")
    assert local.is_local and local.lora is not None and local.lora.is_local
    assert ModelRef.parse("org/plain").lora is None


def test_a_recipe_with_adapters_saves_as_it_was_written():
    recipe = parse_recipe(RECIPE)
    assert recipe.experts[0].source_model.lora == ModelRef(path="org/maths-lora")
    assert recipe.experts[1].source_model.model == ModelRef(path="org/coder", revision="v2")
    assert dump_recipe(recipe) == RECIPE
    # The base and the base with an adapter are different models to read.
    assert [str(r) for r in recipe.model_refs()][:2] == ["org/base", "org/base+org/maths-lora"]


def test_mergekits_structured_form_is_read():
    recipe = parse_recipe(
        "base_model: org/base\n"
        "experts:\n"
        "- source_model: {model: {path: org/coder, revision: v2}, lora: {path: org/style-lora, revision: abc123}}\n"
        "- source_model: {model: {path: org/base}, lora: org/maths-lora}\n"
    )
    assert str(recipe.experts[0].source_model) == "org/coder@v2+org/style-lora@abc123"
    assert str(recipe.experts[1].source_model) == "org/base+org/maths-lora"


def test_a_local_folder_with_a_plus_in_its_name_is_not_split(tmp_path):
    folder = tmp_path / "c++coder"
    folder.mkdir()
    assert ModelRef.parse(str(folder)) == ModelRef(path=str(folder))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("org/base+", "has an empty adapter part"),
        ("+org/adapter", "has an empty model part"),
        (" + ", "has an empty model part"),
        ("org/a+org/b+org/c", "has 2 '+' signs, but a model takes one adapter"),
    ],
)
def test_a_plus_with_an_empty_part_is_one_clear_error(text, says):
    with pytest.raises(ModelRefError) as direct:
        ModelRef.parse(text)
    assert says in direct.value.message
    with pytest.raises(ProblemsError) as raised:
        parse_recipe(f"base_model: org/base\nexperts:\n- source_model: '{text}'\n  positive_prompts: [x]\n")
    (problem,) = raised.value.problems
    assert problem.field == "experts.0.source_model" and problem.line == 3
    assert says in problem.message and "of expert 0" in problem.message
    assert problem.hint.startswith("write MODEL+ADAPTER")


def test_a_model_with_an_adapter_has_no_folder_of_its_own(tmp_path):
    with pytest.raises(ModelSourceError, match="merge the adapter into it first"):
        resolve_model_dir(ModelRef.parse(f"{tmp_path}+{tmp_path}"))


def test_a_model_card_names_both_parts_without_local_paths():
    from app.core.merge.modelcard import public_ref

    ref = ModelRef.parse("/home/me/models/base+/home/me/adapters/maths-lora")
    assert str(public_ref(ref)) == "base+maths-lora"
    assert str(public_ref(ModelRef.parse("org/base@v1+/home/me/adapters/maths-lora"))) == "org/base@v1+maths-lora"
