"""Chat arrives with its own issue; until then the page says what will be here and when."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from app.gui.widgets import explanation, heading


class ChatPage(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model_label = QLabel("No merged model yet.")
        self.model_label.setWordWrap(True)
        self.model_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.addWidget(heading("Chat"))
        layout.addWidget(
            explanation(
                "Chat arrives with a merged model: merge on the Merge page, then choose Open in Chat. "
                "Each reply will show, token by token, which experts the router chose, "
                "in the experts' colours."
            )
        )
        layout.addWidget(self.model_label)
        layout.addStretch(1)

    def set_model(self, folder: Path) -> None:
        self.model_label.setText(f"Merged model: {folder}")
