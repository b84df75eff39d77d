"""The main window's frame: long messages wrap inside it, the sidebar keeps its width, the log follows."""

from __future__ import annotations

from PySide6.QtCore import QCoreApplication, QPoint
from PySide6.QtWidgets import QLabel, QWidget

from app.gui.main_window import Step
from app.gui.widgets import explanation
from tests.gui.conftest import screenshot

# What users really get: a path with no spaces, a hash with no break at all, and a fix.
LONG_PATH = "/home/someone/models/" + "a_fine_tune_whose_folder_name_goes_on_and_on-" * 6 + "/model.safetensors"
LONG_HASH = "0123456789abcdef" * 12
LONG_ERROR = (
    f"The merge failed: cannot write {LONG_PATH}: No space left on device (blob {LONG_HASH}).\n"
    "Fix: free some space on that disk, or choose another output folder, and merge again."
)


def message_labels(window) -> dict[Step, list[QLabel]]:
    """Every label a page writes messages, errors and results into."""
    models, prompts, preview = window.models_page, window.prompts_page, window.preview_page
    merge, train, evaluate, chat = window.merge_page, window.train_page, window.evaluate_page, window.chat_page
    return {
        Step.MODELS: [models.base_info, models.general_problems],
        Step.PROMPTS: [prompts.expert_problems, prompts.settings_problems],
        Step.PREVIEW: [preview.status, preview.quality, preview.warnings],
        Step.MERGE: [merge.problems, merge.stage, merge.speed, merge.result_label],
        Step.TRAIN: [train.model_note, train.message, train.before_after.quality],
        Step.EVALUATE: [evaluate.model_note, evaluate.stage, evaluate.result_note, evaluate.results.table_note],
        Step.CHAT: [
            chat.model_box.model_status,
            chat.model_box.fit_message,
            chat.controls.stats,
            chat.panel.panel_reason,
        ],
    }


def right_edge_in(widget: QWidget, ancestor: QWidget) -> int:
    return widget.mapTo(ancestor, QPoint(widget.width(), 0)).x()


def test_long_messages_wrap_inside_the_window_on_every_page(window, qtbot) -> None:
    window.document.new()
    QCoreApplication.processEvents()
    width, sidebar = window.width(), window.steps.width()
    assert width == 1180 and sidebar >= window.steps.sizeHintForColumn(0)

    for step, labels in message_labels(window).items():
        window.show_step(step)
        page = window.pages.currentWidget()
        if step is Step.PREVIEW:
            window.preview_page.warnings.show()
        if step is Step.TRAIN:
            window.train_page.tabs.setCurrentWidget(window.train_page.before_after)
        if step is Step.CHAT:
            window.chat_page.model_box.fit_box.show()
            window.chat_page.panel.setCurrentWidget(window.chat_page.panel.panel_reason)
            conversation = window.chat_page.conversation
            question = conversation.add("user", f"Where is {LONG_PATH}?", None)
            conversation.add("assistant", f"{LONG_ERROR} {LONG_HASH}" * 3, question.id)
            window.chat_page._render()
        QCoreApplication.processEvents()  # the page's own updates first (a theme switch redraws the chat)
        for label in labels:
            label.setText(LONG_ERROR)
        window.context.log(LONG_ERROR)
        QCoreApplication.processEvents()
        assert window.width() == width, f"{step.name} widened the window"
        assert window.steps.width() == sidebar, f"{step.name} narrowed the sidebar"
        for label in labels:
            assert label.isVisible()
            assert right_edge_in(label, page) <= page.width(), f"a {step.name} message runs out of the page"
            assert label.text() == LONG_ERROR  # as set, without the places it may break
        screenshot(window, f"window-long-messages-{step.name.lower()}")

    for labels in message_labels(window).values():
        for label in labels:
            label.clear()
    QCoreApplication.processEvents()
    assert (window.width(), window.steps.width()) == (width, sidebar)


def last_line_bottom(view) -> float:
    """Where the log's last line ends, in viewport pixels."""
    last = view.document().lastBlock()
    return view.blockBoundingGeometry(last).translated(view.contentOffset()).bottom()


def test_the_log_follows_long_wrapped_errors_while_at_the_bottom(window) -> None:
    traceback_like = " ".join([LONG_ERROR] * 4)  # taller, wrapped, than the dock's few lines
    view = window.log_panel.view
    view.setMaximumBlockCount(30)  # the oldest lines go, as after MAX_LOG_LINES, within the test
    scrollbar = view.verticalScrollBar()
    for index in range(60):
        window.context.log(f"{index}: {traceback_like}" if index % 3 == 0 else f"{index}: merged layer {index}")
        if index % 2:
            QCoreApplication.processEvents()
    QCoreApplication.processEvents()
    assert scrollbar.maximum() > 0 and scrollbar.value() == scrollbar.maximum()
    assert view.document().lastBlock().text().endswith("59: merged layer 59")
    assert 0 < last_line_bottom(view) <= view.viewport().height()

    scrollbar.setValue(0)  # the user scrolls up to read an earlier error: the view stays there
    for index in range(60, 64):
        window.context.log(f"{index}: {traceback_like}")
        QCoreApplication.processEvents()
    assert scrollbar.value() < scrollbar.maximum() and last_line_bottom(view) > view.viewport().height()

    scrollbar.setValue(scrollbar.maximum())  # back at the bottom, it follows again
    window.context.log(traceback_like)
    window.context.log("the last line")
    QCoreApplication.processEvents()
    assert scrollbar.value() == scrollbar.maximum()
    assert 0 < last_line_bottom(view) <= view.viewport().height()


def test_a_message_copies_as_it_was_written(qtbot) -> None:
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QGuiApplication

    label = explanation(LONG_ERROR)  # selectable, like every explanation
    qtbot.addWidget(label)
    label.resize(300, label.heightForWidth(300))
    label.show()
    assert label.text() == LONG_ERROR
    label.setFocus()
    label.setSelection(0, len(QLabel.text(label)))  # what it shows: the text and places to break it
    qtbot.keyClick(label, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    assert QGuiApplication.clipboard().text() == LONG_ERROR


def test_a_check_that_outlives_its_page_delivers_nothing_to_it(qtbot, settings, llama_donors) -> None:
    # A page destroyed while its compatibility check runs (a window deleted without closing): the
    # answer must not reach the destroyed widgets, nor the job's end the destroyed context.
    from PySide6.QtCore import QEvent

    from app.core.recipe import parse_recipe
    from app.gui.context import AppContext
    from app.gui.document import RecipeDocument
    from app.gui.pages.models import ModelsPage

    document, context = RecipeDocument(), AppContext(settings)
    page = ModelsPage(document, context)
    experts = "".join(f"  - source_model: {llama_donors[name]}\n" for name in ("expert0", "expert1"))
    document.edit(parse_recipe(f"base_model: {llama_donors['base']}\nexperts:\n{experts}"), "Recipe")
    page._start_check()
    checks = list(context.running)
    assert checks
    page.deleteLater()
    context.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
    for handle in checks:
        assert handle.wait()
    QCoreApplication.processEvents()  # pytest-qt fails the test on an exception raised in a slot
