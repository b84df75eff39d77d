"""The start screen: new, open, recent recipes (one click opens one), chat, and the demo for newcomers."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPalette
from PySide6.QtWidgets import (
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QStyle,
    QVBoxLayout,
    QWidget,
)

from app.core.demo import DEMO_DURATION
from app.gui.widgets import explanation, heading


class StartPage(QWidget):
    new_requested = Signal()
    open_requested = Signal()
    demo_requested = Signal()
    chat_requested = Signal()
    evaluate_requested = Signal()
    recent_requested = Signal(object)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.demo_button = QPushButton("Try the demo")
        self.demo_button.setDefault(True)
        self.demo_button.setToolTip("Builds three tiny local experts (arithmetic, code, prose) and opens their recipe.")
        new_button = QPushButton("New recipe")
        open_button = QPushButton("Open recipe…")
        self.chat_button = QPushButton("Chat with a model…")
        self.chat_button.setToolTip("Any Mixtral, Qwen2-MoE or Qwen3-MoE folder or downloaded Hub model; no recipe.")
        self.demo_button.clicked.connect(self.demo_requested)
        new_button.clicked.connect(self.new_requested)
        open_button.clicked.connect(self.open_requested)
        self.chat_button.clicked.connect(self.chat_requested)
        self.evaluate_button = QPushButton("Evaluate a model…")
        self.evaluate_button.setToolTip("Perplexity on your data, beside the base and experts of a merged model.")
        self.evaluate_button.clicked.connect(self.evaluate_requested)
        self.recent = QListWidget()
        self.recent.setMaximumHeight(180)
        self.recent.setCursor(Qt.CursorShape.PointingHandCursor)
        self.recent.itemClicked.connect(self._recent_clicked)
        self.recent.itemActivated.connect(self._recent_activated)

        buttons = QHBoxLayout()
        for button in (self.demo_button, new_button, open_button, self.chat_button, self.evaluate_button):
            button.setMinimumHeight(36)
            buttons.addWidget(button)

        column = QVBoxLayout()
        column.addStretch(2)
        column.addWidget(heading("FrankenMoE Studio"))
        column.addWidget(
            explanation(
                "Build a Mixture-of-Experts model from models you already have: pick a base and experts, "
                "describe with prompts what each expert is for, preview how the router will send text, "
                "merge, and chat. New here? Try the demo: it needs no Hub access, and building its models "
                f"takes {DEMO_DURATION} on a CPU. Have an MoE model already? Chat with it or evaluate it: no recipe "
                "needed."
            )
        )
        column.addSpacing(12)
        column.addLayout(buttons)
        column.addSpacing(16)
        self.recent_heading = explanation("Recent recipes")
        column.addWidget(self.recent_heading)
        column.addWidget(self.recent)
        column.addStretch(3)

        outer = QHBoxLayout(self)
        outer.addStretch(1)
        outer.addLayout(column, 3)
        outer.addStretch(1)

    def set_recent_files(self, paths: list[Path]) -> None:
        self.recent.clear()
        for path in paths:
            item = QListWidgetItem(f"{path.name}    {path.parent}")
            item.setData(Qt.ItemDataRole.UserRole, path)
            item.setToolTip(str(path))
            if not path.exists():
                item.setText(f"{item.text()}    (not found: click to remove it)")
                item.setToolTip(f"{path} no longer exists.")
                item.setForeground(self.palette().color(QPalette.ColorRole.PlaceholderText))
                font = item.font()
                font.setItalic(True)
                item.setFont(font)
            self.recent.addItem(item)
        self.recent.setVisible(bool(paths))
        self.recent_heading.setVisible(bool(paths))

    def _recent_clicked(self, item: QListWidgetItem) -> None:
        # One click opens a recipe, as on a web page; styles that activate on one click already did.
        if not self.style().styleHint(QStyle.StyleHint.SH_ItemView_ActivateItemOnSingleClick, None, self.recent):
            self.recent_requested.emit(item.data(Qt.ItemDataRole.UserRole))

    def _recent_activated(self, item: QListWidgetItem) -> None:
        self.recent_requested.emit(item.data(Qt.ItemDataRole.UserRole))
