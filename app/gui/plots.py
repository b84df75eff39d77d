"""Heatmaps drawn with QPainter: title, axis labels, tick labels, a colour-bar legend, and
optional outlined cells (the expert each layer picks). Colours come from the palette, so the plot
reads in light and dark themes alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QLinearGradient, QPainter, QPaintEvent, QPalette, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from app.gui.theme import is_dark


@dataclass(frozen=True)
class HeatmapData:
    values: Sequence[Sequence[float]]
    row_labels: Sequence[str]
    column_labels: Sequence[str]
    title: str
    x_label: str
    y_label: str
    value_range: tuple[float, float] = (0.0, 1.0)
    legend_label: str = ""
    # For each row, the column to outline (e.g. the expert a layer picks), or None.
    outlined: Sequence[int | None] = ()
    # For each row, several columns to outline (e.g. the top-k experts a layer picked for a token).
    marked: Sequence[Sequence[int]] = ()
    outline_legend: str = ""
    column_colors: Sequence[str] = field(default_factory=tuple)
    diverging: bool = False


def _mix(a: QColor, b: QColor, t: float) -> QColor:
    t = min(1.0, max(0.0, t))
    return QColor.fromRgbF(
        a.redF() + (b.redF() - a.redF()) * t,
        a.greenF() + (b.greenF() - a.greenF()) * t,
        a.blueF() + (b.blueF() - a.blueF()) * t,
    )


class Heatmap(QWidget):
    def __init__(self, empty_text: str = "Nothing to show yet.", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._data: HeatmapData | None = None
        self._empty_text = empty_text
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setMinimumSize(320, 240)

    def sizeHint(self) -> QSize:
        return QSize(480, 360)

    @property
    def data(self) -> HeatmapData | None:
        return self._data

    @property
    def empty_text(self) -> str:
        return self._empty_text

    def set_empty_text(self, text: str) -> None:
        self._empty_text = text
        if self._data is None:
            self.update()

    def set_data(self, data: HeatmapData | None, empty_text: str | None = None) -> None:
        self._data = data
        if empty_text is not None:
            self._empty_text = empty_text
        self.update()

    def color_for(self, value: float) -> QColor:
        """Sequential: background to accent; diverging: blue through background to orange."""
        assert self._data is not None
        low, high = self._data.value_range
        t = (value - low) / (high - low) if high > low else 0.0
        background = self.palette().color(QPalette.ColorRole.Base)
        hot = QColor("#e8710a") if is_dark(self.palette()) else QColor("#d4500f")
        if not self._data.diverging:
            return _mix(background, hot, t)
        cold = QColor("#4f8fdc")
        return _mix(cold, background, t * 2) if t < 0.5 else _mix(background, hot, (t - 0.5) * 2)

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        palette = self.palette()
        text_color = palette.color(QPalette.ColorRole.WindowText)
        painter.fillRect(self.rect(), palette.color(QPalette.ColorRole.Window))
        painter.setPen(text_color)
        data = self._data
        if data is None or not data.values:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self._empty_text)
            painter.end()
            return

        base_font = QFont(self.font())
        title_font = QFont(base_font)
        title_font.setBold(True)
        title_font.setPointSizeF(base_font.pointSizeF() * 1.15)
        metrics = QFontMetricsF(base_font)
        line = metrics.height()
        rows, columns = len(data.values), len(data.values[0])

        row_label_width = max(metrics.horizontalAdvance(label) for label in data.row_labels) + 8
        column_label_height = line + (8 if data.column_colors else 4)
        legend_width = 70
        left = line + 6 + row_label_width
        top = QFontMetricsF(title_font).height() + 10
        bottom_space = column_label_height + line + 8 + (line + 4 if data.outline_legend else 0)
        plot = QRectF(left, top, self.width() - left - legend_width - 10, self.height() - top - bottom_space)
        if plot.width() < 20 or plot.height() < 20:
            painter.end()
            return
        cell_w, cell_h = plot.width() / columns, plot.height() / rows

        painter.setFont(title_font)
        painter.drawText(QRectF(0, 2, self.width(), top - 6), Qt.AlignmentFlag.AlignCenter, data.title)
        painter.setFont(base_font)

        show_values = cell_w > metrics.horizontalAdvance("-0.00") + 6 and cell_h > line + 2
        for r, row in enumerate(data.values):
            for c, value in enumerate(row):
                cell = QRectF(plot.left() + c * cell_w, plot.top() + r * cell_h, cell_w, cell_h)
                color = self.color_for(value)
                painter.fillRect(cell, color)
                if show_values:
                    painter.setPen(QColor("#000000") if color.lightnessF() > 0.55 else QColor("#ffffff"))
                    painter.drawText(cell, Qt.AlignmentFlag.AlignCenter, f"{value:.2f}")
        painter.setPen(QPen(palette.color(QPalette.ColorRole.Mid), 1))
        painter.drawRect(plot)

        # Thin enough that outlined neighbours (top-k picks side by side) stay apart.
        outline_pen = QPen(text_color, min(4.0, max(2.0, min(cell_w, cell_h) * 0.05)))
        painter.setPen(outline_pen)
        painter.setBrush(Qt.BrushStyle.NoBrush)
        cells = [(r, column) for r, column in enumerate(data.outlined) if column is not None]
        cells += [(r, column) for r, columns in enumerate(data.marked) for column in columns]
        inset = outline_pen.widthF() / 2
        for r, column in cells:
            painter.drawRect(
                QRectF(plot.left() + column * cell_w, plot.top() + r * cell_h, cell_w, cell_h).adjusted(
                    inset, inset, -inset, -inset
                )
            )

        painter.setPen(text_color)
        for r, label in enumerate(data.row_labels):
            rect = QRectF(line + 6, plot.top() + r * cell_h, row_label_width - 6, cell_h)
            painter.drawText(rect, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, label)
        for c, label in enumerate(data.column_labels):
            rect = QRectF(plot.left() + c * cell_w, plot.bottom() + 4, cell_w, line)
            elided = metrics.elidedText(label, Qt.TextElideMode.ElideRight, cell_w - 2)
            painter.drawText(rect, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop, elided)
            if c < len(data.column_colors):
                painter.fillRect(
                    QRectF(plot.left() + c * cell_w + 2, plot.bottom() + 4 + line, cell_w - 4, 4),
                    QColor(data.column_colors[c]),
                )
        x_label_top = plot.bottom() + column_label_height + 4
        painter.drawText(
            QRectF(plot.left(), x_label_top, plot.width(), line), Qt.AlignmentFlag.AlignCenter, data.x_label
        )
        if data.outline_legend:
            swatch = QRectF(plot.left(), x_label_top + line + 6, line * 0.8, line * 0.8)
            painter.setPen(QPen(text_color, 2))
            painter.drawRect(swatch)
            painter.drawText(QPointF(swatch.right() + 6, swatch.bottom()), data.outline_legend)
        painter.save()
        painter.translate(2, plot.center().y())
        painter.rotate(-90)
        painter.drawText(QRectF(-plot.height() / 2, 0, plot.height(), line), Qt.AlignmentFlag.AlignCenter, data.y_label)
        painter.restore()

        self._draw_colour_bar(painter, QRectF(plot.right() + 14, plot.top(), 14, plot.height()), metrics)
        painter.end()

    def _draw_colour_bar(self, painter: QPainter, bar: QRectF, metrics: QFontMetricsF) -> None:
        assert self._data is not None
        low, high = self._data.value_range
        gradient = QLinearGradient(bar.bottomLeft(), bar.topLeft())
        for stop in (0.0, 0.25, 0.5, 0.75, 1.0):
            gradient.setColorAt(stop, self.color_for(low + (high - low) * stop))
        painter.fillRect(bar, gradient)
        painter.setPen(QPen(self.palette().color(QPalette.ColorRole.Mid), 1))
        painter.drawRect(bar)
        painter.setPen(self.palette().color(QPalette.ColorRole.WindowText))
        text_left = bar.right() + 4
        painter.drawText(QPointF(text_left, bar.top() + metrics.ascent()), f"{high:g}")
        painter.drawText(QPointF(text_left, bar.bottom()), f"{low:g}")
        if self._data.legend_label:
            painter.save()
            painter.translate(text_left + metrics.height() * 0.2, bar.center().y())
            painter.rotate(90)
            painter.drawText(
                QRectF(-bar.height() / 2, -metrics.height() - 14, bar.height(), metrics.height()),
                Qt.AlignmentFlag.AlignCenter,
                self._data.legend_label,
            )
            painter.restore()
