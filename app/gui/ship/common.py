"""What the export and publish dialogs share: plan messages, progress text, links and folders."""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import QLabel, QLayout, QVBoxLayout, QWidget

from app.core.problems import Problem, sentence
from app.core.progress import Progress
from app.gui.widgets import format_bytes, format_duration


def plan_messages(problems: Iterable[Problem], warnings: Iterable[str]) -> str:
    """A plan's problems and warnings as the app shows problems everywhere: errors, then warnings,
    then each fix once."""
    problems = list(problems)
    ordered = [*(p for p in problems if p.is_error), *(p for p in problems if not p.is_error)]
    lines = [f"{'✗' if p.is_error else '⚠'} {as_sentence(p.message)}" for p in ordered]
    lines += [f"⚠ {as_sentence(warning)}" for warning in warnings]
    fixes = dict.fromkeys(sentence(p.hint) for p in ordered if p.hint)
    return "\n".join([*lines, *(f"Fix: {fix}" for fix in fixes)])


def as_sentence(clause: str) -> str:
    """A clause as a sentence, except that a first word naming a setting (norm_topk_prob) keeps its case."""
    first = clause.strip().split(" ", 1)[0]
    if "_" in first:
        return clause.strip() if clause.strip().endswith((".", "!", "?")) else f"{clause.strip()}."
    return sentence(clause)


def has_errors(problems: Iterable[Problem]) -> bool:
    return any(problem.is_error for problem in problems)


class RateMeter:
    """Describes progress records with their bytes, speed and time left; each stage is timed apart,
    since a stage that starts late would otherwise inherit the time spent before it."""

    def __init__(self) -> None:
        self._start: tuple[str, float, int] | None = None

    def reset(self) -> None:
        self._start = None

    def describe(self, record: Progress) -> str:
        text = f"{record.stage}: {record.message}" if record.message else record.stage
        if not record.bytes_total:
            return text
        text += f" · {format_bytes(record.bytes_done)} of {format_bytes(record.bytes_total)}"
        now = time.monotonic()
        if self._start is None or self._start[0] != record.stage:
            self._start = (record.stage, now, record.bytes_done)
            return text
        _stage, started, first_bytes = self._start
        elapsed = now - started
        rate = (record.bytes_done - first_bytes) / elapsed if elapsed > 0.2 else 0.0
        if rate > 0:
            left = (record.bytes_total - record.bytes_done) / rate
            text += f" · {format_bytes(rate)}/s · about {format_duration(left)} left"
        return text


def with_note(field: QWidget | QLayout, note: QLabel) -> QVBoxLayout:
    """A form field with its note right below it: as a form row of its own, a wrapped note would be
    given the height of several lines and float away from its field."""
    column = QVBoxLayout()
    column.setSpacing(2)
    if isinstance(field, QLayout):
        column.addLayout(field)
    else:
        column.addWidget(field)
    column.addWidget(note)
    return column


def link_label(parent: QWidget | None = None) -> QLabel:
    """A label for a link that opens in the browser; set its text with :func:`link_html`."""
    label = QLabel(parent)
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setOpenExternalLinks(True)
    label.setWordWrap(True)
    return label


def link_html(url: str, before: str = "") -> str:
    """Rich text for a link to `url` after the plain text `before`; both may come from the Hub, so
    both are escaped."""
    escaped = html.escape(url, quote=True)
    return f'{html.escape(before)}<a href="{escaped}">{escaped}</a>'


def show_in_folder(path: Path) -> None:
    """Opens the folder that holds `path` in the system's file manager."""
    QDesktopServices.openUrl(QUrl.fromLocalFile(str(path.parent)))
