"""The Hub in the desktop app, against the local Hub server: search, details, gated models,
downloads from the Models page with progress and cancel, tokens, and merges that fetch first."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from app.core.hub import HubConfig, cached_snapshot
from app.core.recipe import ModelRef
from app.gui import recipe_edits
from app.gui.hub_search import HubSearchDialog, Purpose
from app.gui.pages.models import COMPATIBILITY, DOWNLOAD, FAMILY, NOT_DOWNLOADED_BADGE, DownloadCell
from app.gui.settings_dialog import SettingsDialog
from tests.gui.conftest import screenshot

pytest_plugins = ["tests.hubserver"]

TIMEOUT_MS = 20_000
COLUMN = {"model": 0, "parameters": 1, "dtype": 3, "licence": 4, "gated": 5, "likes": 7}


@pytest.fixture
def gui_hub(hub, hub_home, monkeypatch):
    """The local Hub, where the app's Hub calls go (HF_ENDPOINT is read at each call)."""
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub


@pytest.fixture
def local_base(tmp_path: Path, tiny_hub_files) -> Path:
    """A base model in a local folder, of the same shape as the Hub's tiny Llamas."""
    folder = tmp_path / "base"
    folder.mkdir()
    for name, content in tiny_hub_files["llama-a"].items():
        (folder / name).write_bytes(content)
    return folder


def new_recipe_on(window, base: Path) -> None:
    """A new recipe on a local base, with random routers: these tests are about models, not prompts."""
    window.new_recipe()
    window.models_page.set_base(str(base))
    window.document.edit(recipe_edits.update_settings(window.document.recipe, gate_mode="random"), "Gate mode")


def open_dialog(window, purpose: Purpose = Purpose.EXPERT) -> HubSearchDialog:
    window.search_hub(purpose)
    assert window.hub_dialog is not None
    return window.hub_dialog


def search(qtbot, dialog: HubSearchDialog, query: str, rows: int) -> None:
    dialog.query.setText(query)
    dialog.search_button.click()
    qtbot.waitUntil(lambda: dialog.proxy.rowCount() == rows, timeout=TIMEOUT_MS)


def shown_repos(dialog: HubSearchDialog) -> list[str]:
    return [dialog.proxy.index(row, 0).data() for row in range(dialog.proxy.rowCount())]


def select(qtbot, dialog: HubSearchDialog, repo: str, waiting_for: str) -> str:
    dialog.table.selectRow(shown_repos(dialog).index(repo))
    qtbot.waitUntil(lambda: waiting_for in dialog.detail_pane.toPlainText(), timeout=TIMEOUT_MS)
    return dialog.detail_pane.toPlainText()


def test_search_shows_hub_rows_sorts_and_pages(window, qtbot, gui_hub) -> None:
    gui_hub.add_model("acme/tiny-llama-odd", {"config.json": b"{}"}, license="<b>odd</b>", downloads=1)
    window.new_recipe()
    dialog = open_dialog(window)
    dialog.page_size = 3
    search(qtbot, dialog, "tiny llama", rows=3)
    # The Hub's order for "most downloaded", one page at a time.
    assert shown_repos(dialog) == ["acme/tiny-llama-instruct", "acme/tiny-llama-chat", "acme/tiny-llama-sharded"]
    assert dialog.more_button.isEnabled()
    dialog.more_button.click()
    qtbot.waitUntil(lambda: dialog.proxy.rowCount() == 5, timeout=TIMEOUT_MS)
    assert not dialog.more_button.isEnabled()

    dialog.table.sortByColumn(COLUMN["likes"], Qt.SortOrder.DescendingOrder)
    assert shown_repos(dialog)[0] == "acme/tiny-llama-chat"
    first = {name: dialog.proxy.index(0, column).data() for name, column in COLUMN.items()}
    assert first["licence"] == "llama3" and first["dtype"] == "F32" and first["gated"] == "open"
    assert first["parameters"].endswith("K")

    # Hub-provided text is shown as text, never read as markup.
    text = select(qtbot, dialog, "acme/tiny-llama-odd", "Licence")
    assert "Licence: <b>odd</b>" in text
    dialog.reject()


