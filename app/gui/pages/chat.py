"""Chat page: load a model, chat with it, and watch which experts its routers choose for every token.

The model lives in the chat worker's thread (:mod:`app.gui.chat_worker`); this page only sends it
requests and shows what comes back. Its widgets live in :mod:`app.gui.chat`: the model box, the
transcript, the routing panel and the controls; the page owns the conversation and the state.

The conversation is autosaved for its model after every change and when the app closes, even
mid-answer, and comes back when that model is loaded again.
"""

from __future__ import annotations

from enum import Enum, auto
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFrame,
    QInputDialog,
    QMessageBox,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.chat import (
    Conversation,
    ExpertLegend,
    ExpertUsage,
    LoadRequest,
    Message,
    ModelDoesNotFit,
    PromptProcessed,
    TokenGenerated,
    TokenRouting,
    write_trace,
)
from app.core.eval.controls import RoutingOverride
from app.core.problems import FrankenMoEError
from app.gui.chat.controls import MessageControls, SamplingForm
from app.gui.chat.expert_controls import ExpertControls
from app.gui.chat.files import AutosavedConversations, run_file_action
from app.gui.chat.model_box import ModelBox
from app.gui.chat.routing_panel import RoutingPanel
from app.gui.chat.style import ExpertStyle
from app.gui.chat.transcript import TranscriptView, describe_generation
from app.gui.chat_worker import AnswerKind, AnswerRequest, ChatBackend, LoadedModel
from app.gui.context import AppContext, describe_error
from app.gui.ship import open_export_dialog, open_publish_dialog
from app.gui.widgets import explanation, heading

CONVERSATION_FILTER = "FrankenMoE conversations (*.json);;All files (*)"


class PageState(Enum):
    NO_MODEL = auto()
    LOADING = auto()
    READY = auto()
    ANSWERING = auto()


