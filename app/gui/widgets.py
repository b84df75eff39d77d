"""Small shared widgets and helpers."""

from __future__ import annotations

import re
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QContextMenuEvent, QGuiApplication, QIcon, QKeyEvent, QKeySequence, QPalette, QPixmap
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QMenu,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

# One way of writing sizes across the app, the CLI and the Hub core's own messages ("265.0 kB").
from app.core.progress import format_bytes

__all__ = [
    "MessageLabel",
    "breakable",
    "color_icon",
    "explanation",
    "format_bytes",
    "format_count",
    "format_duration",
    "heading",
]

ZERO_WIDTH_SPACE = "\u200b"
# Runs of text without spaces longer than this (paths, Hub ids, URLs) get places to break, so that a
# message wraps at the label's width instead of widening the label, its page and the window.
LONG_RUN = 24
BREAK_AFTER = frozenset("/\\_-.,:;=&?)]}")
LONG_RUN_PATTERN = re.compile(rf"\S{{{LONG_RUN + 1},}}")


def breakable(text: str) -> str:
    """`text` with zero-width spaces in its long runs without spaces: after a path separator or
    punctuation, and at least every LONG_RUN characters."""

    def add_breaks(match: re.Match[str]) -> str:
        pieces: list[str] = []
        since_break = 0
        for character in match.group(0):
            pieces.append(character)
            since_break += 1
            if character in BREAK_AFTER or since_break >= LONG_RUN:
                pieces.append(ZERO_WIDTH_SPACE)
                since_break = 0
        return "".join(pieces).rstrip(ZERO_WIDTH_SPACE)

    return LONG_RUN_PATTERN.sub(add_breaks, text)


class MessageLabel(QLabel):
    """Plain text of any length, word-wrapped at the label's width: long paths and names break too,
    so that no message widens the window. ``text()`` and copying give the text as it was set."""

    def __init__(self, text: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._text = ""
        self.setWordWrap(True)
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.setText(text)

    def setText(self, text: str) -> None:
        self._text = text
        super().setText(breakable(text))

    def text(self) -> str:
        return self._text

    def clear(self) -> None:
        self.setText("")

    def copy_selection(self) -> None:
        # selectedText() ends paragraphs with U+2029, as text documents do.
        text = self.selectedText().replace(ZERO_WIDTH_SPACE, "").replace("\u2029", "\n")
        QGuiApplication.clipboard().setText(text)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.matches(QKeySequence.StandardKey.Copy) and self.hasSelectedText():
            self.copy_selection()
            event.accept()
            return
        super().keyPressEvent(event)

    def contextMenuEvent(self, event: QContextMenuEvent) -> None:
        if not self.textInteractionFlags() & Qt.TextInteractionFlag.TextSelectableByMouse:
            super().contextMenuEvent(event)
            return
        menu = QMenu(self)
        copy = menu.addAction("Copy", self.copy_selection)
        copy.setEnabled(self.hasSelectedText())
        menu.addAction("Select All", lambda: self.setSelection(0, len(super(MessageLabel, self).text())))
        menu.exec(event.globalPos())


def heading(text: str, parent: QWidget | None = None) -> QLabel:
    label = QLabel(text, parent)
    font = label.font()
    font.setPointSizeF(font.pointSizeF() * 1.5)
    font.setBold(True)
    label.setFont(font)
    return label


def explanation(text: str, parent: QWidget | None = None) -> MessageLabel:
    label = MessageLabel(text, parent)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    # A palette role rather than a colour, so that the text follows a switch to a dark theme.
    label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
    return label


def color_icon(color: str, size: int = 14) -> QIcon:
    pixmap = QPixmap(size, size)
    pixmap.fill(QColor(color))
    return QIcon(pixmap)


def format_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def short(text: str, length: int = 40) -> str:
    """One line of at most `length` characters: line breaks shown as ⏎, the rest cut with an ellipsis."""
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= length else text[: length - 1] + "…"


class FileList(QWidget):
    """Files chosen one by one: a list (each once), Add files… and Remove."""

    def __init__(self, title: str, file_filter: str, height: int = 72, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = title
        self.file_filter = file_filter
        self.files = QListWidget()
        self.files.setMaximumHeight(height)
        add = QPushButton("Add files…")
        add.clicked.connect(self._add_dialog)
        self.remove = QPushButton("Remove")
        self.remove.clicked.connect(self._remove_selected)
        buttons = QHBoxLayout()
        buttons.addWidget(add)
        buttons.addWidget(self.remove)
        buttons.addStretch(1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.files)
        layout.addLayout(buttons)
        self._update()

    def add(self, paths: list[Path]) -> None:
        present = set(self.paths())
        for path in paths:
            if path not in present:
                item = QListWidgetItem(path.name)
                item.setData(Qt.ItemDataRole.UserRole, path)
                item.setToolTip(str(path))
                self.files.addItem(item)
        self._update()

    def clear(self) -> None:
        self.files.clear()
        self._update()

    def paths(self) -> list[Path]:
        return [self.files.item(row).data(Qt.ItemDataRole.UserRole) for row in range(self.files.count())]

    def _add_dialog(self) -> None:
        names, _filter = QFileDialog.getOpenFileNames(self, self.title, "", self.file_filter)
        self.add([Path(name) for name in names])

    def _remove_selected(self) -> None:
        for item in self.files.selectedItems():
            self.files.takeItem(self.files.row(item))
        self._update()

    def _update(self) -> None:
        self.remove.setEnabled(self.files.count() > 0)
