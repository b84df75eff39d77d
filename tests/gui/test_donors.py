"""Donors on the Models page: a folder that is not a model is refused at once, a donor of other
sizes shows every reason on its row, and Merge stays disabled while a model problem stands.
Opening another recipe leaves nothing of the previous one on the Merge page."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtWidgets import QFileDialog

from app.gui import recipe_edits
from app.gui.main_window import Step
from app.gui.pages.models import COMPATIBILITY
from tests.gui.conftest import screenshot
from tests.models import make_tiny_model

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def donors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("donors")
    notes = root / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("Not a model.")
    return {
        "base": make_tiny_model(root / "base", "llama", seed=0),
        "good": make_tiny_model(root / "good", "llama", seed=1),
        "odd": make_tiny_model(
            root / "odd",
            "llama",
            seed=2,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            tokenizer_vocab=300,
        ),
        "notes": notes,
    }


def choose_folders(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """The folder dialog answers with these folders, one per call."""
    answers = [str(folder) for folder in folders]
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", staticmethod(lambda *args: answers.pop(0)))


def new_recipe_on(window, base: Path) -> None:
    """Random routers, so that no prompt problem blocks the merge: only the models can."""
    window.new_recipe()
    window.models_page.set_base(str(base))
    window.document.edit(recipe_edits.update_settings(window.document.recipe, gate_mode="random"), "Gate mode")


def write_recipe(path: Path, base: Path, *experts: Path) -> Path:
    lines = [f"base_model: {base}", "gate_mode: hidden", "experts:"]
    for index, expert in enumerate(experts):
        lines += [f"  - source_model: {expert}", f"    positive_prompts: [topic {index}]"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_folder_that_is_not_a_model_is_refused_at_once(window, qtbot, answer, monkeypatch, donors) -> None:
    new_recipe_on(window, donors["base"])
    choose_folders(monkeypatch, donors["notes"])
    window.models_page.add_folder_button.click()
    qtbot.waitUntil(lambda: bool(answer["warnings"]), timeout=TIMEOUT_MS)
    ((title, text),) = answer["warnings"]
    assert title == "Not a model folder"
    assert "has no config.json" in text and "Choose the folder that holds the model's config.json" in text
    assert window.document.recipe.experts == ()
    assert window.models_page.table.rowCount() == 0


def test_a_donor_of_other_sizes_shows_every_reason_and_blocks_merge(window, qtbot, monkeypatch, donors) -> None:
    new_recipe_on(window, donors["base"])
    choose_folders(monkeypatch, donors["good"], donors["odd"])
    page, merge = window.models_page, window.merge_page
    page.add_folder_button.click()
    qtbot.waitUntil(lambda: len(window.document.recipe.experts) == 1, timeout=TIMEOUT_MS)
    page.add_folder_button.click()
    table = page.table
    qtbot.waitUntil(
        lambda: table.rowCount() == 2 and table.item(1, COMPATIBILITY).text().startswith("✗"), timeout=TIMEOUT_MS
    )
    shown = table.item(1, COMPATIBILITY).text()
    for reason in (
        "✗ Hidden size differs: base has 32, odd has 48",
        "✗ Intermediate size differs: base has 64, odd has 96",
        "✗ Layer count differs: base has 2, odd has 3",
        "✗ Vocab size differs",
        "Fix: Use fine-tunes of the same base model as experts.",
    ):
        assert reason in shown
    assert table.item(0, COMPATIBILITY).text() == "✓ Compatible"
    # The reasons are on the row, wrapped, not only in a tooltip: the row grows to hold them.
    assert table.rowHeight(1) >= 4 * table.rowHeight(0)
    assert table.columnWidth(COMPATIBILITY) < table.viewport().width() // 2
    table.clearSelection()
    screenshot(page, "1-models-other-sizes")

    qtbot.waitUntil(lambda: "Hidden size differs" in merge.problems.text(), timeout=TIMEOUT_MS)
    assert "odd has 48" in merge.problems.text() and "experts.1" not in merge.problems.text()
    assert not merge.merge_button.isEnabled()
    window.show_step(Step.MERGE)
    screenshot(window, "4-merge-blocked")
    page.table.selectRow(1)
    page.remove_button.click()
    # One expert left: route each token to it alone, and nothing stands in the way of the merge.
    window.document.edit(recipe_edits.update_settings(window.document.recipe, experts_per_token=1), "Top-k")
    qtbot.waitUntil(lambda: merge.merge_button.isEnabled(), timeout=TIMEOUT_MS)
    assert merge.problems.text() == ""


def test_a_recipe_naming_a_folder_that_is_not_a_model_cannot_merge(window, qtbot, donors, tmp_path) -> None:
    recipe = write_recipe(tmp_path / "r.yml", donors["base"], donors["good"], donors["notes"])
    assert window.open_recipe(recipe)
    merge, table = window.merge_page, window.models_page.table
    qtbot.waitUntil(lambda: "has no config.json" in merge.problems.text(), timeout=TIMEOUT_MS)
    assert merge.problems.text().startswith("✗ Expert 1: ")
    assert not merge.merge_button.isEnabled()
    assert "has no config.json" in table.item(1, COMPATIBILITY).text()


def test_opening_another_recipe_resets_the_merge_page(window, qtbot, donors, tmp_path) -> None:
    first = write_recipe(tmp_path / "first.yml", donors["base"], donors["good"], donors["good"])
    first.write_text(first.read_text().replace("gate_mode: hidden", "gate_mode: random"))
    first.write_text(first.read_text() + "frankenmoe:\n  allow_identical_experts: true\n")
    assert window.open_recipe(first)
    merge = window.merge_page
    merge.out_dir.setText(str(tmp_path / "merged"))
    merge.overwrite.setChecked(True)
    merge.name.setText("First MoE")
    qtbot.waitUntil(lambda: merge.merge_button.isEnabled(), timeout=TIMEOUT_MS)
    merge.merge_button.click()
    qtbot.waitUntil(lambda: merge.merged_folder is not None, timeout=TIMEOUT_MS)
    assert merge.progress.value() == merge.progress.maximum() and merge.chat_button.isVisibleTo(merge)
    # No preview was computed for this recipe, so there is no routing picture to put beside the model.
    assert not (merge.merged_folder / "routing-preview.png").exists()

    second = write_recipe(tmp_path / "second.yml", donors["base"], donors["good"], donors["odd"])
    assert window.open_recipe(second)
    assert merge.out_dir.text() == str(tmp_path / "second-moe")
    assert not merge.overwrite.isChecked()
    assert merge.name.text() == "" and merge.merged_folder is None
    assert merge.progress.value() == 0 and merge.stage.text() == "" and merge.result_label.text() == ""
    assert not merge.chat_button.isVisibleTo(merge) and not merge.show_button.isVisibleTo(merge)
    assert not merge.merge_button.isEnabled()
    qtbot.waitUntil(lambda: "expert 1 has 48" in merge.problems.text(), timeout=TIMEOUT_MS)
