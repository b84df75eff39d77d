"""The Evaluate page's charts, painted with QPainter in the style of :mod:`app.gui.plots`: a grouped
bar chart (one group per dataset, one bar per model, the best of each group outlined and starred)
and a line plot (the k sweep: one line per dataset). Colours of text and frames come from the
palette, so both read in light and dark themes; series colours are fixed, so a model keeps its
colour across charts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QPainter, QPaintEvent, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from app.gui.plots import wrap_text

SERIES_COLORS = ("#4f8fdc", "#e8710a", "#2e9e5b", "#b04fc4", "#d4a017", "#c2185b", "#00838f", "#795548")
TICKS = 5
BEST_MARK = "★"


def series_color(index: int) -> QColor:
    return QColor(SERIES_COLORS[index % len(SERIES_COLORS)])


def nice_ceiling(value: float) -> float:
    """A round number at or above value: 1, 2 or 5 times a power of ten."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(step * power for step in (1, 2, 5, 10) if step * power >= value * (1 - 1e-9))


@dataclass(frozen=True)
class BarChartData:
    groups: Sequence[str]  # datasets, along the x axis
    series: Sequence[str]  # models, one bar each per group
    values: Sequence[Sequence[float | None]]  # groups x series; None: not measured
    title: str
    y_label: str
    lower_is_better: bool = True


@dataclass(frozen=True)
class LinePlotData:
    x_values: Sequence[float]
    series: Sequence[str]
    values: Sequence[Sequence[float | None]]  # series x x_values
    title: str
    x_label: str
    y_label: str


class Chart(QWidget):
    """What both charts share: the empty text, fonts, the title, the y axis and the legend."""

    def __init__(self, empty_text: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._empty_text = empty_text
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(320, 220)

    def sizeHint(self) -> QSize:
        return QSize(560, 360)

    @property
    def empty_text(self) -> str:
        return self._empty_text

    def fonts(self) -> tuple[QFont, QFont]:
        base = QFont(self.font())
        title = QFont(base)
        title.setBold(True)
        title.setPointSizeF(base.pointSizeF() * 1.15)
        return base, title

    def _begin(self) -> tuple[QPainter, QColor]:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        palette = self.palette()
        painter.fillRect(self.rect(), palette.color(QPalette.ColorRole.Window))
        text = palette.color(QPalette.ColorRole.WindowText)
        painter.setPen(text)
        return painter, text

    def _draw_empty(self, painter: QPainter) -> None:
        painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self._empty_text)

    def _draw_title(self, painter: QPainter, title: str) -> float:
        """Draws the wrapped title; returns where the content starts."""
        _base, title_font = self.fonts()
        metrics = QFontMetricsF(title_font)
        lines = wrap_text(metrics, title, self.width() - 8)
        painter.setFont(title_font)
        height = len(lines) * metrics.height()
        painter.drawText(QRectF(4, 2, self.width() - 8, height + 2), Qt.AlignmentFlag.AlignCenter, "\n".join(lines))
        painter.setFont(self.fonts()[0])
        return height + 10

    def _legend_rows(self, series: Sequence[str], metrics: QFontMetricsF, width: float) -> list[list[int]]:
        """Series indices per legend row, filled left to right."""
        rows: list[list[int]] = [[]]
        used = 0.0
        for index, name in enumerate(series):
            item = metrics.height() + 6 + metrics.horizontalAdvance(name) + 16
            if rows[-1] and used + item > width:
                rows.append([])
                used = 0.0
            rows[-1].append(index)
            used += item
        return rows

    def _draw_legend(self, painter: QPainter, series: Sequence[str], top: float, text: QColor) -> None:
        metrics = QFontMetricsF(self.fonts()[0])
        line = metrics.height()
        for row_number, row in enumerate(self._legend_rows(series, metrics, self.width() - 16)):
            x = 8.0
            y = top + row_number * (line + 4)
            for index in row:
                painter.fillRect(QRectF(x, y + line * 0.15, line * 0.7, line * 0.7), series_color(index))
                x += line * 0.7 + 6
                name = metrics.elidedText(series[index], Qt.TextElideMode.ElideMiddle, self.width() - x - 8)
                painter.setPen(text)
                painter.drawText(QPointF(x, y + metrics.ascent()), name)
                x += metrics.horizontalAdvance(name) + 16

    def _legend_height(self, series: Sequence[str]) -> float:
        metrics = QFontMetricsF(self.fonts()[0])
        return len(self._legend_rows(series, metrics, self.width() - 16)) * (metrics.height() + 4)

    def _draw_y_axis(
        self, painter: QPainter, plot: QRectF, low: float, high: float, label: str, text: QColor, ticks: int = TICKS
    ) -> None:
        metrics = QFontMetricsF(self.fonts()[0])
        grid = QPen(self.palette().color(QPalette.ColorRole.Mid), 1, Qt.PenStyle.DotLine)
        for tick in range(ticks + 1):
            value = low + (high - low) * tick / ticks
            y = plot.bottom() - plot.height() * tick / ticks
            painter.setPen(grid)
            painter.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
            painter.setPen(text)
            tick_text = f"{value:.3g}"
            painter.drawText(
                QRectF(0, y - metrics.height() / 2, plot.left() - 6, metrics.height()),
                Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                tick_text,
            )
        painter.save()
        painter.translate(2, plot.center().y())
        painter.rotate(-90)
        painter.drawText(
            QRectF(-plot.height() / 2, 0, plot.height(), metrics.height()), Qt.AlignmentFlag.AlignCenter, label
        )
        painter.restore()
        painter.setPen(QPen(self.palette().color(QPalette.ColorRole.Mid), 1))
        painter.drawRect(plot)
        painter.setPen(text)

    def _left_margin(self, high: float) -> float:
        metrics = QFontMetricsF(self.fonts()[0])
        widest = max(metrics.horizontalAdvance(f"{high * tick / TICKS:.3g}") for tick in range(TICKS + 1))
        return metrics.height() + 8 + widest + 6