class ChatPage(QWidget):
    evaluate_requested = Signal(object)  # the model's folder or Hub id, as loaded

    def __init__(self, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.context = context
        self.backend = ChatBackend(self)
        self.autosaved = AutosavedConversations(context)
        self.state = PageState.NO_MODEL
        self.model: LoadedModel | None = None
        self.conversation = Conversation()
        self.legend = ExpertLegend.default(0)
        self.usage: ExpertUsage | None = None
        self._pinned_token: TokenRouting | None = None
        self._streamed: list[TokenGenerated] = []
        self._loading: str = ""  # the model being loaded, as requested
        self._model_key: str = ""  # the model loaded, as requested: its conversation is autosaved for it

        self.model_box = ModelBox(context.settings.device, context.settings.dtype)
        self.model_box.load_requested.connect(self.load_model)
        self.model_box.cancel_button.clicked.connect(self.backend.cancel.set)
        self.model_box.unload_button.clicked.connect(self.unload_model)
        self.model_box.evaluate_button.clicked.connect(lambda: self.evaluate_requested.emit(self._model_key))
        self.model_box.export_button.clicked.connect(self._export)
        self.model_box.publish_button.clicked.connect(self._publish)

        worker = self.backend.worker
        worker.load_progress.connect(self.model_box.show_progress)
        worker.loaded.connect(self._loaded)
        worker.load_failed.connect(self._load_failed)
        worker.load_cancelled.connect(self._load_cancelled)
        worker.unloaded.connect(self._unloaded)
        worker.prompt_processed.connect(self._prompt_processed)
        worker.tokens_generated.connect(self._tokens_generated)
        worker.answer_finished.connect(self._answer_finished)
        worker.answer_failed.connect(self._answer_failed)

        self.transcript = TranscriptView()
        self.transcript.token_pointed.connect(self._show_token)
        self.transcript.token_clicked.connect(self._pin_token)
        self.transcript.branch_clicked.connect(self.select_branch)
        self.transcript.edit_clicked.connect(self._edit_dialog)
        self.transcript.palette_changed.connect(self._palette_changed)
        self.controls = MessageControls()
        controls = self.controls
        controls.send_button.clicked.connect(lambda: self.send(controls.message_input.toPlainText()))
        controls.stop_button.clicked.connect(self.stop)
        controls.regenerate_button.clicked.connect(self.regenerate)
        controls.clear_button.clicked.connect(self.clear)
        controls.save_button.clicked.connect(self._save_dialog)
        controls.open_button.clicked.connect(self._open_dialog)
        controls.markdown_button.clicked.connect(self._markdown_dialog)
        controls.restore_button.clicked.connect(self.restore_last_conversation)

        self.panel = RoutingPanel()
        self.panel.color_by.currentIndexChanged.connect(self._color_by_changed)
        self.panel.export_trace_button.clicked.connect(self._trace_dialog)
        self.panel.export_usage_button.clicked.connect(self._usage_dialog)
        self.sampling = SamplingForm()
        self.side_tabs = QTabWidget()
        self.side_tabs.addTab(self.panel, "Routing")
        settings_area = QScrollArea()
        settings_area.setWidget(self.sampling)
        settings_area.setWidgetResizable(True)
        settings_area.setFrameShape(QFrame.Shape.NoFrame)
        settings_area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.side_tabs.addTab(settings_area, "Settings")
        self.experts = ExpertControls()
        self.experts.override_changed.connect(self.backend.set_routing)
        self.side_tabs.addTab(self.experts, "Experts")

        column = QWidget()
        column_layout = QVBoxLayout(column)
        column_layout.setContentsMargins(0, 0, 0, 0)
        column_layout.addWidget(self.transcript, 1)
        column_layout.addWidget(self.controls)

        layout = QVBoxLayout(self)
        layout.addWidget(heading("7  Chat"))
        layout.addWidget(
            explanation(
                "Chat with a merged model, any Mixtral, Qwen2-MoE or Qwen3-MoE model folder, or a downloaded "
                "Hub model. Each token of an answer is coloured by the expert its router chose; point at a "
                "token to see what every layer chose for it."
            )
        )
        layout.addWidget(self.model_box)
        splitter = QSplitter()
        splitter.addWidget(column)
        splitter.addWidget(self.side_tabs)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        splitter.setChildrenCollapsible(False)
        layout.addWidget(splitter, 1)
        self._set_state(PageState.NO_MODEL)
        self._render()

    # ------------------------------------------------------------------ state

    def _palette_changed(self) -> None:
        # The transcript's colours come from the palette; a theme switch redraws it (an answer
        # being streamed keeps its colours until it ends and is redrawn anyway).
        if not self.is_answering:
            self._render()

    def _set_state(self, state: PageState) -> None:
        self.state = state
        idle = state in (PageState.NO_MODEL, PageState.READY)
        ready = state is PageState.READY
        has_messages = bool(self.conversation.messages)
        self.model_box.set_enabled_for(idle, state is PageState.LOADING, ready)
        self.model_box.evaluate_button.setEnabled(ready)
        for button in (self.model_box.export_button, self.model_box.publish_button):
            button.setEnabled(ready and self._model_folder is not None)
        controls = self.controls
        controls.send_button.setEnabled(ready)
        controls.stop_button.setEnabled(state is PageState.ANSWERING)
        controls.regenerate_button.setEnabled(ready and has_messages)
        for button in (controls.clear_button, controls.save_button, controls.markdown_button):
            button.setEnabled(idle and has_messages)
        controls.open_button.setEnabled(idle)
        controls.restore_button.setEnabled(ready)
        self.panel.export_trace_button.setEnabled(idle and self._latest_answer() is not None)
        self.panel.export_usage_button.setEnabled(idle and self.usage is not None and self.usage.tokens > 0)

    @property
    def is_answering(self) -> bool:
        return self.state is PageState.ANSWERING

    @property
    def expert_style(self) -> ExpertStyle:
        return ExpertStyle(self.legend, self.model is not None and self.model.has_shared_expert)

    @property
    def _model_folder(self) -> Path | None:
        """The loaded model's folder, when it was loaded from one (not from a Hub id)."""
        folder = Path(self._model_key).expanduser() if self._model_key else None
        return folder if folder is not None and folder.is_dir() else None

    def _export(self) -> None:
        if self._model_folder is not None:
            open_export_dialog(self._model_folder, self.context, self)

    def _publish(self) -> None:
        if self._model_folder is not None:
            open_publish_dialog(self._model_folder, self.context, self)

    # ------------------------------------------------------------------ loading

    def set_model(self, folder: Path) -> None:
        """A model to chat with, e.g. the one just merged: loaded at once unless the page is busy."""
        self.model_box.set_model(str(folder))
        if self.state in (PageState.NO_MODEL, PageState.READY):
            self.load_model(self.model_box.request_from_controls())

    def load_model(self, request: LoadRequest) -> None:
        box = self.model_box
        if not request.model:
            box.model_status.setText("Choose a model folder, or type a downloaded Hub id.")
            return
        box.fit_box.setVisible(False)
        self.model = None
        self._reset_routing(None)
        box.load_progress.setValue(0)
        box.model_status.setText(f"Loading {request.model}…")
        self._set_state(PageState.LOADING)
        self._loading, self._model_key = request.model, ""
        self.controls.restore_button.setVisible(False)
        self.context.log(f"Chat: loading {request.model}")
        self.backend.load(request)

    def unload_model(self) -> None:
        self.model = None
        self._model_key = ""
        self._reset_routing(None)
        self.model_box.model_status.setText("Unloading…")
        self._set_state(PageState.NO_MODEL)
        self.backend.unload()

    def _loaded(self, model: LoadedModel) -> None:
        self.model = model
        self.legend = model.legend
        self.model_box.model_status.setText(f"{model.name} loaded {model.description}.")
        self.context.log(f"Chat: loaded {model.name} {model.description}")
        self.panel.show_unavailable(model.panel_unavailable_reason)
        self.panel.fill_color_by(model.layers)
        self._reset_routing(model)
        self._model_key = self._loading
        self._set_state(PageState.READY)
        self._offer_last_conversation()
        self._render()

    def _load_failed(self, error: BaseException) -> None:
        self._set_state(PageState.NO_MODEL)
        if isinstance(error, ModelDoesNotFit):
            self.model_box.offer_fallbacks(error)
            self.model_box.model_status.setText("The model does not fit; choose a way that does, below.")
        else:
            self.model_box.model_status.setText(f"Cannot load the model: {describe_error(error)}")
        self.context.log(f"Chat: loading failed: {describe_error(error)}")

    def _load_cancelled(self) -> None:
        self.model_box.model_status.setText("Loading cancelled.")
        self._set_state(PageState.NO_MODEL)

    def _reset_routing(self, model: LoadedModel | None) -> None:
        """A newly loaded (or no) model starts with its own routing."""
        self.backend.set_routing(RoutingOverride())
        moe = model is not None and model.is_moe
        self.experts.set_model(len(self.legend.labels) if moe else 0, model.top_k if moe else 0, self.expert_style)

    def _unloaded(self) -> None:
        if self.state is PageState.NO_MODEL:
            self.model_box.model_status.setText("No model loaded: its memory is freed.")

    # ------------------------------------------------------------------ chatting

    def send(self, text: str) -> None:
        if self.state is not PageState.READY or not text.strip():
            return
        self.controls.message_input.clear()
        self._start_answer(AnswerKind.SEND, self.conversation.path(), pending=text, text=text)

    def regenerate(self) -> None:
        path = self.conversation.path()
        if self.state is not PageState.READY or not path:
            return
        question = len(path) if path[-1].role == "user" else len(path) - 1
        self._start_answer(AnswerKind.REGENERATE, path[:question])

    def edit_message(self, message_id: str, text: str) -> None:
        """A new version of an earlier message on a branch of its own; an edited question is answered."""
        if self.state is not PageState.READY or not text.strip():
            return
        message = self.conversation.messages[message_id]
        if message.role == "assistant":
            self.conversation.edit(message_id, text)
            self._autosave()
            self._render()
            return
        before = self.conversation.path(message.parent) if message.parent else []
        self._start_answer(AnswerKind.EDIT, before, pending=text, text=text, message_id=message_id)

    def _edit_dialog(self, message_id: str) -> None:
        if self.state is PageState.ANSWERING:
            return  # the conversation is the worker's until the answer ends
        text, ok = QInputDialog.getMultiLineText(
            self,
            "Edit the message",
            "The edited message starts a new branch; the old one stays (◀ ▶ switch between them):",
            self.conversation.messages[message_id].content,
        )
        if ok:
            self.edit_message(message_id, text)

    def select_branch(self, message_id: str) -> None:
        if self.state is not PageState.ANSWERING:
            self.conversation.select(message_id)
            self._autosave()
            self._render()

    def stop(self) -> None:
        self.backend.stop.set()

    def clear(self) -> None:
        if self.state in (PageState.NO_MODEL, PageState.READY):
            self.conversation.clear()
            self._pinned_token = None
            self._autosave()
            self._render()

    def _start_answer(
        self, kind: AnswerKind, shown: list[Message], pending: str = "", text: str = "", message_id: str = ""
    ) -> None:
        self.conversation.system_prompt = self.sampling.system_prompt.toPlainText().strip()
        try:
            settings = self.sampling.sampling_settings().validated()
        except FrankenMoEError as error:
            QMessageBox.warning(self, "Check the settings", describe_error(error))
            return
        self._streamed = []
        self._render(shown, pending_question=pending, answering=True)
        self.controls.stats.setText("Reading the prompt…")
        self._set_state(PageState.ANSWERING)
        self.backend.answer(AnswerRequest(kind, self.conversation, settings, text, message_id))

    def _prompt_processed(self, event: PromptProcessed) -> None:
        self.controls.stats.setText(f"Prompt of {len(event.tokens)} tokens read in {event.seconds:.2f} s")

    def _tokens_generated(self, events: list[TokenGenerated]) -> None:
        if not self.is_answering:
            return
        self._streamed.extend(events)
        self.transcript.stream(events, self.usage)
        last = events[-1]
        self.controls.stats.setText(
            f"{last.count} tokens · {last.tokens_per_second:.1f} tokens/s · "
            f"first token after {last.time_to_first_token:.2f} s"
        )
        self._show_token(None)
        self.panel.show_usage(self.usage, self.expert_style)

    def _answer_finished(self, message: Message | None) -> None:
        if message is not None and self._streamed:
            self.transcript.pieces[message.id] = [event.text for event in self._streamed]
        self._streamed = []
        self._set_state(PageState.READY)
        self._autosave()
        self._render()

    def _answer_failed(self, error: BaseException) -> None:
        self._streamed = []
        self._set_state(PageState.READY)
        self._autosave()
        self._render()
        self.controls.stats.setText(f"The answer failed: {describe_error(error)}")
        self.context.log(f"Chat: the answer failed: {describe_error(error)}")

    # ------------------------------------------------------------------ the transcript and the panel

    def _render(self, shown: list[Message] | None = None, pending_question: str = "", answering: bool = False) -> None:
        """Rebuild the transcript: the active path, or while answering what leads up to the answer."""
        messages = self.conversation.path() if shown is None else shown
        style = self.expert_style
        self.usage = self._new_usage(messages)
        self.transcript.expert_style = style
        self.transcript.color_slot = self.panel.color_slot()
        self.transcript.render(
            self.conversation,
            messages,
            self._model_name(),
            self.usage,
            pending_question,
            answering,
            self._empty_transcript_text(),
        )
        if not answering:  # while answering, the stats say how the answer goes
            self.controls.stats.setText(describe_generation(messages[-1]) if messages else "")
        self._show_token(None)
        self.panel.show_usage(self.usage, style)
        self.panel.show_legend(style)
        self._set_state(self.state)

    def _empty_transcript_text(self) -> str:
        if self.model is None:
            return "Load a model above to chat with it."
        return "Type a message below and press Send."

    def _model_name(self) -> str:
        return self.model.name if self.model is not None else (self.conversation.model or "Model")

    def _color_by_changed(self) -> None:
        self.transcript.color_slot = self.panel.color_slot()
        # While an answer streams, the conversation is the worker's; the redraw at its end applies the choice.
        if not self.is_answering:
            self._render()

    def _pin_token(self, token: TokenRouting) -> None:
        self._pinned_token = token
        self._show_token(token)

    def _show_token(self, token: TokenRouting | None) -> None:
        """Show a token's routing; without one, the pinned token, else the latest token of the transcript."""
        shown = self.transcript.shown_tokens
        token = token or self._pinned_token or (shown[-1] if shown else None)
        self.panel.show_token(token, self.expert_style)

    def _new_usage(self, messages: list[Message]) -> ExpertUsage | None:
        """Usage counts for the generated tokens of the transcript; the messages fill it as they are written."""
        for message in messages:
            if message.generation is not None:
                for token in message.generation.generated:
                    if token.experts:
                        return ExpertUsage(token.layers, len(token.probs[0]))
        if self.model is not None and self.model.is_moe:
            return ExpertUsage(self.model.layers, len(self.legend.labels))
        return None

    def _latest_answer(self) -> Message | None:
        return next((m for m in reversed(self.conversation.path()) if m.generation is not None), None)

    # ------------------------------------------------------------------ files

    def save_conversation(self, path: Path) -> None:
        self.conversation.system_prompt = self.sampling.system_prompt.toPlainText().strip()
        self.conversation.save(path)
        self.context.log(f"Chat: saved the conversation to {path}")

    def open_conversation(self, path: Path) -> None:
        self._use_conversation(Conversation.load(path))

    def _use_conversation(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.transcript.pieces.clear()
        self._pinned_token = None
        self.controls.restore_button.setVisible(False)
        self.sampling.system_prompt.setPlainText(self.conversation.system_prompt)
        if self.model is None:
            # Without a model, the recorded routing still shows, in the default colours.
            answer = self._latest_answer()
            probs = answer.generation.generated[0].probs if answer and answer.generation else ()
            self.legend = ExpertLegend.default(len(probs[0]) if probs else 0)
            self.panel.fill_color_by(answer.generation.generated[0].layers if answer and answer.generation else ())
        self._render()

    def export_markdown(self, path: Path) -> None:
        Path(path).write_text(self.conversation.to_markdown(), encoding="utf-8")

    def export_trace(self, path: Path) -> None:
        answer = self._latest_answer()
        if answer is not None and answer.generation is not None:
            write_trace(answer.generation.trace, path)

    def export_usage(self, path: Path) -> None:
        if self.usage is not None:
            legend = self.legend if len(self.legend.labels) == self.usage.num_experts else None
            Path(path).write_text(self.usage.to_csv(legend), encoding="utf-8")

    def _save_dialog(self) -> None:
        run_file_action(self, "Save the conversation", True, CONVERSATION_FILTER, "chat.json", self.save_conversation)

    def _open_dialog(self) -> None:
        run_file_action(self, "Open a conversation", False, CONVERSATION_FILTER, "", self.open_conversation)

    def _markdown_dialog(self) -> None:
        run_file_action(self, "Export as Markdown", True, "Markdown (*.md)", "chat.md", self.export_markdown)

    def _trace_dialog(self) -> None:
        run_file_action(
            self, "Export the routing trace", True, "JSON Lines (*.jsonl)", "trace.jsonl", self.export_trace
        )

    def _usage_dialog(self) -> None:
        run_file_action(self, "Export expert usage", True, "CSV (*.csv)", "usage.csv", self.export_usage)

    # ------------------------------------------------------------------ autosave

    def _autosave(self) -> None:
        """Keep the conversation for the loaded model; it now replaces whatever was kept before."""
        if self._model_key:
            self.controls.restore_button.setVisible(False)
            self.conversation.system_prompt = self.sampling.system_prompt.toPlainText().strip()
            self.autosaved.save(self.conversation, self._model_key)

    def _offer_last_conversation(self) -> None:
        """The conversation last held with the model just loaded: back at once if none is shown, else offered."""
        last = self.autosaved.last(self._model_key)
        if last is None or last.to_json() == self.conversation.to_json():
            return
        if self.conversation.messages:
            self.controls.restore_button.setVisible(True)
            return
        self._use_conversation(last)
        self.model_box.model_status.setText(f"{self.model_box.model_status.text()} The last conversation is back.")
        self.context.log(f"Chat: restored the last conversation with {self._model_key}")

    def restore_last_conversation(self) -> None:
        if self.state is PageState.READY and (last := self.autosaved.last(self._model_key)) is not None:
            self._use_conversation(last)
            self._render()

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> bool:
        """Stop any answer or load at its next step, join the worker, free the model and autosave."""
        joined = self.backend.shutdown()
        if joined:  # the worker has let go of the conversation, with what it had of its answer
            self._autosave()
        return joined
