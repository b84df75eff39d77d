"""Long work: cancel of preview and merge, closing with work running, incompatible experts."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QMessageBox

from app.core.demo import demo_recipe_path
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
    page.merge_button.click()
    page.cancel_button.click()
    qtbot.waitUntil(lambda: page.merge_button.isEnabled(), timeout=TIMEOUT_MS)
    assert "cancelled" in page.stage.text()
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
    reasons = table.item(3, COMPATIBILITY).toolTip()
    assert "hidden size differs: base has 64" in reasons and "Fix:" in reasons
    assert table.item(0, COMPATIBILITY).text() == "✓ Compatible"
    screenshot(window, "1-models-incompatible")


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
