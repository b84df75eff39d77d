"""Long work: cancel of preview and merge, closing with work running, incompatible experts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PySide6.QtWidgets import QMessageBox

from app.core.demo import demo_recipe_path
from app.core.merge.leftovers import PARTIAL_MARK, record_output_folder
from app.core.recipe import parse_recipe, save_recipe
from app.gui.pages.models import COMPATIBILITY
from app.gui.workers import running_jobs
from tests.gui.conftest import screenshot
from tests.models import make_tiny_model

TIMEOUT_MS = 60_000


def test_cancel_preview(window, qtbot, demo_recipe: Path) -> None:
    assert window.open_recipe(demo_recipe)
    page = window.preview_page
    page.compute_button.click()
    page.cancel_button.click()
    qtbot.waitUntil(lambda: page.compute_button.isEnabled(), timeout=TIMEOUT_MS)
    assert page.result is None
    assert "cancelled" in page.status.text()


def test_cancel_merge_leaves_nothing(window, qtbot, demo_recipe: Path, tmp_path: Path) -> None:
    assert window.open_recipe(demo_recipe)
    page = window.merge_page
    page.out_dir.setText(str(tmp_path / "out"))
    qtbot.waitUntil(page.merge_button.isEnabled, timeout=TIMEOUT_MS)  # once the models are checked
    page.merge_button.click()
    page.cancel_button.click()
    qtbot.waitUntil(lambda: page.merge_button.isEnabled(), timeout=TIMEOUT_MS)
    assert "cancelled" in page.stage.text()
    assert page.progress.value() == 0 and page.speed.text() == ""
    assert list(tmp_path.iterdir()) == []


def test_closing_with_work_running_asks_then_stops_it(window, qtbot, answer) -> None:
    window.try_demo()
    qtbot.waitUntil(lambda: window.demo_job.last_progress is not None, timeout=TIMEOUT_MS)
    answer["question"] = QMessageBox.StandardButton.No
    assert not window.close()
    assert window.isVisible() and running_jobs()
    answer["question"] = QMessageBox.StandardButton.Yes
    assert window.close()
    assert not running_jobs()
    assert "Stop Demo and quit?" in answer["asked"][-1]
    assert not demo_recipe_path(window.settings.demo_dir).parent.exists()


def test_incompatible_expert_shown_with_its_reasons(window, qtbot, demo_recipe: Path, tmp_path: Path) -> None:
    assert window.open_recipe(demo_recipe)
    odd = make_tiny_model(tmp_path / "wider", "llama", seed=3, hidden_size=48)
    window.models_page.add_expert(str(odd), "Wider")
    table = window.models_page.table
    qtbot.waitUntil(lambda: table.item(3, COMPATIBILITY).text().startswith("✗"), timeout=TIMEOUT_MS)
    reasons = table.item(3, COMPATIBILITY).text()
    assert "Hidden size differs: base has 64, Wider has 48" in reasons and "Fix:" in reasons
    assert table.item(0, COMPATIBILITY).text() == "✓ Compatible"
    screenshot(window, "1-models-incompatible")


def dead_partial_folder(folder: Path, target: str, size: int) -> Path:
    """A hidden work folder as a killed merge leaves it, owned by a process that has exited."""
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    partial = folder / f".{target}{PARTIAL_MARK}{exited.pid}-1700000000000-0a1b2c3d"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * size)
    return partial


def test_at_start_the_window_cleans_up_after_killed_merges_and_says_so(
    qtbot, settings, answer, tmp_path: Path, monkeypatch
) -> None:
    from app.gui.main_window import MainWindow

    monkeypatch.setenv("FRANKENMOE_STATE_DIR", str(tmp_path / "state"))
    models = tmp_path / "models"
    partial = dead_partial_folder(models, "moe", 2_500_000)
    record_output_folder(models)
    main = MainWindow(settings)
    qtbot.addWidget(main)
    qtbot.waitUntil(lambda: not partial.exists() and "freed" in main.statusBar().currentMessage(), timeout=TIMEOUT_MS)
    assert f"freed 2.5 MB: removed 1 unfinished merge folder(s) left by stopped merges in {models}" in (
        main.statusBar().currentMessage()
    )
    assert "Cleaned up after stopped merges: freed 2.5 MB" in main.log_panel.text


def test_a_merge_cleans_up_after_a_killed_merge_in_its_folder_and_says_so(
    window, qtbot, llama_donors, tmp_path: Path
) -> None:
    lines = [f"base_model: {llama_donors['base']}", "gate_mode: random", "experts:"]
    lines += [f"  - source_model: {llama_donors[f'expert{index}']}" for index in range(2)]
    recipe_path = tmp_path / "recipe.yml"
    save_recipe(parse_recipe("\n".join(lines)), recipe_path)
    assert window.open_recipe(recipe_path)
    out = tmp_path / "out"
    partial = dead_partial_folder(out, "earlier-moe", 1_200_000)
    page = window.merge_page
    page.out_dir.setText(str(out / "moe"))
    qtbot.waitUntil(page.merge_button.isEnabled, timeout=TIMEOUT_MS)  # once the models are checked
    page.merge_button.click()
    qtbot.waitUntil(lambda: page.merged_folder is not None, timeout=TIMEOUT_MS)
    assert not partial.exists()
    assert f"freed 1.2 MB: removed 1 unfinished merge folder(s) left by stopped merges in {out}" in (
        window.log_panel.text
    )
    assert "Cleaned up after stopped merges: freed 1.2 MB" in window.statusBar().currentMessage()


def test_status_bar_progress_shows_the_demos_share_done(window, qtbot) -> None:
    bar = window.job_progress
    window.try_demo()
    qtbot.waitUntil(
        lambda: window.demo_job.last_progress is not None and window.demo_job.last_progress.fraction > 0,
        timeout=TIMEOUT_MS,
    )
    record = window.demo_job.last_progress
    assert bar.isVisible()
    assert (bar.minimum(), bar.maximum()) == (0, 1000)  # determinate, not the busy animation
    assert bar.value() == round(record.fraction * 1000)
    assert f"({record.fraction:.0%})" in window.statusBar().currentMessage()
    with qtbot.waitSignal(window.demo_job.finished, timeout=TIMEOUT_MS):
        window.demo_job.cancel()
    assert not bar.isVisible()
    assert (bar.minimum(), bar.maximum()) == (0, 0)  # the next job, whatever it is, starts as busy
