"""LoRA adapters on the Models page: adding one from a folder or the Hub, its row, its problems,
removing it, and the recipe that keeps ``MODEL+ADAPTER``. Adapters are made by peft itself."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from app.core.hub.fit import moe_parameter_count
from app.core.recipe import load_recipe
from app.gui import recipe_edits
from app.gui.hub_search import BASE_COLUMN, Purpose
from app.gui.pages.models import COMPATIBILITY, DOWNLOAD, MODEL, DownloadCell
from tests.gui.conftest import screenshot
from tests.lora_adapters import make_adapter
from tests.models import make_tiny_model

pytest_plugins = ["tests.hubserver"]

TIMEOUT_MS = 30_000
SHOTS = Path("/work/wt/shots")
MLP_NAMES = ("gate_proj", "up_proj", "down_proj")
MLP_AND_QUERY = [*MLP_NAMES, "q_proj"]


@pytest.fixture(scope="session")
def adapter_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama base and expert, an adapter of the base (MLP and q_proj), an adapter made for a
    wider model (its shapes cannot fit the base), and a model folder that is no adapter."""
    root = tmp_path_factory.mktemp("gui-adapters")
    base = make_tiny_model(root / "base", "llama", seed=0)
    expert = make_tiny_model(root / "expert", "llama", seed=1)
    wide = make_tiny_model(root / "wide", "llama", seed=2, hidden_size=48)
    return {
        "base": base,
        "expert": expert,
        "adapter": make_adapter(root / "math-lora", base, r=8, lora_alpha=16, target_modules=MLP_AND_QUERY).folder,
        "wide-adapter": make_adapter(root / "wide-lora", wide, r=4, lora_alpha=8, target_modules=MLP_AND_QUERY).folder,
    }


