"""The log dock: what the workers report, newest at the bottom."""

from __future__ import annotations

from PySide6.QtCore import QSize
from PySide6.QtGui import QFontDatabase
from PySide6.QtWidgets import QDockWidget, QPlainTextEdit, QWidget

MAX_LOG_LINES = 5000
# The log is for glancing at while working; the pages above need the height more.
LINES_SHOWN = 5


class LogView(QPlainTextEdit):
    """Follows new lines while scrolled to the bottom, and stays put while the user reads above."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.following = True
        scrollbar = self.verticalScrollBar()
        scrollbar.valueChanged.connect(self._scrolled)
        # A wrapped line's height is known only once it is laid out, after it was appended: the
        # range grows then, and a view that follows moves with it.
        scrollbar.rangeChanged.connect(self._range_changed)

    def _scrolled(self, value: int) -> None:
        self.following = value >= self.verticalScrollBar().maximum()

    def _range_changed(self, _minimum: int, maximum: int) -> None:
        if self.following:
            self.verticalScrollBar().setValue(maximum)

    def append_line(self, line: str) -> None:
        following = self.following
        self.appendPlainText(line)
        # Dropping the oldest lines may move the view while the line goes in; following decides.
        self.following = following
        if following:
            self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

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
        self.view.append_line(line)

    @property
    def text(self) -> str:
        return self.view.toPlainText()