class BarChart(Chart):
    """Grouped bars; the best bar of each group is outlined in the text colour and starred."""

    def __init__(self, empty_text: str = "No results yet.", parent: QWidget | None = None) -> None:
        super().__init__(empty_text, parent)
        self._data: BarChartData | None = None

    @property
    def data(self) -> BarChartData | None:
        return self._data

    def set_data(self, data: BarChartData | None, empty_text: str | None = None) -> None:
        self._data = data
        if empty_text is not None:
            self._empty_text = empty_text
        self.update()

    def best_series(self) -> list[int | None]:
        """For each group, the series with the best value (None where nothing was measured)."""
        if self._data is None:
            return []
        best: list[int | None] = []
        for row in self._data.values:
            measured = [(value, index) for index, value in enumerate(row) if value is not None]
            if not measured:
                best.append(None)
                continue
            pick = min(measured) if self._data.lower_is_better else max(measured, key=lambda pair: (pair[0], -pair[1]))
            best.append(pick[1])
        return best

    def paintEvent(self, event: QPaintEvent) -> None:
        painter, text = self._begin()
        data = self._data
        values = [value for row in data.values for value in row if value is not None] if data else []
        if data is None or not values:
            self._draw_empty(painter)
            painter.end()
            return
        metrics = QFontMetricsF(self.fonts()[0])
        line = metrics.height()
        top = self._draw_title(painter, data.title) + line  # room for the best bar's value above it
        high = nice_ceiling(max(values))
        legend_height = self._legend_height(data.series)
        left = self._left_margin(high)
        plot = QRectF(left, top, self.width() - left - 10, self.height() - top - 2 * line - 14 - legend_height)
        if plot.width() < 40 or plot.height() < 40:
            painter.end()
            return
        self._draw_y_axis(painter, plot, 0.0, high, data.y_label, text)

        group_width = plot.width() / len(data.groups)
        bar_width = group_width * 0.8 / max(1, len(data.series))
        best = self.best_series()
        for group, row in enumerate(data.values):
            group_left = plot.left() + group * group_width + group_width * 0.1
            for index, value in enumerate(row):
                if value is None:
                    continue
                height = plot.height() * value / high
                bar = QRectF(group_left + index * bar_width, plot.bottom() - height, bar_width - 2, height)
                painter.fillRect(bar, series_color(index))
                if best[group] == index:
                    painter.setPen(QPen(text, 2))
                    painter.setBrush(Qt.BrushStyle.NoBrush)
                    painter.drawRect(bar.adjusted(1, 1, -1, -1))
                    label = f"{BEST_MARK} {value:.3g}"
                    width = metrics.horizontalAdvance(label) + 4
                    painter.drawText(
                        QRectF(bar.center().x() - width / 2, bar.top() - line - 2, width, line),
                        Qt.AlignmentFlag.AlignCenter,
                        label,
                    )
            painter.setPen(text)
            name = metrics.elidedText(data.groups[group], Qt.TextElideMode.ElideMiddle, group_width - 4)
            painter.drawText(
                QRectF(plot.left() + group * group_width, plot.bottom() + 4, group_width, line),
                Qt.AlignmentFlag.AlignCenter,
                name,
            )
        self._draw_legend(painter, data.series, plot.bottom() + line + 12, text)
        painter.end()


