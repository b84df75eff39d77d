"""The demo flow end to end: open the demo recipe, preview, merge, and the output loads."""

from __future__ import annotations

import shutil
from pathlib import Path

from PySide6.QtGui import QImage

from app.core.merge.modelcard import ROUTING_PREVIEW_IMAGE
from app.gui.main_window import Step
from tests.gui.conftest import SCREENSHOTS, screenshot

WORK_TIMEOUT_MS = 60_000


def test_demo_flow_preview_merge_and_load(window, qtbot, demo_recipe: Path, tmp_path: Path) -> None:
    screenshot(window, "0-start")
    assert window.open_recipe(demo_recipe)
    window.show_step(Step.MODELS)
    qtbot.waitUntil(lambda: window.models_page.table.item(0, 6).text() == "✓ Compatible", timeout=WORK_TIMEOUT_MS)
    assert window.models_page.table.item(0, 3).text() == "llama"
    screenshot(window, "1-models")
    window.show_step(Step.PROMPTS)
    screenshot(window, "2-prompts")

    window.show_step(Step.PREVIEW)
    page = window.preview_page
    with qtbot.waitSignal(page.computed, timeout=WORK_TIMEOUT_MS):
        page.compute_button.click()
    assert "test prompts" in page.quality.text()
    assert page.similarity.data is not None and len(page.similarity.data.values) == 3
    assert page.routing.data is not None and [len(row) for row in page.routing.data.marked] == [2] * 4
    screenshot(window, "3-preview")

    window.show_step(Step.MERGE)
    merge = window.merge_page
    out = tmp_path / "merged"
    merge.out_dir.setText(str(out))
    merge.name.setText("Demo MoE")
    qtbot.waitUntil(merge.merge_button.isEnabled, timeout=WORK_TIMEOUT_MS)  # once the models are checked
    merge.merge_button.click()
    qtbot.waitUntil(lambda: merge.merged_folder is not None, timeout=WORK_TIMEOUT_MS)
    assert (out / "config.json").is_file()
    assert merge.chat_button.isVisible() and merge.show_button.isVisible() and merge.train_button.isVisible()
    screenshot(window, "4-merge")
    # The preview's routing of the test prompts goes beside the model, for its published card.
    image = QImage(str(out / ROUTING_PREVIEW_IMAGE))
    assert not image.isNull() and image.width() == 900 and image.height() >= 160 + 34 * 4
    assert len({image.pixel(x, image.height() // 2) for x in range(0, 900, 10)}) > 5  # drawn, not blank
    shutil.copy(out / ROUTING_PREVIEW_IMAGE, SCREENSHOTS / "routing-preview.png")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 3

    merge.train_button.click()  # step 5 takes the merged model, its recipe's prompts ticked
    train = window.train_page
    assert window.pages.currentWidget() is train and train.model_path.text() == str(out)
    assert train.out_dir.text() == str(out.with_name("merged-routers-trained"))
    assert train.form.recipe_prompts.isChecked()
    screenshot(window, "5-train-routers")

    merge.chat_button.click()
    assert window.pages.currentWidget() is window.chat_page
    screenshot(window, "6-chat")