def test_details_say_why_the_wide_model_cannot_join(window, qtbot, gui_hub, local_base: Path) -> None:
    new_recipe_on(window, local_base)
    dialog = open_dialog(window)
    search(qtbot, dialog, "tiny llama", rows=4)
    text = select(qtbot, dialog, "acme/tiny-llama-chat", "This recipe")
    assert "Can join this recipe" in text and "to fetch" in text and "Memory" in text
    text = select(qtbot, dialog, "acme/tiny-llama-wide", "This recipe")
    assert "Cannot join this recipe" in text
    assert "hidden size differs: base has 32" in text and "48" in text and "Fix:" in text
    assert "Hidden size\t48" in text or "Hidden size 48" in text or "48, intermediate" in text
    screenshot(dialog, "hub-search")
    dialog.reject()


def test_gated_model_explains_how_to_get_access(window, qtbot, gui_hub) -> None:
    window.new_recipe()
    dialog = open_dialog(window)
    search(qtbot, dialog, "gated", rows=1)
    assert dialog.proxy.index(0, COLUMN["gated"]).data() == "gated"
    text = select(qtbot, dialog, "acme/gated-llama", "How to get access")
    assert "accept the terms" in text and "Settings" in text
    assert f'href="{gui_hub.url}/acme/gated-llama"' in dialog.detail_pane.toHtml()
    screenshot(dialog, "hub-gated")
    dialog.reject()


def test_stop_ends_a_search_the_hub_never_answers(window, qtbot, gui_hub) -> None:
    window.new_recipe()
    dialog = open_dialog(window)
    assert not dialog.stop_button.isEnabled()
    gui_hub.hold("/api/models")
    dialog.query.setText("tiny llama")
    dialog.search_button.click()
    qtbot.waitUntil(gui_hub.request_held.is_set, timeout=TIMEOUT_MS)
    assert dialog.status.text() == "Searching…" and dialog.stop_button.isEnabled()
    job = dialog._search_job
    assert job is not None
    with qtbot.waitSignal(job.finished, timeout=TIMEOUT_MS):
        dialog.stop_button.click()
    # The worker has ended while the Hub still holds the request unanswered.
    assert not job.is_running
    assert dialog.status.text() == "Search stopped." and not dialog.stop_button.isEnabled()
    dialog.reject()


def test_stop_ends_reading_a_model_the_hub_never_answers(window, qtbot, gui_hub) -> None:
    window.new_recipe()
    dialog = open_dialog(window)
    search(qtbot, dialog, "tiny llama", rows=4)
    gui_hub.hold("/api/models/acme/tiny-llama-chat")
    dialog.table.selectRow(shown_repos(dialog).index("acme/tiny-llama-chat"))
    qtbot.waitUntil(gui_hub.request_held.is_set, timeout=TIMEOUT_MS)
    assert "Reading its configuration" in dialog.detail_pane.toPlainText()
    job = dialog._inspect_job
    assert job is not None and dialog.stop_button.isEnabled()
    with qtbot.waitSignal(job.finished, timeout=TIMEOUT_MS):
        dialog.stop_button.click()
    assert not job.is_running
    assert "Stopped reading its configuration" in dialog.detail_pane.toPlainText()
    dialog.reject()


