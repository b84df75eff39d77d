"""The chat page with tiny models: load, streaming coloured tokens, the routing panel, stop, regenerate,
branches, files, fallbacks for a model that does not fit, a dense model, and shutting down mid-answer."""

from __future__ import annotations

import csv
import gc
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QUrl
from PySide6.QtGui import QColor, QFontMetricsF, QPalette, Qt, QTextCharFormat, QTextDocument
from PySide6.QtWidgets import QApplication, QComboBox, QLabel, QMessageBox, QStyle, QStyleOptionComboBox

from app.core.chat import (
    Conversation,
    ExpertLegend,
    Generation,
    LoadMode,
    LoadRequest,
    SamplingSettings,
    TokenRouting,
    plan_load,
)
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import parse_recipe
from app.gui.chat.routing_panel import MIN_ROW_HEIGHT
from app.gui.chat.style import ExpertStyle
from app.gui.chat.transcript import token_pieces
from app.gui.context import AppContext
from app.gui.main_window import MainWindow
from app.gui.pages.chat import ChatPage, PageState
from app.gui.plots import Heatmap
from app.gui.settings import AppSettings
from app.gui.theme import apply_theme
from tests.chat_models import make_tiny_moe
from tests.core.test_chat_capture import MERGED_RECIPE
from tests.gui.conftest import screenshot
from tests.gui.test_garbage import Cycle

TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def merged(llama_donors: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    recipe = parse_recipe(MERGED_RECIPE.format(**llama_donors))
    out = tmp_path_factory.mktemp("chat-gui") / "merged"
    run_job(merge_moe(recipe, MergeOptions(out_dir=out)))
    return out


@pytest.fixture
def page(qtbot, settings: AppSettings) -> Iterator[ChatPage]:
    chat = ChatPage(AppContext(settings))
    qtbot.addWidget(chat)
    chat.resize(1180, 720)
    chat.show()
    yield chat
    assert chat.shutdown()


def load(qtbot, page: ChatPage, request: LoadRequest) -> None:
    page.load_model(request)
    qtbot.waitUntil(lambda: page.state is not PageState.LOADING, timeout=TIMEOUT_MS)


def answer(qtbot, page: ChatPage, action) -> None:
    action()
    assert page.is_answering
    qtbot.waitUntil(lambda: page.state is PageState.READY, timeout=TIMEOUT_MS)


def anchor_formats(page: ChatPage, kind: str = "token") -> dict[str, QTextCharFormat]:
    """The character format of each link of a kind (token, edit, branch) in the transcript, by its text."""
    formats = {}
    block = page.transcript.document().begin()
    while block.isValid():
        fragments = block.begin()
        while not fragments.atEnd():
            fragment = fragments.fragment()
            if fragment.charFormat().anchorHref().startswith(f"{kind}:"):
                formats[fragment.text()] = fragment.charFormat()
            fragments += 1
        block = block.next()
    return formats


def shown_tooltip(tooltip: str) -> str:
    """What Qt's tooltip shows for this text: it is rich text when Qt guesses it is, else plain."""
    if not Qt.mightBeRichText(tooltip):
        return tooltip
    document = QTextDocument()
    document.setHtml(tooltip)
    return document.toPlainText()


def plain_sampling(page: ChatPage, seed: int) -> None:
    """Sampling from the whole distribution, so that a seed picks the answer alone."""
    page.sampling.temperature.setValue(1.0)
    page.sampling.top_p.setValue(1.0)
    page.sampling.top_k.setValue(0)
    page.sampling.max_new_tokens.setValue(40)
    page.sampling.seed.setValue(seed)


def token_background(page: ChatPage, index: int) -> QColor:
    """The background of the index-th coloured token in the transcript."""
    document = page.transcript.document()
    block = document.begin()
    while block.isValid():
        fragments = block.begin()
        while not fragments.atEnd():
            fragment = fragments.fragment()
            if fragment.charFormat().anchorHref() == f"token:{index}":
                return fragment.charFormat().background().color()
            fragments += 1
        block = block.next()
    raise AssertionError(f"no token {index} in the transcript")


def test_a_merged_model_streams_coloured_tokens_and_the_panel_follows(qtbot, page: ChatPage, merged: Path) -> None:
    page.model_box.device.setCurrentText("cpu")
    page.model_box.model_path.setText(str(merged))
    page.model_box.load_button.click()
    qtbot.waitUntil(lambda: page.state is PageState.READY, timeout=TIMEOUT_MS)
    assert page.model is not None and page.model.is_moe
    assert "maths" in page.panel.legend_label.text() and "code" in page.panel.legend_label.text()
    assert page.panel.currentIndex() == 0

    batches: list[int] = []
    page.backend.worker.tokens_generated.connect(lambda events: batches.append(len(events)))
    page.sampling.max_new_tokens.setValue(40)
    page.sampling.seed.setValue(5)
    page.sampling.system_prompt.setPlainText("You are terse.")
    page.controls.message_input.setPlainText("What is 2 + 2?")
    answer(qtbot, page, page.controls.send_button.click)

    question, reply = page.conversation.path()
    assert question.content == "What is 2 + 2?" and page.conversation.system_prompt == "You are terse."
    generated = reply.generation.generated
    # Every token reaches the page; the 30-updates-a-second cap is tested with a controlled clock
    # in test_chat_worker.py.
    assert sum(batches) == len(generated)
    assert "tokens/s" in page.controls.stats.text() and "first token after" in page.controls.stats.text()

    # Each token is coloured by the expert most layers chose; then by one layer's choice.
    first = page.transcript.shown_tokens[0]
    expected = page.transcript.token_background(first)
    assert token_background(page, 0) == expected
    assert expected != page.palette().base().color()
    page.panel.color_by.setCurrentIndex(2)  # layer 1's first choice
    assert token_background(page, 0) == page.transcript.token_background(page.transcript.shown_tokens[0])

    # Pointing at a token shows its layers x experts router weights with the top-k marked.
    page.transcript.highlighted.emit(QUrl("token:0"))
    heatmap = page.panel.token_map.data
    assert heatmap is not None
    assert heatmap.row_labels == ["layer 0", "layer 1"]
    assert heatmap.column_labels == ["maths", "code", "2"]
    assert [list(row) for row in heatmap.marked] == [list(e) for e in first.experts]
    usage = page.panel.usage_map.data
    assert usage is not None and usage.row_labels[-1] == "all tokens" and len(usage.values) == 3
    assert page.usage.tokens == len([t for t in generated if t.experts])
    # Clicking pins a token: leaving it (an empty hover) keeps it shown, a theme switch too.
    pinned = page.transcript.shown_tokens[3]
    page.transcript.anchorClicked.emit(QUrl("token:3"))
    page.transcript.highlighted.emit(QUrl())
    assert page.panel.token_map.data is not None and str(pinned.position) in page.panel.token_map.data.title
    screenshot(page, "chat-panel")
    assert page.panel.token_map.data is not None and str(pinned.position) in page.panel.token_map.data.title


def test_regenerate_edit_branches_save_load_and_export(qtbot, page: ChatPage, merged: Path, tmp_path: Path) -> None:
    load(qtbot, page, LoadRequest(str(merged), device="cpu"))
    page.sampling.max_new_tokens.setValue(6)
    page.sampling.seed.setValue(2)  # fixed, so that no answer can end at its first token
    answer(qtbot, page, lambda: page.send("Tell me a story"))
    question, first_reply = page.conversation.path()

    answer(qtbot, page, page.controls.regenerate_button.click)
    assert [m.id for m in page.conversation.siblings(first_reply.id)][:1] == [first_reply.id]
    assert len(page.conversation.siblings(first_reply.id)) == 2
    assert "2/2" in page.transcript.toPlainText()

    answer(qtbot, page, lambda: page.edit_message(question.id, "Write some python code"))
    edited, edited_reply = page.conversation.path()
    assert edited.content == "Write some python code" and edited_reply.generation is not None
    assert len(page.conversation.siblings(question.id)) == 2  # the old branch is kept
    page.select_branch(question.id)
    assert page.conversation.path()[0].id == question.id
    assert "Tell me a story" in page.transcript.toPlainText()

    conversation_file = tmp_path / "chat.json"
    page.save_conversation(conversation_file)
    path_before = [m.id for m in page.conversation.path()]
    page.clear()
    assert not page.conversation.messages and page.panel.usage_map.data is None
    page.open_conversation(conversation_file)
    assert [m.id for m in page.conversation.path()] == path_before
    assert page.transcript.shown_tokens and page.panel.usage_map.data is not None  # the saved routing shows again

    page.export_markdown(tmp_path / "chat.md")
    assert "Tell me a story" in (tmp_path / "chat.md").read_text()
    page.export_trace(tmp_path / "trace.jsonl")
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert records[-1]["generated"] and not records[0]["generated"] and records[-1]["layers"] == [0, 1]
    page.export_usage(tmp_path / "usage.csv")
    rows = list(csv.reader(io.StringIO((tmp_path / "usage.csv").read_text())))
    assert rows[0] == ["layer", "maths", "code", "expert 2"] and rows[-1][0] == "tokens"


def test_stop_takes_effect_at_the_next_token(qtbot, page: ChatPage, merged: Path) -> None:
    load(qtbot, page, LoadRequest(str(merged), device="cpu"))
    page.sampling.max_new_tokens.setValue(5000)
    page.sampling.seed.setValue(3)
    page.backend.worker.tokens_generated.connect(lambda _events: page.controls.stop_button.click())
    answer(qtbot, page, lambda: page.send("Count to a thousand"))
    reply = page.conversation.path()[-1]
    assert reply.generation.stop_reason == "stopped"
    assert len(reply.generation.generated) < 5000
    assert "ended by the user" in page.controls.stats.text()


def test_a_model_that_does_not_fit_offers_what_does(qtbot, page: ChatPage, merged: Path) -> None:
    full = plan_load(LoadRequest(str(merged), device="cpu", dtype="float32"))
    half = next(o for o in full.options if (o.mode, o.dtype) == (LoadMode.FULL, "bfloat16"))
    limit = (half.needed + full.chosen.needed) // 2
    load(qtbot, page, LoadRequest(str(merged), device="cpu", dtype="float32", memory_limit=limit))
    assert page.state is PageState.NO_MODEL and page.model_box.fit_box.isVisible()
    assert "does not fit" in page.model_box.fit_message.text()
    labels = [button.text() for button in page.model_box.fallback_buttons]
    assert "Load on cpu in bfloat16" in labels
    page.model_box.fallback_buttons[labels.index("Load on cpu in bfloat16")].click()
    qtbot.waitUntil(lambda: page.state is PageState.READY, timeout=TIMEOUT_MS)
    assert page.model is not None and "bfloat16" in page.model.description
    assert not page.model_box.fit_box.isVisible()

    page.model_box.unload_button.click()
    qtbot.waitUntil(lambda: "memory is freed" in page.model_box.model_status.text(), timeout=TIMEOUT_MS)
    assert page.state is PageState.NO_MODEL and not page.controls.send_button.isEnabled()


def test_unloading_in_the_chat_worker_leaves_cycles_to_the_gui_thread(qtbot, page: ChatPage, merged: Path) -> None:
    # The chat worker unloads in its own thread; a cycle freed there may hold a Qt object.
    load(qtbot, page, LoadRequest(str(merged), device="cpu"))
    Cycle.finalized_in.clear()
    Cycle()
    page.model_box.unload_button.click()
    qtbot.waitUntil(lambda: "memory is freed" in page.model_box.model_status.text(), timeout=TIMEOUT_MS)
    main_thread = threading.main_thread().name
    assert Cycle.finalized_in in ([], [main_thread])  # the GUI's collector may have run meanwhile
    gc.collect()
    assert Cycle.finalized_in == [main_thread]


def test_a_dense_model_chats_without_a_panel_and_says_why(qtbot, page: ChatPage, llama_donors) -> None:
    load(qtbot, page, LoadRequest(str(llama_donors["base"]), device="cpu"))
    assert page.panel.currentIndex() == 1
    assert "dense model" in page.panel.panel_reason.text() and "no layer has a router" in page.panel.panel_reason.text()
    page.sampling.max_new_tokens.setValue(4)
    answer(qtbot, page, lambda: page.send("hello"))
    assert page.conversation.path()[-1].generation is not None
    assert not page.transcript.shown_tokens  # nothing to colour


def test_a_folder_without_config_json_shows_the_problem_and_the_fix(qtbot, page: ChatPage, tmp_path: Path) -> None:
    folder = tmp_path / "no-config"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    load(qtbot, page, LoadRequest(str(folder), device="cpu"))
    assert page.state is PageState.NO_MODEL
    status = page.model_box.model_status.text()
    assert "has no config.json" in status and "Fix: Point at the folder that holds config.json" in status
    assert "FileNotFoundError" not in status


def test_the_shared_expert_of_a_qwen2_moe_shows_as_always_active(qtbot, page: ChatPage, tmp_path: Path) -> None:
    folder = make_tiny_moe(tmp_path / "qwen2", "qwen2_moe", seed=4)
    load(qtbot, page, LoadRequest(str(folder), device="cpu"))
    assert page.model is not None and page.model.has_shared_expert
    assert "shared expert (always active)" in page.panel.legend_label.text()
    page.sampling.max_new_tokens.setValue(5)
    page.sampling.seed.setValue(1)  # a random seed may sample the end-of-text token first, leaving nothing to click
    answer(qtbot, page, lambda: page.send("hello"))
    assert page.transcript.shown_tokens
    page.transcript.anchorClicked.emit(QUrl("token:0"))
    heatmap = page.panel.token_map.data
    assert heatmap is not None and heatmap.column_labels[-1] == "shared"
    assert all(row[-1] == 1.0 for row in heatmap.values) and all(4 in row for row in heatmap.marked)
    assert heatmap.row_labels == ["layer 0", "layer 2"]  # layer 1 is dense
    screenshot(page, "chat-panel-qwen2-moe")


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_moe(tmp_path_factory.mktemp("chat-qwen3") / "qwen3", "qwen3_moe", seed=11)


def test_the_token_that_ends_an_answer_is_neither_shown_nor_exported(
    qtbot, page: ChatPage, qwen3_moe: Path, tmp_path: Path
) -> None:
    load(qtbot, page, LoadRequest(str(qwen3_moe), device="cpu"))
    plain_sampling(page, seed=34)  # this tiny model's answer then ends with its end-of-text token, "</s>"
    answer(qtbot, page, lambda: page.send("What is 2 plus 2?"))
    reply = page.conversation.path()[-1]
    assert reply.generation.stop_reason == "eos" and reply.generation.generated[-1].token == "</s>"
    assert page.transcript.shown_tokens and "</s>" not in page.transcript.toPlainText()
    page.export_markdown(tmp_path / "chat.md")
    assert "</s>" not in (tmp_path / "chat.md").read_text(encoding="utf-8")
    page.save_conversation(tmp_path / "chat.json")
    page.open_conversation(tmp_path / "chat.json")  # not streamed: the pieces come from the text
    assert page.transcript.shown_tokens and "</s>" not in page.transcript.toPlainText()


def test_token_tooltips_show_the_token_and_its_expert_as_written(page: ChatPage) -> None:
    def token(position: int, text: str, expert: int) -> TokenRouting:
        probs = (0.75, 0.25) if expert == 0 else (0.25, 0.75)
        return TokenRouting(position, position, text, True, (0,), ((expert,),), ((1.0,),), (probs,))

    tokens = (token(5, "8", 0), token(6, "&lt;", 1), token(7, "  <i>x</i>", 1))
    conversation = Conversation()
    question = conversation.add("user", "hi", None)
    generation = Generation(SamplingSettings(seed=1), 1, "eos", 0.1, 1.0, (), tokens)
    conversation.add("assistant", "8&lt;  <i>x</i>", question.id, generation)
    page.conversation = conversation
    page.legend = ExpertLegend(("Arithmetic", "<b>code</b> & more"), ("#123456", "#654321"))
    page._render()
    tooltips = {text: shown_tooltip(char_format.toolTip()) for text, char_format in anchor_formats(page).items()}
    assert tooltips == {
        "8": "'8': Arithmetic",
        "&lt;": "'&lt;': <b>code</b> & more",
        "  <i>x</i>": "'  <i>x</i>': <b>code</b> & more",
    }


def assert_heatmap_reads(heatmap: Heatmap) -> None:
    """Every text of the plot whole and inside its place, and every row at least MIN_ROW_HEIGHT high."""
    data, layout = heatmap.data, heatmap.layout_for(heatmap.width(), heatmap.height())
    assert data is not None and layout is not None
    base_font, title_font = heatmap.fonts()
    metrics, title_metrics = QFontMetricsF(base_font), QFontMetricsF(title_font)
    assert " ".join(layout.title_lines) == data.title
    assert all(title_metrics.horizontalAdvance(line) <= layout.title_rect.width() for line in layout.title_lines)
    assert len(layout.title_lines) * title_metrics.height() <= layout.title_rect.height() + 1
    assert layout.column_labels == list(data.column_labels)
    room = layout.column_label_height if layout.vertical_column_labels else layout.cell_width
    assert all(metrics.horizontalAdvance(label) <= room for label in layout.column_labels)
    assert layout.legend_label == data.legend_label
    assert metrics.horizontalAdvance(layout.legend_label) <= layout.bar.height()
    assert layout.cell_height >= MIN_ROW_HEIGHT


def assert_texts_fit(widget) -> None:
    """Every one-line label and combo box under widget shows its whole text."""
    for label in widget.findChildren(QLabel):
        if label.isVisible() and not label.wordWrap() and label.textFormat() != Qt.TextFormat.RichText:
            assert label.fontMetrics().horizontalAdvance(label.text()) <= label.contentsRect().width(), label.text()
    for combo in widget.findChildren(QComboBox):
        if combo.isVisible():
            option = QStyleOptionComboBox()
            combo.initStyleOption(option)
            field = combo.style().subControlRect(
                QStyle.ComplexControl.CC_ComboBox, option, QStyle.SubControl.SC_ComboBoxEditField, combo
            )
            assert combo.fontMetrics().horizontalAdvance(combo.currentText()) <= field.width(), combo.currentText()


@pytest.mark.parametrize("layers", [2, 8])
def test_the_routing_panel_reads_at_the_default_window_size(qtbot, window, tmp_path: Path, layers: int) -> None:
    names = ("Arithmetic", "Python code", "Short stories", "French")
    folder = make_tiny_moe(tmp_path / f"moe-{layers}", "mixtral", seed=5, layers=layers, expert_names=names)
    window.document.new()
    chat = window.chat_page
    chat.model_box.device.setCurrentText("cpu")
    window.open_in_chat(folder)
    qtbot.waitUntil(lambda: chat.state is PageState.READY, timeout=TIMEOUT_MS)
    assert "Short&nbsp;stories" in chat.panel.legend_label.text()  # the names reached the panel
    chat.sampling.max_new_tokens.setValue(8)
    chat.sampling.seed.setValue(5)
    answer(qtbot, chat, lambda: chat.send("What is 2 plus 2?"))
    chat.transcript.anchorClicked.emit(QUrl(f"token:{len(chat.transcript.shown_tokens) - 1}"))
    qtbot.waitUntil(lambda: chat.panel.token_map.height() >= chat.panel.token_map.minimumSizeHint().height())

    assert_heatmap_reads(chat.panel.token_map)
    assert_heatmap_reads(chat.panel.usage_map)
    assert_texts_fit(chat.panel)
    area = chat.panel.plots_area
    assert chat.panel.token_map.width() <= area.viewport().width()  # nothing hides beyond the right edge
    if layers == 8:
        assert area.verticalScrollBar().maximum() > 0  # the rows keep their height; the panel scrolls
    screenshot(window, f"chat-routing-{layers}-layers")
    apply_theme(QApplication.instance(), "dark")  # the links are redrawn in the new theme's colour
    assert anchor_formats(chat, "edit")["edit"].foreground().color() == chat.palette().color(QPalette.ColorRole.Link)
    apply_theme(QApplication.instance(), "light")

    chat.side_tabs.setCurrentIndex(1)
    qtbot.waitUntil(lambda: chat.sampling.system_prompt.isVisible())
    prompt = chat.sampling.system_prompt
    assert prompt.height() >= 5 * prompt.fontMetrics().lineSpacing()
    assert prompt.width() >= 0.8 * chat.side_tabs.currentWidget().width()
    assert_texts_fit(chat.sampling)
    screenshot(window, f"chat-settings-{layers}-layers")


def test_model_text_in_rich_text_is_escaped(qtbot, page: ChatPage, tmp_path: Path) -> None:
    page.panel.show_legend(ExpertStyle(ExpertLegend(("<b>bold</b>",), ("#123456",))))
    assert "&lt;b&gt;bold&lt;/b&gt;" in page.panel.legend_label.text()
    # Labels that show a model's name, path or errors show them as written, markup or not.
    page.load_model(LoadRequest(str(tmp_path / "<b>no such model</b>"), device="cpu"))
    qtbot.waitUntil(lambda: page.state is PageState.NO_MODEL, timeout=TIMEOUT_MS)
    page.panel.show_unavailable("<i>dense</i> is a dense model")
    for label in (page.model_box.model_status, page.panel.panel_reason):
        assert "<" in label.text() and label.textFormat() == Qt.TextFormat.PlainText


def test_token_pieces_follow_the_answer_text() -> None:
    from app.core.chat import TokenRouting

    def token(text: str) -> TokenRouting:
        return TokenRouting(0, 0, text, True, (0,), ((0,),), ((1.0,),), ((1.0,),))

    pieces = token_pieces("Hello big world!", tuple(token(t) for t in ("Hello", "big", "\ufffd", "world", "!")))
    assert pieces == ["Hello", " big", "", " world", "!"]
    assert "".join(pieces) == "Hello big world!"


@pytest.fixture
def replies(answer: dict) -> dict:
    """The window's answers to its questions (the conftest's `answer`, named apart from the helper here)."""
    return answer


def test_quitting_mid_answer_asks_then_stops_and_keeps_the_conversation(
    qtbot, window, replies: dict, settings: AppSettings, merged: Path
) -> None:
    chat = window.chat_page
    chat.model_box.device.setCurrentText("cpu")
    window.open_in_chat(merged)
    qtbot.waitUntil(lambda: chat.state is PageState.READY, timeout=TIMEOUT_MS)
    chat.sampling.max_new_tokens.setValue(100_000)
    chat.sampling.seed.setValue(5)
    chat.sampling.system_prompt.setPlainText("Be verbose.")
    chat.send("Go on forever")
    with qtbot.waitSignal(chat.backend.worker.tokens_generated, timeout=TIMEOUT_MS):
        pass

    replies["question"] = QMessageBox.StandardButton.No
    assert not window.close()
    assert "Stop the chat's answer and quit?" in replies["asked"][-1] and "conversation is kept" in replies["asked"][-1]
    assert window.isVisible() and chat.is_answering  # refusing stops nothing
    with qtbot.waitSignal(chat.backend.worker.tokens_generated, timeout=TIMEOUT_MS):
        pass

    replies["question"] = QMessageBox.StandardButton.Yes
    assert window.close()  # returns once the worker has stopped at its next token and been joined
    assert chat.backend.thread.isFinished()
    reply = chat.conversation.path()[-1]
    assert reply.generation is not None and reply.generation.stop_reason == "stopped"
    assert chat.backend.worker._model is None  # the model's memory is freed

    # The same model, opened again (here by a new window), brings the conversation back, unfinished answer included.
    again = MainWindow(settings)
    qtbot.addWidget(again)
    again.chat_page.model_box.device.setCurrentText("cpu")
    again.open_in_chat(merged)
    qtbot.waitUntil(lambda: again.chat_page.state is PageState.READY, timeout=TIMEOUT_MS)
    restored = again.chat_page
    question, reply = restored.conversation.path()
    assert question.content == "Go on forever" and restored.conversation.system_prompt == "Be verbose."
    assert reply.generation.stop_reason == "stopped" and reply.generation.generated
    assert restored.sampling.system_prompt.toPlainText() == "Be verbose."
    assert "Go on forever" in restored.transcript.toPlainText() and restored.transcript.shown_tokens
    assert "last conversation is back" in restored.model_box.model_status.text()
    assert again.close()


def test_a_model_loaded_beside_a_conversation_offers_its_own(qtbot, page: ChatPage, tmp_path: Path) -> None:
    first = make_tiny_moe(tmp_path / "first", "mixtral", seed=5)
    second = make_tiny_moe(tmp_path / "second", "mixtral", seed=6)
    load(qtbot, page, LoadRequest(str(second), device="cpu"))
    page.sampling.max_new_tokens.setValue(3)
    page.sampling.seed.setValue(5)
    answer(qtbot, page, lambda: page.send("Kept with the second model"))
    page.unload_model()
    page.clear()  # with no model loaded, nothing autosaved changes
    load(qtbot, page, LoadRequest(str(first), device="cpu"))
    assert not page.conversation.messages  # the first model has no conversation of its own yet
    answer(qtbot, page, lambda: page.send("Held with the first model"))

    load(qtbot, page, LoadRequest(str(second), device="cpu"))  # the first model's conversation stays shown
    assert page.conversation.path()[0].content == "Held with the first model"
    assert page.controls.restore_button.isVisible()
    page.controls.restore_button.click()
    assert page.conversation.path()[0].content == "Kept with the second model"
    assert not page.controls.restore_button.isVisible()

    page.controls.clear_button.click()  # clearing means it: nothing comes back
    load(qtbot, page, LoadRequest(str(second), device="cpu"))
    assert not page.conversation.messages and not page.controls.restore_button.isVisible()
