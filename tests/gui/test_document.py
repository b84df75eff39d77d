"""The recipe as a document: undo and redo of every kind of edit, open/save, errors with lines."""

from __future__ import annotations

from pathlib import Path

from app.core.recipe import load_recipe
from app.gui.pages.models import LABEL


def test_undo_and_redo_every_edit(window, qtbot, demo_recipe: Path) -> None:
    assert window.open_recipe(demo_recipe)
    original = window.document.recipe
    models, prompts = window.models_page, window.prompts_page

    models.table.item(1, LABEL).setText("Python")
    models.set_color(0, "#123456")
    models.table.selectRow(2)
    models._move(-1)
    prompts.experts.setCurrentRow(0)
    prompts.positive.add_many("1 + 1 = 2\n\n2 + 2 = 4\n")
    prompts.test.add_many("5 * 5 = 25")
    prompts.gate_mode.setCurrentText("cheap_embed")
    prompts.top_k.setValue(1)
    edited = window.document.recipe

    assert edited.studio.experts[1].label == "Prose"  # moved up over "Python"
    assert edited.studio.experts[2].label == "Python"
    assert edited.studio.experts[0].color == "#123456"
    assert edited.experts[0].positive_prompts[-2:] == ("1 + 1 = 2", "2 + 2 = 4")
    assert edited.studio.experts[0].test_prompts[-1] == "5 * 5 = 25"
    assert (edited.gate_mode, edited.experts_per_token) == ("cheap_embed", 1)
    assert window.isWindowModified()

    stack = window.document.undo_stack
    assert stack.count() == 7
    while stack.canUndo():
        window.undo_action.trigger()
    assert window.document.recipe == original
    assert not window.isWindowModified()
    assert models.table.item(1, LABEL).text() == "Code"
    while stack.canRedo():
        window.redo_action.trigger()
    assert window.document.recipe == edited


def test_typing_a_label_is_one_undo_step(window, demo_recipe: Path) -> None:
    assert window.open_recipe(demo_recipe)
    for text in ("P", "Py", "Pyt"):
        window.models_page.table.item(1, LABEL).setText(text)
    assert window.document.undo_stack.count() == 1


def test_save_and_open_round_trip(window, demo_recipe: Path, tmp_path: Path) -> None:
    assert window.open_recipe(demo_recipe)
    window.prompts_page.negative.add_many("lorem ipsum")
    target = tmp_path / "saved.yml"
    assert window._save_to(target)
    assert not window.isWindowModified()
    assert window.windowTitle().startswith("saved.yml")
    saved = window.document.recipe
    window.new_recipe()
    assert window.open_recipe(target)
    assert window.document.recipe == saved == load_recipe(target)
    assert window.settings.recent_files[0] == target.resolve()


def test_bad_recipe_is_reported_with_its_line(window, answer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("base_model: ./base\nexperts:\n  - source_model: ./a\n   positive_prompts: [x]\n")
    assert not window.open_recipe(bad)
    title, text = answer["warnings"][-1]
    assert "bad.yml is not a valid recipe" in title
    assert "line 4" in text
    assert not window.document.is_open


def test_unsaved_changes_are_not_lost_silently(window, answer, demo_recipe: Path) -> None:
    assert window.open_recipe(demo_recipe)
    window.prompts_page.positive.add_many("new prompt")
    from PySide6.QtWidgets import QMessageBox

    answer["question"] = QMessageBox.StandardButton.Cancel
    window.new_recipe()
    assert window.document.path == demo_recipe  # still open, edit kept
    assert window.document.is_modified
    answer["question"] = QMessageBox.StandardButton.Discard
    window.new_recipe()
    assert window.document.path is None