def test_an_unreachable_hub_is_named_in_the_dialog(window, qtbot, hub_home, closed_endpoint, monkeypatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", closed_endpoint)
    window.new_recipe()
    dialog = open_dialog(window)
    dialog.query.setText("llama")
    dialog.search_button.click()
    qtbot.waitUntil(lambda: dialog.status.text() == "The search failed.", timeout=TIMEOUT_MS)
    text = dialog.detail_pane.toPlainText()
    assert f"Cannot reach the Hub at {closed_endpoint}" in text and "refused the connection" in text
    assert "Fix:" in text and "still work offline" in text
    dialog.reject()


def add_hub_expert(window, qtbot, repo: str) -> DownloadCell:
    """Add ``repo`` as an expert through the dialog; returns its row's download cell."""
    dialog = open_dialog(window)
    search(qtbot, dialog, repo, rows=1)
    select(qtbot, dialog, repo, "This recipe")
    dialog.add_button.click()
    table = window.models_page.table
    qtbot.waitUntil(
        lambda: table.rowCount() == 1 and table.item(0, COMPATIBILITY).text() == NOT_DOWNLOADED_BADGE,
        timeout=TIMEOUT_MS,
    )
    cell = table.cellWidget(0, DOWNLOAD)
    assert isinstance(cell, DownloadCell) and cell.button.isVisible()
    return cell


def test_download_button_shows_progress_and_ends_with_the_badge_updated(
    window, qtbot, gui_hub, local_base: Path
) -> None:
    new_recipe_on(window, local_base)
    cell = add_hub_expert(window, qtbot, "acme/tiny-llama-chat")
    table = window.models_page.table
    assert table.item(0, FAMILY).text() == "llama"  # as the Hub describes it, before any download
    gui_hub.throttle("model.safetensors", piece=16_384, pause_s=0.05)
    cell.button.click()
    assert cell.progress.isVisible() and cell.cancel_button.isVisible()
    assert cell.job is not None
    with qtbot.waitSignal(cell.job.finished, timeout=TIMEOUT_MS):
        qtbot.waitUntil(lambda: "kB of" in cell.progress.toolTip(), timeout=TIMEOUT_MS)
        assert cell.progress.toolTip().startswith("acme/tiny-llama-chat: ")
    qtbot.waitUntil(lambda: table.item(0, COMPATIBILITY).text() == "✓ Compatible", timeout=TIMEOUT_MS)
    assert table.item(0, DOWNLOAD).text() == "downloaded"
    assert cached_snapshot(ModelRef.parse("acme/tiny-llama-chat"), HubConfig.current()) is not None
    assert "Download acme/tiny-llama-chat: finished" in window.log_panel.text
    screenshot(window, "1-models-hub")


def test_cancelled_download_leaves_the_cache_consistent(window, qtbot, gui_hub, hub_home, local_base: Path) -> None:
    new_recipe_on(window, local_base)
    cell = add_hub_expert(window, qtbot, "acme/tiny-llama-chat")
    gui_hub.throttle("model.safetensors", piece=2048, pause_s=0.05)
    cell.button.click()
    qtbot.waitUntil(lambda: "kB of" in cell.progress.toolTip(), timeout=TIMEOUT_MS)
    screenshot(window, "1-models-downloading")
    assert cell.job is not None
    with qtbot.waitSignal(cell.job.finished, timeout=TIMEOUT_MS):
        cell.cancel_button.click()
    assert cell.button.isVisible() and not cell.progress.isVisible()
    repo_cache = hub_home / "hub" / "models--acme--tiny-llama-chat"
    assert not list(repo_cache.rglob("*.incomplete"))
    weights = gui_hub.repos["acme/tiny-llama-chat"].commits
    assert cached_snapshot(ModelRef.parse("acme/tiny-llama-chat"), HubConfig.current()) is None
    assert weights  # the server still has it; only the cache is incomplete, and says so
    assert window.models_page.table.item(0, COMPATIBILITY).text() == NOT_DOWNLOADED_BADGE
    assert "Download acme/tiny-llama-chat: cancelled" in window.log_panel.text


def test_cancel_ends_a_download_whose_lookup_the_hub_never_answers(window, qtbot, gui_hub, local_base: Path) -> None:
    new_recipe_on(window, local_base)
    cell = add_hub_expert(window, qtbot, "acme/tiny-llama-chat")
    gui_hub.hold("/api/models/acme/tiny-llama-chat")
    cell.button.click()
    qtbot.waitUntil(gui_hub.request_held.is_set, timeout=TIMEOUT_MS)
    assert cell.job is not None
    with qtbot.waitSignal(cell.job.finished, timeout=TIMEOUT_MS):
        cell.cancel_button.click()
    assert cell.button.isVisible() and not cell.progress.isVisible()
    assert "Download acme/tiny-llama-chat: cancelled" in window.log_panel.text


def test_settings_check_the_saved_token_and_never_show_one(qtbot, window, gui_hub, monkeypatch) -> None:
    gui_hub.add_token("hf_alice_secret", "alice")
    monkeypatch.setenv("HF_TOKEN", "hf_alice_secret")
    dialog = SettingsDialog(window.settings, window.context, window)
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitUntil(lambda: "Logged in to the Hub as alice" in dialog.login_status.text(), timeout=TIMEOUT_MS)
    dialog.token.setText("hf_wrong_secret")
    dialog.login_button.click()
    assert dialog.token.text() == ""
    qtbot.waitUntil(lambda: "refused" in dialog.login_status.text(), timeout=TIMEOUT_MS)
    screenshot(dialog, "settings")
    shown = dialog.login_status.text() + window.log_panel.text
    assert "secret" not in shown
    dialog.reject()


def test_merge_downloads_missing_hub_models_first(window, qtbot, gui_hub, hub_home, local_base: Path, tmp_path) -> None:
    new_recipe_on(window, local_base)
    window.models_page.add_expert("acme/tiny-llama-chat")
    window.models_page.add_expert("acme/tiny-llama-instruct")
    merge = window.merge_page
    out = tmp_path / "moe"
    merge.out_dir.setText(str(out))
    stages: list[str] = []
    # Not downloaded yet is no reason to wait: the merge downloads them first.
    qtbot.waitUntil(merge.merge_button.isEnabled, timeout=TIMEOUT_MS)
    merge.merge_button.click()
    assert merge.job is not None
    merge.job.progress.connect(lambda record: stages.append(record.stage))
    qtbot.waitUntil(lambda: merge.merged_folder is not None or "failed" in merge.stage.text(), timeout=60_000)
    assert merge.merged_folder == out, merge.stage.text()
    assert "download" in stages
    cached = sorted(p.name for p in (hub_home / "hub").iterdir() if p.name.startswith("models--"))
    assert cached == ["models--acme--tiny-llama-chat", "models--acme--tiny-llama-instruct"]


def test_cancelled_merge_shows_no_progress_or_time_left(window, qtbot, gui_hub, local_base: Path, tmp_path) -> None:
    new_recipe_on(window, local_base)
    window.models_page.add_expert("acme/tiny-llama-chat")
    window.models_page.add_expert("acme/tiny-llama-instruct")
    merge = window.merge_page
    merge.out_dir.setText(str(tmp_path / "moe"))
    gui_hub.throttle("model.safetensors", piece=2048, pause_s=0.05)
    qtbot.waitUntil(merge.merge_button.isEnabled, timeout=TIMEOUT_MS)
    merge.merge_button.click()
    qtbot.waitUntil(lambda: "left" in merge.speed.text() and merge.progress.value() > 0, timeout=TIMEOUT_MS)
    assert merge.job is not None
    with qtbot.waitSignal(merge.job.finished, timeout=TIMEOUT_MS):
        merge.cancel_button.click()
    assert merge.stage.text() == "Merge cancelled; nothing was left behind."
    assert merge.progress.value() == 0 and merge.speed.text() == ""
    assert merge.merge_button.isEnabled() and not merge.cancel_button.isEnabled()
    assert not (tmp_path / "moe").exists()


def test_preview_downloads_a_hub_base_first(window, qtbot, gui_hub) -> None:
    window.new_recipe()
    window.models_page.set_base("acme/tiny-llama-instruct")
    window.models_page.add_expert("acme/tiny-llama-chat")
    window.models_page.add_expert("acme/tiny-llama-instruct")
    window.document.edit(recipe_edits.update_settings(window.document.recipe, gate_mode="random"), "Gate mode")
    qtbot.waitUntil(lambda: window.models_page.base_download is not None, timeout=TIMEOUT_MS)
    page = window.preview_page
    stages: list[str] = []
    page.compute_button.click()
    assert page.job is not None
    page.job.progress.connect(lambda record: stages.append(record.stage))
    with qtbot.waitSignal(page.job.finished, timeout=TIMEOUT_MS):
        pass
    assert page.result is not None, page.status.text()
    assert "download" in stages
    base = ModelRef.parse("acme/tiny-llama-instruct")
    assert cached_snapshot(base, HubConfig.current()) is not None
