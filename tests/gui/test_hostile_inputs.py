"""Hostile files opened from the window: a dialog that names the problem, never an escaped exception."""

from __future__ import annotations

from pathlib import Path

from tests.hostile import billion_laughs


def test_a_recipe_that_is_not_utf8_gets_a_dialog(window, answer, tmp_path: Path) -> None:
    path = tmp_path / "latin1.yml"
    path.write_bytes("base_model: ./base\nexperts: [{source_model: ./modèle}]\n".encode("latin-1"))
    assert not window.open_recipe(path)
    title, text = answer["warnings"][-1]
    assert "latin1.yml is not a valid recipe" in title
    assert "is not UTF-8 text" in text
    assert "Fix: " in text
    assert not window.document.is_open


def test_a_billion_laughs_recipe_opens_without_stalling_the_window(window, answer, tmp_path: Path) -> None:
    path = tmp_path / "laughs.yml"
    path.write_text(billion_laughs(9))  # 9**10 strings if its aliases were expanded
    assert window.open_recipe(path)  # returns at once: the aliases are walked once each
    assert window.document.is_open
    assert len(window.document.recipe.ignored_keys) == 10
