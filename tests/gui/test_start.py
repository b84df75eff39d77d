"""The start screen: chat without a recipe, recent recipes that open with one click and that say when they are gone."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QCoreApplication, Qt
from PySide6.QtWidgets import QListWidget

from app.gui.main_window import MainWindow, Step
from app.gui.settings import AppSettings
from tests.gui.conftest import screenshot

RECIPE = "base_model: ./base\nexperts:\n  - source_model: ./a\n    positive_prompts: [x]\n"


def click_row(qtbot, view: QListWidget, row: int) -> None:
    qtbot.mouseClick(view.viewport(), Qt.MouseButton.LeftButton, pos=view.visualItemRect(view.item(row)).center())


def test_chat_from_the_start_screen_needs_no_recipe(window, qtbot) -> None:
    assert window.central.currentWidget() is window.start_page
    chat_action = window.step_actions[Step.CHAT]
    assert chat_action.isEnabled()
    # Train routers, Evaluate and Chat take any model folder; the recipe's steps wait for a recipe.
    assert window.step_actions[Step.EVALUATE].isEnabled() and window.step_actions[Step.TRAIN].isEnabled()
    model_steps = (Step.TRAIN, Step.CHAT, Step.EVALUATE)
    assert not any(window.step_actions[step].isEnabled() for step in Step if step not in model_steps)

    qtbot.mouseClick(window.start_page.chat_button, Qt.MouseButton.LeftButton)
    assert window.central.currentWidget() is window.workspace
    assert window.pages.currentWidget() is window.chat_page and window.chat_page.isVisible()
    assert window.chat_page.model_box.load_button.isEnabled() and window.chat_page.model_box.model_path.hasFocus()
    # The recipe's steps wait for a recipe; the sidebar says so.
    for step in (Step.MODELS, Step.PROMPTS, Step.PREVIEW, Step.MERGE):
        assert not window.steps.item(step).flags() & Qt.ItemFlag.ItemIsEnabled
    window.show_step(Step.MODELS)
    assert window.pages.currentWidget() is window.chat_page
    screenshot(window, "start-chat-without-recipe")

    window.new_recipe()
    assert window.pages.currentWidget() is window.models_page
    assert all(window.step_actions[step].isEnabled() for step in Step)
    assert all(window.steps.item(step).flags() & Qt.ItemFlag.ItemIsEnabled for step in Step)


def test_view_chat_opens_it_from_the_start_screen(window) -> None:
    window.step_actions[Step.CHAT].trigger()
    assert window.central.currentWidget() is window.workspace
    assert window.pages.currentWidget() is window.chat_page


def test_recent_recipes_open_with_one_click_and_missing_ones_leave(
    qtbot, settings: AppSettings, answer, tmp_path: Path
) -> None:
    kept, gone = tmp_path / "kept.yml", tmp_path / "gone.yml"
    for path in (kept, gone):
        path.write_text(RECIPE)
        settings.remember(path)
    gone.unlink()
    main = MainWindow(AppSettings.load())  # as the app starts: the recent recipes come from QSettings
    qtbot.addWidget(main)
    main.show()
    recent = main.start_page.recent
    assert [recent.item(row).data(Qt.ItemDataRole.UserRole) for row in range(recent.count())] == [
        gone.resolve(),
        kept.resolve(),
    ]
    assert "not found" in recent.item(0).text() and "not found" not in recent.item(1).text()
    screenshot(main.start_page, "start-recent-recipes")

    click_row(qtbot, recent, 0)
    assert not main.document.is_open
    assert main.settings.recent_files == [kept.resolve()]
    assert AppSettings.load().recent_files == [kept.resolve()]  # gone from QSettings too
    assert recent.count() == 1 and "no longer exists" in main.statusBar().currentMessage()

    click_row(qtbot, recent, 0)
    QCoreApplication.processEvents()
    assert main.document.is_open and main.document.path == kept.resolve()
    assert main.central.currentWidget() is main.workspace
    main.close()