def expected_summary(adapter: Path, r: int, alpha: int) -> str:
    """The row's summary computed here from the safetensors header, independently of app.core.lora."""
    content = (adapter / "adapter_model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8 : 8 + size])
    counts = {name: int.__mul__(*entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    mlp = sum(n for name, n in counts.items() if any(f".{m}." in name for m in MLP_NAMES))
    return f"r={r}, alpha={alpha}, MLP part {100 * mlp / sum(counts.values()):.0f} % of the adapter"


def recipe_on(window, files: dict[str, Path]) -> None:
    window.new_recipe()
    window.models_page.set_base(str(files["base"]))
    window.models_page.add_expert(str(files["expert"]), "expert")
    window.models_page.add_expert(str(files["base"]), "base copy")
    window.document.edit(recipe_edits.update_settings(window.document.recipe, gate_mode="random"), "Gate mode")


def cell(window, row: int, column: int) -> str:
    item = window.models_page.table.item(row, column)
    return item.text() if item is not None else ""


def test_a_local_adapter_joins_an_expert_and_its_row_shows_it(window, qtbot, adapter_files, tmp_path) -> None:
    page = window.models_page
    recipe_on(window, adapter_files)
    page.table.selectRow(1)
    adapter = adapter_files["adapter"]
    page.adapter_panel.add_adapter_folder(1, str(adapter))
    qtbot.waitUntil(lambda: window.document.recipe.experts[1].source_model.lora is not None, timeout=TIMEOUT_MS)

    summary = expected_summary(adapter, 8, 16)
    row_text = f"{adapter_files['base']} + {adapter} ({summary})"
    qtbot.waitUntil(lambda: cell(window, 1, MODEL) == row_text, timeout=TIMEOUT_MS)
    # q_proj's deltas cannot go into an expert's MLP: the row warns, naming what is dropped.
    qtbot.waitUntil(lambda: cell(window, 1, COMPATIBILITY).startswith("⚠"), timeout=TIMEOUT_MS)
    # Said once, though both the recipe check and the adapter's own reading report it.
    assert cell(window, 1, COMPATIBILITY).count("also changes the attention") == 1
    assert cell(window, 0, MODEL) == str(adapter_files["expert"])  # the other expert is untouched
    assert summary in page.adapter_panel.details.text()
    assert page.adapter_panel.remove_button.isEnabled()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.grab().save(str(SHOTS / "lora-gui-models-adapter.png"))
    screenshot(page, "models-adapter")

    # The recipe keeps MODEL+ADAPTER, as mergekit writes it, and opens again unchanged.
    path = tmp_path / "recipe.yaml"
    window.document.save(path)
    saved = yaml.safe_load(path.read_text())
    assert saved["experts"][1]["source_model"] == f"{adapter_files['base']}+{adapter}"
    assert load_recipe(path).experts[1].source_model == window.document.recipe.experts[1].source_model

    # Removing the adapter leaves the model; undo brings the adapter back.
    page.adapter_panel.remove_adapter()
    assert window.document.recipe.experts[1].source_model.lora is None
    qtbot.waitUntil(lambda: cell(window, 1, MODEL) == str(adapter_files["base"]), timeout=TIMEOUT_MS)
    window.document.undo_stack.undo()
    assert cell(window, 1, MODEL) == row_text


def test_an_adapter_for_another_model_shows_the_problem_on_the_row(window, qtbot, adapter_files) -> None:
    page = window.models_page
    recipe_on(window, adapter_files)
    page.table.selectRow(0)
    page.adapter_panel.add_adapter_folder(0, str(adapter_files["wide-adapter"]))
    qtbot.waitUntil(lambda: cell(window, 0, COMPATIBILITY).startswith("✗"), timeout=TIMEOUT_MS)
    text = cell(window, 0, COMPATIBILITY)
    assert "48" in text and "32" in text, text  # the adapter's width and the model's, both named
    assert "Fix:" in text
    details = page.adapter_panel.details.text()
    assert details.startswith("r=4, alpha=8") and "✗" in details
    page.grab().save(str(SHOTS / "lora-gui-models-bad-adapter.png"))


def test_a_folder_that_is_no_adapter_is_refused_with_the_reason(window, qtbot, adapter_files, answer) -> None:
    page = window.models_page
    recipe_on(window, adapter_files)
    before = window.document.recipe
    page.adapter_panel.add_adapter_folder(0, str(adapter_files["expert"]))
    qtbot.waitUntil(lambda: bool(answer["warnings"]), timeout=TIMEOUT_MS)
    title, text = answer["warnings"][0]
    assert title == "Not an adapter folder"
    assert "adapter_config.json" in text and str(adapter_files["expert"]) in text
    assert window.document.recipe == before


def test_the_hub_dialog_finds_adapters_and_puts_one_on_the_selected_expert(
    window, qtbot, adapter_files, adapter_hub, hub_home, monkeypatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", adapter_hub.url)
    page = window.models_page
    recipe_on(window, adapter_files)
    page.table.selectRow(1)
    page.adapter_panel.hub_button.click()
    dialog = window.hub_dialog
    assert dialog is not None and dialog.purpose is Purpose.ADAPTER
    assert dialog.adapters_only.isChecked() and not dialog.table.isColumnHidden(BASE_COLUMN)
    dialog.query.setText("tiny")
    dialog.search_button.click()
    qtbot.waitUntil(lambda: dialog.proxy.rowCount() == 3, timeout=TIMEOUT_MS)
    assert dialog.proxy.index(0, BASE_COLUMN).data() == "acme/tiny-llama-instruct"
    dialog.table.selectRow(0)
    qtbot.waitUntil(lambda: "acme/tiny-adapter-chat" in dialog.details, timeout=TIMEOUT_MS)
    pane = dialog.detail_pane.toPlainText()
    assert "LoRA adapter" in pane and "r=8, alpha=16" in pane and "for its base acme/tiny-llama-instruct" in pane
    assert not dialog.base_button.isEnabled()  # an adapter alone is no base model
    # Memory: the MoE of the base's size, with the recipe's two experts (the adapter adds none).
    details = dialog.details["acme/tiny-adapter-chat"]
    assert details.fit is not None and details.report is not None and details.report.adapter is not None
    base_parameters = details.report.adapter.base_parameters
    assert details.fit.moe_parameters == moe_parameter_count(details.report.config, base_parameters, 2)
    dialog.grab().save(str(SHOTS / "lora-gui-hub-adapters.png"))
    dialog.adapter_button.click()
    qtbot.waitUntil(lambda: window.hub_dialog is None, timeout=TIMEOUT_MS)
    source = window.document.recipe.experts[1].source_model
    assert str(source) == f"{adapter_files['base']}+acme/tiny-adapter-chat"
    # Not downloaded yet: the row says so until its Download button fetches the adapter.
    qtbot.waitUntil(lambda: "adapter not read yet" in cell(window, 1, MODEL), timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: isinstance(page.table.cellWidget(1, DOWNLOAD), DownloadCell), timeout=TIMEOUT_MS)
    download_cell = page.table.cellWidget(1, DOWNLOAD)
    download_cell.button.click()
    qtbot.waitUntil(lambda: "(r=8, alpha=16, MLP part" in cell(window, 1, MODEL), timeout=TIMEOUT_MS)
    assert not adapter_hub.file_requests("optimizer.pt") and not adapter_hub.file_requests("adapter_model.bin")
    qtbot.waitUntil(lambda: cell(window, 1, DOWNLOAD) == "downloaded", timeout=TIMEOUT_MS)
    # Checked again once downloaded; its problems name it by its Hub id, not by its folder in the cache.
    # (the cell says "checking" in between, so wait for the new check's words too)
    qtbot.waitUntil(
        lambda: "not downloaded" not in (text := cell(window, 1, COMPATIBILITY)) and "changes the attention" in text,
        timeout=TIMEOUT_MS,
    )
    assert "acme/tiny-adapter-chat also changes the attention" in cell(window, 1, COMPATIBILITY)
    assert "snapshots" not in page.adapter_panel.details.text()
    page.grab().save(str(SHOTS / "lora-gui-models-hub-adapter.png"))


def test_an_adapter_chosen_as_a_new_expert_joins_the_recipes_base(
    window, qtbot, adapter_files, adapter_hub, hub_home, monkeypatch
) -> None:
    monkeypatch.setenv("HF_ENDPOINT", adapter_hub.url)
    recipe_on(window, adapter_files)
    window.search_hub(Purpose.EXPERT)
    dialog = window.hub_dialog
    assert dialog is not None and not dialog.adapters_only.isChecked()
    assert dialog.table.isColumnHidden(BASE_COLUMN) and not dialog.adapter_button.isVisible()
    dialog.adapters_only.setChecked(True)
    dialog.query.setText("plain")
    dialog.search_button.click()
    qtbot.waitUntil(lambda: dialog.proxy.rowCount() == 1, timeout=TIMEOUT_MS)
    dialog.table.selectRow(0)
    assert dialog.add_button.isEnabled() and not dialog.base_button.isEnabled()
    dialog.add_button.click()
    qtbot.waitUntil(lambda: window.hub_dialog is None, timeout=TIMEOUT_MS)
    experts = window.document.recipe.experts
    assert len(experts) == 3
    assert str(experts[2].source_model) == f"{adapter_files['base']}+acme/tiny-adapter-plain"
    assert window.document.recipe.expert_label(2) == "tiny-adapter-plain"


def test_a_base_with_an_empty_adapter_part_is_refused_with_the_fix(window, qtbot, adapter_files, answer) -> None:
    page = window.models_page
    recipe_on(window, adapter_files)
    before = window.document.recipe
    page.base_edit.setText(f"{adapter_files['base']}+")
    page.base_edit.editingFinished.emit()
    title, text = answer["warnings"][0]
    assert title == "Not a model" and "empty adapter part" in text and "Fix:" in text
    assert window.document.recipe == before
    assert page.base_edit.text() == str(adapter_files["base"])
