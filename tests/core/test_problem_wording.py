"""Every problem a person reads is written the same way: sentences, "... . Fix: ...", the expert's
name rather than a field path, and a guess for a misspelt key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.core.compat import check_recipe
from app.core.problems import Problem, ProblemsError
from app.core.recipe import parse_recipe, validate_recipe
from tests.models import make_tiny_model

BAD_RECIPES = [
    # Misspelt keys, a prompt gate mode without prompts, impossible settings.
    """
base_model: a/base
gate_mod: random
dtype: float8
architecture: gpt9
experts_per_token: 5
experts:
  - source_model: a/one
    postive_prompts: [sums]
  - source_model: a/one
shared_experts:
  - source_model: a/two
  - source_model: a/three
""",
    "base_model: a/base\nexperts: []\nexperts_per_token: 0\ngate_mode: hiden\n",
    "base_model: a/base\nexperts:\n  - source_model: a/one\n    positive_prompts: [x]\n"
    "  - source_model: a/two\n    positive_prompts: [x]\n",
]
UNPARSABLE_RECIPES = [
    "base_model: a/base\nexperts:\n  - positive_prompts: [x]\n",
    "base_model: a/base\nexperts:\n  - source_model: a/one\nfrankenmoe:\n  experts:\n    - colr: red\n",
    "base_model: a/base\nexperts: [\n",
    "- just a list\n",
]
# A full stop followed by a lowercase word starts a sentence in lowercase ("e.g. x" is no sentence).
LOWERCASE_SENTENCE = re.compile(r"(?<!e\.g)[.?!] [a-z]")
FIELD_PATH = re.compile(r"\b(shared_)?experts\.\d")


def assert_well_written(problem: Problem) -> None:
    text = problem.text
    assert text[0] == text[0].upper(), text
    assert text.endswith((".", "?", "!")), text
    assert not LOWERCASE_SENTENCE.search(text), text
    if problem.hint:
        assert re.search(r"[.?!] Fix: [A-Z`]", text), text
    # Messages start in lowercase to follow a field's name; an identifier there would be mangled
    # by the capital letter a sentence needs.
    assert "_" not in problem.message.split()[0], problem.message
    assert not FIELD_PATH.search(text), text


def collected_problems() -> list[Problem]:
    problems = [p for text in BAD_RECIPES for p in validate_recipe(parse_recipe(text))]
    for text in UNPARSABLE_RECIPES:
        with pytest.raises(ProblemsError) as caught:
            parse_recipe(text)
        problems += caught.value.problems
    return problems


def test_recipe_problems_are_sentences_with_a_full_stop_before_fix() -> None:
    problems = collected_problems()
    assert len(problems) >= 15
    for problem in problems:
        assert_well_written(problem)
    assert str(problems[0]).count(". Fix: ") == 1


def test_a_misspelt_key_gets_a_guess() -> None:
    hints = {p.field: p.hint for p in collected_problems()}
    assert hints["gate_mod"].startswith("did you mean `gate_mode`?")
    assert hints["gate_mode"].startswith("did you mean `hidden`?")
    assert hints["experts.0.postive_prompts"].startswith("did you mean `positive_prompts`?")
    extras_hint = next(hint for field, hint in hints.items() if field.endswith("colr"))
    assert extras_hint.startswith("did you mean `color`?")


def test_an_unknown_key_of_an_expert_is_named_by_the_expert() -> None:
    problems = validate_recipe(parse_recipe(BAD_RECIPES[0]))
    (typo,) = [p for p in problems if p.field == "experts.0.postive_prompts"]
    assert typo.message == "unknown key 'postive_prompts' of expert 0 is ignored (mergekit-moe ignores it too)"


def test_same_prompts_only_when_there_are_prompts() -> None:
    without = "base_model: a/base\nexperts:\n  - source_model: a/one\n  - source_model: a/two\n"
    messages = [p.message for p in validate_recipe(parse_recipe(without))]
    assert not any("same prompts" in m for m in messages)
    assert sum("has no positive prompts" in m for m in messages) == 2
    assert any("same prompts" in p.message for p in validate_recipe(parse_recipe(BAD_RECIPES[2])))


def test_model_problems_name_the_expert_and_read_as_sentences(tmp_path: Path) -> None:
    base = make_tiny_model(tmp_path / "base", "llama", seed=0)
    wider = make_tiny_model(tmp_path / "wider", "llama", seed=1, hidden_size=48, tokenizer_vocab=300)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    recipe = parse_recipe(
        f"base_model: {base}\ngate_mode: random\nexperts:\n  - source_model: {wider}\n"
        f"  - source_model: {notes}\n  - source_model: {tmp_path / 'absent'}\n"
        "frankenmoe:\n  experts:\n    - label: Wider\n"
    )
    problems = check_recipe(recipe)
    for problem in problems:
        assert_well_written(problem)
    wider_messages = [p.message for p in problems if p.field == "experts.0.source_model"]
    assert any(m.startswith("hidden size differs: base has 32, Wider has 48") for m in wider_messages)
    assert any(m.startswith("vocabulary differs") for m in wider_messages)
    (no_config,) = [p for p in problems if p.field == "experts.1.source_model"]
    assert no_config.message.startswith("expert 1: ") and "has no config.json" in no_config.message
