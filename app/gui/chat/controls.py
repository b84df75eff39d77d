"""The chat's controls: the message box with its buttons, and the sampling settings."""

from __future__ import annotations

from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.core.chat import SamplingSettings
from app.gui.widgets import MessageLabel, explanation

SEED_RANDOM = -1  # the seed box's "random": a fresh seed per answer, recorded with it
SYSTEM_PROMPT_LINES = 6  # what the system prompt box shows without scrolling


class MessageControls(QWidget):
    """The answer's statistics, the message box, and the buttons that act on the conversation."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.stats = MessageLabel()
        self.stats.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        self.message_input = QPlainTextEdit()
        self.message_input.setPlaceholderText("Type a message; Ctrl+Enter sends it")
        self.message_input.setMaximumHeight(90)
        self.send_button = QPushButton("Send")
        self.send_button.setShortcut("Ctrl+Return")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Ends the answer before its next token")
        self.regenerate_button = QPushButton("Regenerate")
        self.regenerate_button.setToolTip("Answers the last message again; the previous answer stays as a branch")
        self.clear_button = QPushButton("Clear")
        self.save_button = QPushButton("Save…")
        self.open_button = QPushButton("Open…")
        self.markdown_button = QPushButton("Export Markdown…")
        self.restore_button = QPushButton("Restore the last conversation")
        self.restore_button.setToolTip(
            "The conversation last held with this model, kept when the app closed; it replaces the one shown"
        )
        self.restore_button.setVisible(False)

        actions = QHBoxLayout()
        for button in (self.send_button, self.stop_button, self.regenerate_button, self.clear_button):
            actions.addWidget(button)
        actions.addStretch(1)
        for button in (self.restore_button, self.open_button, self.save_button, self.markdown_button):
            actions.addWidget(button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.stats)
        layout.addWidget(self.message_input)
        layout.addLayout(actions)


class SamplingForm(QWidget):
    """The system prompt and the sampling settings of the next answer."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        defaults = SamplingSettings()
        self.system_prompt = QPlainTextEdit()
        self.system_prompt.setPlaceholderText("Optional: instructions the model sees before the conversation")
        margins = self.system_prompt.contentsMargins()
        lines = self.system_prompt.fontMetrics().lineSpacing() * SYSTEM_PROMPT_LINES
        padding = 2 * self.system_prompt.document().documentMargin() + margins.top() + margins.bottom()
        self.system_prompt.setFixedHeight(int(lines + padding))
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

        # The system prompt spans the tab's width under its label: beside it, it would get what the
        # labels of the form leave, too little for instructions.
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel("System prompt"))
        layout.addWidget(self.system_prompt)
        form = QFormLayout()
        layout.addLayout(form)
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
        layout.addStretch(1)

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
