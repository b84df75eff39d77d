"""Chat page: load a model, chat with it, and watch which experts its routers choose for every token.

The model lives in the chat worker's thread (:mod:`app.gui.chat_worker`); this page only sends it
requests and shows what comes back. The transcript is built with text cursors, never from HTML, so
text a model or a conversation file brings can never turn into markup.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from enum import Enum, auto
from pathlib import Path

from PySide6.QtCore import QEvent, Qt, QUrl
from PySide6.QtGui import QColor, QFont, QPalette, QTextBlockFormat, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QStackedWidget,
    QTabWidget,
    QTextBrowser,
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
    SamplingSettings,
    TokenGenerated,
    TokenRouting,
    write_trace,
)
from app.core.chat.session import STOP_REASONS
from app.core.chat.trace import token_heatmap
from app.core.devices import DEVICE_CHOICES
from app.core.problems import FrankenMoEError
from app.core.progress import Progress
from app.gui.chat_worker import AnswerKind, AnswerRequest, ChatBackend, LoadedModel
from app.gui.context import AppContext, describe_error
from app.gui.plots import Heatmap, HeatmapData
from app.gui.theme import is_dark
from app.gui.widgets import MessageLabel, explanation, heading

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
SHARED_EXPERT_COLOR = "#999999"
SEED_RANDOM = -1  # the seed box's "random": a fresh seed per answer, recorded with it
CONVERSATION_FILTER = "FrankenMoE conversations (*.json);;All files (*)"
REMOTE_CODE_WARNING = (
    "Remote code is Python from the model's repository, run with your permissions. Allow it only for "
    "models whose authors you trust; it is never run otherwise."
)
# How strongly a token's background takes its expert's colour: enough to tell experts apart,
# little enough that the text stays readable in either theme.
TINT_LIGHT = 0.45
TINT_DARK = 0.55


class PageState(Enum):
    NO_MODEL = auto()
    LOADING = auto()
    READY = auto()
    ANSWERING = auto()


def _mix(a: QColor, b: QColor, t: float) -> QColor:
    return QColor.fromRgbF(
        a.redF() + (b.redF() - a.redF()) * t,
        a.greenF() + (b.greenF() - a.greenF()) * t,
        a.blueF() + (b.blueF() - a.blueF()) * t,
    )


def token_pieces(content: str, tokens: tuple[TokenRouting, ...]) -> list[str]:
    """Split an answer's text into one piece per generated token, for answers not streamed here.

    A token decoded alone may lose its leading space or be a partial character, so each token's
    text is looked up in the answer from where the previous one ended, and the piece runs up to
    the end of the match; a token that cannot be found gets no text, and the next found piece
    takes the gap. What is left over at the end goes to the last token.
    """
    pieces: list[str] = []
    cursor = 0
    unmatched = False
    for token in tokens:
        text = token.token.strip() or token.token
        found = content.find(text, cursor) if text and "\ufffd" not in text else -1
        if found >= 0 and (unmatched or not content[cursor:found].strip()):
            end = found + len(text)
            pieces.append(content[cursor:end])
            cursor, unmatched = end, False
        else:
            pieces.append("")
            unmatched = True
    if pieces and cursor < len(content):
        pieces[-1] += content[cursor:]
    return pieces


class ChatPage(QWidget):
    def __init__(self, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.context = context
        self.backend = ChatBackend(self)
        self.state = PageState.NO_MODEL
        self.model: LoadedModel | None = None
        self.conversation = Conversation()
        self.legend = ExpertLegend.default(0)
        self.usage: ExpertUsage | None = None
        # Every answer streamed here keeps its exact text pieces, one per token, by message id.
        self._pieces: dict[str, list[str]] = {}
        self._shown_tokens: list[TokenRouting] = []  # the tokens the transcript links to, by index
        self._pinned_token: TokenRouting | None = None
        self._streamed: list[TokenGenerated] = []
        self._stream_cursor: QTextCursor | None = None
        self._last_plan_request: LoadRequest | None = None

        worker = self.backend.worker
        worker.load_progress.connect(self._load_progress)
        worker.loaded.connect(self._loaded)
        worker.load_failed.connect(self._load_failed)
        worker.load_cancelled.connect(self._load_cancelled)
        worker.unloaded.connect(self._unloaded)
        worker.prompt_processed.connect(self._prompt_processed)
        worker.tokens_generated.connect(self._tokens_generated)
        worker.answer_finished.connect(self._answer_finished)
        worker.answer_failed.connect(self._answer_failed)

        layout = QVBoxLayout(self)
        layout.addWidget(heading("5  Chat"))
        layout.addWidget(
            explanation(
                "Chat with a merged model, any Mixtral, Qwen2-MoE or Qwen3-MoE model folder, or a downloaded "
                "Hub model. Each token of an answer is coloured by the expert its router chose; point at a "
                "token to see what every layer chose for it."
            )
        )
        layout.addWidget(self._build_model_box())
        splitter = QSplitter()
        splitter.addWidget(self._build_transcript())
        splitter.addWidget(self._build_side())
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        splitter.setChildrenCollapsible(False)
        layout.addWidget(splitter, 1)
        self._set_state(PageState.NO_MODEL)
        self._render()

    # ------------------------------------------------------------------ building

    def _build_model_box(self) -> QWidget:
        box = QGroupBox("Model")
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("A model folder, or a Hub id already downloaded (org/name)")
        self.model_path.textEdited.connect(lambda _text: self.allow_remote_code.setChecked(False))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_model)
        self.device = QComboBox()
        self.device.addItems(DEVICE_CHOICES)
        self.device.setToolTip("auto: a CUDA GPU, then Apple MPS, then the CPU")
        self.device.setCurrentText(self.context.settings.device)
        self.dtype = QComboBox()
        self.dtype.addItems(DTYPE_CHOICES)
        self.dtype.setToolTip("auto: bfloat16 or float16 on GPUs, float32 on the CPU")
        self.dtype.setCurrentText(self.context.settings.dtype)
        self.allow_remote_code = QCheckBox("Allow this model's own code")
        self.allow_remote_code.setToolTip(REMOTE_CODE_WARNING)
        self.remote_code_warning = QLabel(f"⚠ {REMOTE_CODE_WARNING}")
        self.remote_code_warning.setWordWrap(True)
        self.remote_code_warning.setVisible(False)
        self.allow_remote_code.toggled.connect(self.remote_code_warning.setVisible)
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(lambda: self.load_model(self.request_from_controls()))
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.backend.cancel.set)
        self.unload_button = QPushButton("Unload")
        self.unload_button.setToolTip("Frees the memory the model takes")
        self.unload_button.clicked.connect(self.unload_model)
        self.load_progress = QProgressBar()
        self.load_progress.setRange(0, 1000)
        self.load_progress.setMaximumWidth(220)
        self.model_status = MessageLabel("No model loaded.")
        self.model_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.fit_box = QGroupBox("The model does not fit")
        self.fit_message = MessageLabel()
        self.fit_buttons_layout = QHBoxLayout()
        self.fallback_buttons: list[QPushButton] = []
        fit_layout = QVBoxLayout(self.fit_box)
        fit_layout.addWidget(self.fit_message)
        fit_layout.addLayout(self.fit_buttons_layout)
        self.fit_box.setVisible(False)

        first = QHBoxLayout()
        first.addWidget(self.model_path, 1)
        first.addWidget(browse)
        first.addWidget(QLabel("Device"))
        first.addWidget(self.device)
        first.addWidget(QLabel("Dtype"))
        first.addWidget(self.dtype)
        first.addWidget(self.allow_remote_code)
        second = QHBoxLayout()
        for button in (self.load_button, self.cancel_button, self.unload_button):
            second.addWidget(button)
        second.addWidget(self.load_progress)
        second.addWidget(self.model_status, 1)
        layout = QVBoxLayout(box)
        layout.addLayout(first)
        layout.addWidget(self.remote_code_warning)
        layout.addLayout(second)
        layout.addWidget(self.fit_box)
        return box

    def _build_transcript(self) -> QWidget:
        self.transcript = QTextBrowser()
        self.transcript.setOpenLinks(False)
        self.transcript.setOpenExternalLinks(False)
        self.transcript.setMouseTracking(True)
        self.transcript.highlighted.connect(self._token_hovered)
        self.transcript.anchorClicked.connect(self._link_clicked)
        self.stats = MessageLabel()
        self.stats.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.message_input = QPlainTextEdit()
        self.message_input.setPlaceholderText("Type a message; Ctrl+Enter sends it")
        self.message_input.setMaximumHeight(90)
        self.send_button = QPushButton("Send")
        self.send_button.setShortcut("Ctrl+Return")
        self.send_button.clicked.connect(lambda: self.send(self.message_input.toPlainText()))
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Ends the answer before its next token")
        self.stop_button.clicked.connect(self.stop)
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setToolTip("Answers the last message again; the previous answer stays as a branch")
        self.regenerate_button.clicked.connect(self.regenerate)
        self.clear_button = QPushButton("Clear")
        self.clear_button.clicked.connect(self.clear)
        self.save_button = QPushButton("Save…")
        self.save_button.clicked.connect(self._save_dialog)
        self.open_button = QPushButton("Open…")
        self.open_button.clicked.connect(self._open_dialog)
        self.markdown_button = QPushButton("Export Markdown…")
        self.markdown_button.clicked.connect(self._markdown_dialog)

        actions = QHBoxLayout()
        for button in (self.send_button, self.stop_button, self.regenerate_button, self.clear_button):
            actions.addWidget(button)
        actions.addStretch(1)
        for button in (self.open_button, self.save_button, self.markdown_button):
            actions.addWidget(button)
        column = QWidget()
        layout = QVBoxLayout(column)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.transcript, 1)
        layout.addWidget(self.stats)
        layout.addWidget(self.message_input)
        layout.addLayout(actions)
        return column

    def _build_side(self) -> QWidget:
        self.side_tabs = QTabWidget()
        self.side_tabs.addTab(self._build_panel(), "Routing")
        self.side_tabs.addTab(self._build_settings(), "Settings")
        return self.side_tabs

    def _build_panel(self) -> QWidget:
        self.legend_label = QLabel()
        self.legend_label.setWordWrap(True)
        self.legend_label.setTextFormat(Qt.TextFormat.RichText)
        self.color_by = QComboBox()
        self.color_by.setToolTip("Which layer's choice colours the tokens")
        self.color_by.currentIndexChanged.connect(self._color_by_changed)
        self.token_map = Heatmap("Point at a token of an answer to see which experts every layer chose for it.")
        self.usage_map = Heatmap("Expert usage appears once the model answers.")
        self.usage_map.setToolTip(
            "Each layer's row: the share of its top-k choices that went to each expert. The last row: each "
            "expert's share of the tokens, counting for each token the expert most layers chose."
        )
        for plot in (self.token_map, self.usage_map):
            plot.setMinimumSize(260, 180)
        self.export_trace_button = QPushButton("Export trace (JSONL)…")
        self.export_trace_button.setToolTip("Every token of the latest answer, prompt included, with its routing")
        self.export_trace_button.clicked.connect(self._trace_dialog)
        self.export_usage_button = QPushButton("Export usage (CSV)…")
        self.export_usage_button.clicked.connect(self._usage_dialog)

        colour_row = QHBoxLayout()
        colour_row.addWidget(QLabel("Colour tokens by"))
        colour_row.addWidget(self.color_by, 1)
        exports = QHBoxLayout()
        exports.addWidget(self.export_trace_button)
        exports.addWidget(self.export_usage_button)
        exports.addStretch(1)
        plots = QSplitter(Qt.Orientation.Vertical)
        plots.addWidget(self.token_map)
        plots.addWidget(self.usage_map)
        plots.setChildrenCollapsible(False)
        panel = QWidget()
        layout = QVBoxLayout(panel)
        layout.addWidget(self.legend_label)
        layout.addLayout(colour_row)
        layout.addWidget(plots, 1)
        layout.addLayout(exports)

        self.panel_reason = explanation("")
        self.panel_reason.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.panel_stack = QStackedWidget()
        self.panel_stack.addWidget(panel)
        self.panel_stack.addWidget(self.panel_reason)
        return self.panel_stack

    def _build_settings(self) -> QWidget:
        defaults = SamplingSettings()
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("Optional: instructions the model sees before the conversation")
        self.system_prompt.setMaximumHeight(110)
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 5.0)
        self.temperature.setSingleStep(0.05)
        self.temperature.setValue(defaults.temperature)
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(defaults.top_p)
        self.top_k = QSpinBox()
        self.top_k.setRange(0, 100_000)
        self.top_k.setValue(defaults.top_k)
        self.repetition_penalty = QDoubleSpinBox()
        self.repetition_penalty.setRange(0.5, 3.0)
        self.repetition_penalty.setSingleStep(0.05)
        self.repetition_penalty.setValue(defaults.repetition_penalty)
        self.max_new_tokens = QSpinBox()
        self.max_new_tokens.setRange(1, 1_000_000)
        self.max_new_tokens.setValue(defaults.max_new_tokens)
        self.seed = QSpinBox()
        self.seed.setRange(SEED_RANDOM, 2**31 - 1)
        self.seed.setSpecialValueText("random")
        self.seed.setValue(SEED_RANDOM)

        settings = QWidget()
        form = QFormLayout(settings)
        form.addRow("System prompt", self.system_prompt)
        form.addRow("Temperature", self.temperature)
        form.addRow("", explanation("Higher is more varied; 0 always takes the likeliest token."))
        form.addRow("Top-p", self.top_p)
        form.addRow("", explanation("Samples only from the likeliest tokens that together make up this share."))
        form.addRow("Top-k", self.top_k)
        form.addRow("", explanation("Samples only from this many likeliest tokens; 0 switches it off."))
        form.addRow("Repetition penalty", self.repetition_penalty)
        form.addRow("", explanation("Above 1 makes tokens already in the text less likely."))
        form.addRow("Max new tokens", self.max_new_tokens)
        form.addRow("Seed", self.seed)
        form.addRow("", explanation("random: a fresh seed per answer, saved with it so the answer can be repeated."))
        return settings

    # ------------------------------------------------------------------ state

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        # The transcript's colours come from the palette; a theme switch redraws it (an answer
        # being streamed keeps its colours until it ends and is redrawn anyway).
        if event.type() == QEvent.Type.PaletteChange and not self.is_answering:
            self._render()

    def _set_state(self, state: PageState) -> None:
        self.state = state
        idle = state in (PageState.NO_MODEL, PageState.READY)
        ready = state is PageState.READY
        has_messages = bool(self.conversation.messages)
        self.load_button.setEnabled(idle)
        self.cancel_button.setEnabled(state is PageState.LOADING)
        self.unload_button.setEnabled(ready)
        self.load_progress.setVisible(state is PageState.LOADING)
        for widget in (self.model_path, self.device, self.dtype, self.allow_remote_code):
            widget.setEnabled(idle)
        self.send_button.setEnabled(ready)
        self.stop_button.setEnabled(state is PageState.ANSWERING)
        self.regenerate_button.setEnabled(ready and has_messages)
        for button in (self.clear_button, self.save_button, self.markdown_button):
            button.setEnabled(idle and has_messages)
        self.open_button.setEnabled(idle)
        self.export_trace_button.setEnabled(idle and self._latest_answer() is not None)
        self.export_usage_button.setEnabled(idle and self.usage is not None and self.usage.tokens > 0)

    @property
    def is_answering(self) -> bool:
        return self.state is PageState.ANSWERING

    # ------------------------------------------------------------------ loading

    def set_model(self, folder: Path) -> None:
        """A model to chat with, e.g. the one just merged: loaded at once unless the page is busy."""
        self.model_path.setText(str(folder))
        self.allow_remote_code.setChecked(False)
        if self.state in (PageState.NO_MODEL, PageState.READY):
            self.load_model(self.request_from_controls())

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "A model folder to chat with", self.model_path.text())
        if folder:
            self.model_path.setText(folder)
            self.allow_remote_code.setChecked(False)

    def request_from_controls(self) -> LoadRequest:
        dtype = self.dtype.currentText()
        return LoadRequest(
            model=self.model_path.text().strip(),
            device=self.device.currentText(),
            dtype=None if dtype == "auto" else dtype,
            trust_remote_code=self.allow_remote_code.isChecked(),
        )

    def load_model(self, request: LoadRequest) -> None:
        if not request.model:
            self.model_status.setText("Choose a model folder, or type a downloaded Hub id.")
            return
        self.fit_box.setVisible(False)
        self.model = None
        self.load_progress.setValue(0)
        self.model_status.setText(f"Loading {request.model}…")
        self._set_state(PageState.LOADING)
        self.context.log(f"Chat: loading {request.model}")
        self.backend.load(request)

    def unload_model(self) -> None:
        self.model = None
        self.model_status.setText("Unloading…")
        self._set_state(PageState.NO_MODEL)
        self.backend.unload()

    def _load_progress(self, record: Progress) -> None:
        # from_pretrained cannot report progress: its stage shows as busy rather than stuck at 0 %.
        busy = record.stage == "loading"
        self.load_progress.setRange(0, 0 if busy else 1000)
        self.load_progress.setValue(int(record.fraction * 1000))
        message = record.message
        if message.lower().startswith(record.stage):
            self.model_status.setText(message[:1].upper() + message[1:])
        else:
            self.model_status.setText(
                f"{record.stage.capitalize()}: {message}" if message else record.stage.capitalize()
            )

    def _loaded(self, model: LoadedModel) -> None:
        self.model = model
        self.legend = model.legend
        self.model_status.setText(f"{model.name} loaded {model.description}.")
        self.context.log(f"Chat: loaded {model.name} {model.description}")
        self.panel_reason.setText(model.panel_unavailable_reason)
        self.panel_stack.setCurrentIndex(0 if model.is_moe else 1)
        self._fill_color_by(model.layers)
        self._set_state(PageState.READY)
        self._render()

    def _load_failed(self, error: BaseException) -> None:
        self._set_state(PageState.NO_MODEL)
        if isinstance(error, ModelDoesNotFit):
            self._offer_fallbacks(error)
            self.model_status.setText("The model does not fit; choose a way that does, below.")
        else:
            self.model_status.setText(f"Cannot load the model: {describe_error(error)}")
        self.context.log(f"Chat: loading failed: {describe_error(error)}")

    def _offer_fallbacks(self, error: ModelDoesNotFit) -> None:
        plan = error.plan
        for button in self.fallback_buttons:
            button.deleteLater()
        self.fallback_buttons = []
        self.fit_message.setText(f"{error.message}.\nFix: {error.hint}.")
        for option in plan.alternatives:
            button = QPushButton(f"Load {option.describe().split(':')[0]}")
            button.setToolTip(option.describe())
            request = plan.request_for(option)
            button.clicked.connect(lambda _checked=False, request=request: self.load_model(request))
            self.fit_buttons_layout.addWidget(button)
            self.fallback_buttons.append(button)
        self.fit_box.setVisible(True)

    def _load_cancelled(self) -> None:
        self.model_status.setText("Loading cancelled.")
        self._set_state(PageState.NO_MODEL)

    def _unloaded(self) -> None:
        if self.state is PageState.NO_MODEL:
            self.model_status.setText("No model loaded: its memory is freed.")

    def _fill_color_by(self, layers: tuple[int, ...]) -> None:
        self.color_by.blockSignals(True)
        self.color_by.clear()
        self.color_by.addItem("The expert most layers chose", None)
        for slot, layer in enumerate(layers):
            self.color_by.addItem(f"Layer {layer}'s first choice", slot)
        self.color_by.blockSignals(False)

    # ------------------------------------------------------------------ chatting

    def sampling_settings(self) -> SamplingSettings:
        seed = self.seed.value()
        return SamplingSettings(
            temperature=self.temperature.value(),
            top_p=self.top_p.value(),
            top_k=self.top_k.value(),
            repetition_penalty=self.repetition_penalty.value(),
            max_new_tokens=self.max_new_tokens.value(),
            seed=None if seed == SEED_RANDOM else seed,
        )

    def send(self, text: str) -> None:
        if self.state is not PageState.READY or not text.strip():
            return
        self.message_input.clear()
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
            self._render()
            return
        before = self.conversation.path(message.parent) if message.parent else []
        self._start_answer(AnswerKind.EDIT, before, pending=text, text=text, message_id=message_id)

    def stop(self) -> None:
        self.backend.stop.set()

    def clear(self) -> None:
        if self.state in (PageState.NO_MODEL, PageState.READY):
            self.conversation.clear()
            self._pinned_token = None
            self._render()

    def _start_answer(
        self, kind: AnswerKind, shown: list[Message], pending: str = "", text: str = "", message_id: str = ""
    ) -> None:
        self.conversation.system_prompt = self.system_prompt.toPlainText().strip()
        try:
            settings = self.sampling_settings().validated()
        except FrankenMoEError as error:
            QMessageBox.warning(self, "Check the settings", describe_error(error))
            return
        self._streamed = []
        self._render(shown, pending_question=pending, answering=True)
        self.stats.setText("Reading the prompt…")
        self._set_state(PageState.ANSWERING)
        self.backend.answer(AnswerRequest(kind, self.conversation, settings, text, message_id))

    def _prompt_processed(self, event: PromptProcessed) -> None:
        self.stats.setText(f"Prompt of {len(event.tokens)} tokens read in {event.seconds:.2f} s")

    def _tokens_generated(self, events: list[TokenGenerated]) -> None:
        if self._stream_cursor is None:
            return
        scrollbar = self.transcript.verticalScrollBar()
        at_bottom = scrollbar.value() >= scrollbar.maximum() - 4
        for event in events:
            self._streamed.append(event)
            self._write_token(self._stream_cursor, event.token, event.text)
            if self.usage is not None and event.token.experts:
                self.usage.add(event.token)
        if at_bottom:
            scrollbar.setValue(scrollbar.maximum())
        last = events[-1]
        self.stats.setText(
            f"{last.count} tokens · {last.tokens_per_second:.1f} tokens/s · "
            f"first token after {last.time_to_first_token:.2f} s"
        )
        self._show_token(None)
        self._show_usage()

    def _answer_finished(self, message: Message | None) -> None:
        if message is not None and self._streamed:
            self._pieces[message.id] = [event.text for event in self._streamed]
        self._streamed = []
        self._set_state(PageState.READY)
        self._render()

    def _answer_failed(self, error: BaseException) -> None:
        self._streamed = []
        self._set_state(PageState.READY)
        self._render()
        self.stats.setText(f"The answer failed: {describe_error(error)}")
        self.context.log(f"Chat: the answer failed: {describe_error(error)}")

    # ------------------------------------------------------------------ the transcript

    def _render(self, shown: list[Message] | None = None, pending_question: str = "", answering: bool = False) -> None:
        """Rebuild the transcript: the active path, or while answering what leads up to the answer."""
        messages = self.conversation.path() if shown is None else shown
        self.transcript.clear()
        self._shown_tokens = []
        cursor = QTextCursor(self.transcript.document())
        self.usage = self._new_usage(messages)
        first = True
        for message in messages:
            self._write_message(cursor, message, first)
            first = False
        if pending_question:
            self._write_header(cursor, "You", None, first)
            cursor.insertText(pending_question, QTextCharFormat())
            first = False
        self._stream_cursor = None
        if answering:
            self._write_header(cursor, self._model_name(), None, first)
            self._stream_cursor = cursor
        elif messages and messages[-1].generation is not None:
            self.stats.setText(self._describe_generation(messages[-1]))
        elif not answering:
            self.stats.setText("")
        if not messages and not pending_question and not answering:
            cursor.insertText(self._empty_transcript_text(), self._muted_format())
        self.transcript.verticalScrollBar().setValue(self.transcript.verticalScrollBar().maximum())
        self._show_token(None)
        self._show_usage()
        self._update_legend()
        self._set_state(self.state)

    def _empty_transcript_text(self) -> str:
        if self.model is None:
            return "Load a model above to chat with it."
        return "Type a message below and press Send."

    def _model_name(self) -> str:
        return self.model.name if self.model is not None else (self.conversation.model or "Model")

    def _muted_format(self) -> QTextCharFormat:
        muted = QTextCharFormat()
        muted.setForeground(self.palette().color(QPalette.ColorRole.PlaceholderText))
        return muted

    def _link_format(self, href: str) -> QTextCharFormat:
        link = QTextCharFormat()
        link.setAnchor(True)
        link.setAnchorHref(href)
        link.setForeground(self.palette().color(QPalette.ColorRole.Link))
        return link

    def _write_header(self, cursor: QTextCursor, name: str, message: Message | None, first: bool) -> None:
        block = QTextBlockFormat()
        block.setTopMargin(0 if first else 14)
        if first:
            cursor.setBlockFormat(block)
        else:
            cursor.insertBlock(block)
        bold = QTextCharFormat()
        bold.setFontWeight(QFont.Weight.Bold)
        cursor.insertText(name, bold)
        if message is not None:
            siblings = self.conversation.siblings(message.id)
            if len(siblings) > 1:
                index = [s.id for s in siblings].index(message.id)
                cursor.insertText("   ", QTextCharFormat())
                if index > 0:
                    cursor.insertText("◀", self._link_format(f"branch:{siblings[index - 1].id}"))
                cursor.insertText(f" {index + 1}/{len(siblings)} ", self._muted_format())
                if index < len(siblings) - 1:
                    cursor.insertText("▶", self._link_format(f"branch:{siblings[index + 1].id}"))
            cursor.insertText("   ", QTextCharFormat())
            cursor.insertText("edit", self._link_format(f"edit:{message.id}"))
        cursor.insertBlock(QTextBlockFormat())

    def _write_message(self, cursor: QTextCursor, message: Message, first: bool) -> None:
        name = "You" if message.role == "user" else self._model_name()
        self._write_header(cursor, name, message, first)
        generation = message.generation
        if generation is None or not generation.generated:
            cursor.insertText(message.content, QTextCharFormat())
            return
        pieces = self._pieces.get(message.id) or token_pieces(message.content, generation.generated)
        for token, piece in zip(generation.generated, pieces, strict=True):
            self._write_token(cursor, token, piece)
            if self.usage is not None and token.experts:
                self.usage.add(token)
        cursor.insertBlock(QTextBlockFormat())
        cursor.insertText(self._describe_generation(message), self._muted_format())

    def _write_token(self, cursor: QTextCursor, token: TokenRouting, text: str) -> None:
        if not text:
            return
        if not token.experts:
            cursor.insertText(text, QTextCharFormat())
            return
        self._shown_tokens.append(token)
        token_format = QTextCharFormat()
        token_format.setAnchor(True)
        token_format.setAnchorHref(f"token:{len(self._shown_tokens) - 1}")
        token_format.setBackground(self._token_background(token))
        token_format.setForeground(self.palette().color(QPalette.ColorRole.Text))
        token_format.setToolTip(self._token_tooltip(token))
        cursor.insertText(text, token_format)

    def _color_by_changed(self) -> None:
        # While an answer streams, the conversation is the worker's; the redraw at its end applies the choice.
        if not self.is_answering:
            self._render()

    def _color_slot(self, token: TokenRouting) -> int | None:
        slot = self.color_by.currentData()
        return slot if isinstance(slot, int) and slot < len(token.experts) else None

    def _expert_color(self, expert: int) -> str:
        colors = self.legend.colors or ExpertLegend.default(expert + 1).colors
        return colors[expert % len(colors)]

    def _expert_label(self, expert: int) -> str:
        return self.legend.labels[expert] if expert < len(self.legend.labels) else f"expert {expert}"

    def _token_background(self, token: TokenRouting) -> QColor:
        expert = token.top_expert(self._color_slot(token))
        base = self.palette().color(QPalette.ColorRole.Base)
        tint = TINT_DARK if is_dark(self.palette()) else TINT_LIGHT
        return _mix(base, QColor(self._expert_color(expert)), tint)

    def _token_tooltip(self, token: TokenRouting) -> str:
        # A tooltip is shown as rich text when it looks like markup, so the token is escaped.
        expert = token.top_expert(self._color_slot(token))
        return f"{html.escape(repr(token.token))}: {html.escape(self._expert_label(expert))}"

    def _describe_generation(self, message: Message) -> str:
        info = message.generation
        if info is None:
            return ""
        return (
            f"{len(info.generated)} tokens · {info.tokens_per_second:.1f} tokens/s · first token after "
            f"{info.time_to_first_token:.2f} s · seed {info.seed} · ended by {STOP_REASONS[info.stop_reason]}"
        )

    def _link_clicked(self, url: QUrl) -> None:
        kind, _, value = url.toString().partition(":")
        if kind == "token":
            self._pinned_token = self._shown_tokens[int(value)]
            self._show_token(self._pinned_token)
            return
        if self.state is PageState.ANSWERING:
            return  # the conversation is the worker's until the answer ends
        if kind == "branch":
            self.select_branch(value)
        elif kind == "edit":
            text, ok = QInputDialog.getMultiLineText(
                self,
                "Edit the message",
                "The edited message starts a new branch; the old one stays (◀ ▶ switch between them):",
                self.conversation.messages[value].content,
            )
            if ok:
                self.edit_message(value, text)

    def select_branch(self, message_id: str) -> None:
        if self.state is not PageState.ANSWERING:
            self.conversation.select(message_id)
            self._render()

    def _token_hovered(self, url: QUrl) -> None:
        kind, _, value = url.toString().partition(":")
        self._show_token(self._shown_tokens[int(value)] if kind == "token" else None)

    # ------------------------------------------------------------------ the panel

    def _shared_expert(self) -> bool:
        return self.model is not None and self.model.has_shared_expert

    def _column_labels(self, num_experts: int) -> tuple[list[str], list[str]]:
        # Unnamed experts go by their number alone, which fits under a narrow column; the axis says "expert".
        labels = [self._expert_label(e).removeprefix("expert ") for e in range(num_experts)]
        colors = [self._expert_color(e) for e in range(num_experts)]
        if self._shared_expert():
            labels.append("shared")
            colors.append(SHARED_EXPERT_COLOR)
        return labels, colors

    def _show_token(self, token: TokenRouting | None) -> None:
        """Show a token's routing; without one, the pinned token, else the latest token of the transcript."""
        token = token or self._pinned_token or (self._shown_tokens[-1] if self._shown_tokens else None)
        if token is None or not token.experts:
            self.token_map.set_data(None)
            return
        num_experts = len(token.probs[0]) if token.probs else max(max(e) for e in token.experts) + 1
        labels, colors = self._column_labels(num_experts)
        shared = [1.0] if self._shared_expert() else []
        values = [[*row, *shared] for row in token.probs] if token.probs else None
        if values is None:
            values = [[*row, *shared] for row in token_heatmap(token, num_experts).tolist()]
        marked = [[*experts, *([num_experts] if shared else [])] for experts in token.experts]
        self.token_map.set_data(
            HeatmapData(
                values=values,
                row_labels=[f"layer {layer}" for layer in token.layers],
                column_labels=labels,
                title=f"Router weights for {token.token!r} (position {token.position})",
                x_label="expert",
                y_label="layer",
                legend_label="router probability",
                marked=marked,
                outline_legend="chosen (top-k)" + ("; shared: always" if shared else ""),
                column_colors=colors,
            )
        )

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

    def _show_usage(self) -> None:
        usage = self.usage
        if usage is None or usage.tokens == 0:
            self.usage_map.set_data(None)
            return
        labels, colors = self._column_labels(usage.num_experts)
        shared = [1.0] if self._shared_expert() else []
        rows = [[*row, *shared] for row in usage.layer_shares().tolist()]
        rows.append([*usage.token_shares().tolist(), *shared])
        self.usage_map.set_data(
            HeatmapData(
                values=rows,
                row_labels=[*(f"layer {layer}" for layer in usage.layers), "all tokens"],
                column_labels=labels,
                title=f"Expert usage over {usage.tokens} generated tokens",
                x_label="expert",
                y_label="layer",
                legend_label="share",
                column_colors=colors,
            )
        )

    def _update_legend(self) -> None:
        entries = [
            f'<span style="background-color:{color}">&nbsp;&nbsp;&nbsp;&nbsp;</span>&nbsp;{html.escape(label)}'
            for label, color in zip(self.legend.labels, self.legend.colors, strict=True)
        ]
        if self._shared_expert():
            entries.append(
                f'<span style="background-color:{SHARED_EXPERT_COLOR}">&nbsp;&nbsp;&nbsp;&nbsp;</span>'
                "&nbsp;shared expert (always active)"
            )
        self.legend_label.setText("&nbsp;&nbsp; ".join(entries))

    def _latest_answer(self) -> Message | None:
        return next((m for m in reversed(self.conversation.path()) if m.generation is not None), None)

    # ------------------------------------------------------------------ files

    def save_conversation(self, path: Path) -> None:
        self.conversation.system_prompt = self.system_prompt.toPlainText().strip()
        self.conversation.save(path)
        self.context.log(f"Chat: saved the conversation to {path}")

    def open_conversation(self, path: Path) -> None:
        self.conversation = Conversation.load(path)
        self._pieces.clear()
        self._pinned_token = None
        self.system_prompt.setPlainText(self.conversation.system_prompt)
        if self.model is None:
            # Without a model, the recorded routing still shows, in the default colours.
            answer = self._latest_answer()
            probs = answer.generation.generated[0].probs if answer and answer.generation else ()
            self.legend = ExpertLegend.default(len(probs[0]) if probs else 0)
            self._fill_color_by(answer.generation.generated[0].layers if answer and answer.generation else ())
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

    def _file_action(
        self, action: str, write: bool, file_filter: str, suggested: str, run: Callable[[Path], None]
    ) -> None:
        if write:
            name, _ = QFileDialog.getSaveFileName(self, action, suggested, file_filter)
        else:
            name, _ = QFileDialog.getOpenFileName(self, action, "", file_filter)
        if not name:
            return
        try:
            run(Path(name))
        except (OSError, FrankenMoEError) as error:
            message = describe_error(error) if isinstance(error, FrankenMoEError) else str(error)
            QMessageBox.warning(self, action, message)

    def _save_dialog(self) -> None:
        self._file_action("Save the conversation", True, CONVERSATION_FILTER, "chat.json", self.save_conversation)

    def _open_dialog(self) -> None:
        self._file_action("Open a conversation", False, CONVERSATION_FILTER, "", self.open_conversation)

    def _markdown_dialog(self) -> None:
        self._file_action("Export as Markdown", True, "Markdown (*.md)", "chat.md", self.export_markdown)

    def _trace_dialog(self) -> None:
        self._file_action("Export the routing trace", True, "JSON Lines (*.jsonl)", "trace.jsonl", self.export_trace)

    def _usage_dialog(self) -> None:
        self._file_action("Export expert usage", True, "CSV (*.csv)", "usage.csv", self.export_usage)

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> bool:
        """Stop any answer or load at its next step, join the worker and free the model."""
        return self.backend.shutdown()