class LinePlot(Chart):
    """One line with markers per series over shared x values; gaps where a value is missing."""

    def __init__(self, empty_text: str = "No sweep yet.", parent: QWidget | None = None) -> None:
        super().__init__(empty_text, parent)
        self._data: LinePlotData | None = None

    @property
    def data(self) -> LinePlotData | None:
        return self._data

    def set_data(self, data: LinePlotData | None, empty_text: str | None = None) -> None:
        self._data = data
        if empty_text is not None:
            self._empty_text = empty_text
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        painter, text = self._begin()
        data = self._data
        values = [value for row in data.values for value in row if value is not None] if data else []
        if data is None or not values or len(data.x_values) < 2:
            self._draw_empty(painter)
            painter.end()
            return
        metrics = QFontMetricsF(self.fonts()[0])
        line = metrics.height()
        top = self._draw_title(painter, data.title)
        # Round ticks around the values: a step of 1, 2 or 5 times a power of ten.
        step = nice_ceiling(((max(values) - min(values)) or max(abs(max(values)), 1.0) * 0.1) / TICKS)
        low, high = math.floor(min(values) / step) * step, math.ceil(max(values) / step) * step
        high = high if high > low else low + step
        ticks = round((high - low) / step)
        legend_height = self._legend_height(data.series)
        left = self._left_margin(high)
        plot = QRectF(left, top, self.width() - left - 16, self.height() - top - 3 * line - 18 - legend_height)
        if plot.width() < 40 or plot.height() < 40:
            painter.end()
            return
        self._draw_y_axis(painter, plot, low, high, data.y_label, text, ticks)
        x_low, x_high = min(data.x_values), max(data.x_values)

        def point(x: float, y: float) -> QPointF:
            return QPointF(
                plot.left() + plot.width() * (x - x_low) / (x_high - x_low),
                plot.bottom() - plot.height() * (y - low) / (high - low),
            )

        for x in data.x_values:
            painter.drawText(
                QRectF(point(x, low).x() - 30, plot.bottom() + 4, 60, line), Qt.AlignmentFlag.AlignCenter, f"{x:g}"
            )
        painter.drawText(
            QRectF(plot.left(), plot.bottom() + line + 6, plot.width(), line),
            Qt.AlignmentFlag.AlignCenter,
            data.x_label,
        )
        for index, row in enumerate(data.values):
            color = series_color(index)
            painter.setPen(QPen(color, 2))
            painter.setBrush(color)
            previous: QPointF | None = None
            for x, y in zip(data.x_values, row, strict=True):
                if y is None:
                    previous = None
                    continue
                current = point(x, y)
                if previous is not None:
                    painter.drawLine(previous, current)
                painter.drawEllipse(current, 3.5, 3.5)
                previous = current
        painter.setBrush(Qt.BrushStyle.NoBrush)
        self._draw_legend(painter, data.series, plot.bottom() + 2 * line + 12, text)
        painter.end()
