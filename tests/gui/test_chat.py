"""The chat page with tiny models: load, streaming coloured tokens, the routing panel, stop, regenerate,
branches, files, fallbacks for a model that does not fit, a dense model, and shutting down mid-answer."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QUrl
from PySide6.QtGui import QColor

from app.core.chat import ExpertLegend, LoadMode, LoadRequest, plan_load
from app.core.merge.pipeline import MergeOptions, merge_moe
from app.core.progress import run_job
from app.core.recipe import parse_recipe
from app.gui.context import AppContext
from app.gui.pages.chat import ChatPage, PageState, token_pieces
from app.gui.settings import AppSettings
from tests.chat_models import make_tiny_moe
from tests.core.test_chat_capture import MERGED_RECIPE
from tests.gui.conftest import screenshot

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
    page.device.setCurrentText("cpu")
    page.model_path.setText(str(merged))
    page.load_button.click()
    qtbot.waitUntil(lambda: page.state is PageState.READY, timeout=TIMEOUT_MS)
    assert page.model is not None and page.model.is_moe
    assert "maths" in page.legend_label.text() and "code" in page.legend_label.text()
    assert page.panel_stack.currentIndex() == 0

    batches: list[int] = []
    page.backend.worker.tokens_generated.connect(lambda events: batches.append(len(events)))
    page.max_new_tokens.setValue(40)
    page.seed.setValue(5)
    page.system_prompt.setPlainText("You are terse.")
    page.message_input.setPlainText("What is 2 + 2?")
    answer(qtbot, page, page.send_button.click)

    question, reply = page.conversation.path()
    assert question.content == "What is 2 + 2?" and page.conversation.system_prompt == "You are terse."
    generated = reply.generation.generated
    # Every token reaches the page; the 30-updates-a-second cap is tested with a controlled clock
    # in test_chat_worker.py.
    assert sum(batches) == len(generated)
    assert "tokens/s" in page.stats.text() and "first token after" in page.stats.text()

    # Each token is coloured by the expert most layers chose; then by one layer's choice.
    first = page._shown_tokens[0]
    expected = page._token_background(first)
    assert token_background(page, 0) == expected
    assert expected != page.palette().base().color()
    page.color_by.setCurrentIndex(2)  # layer 1's first choice
    assert token_background(page, 0) == page._token_background(page._shown_tokens[0])

    # Pointing at a token shows its layers x experts router weights with the top-k marked.
    page._token_hovered(QUrl("token:0"))
    heatmap = page.token_map.data
    assert heatmap is not None
    assert heatmap.row_labels == ["layer 0", "layer 1"]
    assert heatmap.column_labels == ["maths", "code", "2"]
    assert [list(row) for row in heatmap.marked] == [list(e) for e in first.experts]
    usage = page.usage_map.data
    assert usage is not None and usage.row_labels[-1] == "all tokens" and len(usage.values) == 3
    assert page.usage.tokens == len([t for t in generated if t.experts])
    # Clicking pins a token: leaving it (an empty hover) keeps it shown, a theme switch too.
    page._link_clicked(QUrl("token:3"))
    page._token_hovered(QUrl())
    assert page.token_map.data is not None and str(page._shown_tokens[3].position) in page.token_map.data.title
    screenshot(page, "chat-panel")
    assert page.token_map.data is not None and str(page._shown_tokens[3].position) in page.token_map.data.title


def test_regenerate_edit_branches_save_load_and_export(qtbot, page: ChatPage, merged: Path, tmp_path: Path) -> None:
    load(qtbot, page, LoadRequest(str(merged), device="cpu"))
    page.max_new_tokens.setValue(6)
    page.seed.setValue(2)  # fixed, so that no answer can end at its first token
    answer(qtbot, page, lambda: page.send("Tell me a story"))
    question, first_reply = page.conversation.path()

    answer(qtbot, page, page.regenerate_button.click)
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
    assert not page.conversation.messages and page.usage_map.data is None
    page.open_conversation(conversation_file)
    assert [m.id for m in page.conversation.path()] == path_before
    assert page._shown_tokens and page.usage_map.data is not None  # the saved routing shows again

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
    page.max_new_tokens.setValue(5000)
    page.seed.setValue(3)
    page.backend.worker.tokens_generated.connect(lambda _events: page.stop_button.click())
    answer(qtbot, page, lambda: page.send("Count to a thousand"))
    reply = page.conversation.path()[-1]
    assert reply.generation.stop_reason == "stopped"
    assert len(reply.generation.generated) < 5000
    assert "ended by the user" in page.stats.text()


def test_a_model_that_does_not_fit_offers_what_does(qtbot, page: ChatPage, merged: Path) -> None:
    full = plan_load(LoadRequest(str(merged), device="cpu", dtype="float32"))
    half = next(o for o in full.options if (o.mode, o.dtype) == (LoadMode.FULL, "bfloat16"))
    limit = (half.needed + full.chosen.needed) // 2
    load(qtbot, page, LoadRequest(str(merged), device="cpu", dtype="float32", memory_limit=limit))
    assert page.state is PageState.NO_MODEL and page.fit_box.isVisible()
    assert "does not fit" in page.fit_message.text()
    labels = [button.text() for button in page.fallback_buttons]
    assert "Load on cpu in bfloat16" in labels
    page.fallback_buttons[labels.index("Load on cpu in bfloat16")].click()
    qtbot.waitUntil(lambda: page.state is PageState.READY, timeout=TIMEOUT_MS)
    assert page.model is not None and "bfloat16" in page.model.description
    assert not page.fit_box.isVisible()

    page.unload_button.click()
    qtbot.waitUntil(lambda: "memory is freed" in page.model_status.text(), timeout=TIMEOUT_MS)
    assert page.state is PageState.NO_MODEL and not page.send_button.isEnabled()


def test_a_dense_model_chats_without_a_panel_and_says_why(qtbot, page: ChatPage, llama_donors) -> None:
    load(qtbot, page, LoadRequest(str(llama_donors["base"]), device="cpu"))
    assert page.panel_stack.currentIndex() == 1
    assert "dense model" in page.panel_reason.text() and "no layer has a router" in page.panel_reason.text()
    page.max_new_tokens.setValue(4)
    answer(qtbot, page, lambda: page.send("hello"))
    assert page.conversation.path()[-1].generation is not None
    assert not page._shown_tokens  # nothing to colour


def test_the_shared_expert_of_a_qwen2_moe_shows_as_always_active(qtbot, page: ChatPage, tmp_path: Path) -> None:
    folder = make_tiny_moe(tmp_path / "qwen2", "qwen2_moe", seed=4)
    load(qtbot, page, LoadRequest(str(folder), device="cpu"))
    assert page.model is not None and page.model.has_shared_expert
    assert "shared expert (always active)" in page.legend_label.text()
    page.max_new_tokens.setValue(5)
    page.seed.setValue(1)  # a random seed may sample the end-of-text token first, leaving nothing to click
    answer(qtbot, page, lambda: page.send("hello"))
    assert page._shown_tokens
    page._link_clicked(QUrl("token:0"))
    heatmap = page.token_map.data
    assert heatmap is not None and heatmap.column_labels[-1] == "shared"
    assert all(row[-1] == 1.0 for row in heatmap.values) and all(4 in row for row in heatmap.marked)
    assert heatmap.row_labels == ["layer 0", "layer 2"]  # layer 1 is dense
    screenshot(page, "chat-panel-qwen2-moe")


def test_model_text_in_rich_text_is_escaped(page: ChatPage) -> None:
    page.legend = ExpertLegend(("<b>bold</b>",), ("#123456",))
    page._update_legend()
    assert "&lt;b&gt;bold&lt;/b&gt;" in page.legend_label.text()


def test_token_pieces_follow_the_answer_text() -> None:
    from app.core.chat import TokenRouting

    def token(text: str) -> TokenRouting:
        return TokenRouting(0, 0, text, True, (0,), ((0,),), ((1.0,),), ((1.0,),))

    pieces = token_pieces("Hello big world!", tuple(token(t) for t in ("Hello", "big", "\ufffd", "world", "!")))
    assert pieces == ["Hello", " big", "", " world", "!"]
    assert "".join(pieces) == "Hello big world!"


def test_closing_the_window_mid_answer_stops_and_joins_the_worker(qtbot, window, merged: Path) -> None:
    chat = window.chat_page
    chat.device.setCurrentText("cpu")
    window.open_in_chat(merged)
    qtbot.waitUntil(lambda: chat.state is PageState.READY, timeout=TIMEOUT_MS)
    chat.max_new_tokens.setValue(100_000)
    chat.seed.setValue(5)
    chat.send("Go on forever")
    with qtbot.waitSignal(chat.backend.worker.tokens_generated, timeout=TIMEOUT_MS):
        pass
    window.close()  # returns once the worker has stopped at its next token and been joined
    assert chat.backend.thread.isFinished()
    reply = chat.conversation.path()[-1]
    assert reply.generation is not None and reply.generation.stop_reason == "stopped"
    assert chat.backend.worker._model is None  # the model's memory is freed
