"""The log dock: what the workers report, newest at the bottom."""

from __future__ import annotations

from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import QDockWidget, QPlainTextEdit, QWidget

MAX_LOG_LINES = 5000


class LogPanel(QDockWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Log", parent)
        self.setObjectName("log-panel")
        self.view = QPlainTextEdit()
        self.view.setReadOnly(True)
        self.view.setMaximumBlockCount(MAX_LOG_LINES)
        self.view.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.view.setPlaceholderText("Jobs report here: demo builds, gate computation, merges.")
        self.setWidget(self.view)

    def append(self, line: str) -> None:
        self.view.appendPlainText(line)

    @property
    def text(self) -> str:
        return self.view.toPlainText()
