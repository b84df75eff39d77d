"""The log dock: what the workers report, newest at the bottom."""

from __future__ import annotations

from PySide6.QtCore import QSize
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import QDockWidget, QPlainTextEdit, QWidget

MAX_LOG_LINES = 5000
# The log is for glancing at while working; the pages above need the height more.
LINES_SHOWN = 5


class LogView(QPlainTextEdit):
    def sizeHint(self) -> QSize:
        # From the font, not pixels, so that the dock keeps its few lines at any scale factor.
        text_height = self.fontMetrics().lineSpacing() * LINES_SHOWN
        chrome = 2 * (self.frameWidth() + round(self.document().documentMargin()))
        return QSize(super().sizeHint().width(), text_height + chrome)


class LogPanel(QDockWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Log", parent)
        self.setObjectName("log-panel")
        self.view = LogView()
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
