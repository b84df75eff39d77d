"""Heatmaps drawn with QPainter: title, axis labels, tick labels, a colour-bar legend, and
optional outlined cells (the expert each layer picks). Colours come from the palette, so the plot
reads in light and dark themes alike.

Text never clips: the title wraps, column labels turn vertical when they do not fit under their
column, and with a minimum row height the widget asks for the height its rows need (put it in a
scroll area); only what still cannot fit is elided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import (
    QColor,
    QFont,
    QFontMetricsF,
    QLinearGradient,
    QPainter,
    QPaintEvent,
    QPalette,
    QPen,
    QResizeEvent,
)
from PySide6.QtWidgets import QSizePolicy, QWidget

from app.gui.theme import is_dark
from app.gui.widgets import short

if TYPE_CHECKING:
    from app.core.routing import PromptRouting


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


LEGEND_WIDTH = 70  # the colour bar, its tick values and its rotated label
MIN_PLOT_SIZE = 20
MAX_VERTICAL_LABEL = 120  # column labels turned vertical are elided beyond this length


@dataclass(frozen=True)
class HeatmapLayout:
    """Where everything goes at one size, and each text as it is drawn (wrapped or elided)."""

    title_lines: list[str]
    title_rect: QRectF
    plot: QRectF
    cell_width: float
    cell_height: float
    column_labels: list[str]
    vertical_column_labels: bool
    column_labels_top: float
    column_label_height: float
    bar: QRectF
    legend_label: str


def wrap_text(metrics: QFontMetricsF, text: str, width: float) -> list[str]:
    """Lines of at most width, broken between words; a word longer than a line is elided."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if current and metrics.horizontalAdvance(candidate) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    lines.append(current)
    return [
        line
        if metrics.horizontalAdvance(line) <= width
        else metrics.elidedText(line, Qt.TextElideMode.ElideMiddle, width)
        for line in lines
    ]


def _mix(a: QColor, b: QColor, t: float) -> QColor:
    t = min(1.0, max(0.0, t))
    return QColor.fromRgbF(
        a.redF() + (b.redF() - a.redF()) * t,
        a.greenF() + (b.greenF() - a.greenF()) * t,
        a.blueF() + (b.blueF() - a.blueF()) * t,
    )


class Heatmap(QWidget):
    def __init__(
        self,
        empty_text: str = "Nothing to show yet.",
        parent: QWidget | None = None,
        minimum: QSize | None = None,
        min_row_height: int = 0,
    ) -> None:
        """``min_row_height`` > 0 makes the widget ask for at least that height per row."""
        super().__init__(parent)
        self._data: HeatmapData | None = None
        self._empty_text = empty_text
        self._minimum = minimum or QSize(320, 240)
        self.min_row_height = min_row_height
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def sizeHint(self) -> QSize:
        return QSize(480, 360).expandedTo(self.minimumSizeHint())

    def minimumSizeHint(self) -> QSize:
        return QSize(self._minimum.width(), max(self._minimum.height(), self.height_for_rows(self.width())))

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
        self.updateGeometry()
        self.update()

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        # The title's lines and the column labels' direction follow the width, and the height needed with them.
        if event.size().width() != event.oldSize().width():
            self.updateGeometry()

    def fonts(self) -> tuple[QFont, QFont]:
        base_font = QFont(self.font())
        title_font = QFont(base_font)
        title_font.setBold(True)
        title_font.setPointSizeF(base_font.pointSizeF() * 1.15)
        return base_font, title_font

    def layout_for(self, width: float, height: float) -> HeatmapLayout | None:
        """The plot's layout at this size, or None without data."""
        data = self._data
        if data is None or not data.values:
            return None
        base_font, title_font = self.fonts()
        metrics, title_metrics = QFontMetricsF(base_font), QFontMetricsF(title_font)
        line = metrics.height()
        columns = len(data.values[0])

        title_lines = wrap_text(title_metrics, data.title, width - 8)
        top = len(title_lines) * title_metrics.height() + 10
        row_label_width = max(metrics.horizontalAdvance(label) for label in data.row_labels) + 8
        left = line + 6 + row_label_width
        plot_width = width - left - LEGEND_WIDTH - 10
        cell_w = plot_width / columns
        label_widths = [metrics.horizontalAdvance(label) for label in data.column_labels]
        vertical = any(w > cell_w - 2 for w in label_widths)
        if vertical:
            label_height = min(max(label_widths), MAX_VERTICAL_LABEL)
            labels = [
                metrics.elidedText(label, Qt.TextElideMode.ElideRight, MAX_VERTICAL_LABEL)
                for label in data.column_labels
            ]
        else:
            label_height, labels = line, list(data.column_labels)
        strip = 8 if data.column_colors else 4  # the column colours, under the plot
        bottom_space = strip + label_height + 4 + line + 8 + (line + 4 if data.outline_legend else 0)
        plot = QRectF(left, top, plot_width, height - top - bottom_space)
        bar = QRectF(plot.right() + 14, plot.top(), 14, plot.height())
        legend_label = metrics.elidedText(data.legend_label, Qt.TextElideMode.ElideRight, bar.height())
        return HeatmapLayout(
            title_lines=title_lines,
            title_rect=QRectF(4, 2, width - 8, top - 8),
            plot=plot,
            cell_width=cell_w,
            cell_height=plot.height() / len(data.values),
            column_labels=labels,
            vertical_column_labels=vertical,
            column_labels_top=plot.bottom() + strip,
            column_label_height=label_height,
            bar=bar,
            legend_label=legend_label,
        )

    def height_for_rows(self, width: float) -> int:
        """The height that gives every row min_row_height and the rotated labels their length, at this width."""
        data = self._data
        if self.min_row_height <= 0 or data is None or not data.values:
            return 0
        probe = self.layout_for(width, 10_000)
        assert probe is not None
        metrics = QFontMetricsF(self.fonts()[0])
        plot_height = max(
            len(data.values) * self.min_row_height,
            metrics.horizontalAdvance(data.legend_label) + 8,
            metrics.horizontalAdvance(data.y_label) + 8,
        )
        return int(10_000 - probe.plot.height() + plot_height) + 1

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
        layout = self.layout_for(self.width(), self.height())
        if data is None or layout is None:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self._empty_text)
            painter.end()
            return
        plot, cell_w, cell_h = layout.plot, layout.cell_width, layout.cell_height
        if plot.width() < MIN_PLOT_SIZE or plot.height() < MIN_PLOT_SIZE:
            painter.end()
            return
        base_font, title_font = self.fonts()
        metrics = QFontMetricsF(base_font)
        line = metrics.height()

        painter.setFont(title_font)
        painter.drawText(layout.title_rect, Qt.AlignmentFlag.AlignCenter, "\n".join(layout.title_lines))
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
        row_label_left = line + 6
        for r, label in enumerate(data.row_labels):
            rect = QRectF(row_label_left, plot.top() + r * cell_h, plot.left() - row_label_left - 6, cell_h)
            painter.drawText(rect, Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, label)
        self._draw_column_labels(painter, layout, line)
        x_label_top = layout.column_labels_top + layout.column_label_height + 4
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

        self._draw_colour_bar(painter, layout.bar, layout.legend_label, metrics)
        painter.end()

    def _draw_column_labels(self, painter: QPainter, layout: HeatmapLayout, line: float) -> None:
        assert self._data is not None
        plot, cell_w = layout.plot, layout.cell_width
        for c, color in enumerate(self._data.column_colors):
            painter.fillRect(QRectF(plot.left() + c * cell_w + 2, plot.bottom() + 2, cell_w - 4, 4), QColor(color))
        for c, label in enumerate(layout.column_labels):
            center = plot.left() + (c + 0.5) * cell_w
            if layout.vertical_column_labels:
                # Read from the bottom up, ending under the column.
                painter.save()
                painter.translate(center, layout.column_labels_top)
                painter.rotate(-90)
                height = layout.column_label_height
                painter.drawText(
                    QRectF(-height, -line / 2, height, line),
                    Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                    label,
                )
                painter.restore()
            else:
                rect = QRectF(center - cell_w / 2, layout.column_labels_top, cell_w, line)
                painter.drawText(rect, Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop, label)

    def _draw_colour_bar(self, painter: QPainter, bar: QRectF, legend_label: str, metrics: QFontMetricsF) -> None:
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
        if legend_label:
            painter.save()
            painter.translate(text_left + metrics.height() * 0.2, bar.center().y())
            painter.rotate(90)
            painter.drawText(
                QRectF(-bar.height() / 2, -metrics.height() - 14, bar.height(), metrics.height()),
                Qt.AlignmentFlag.AlignCenter,
                legend_label,
            )
            painter.restore()


def prompt_routing_heatmap(
    routing: PromptRouting, labels: Sequence[str], colors: Sequence[str], top_k: int, title: str
) -> HeatmapData:
    """Each layer's router weights for one test prompt (averaged over its tokens), its top-k experts outlined."""
    per_layer = routing.weights.mean(axis=1)  # layers x experts
    top_k = max(1, min(top_k, len(labels)))
    # Each layer's top-k experts, likeliest first.
    picked = [[int(column) for column in (-row).argsort(kind="stable")[:top_k]] for row in per_layer]
    picks = "the expert each layer picks" if top_k == 1 else f"the {top_k} experts each layer picks (top {top_k})"
    return HeatmapData(
        values=per_layer.tolist(),
        row_labels=[f"layer {i}" for i in range(len(per_layer))],
        column_labels=list(labels),
        title=title,
        x_label=f"Expert (this prompt belongs to {labels[routing.intended_expert]})",
        y_label="Layer",
        value_range=(0.0, 1.0),
        legend_label="mean router weight",
        marked=picked,
        outline_legend=picks,
        column_colors=list(colors),
    )


def routing_overview_heatmap(
    routings: Sequence[PromptRouting], labels: Sequence[str], colors: Sequence[str]
) -> HeatmapData:
    """Every test prompt's mean router weight per expert (over layers and tokens), its intended expert outlined."""
    return HeatmapData(
        values=[routing.weights.mean(axis=(0, 1)).tolist() for routing in routings],
        row_labels=[short(routing.text, 28) for routing in routings],
        column_labels=list(labels),
        title="Where the recipe's test prompts go (mean router weight over layers and tokens)",
        x_label="Expert",
        y_label="Test prompt",
        value_range=(0.0, 1.0),
        legend_label="mean router weight",
        marked=[[routing.intended_expert] for routing in routings],
        outline_legend="the expert each prompt was written for",
        column_colors=list(colors),
    )


def save_heatmap_png(data: HeatmapData, path: Path, width: int = 900) -> None:
    """Draw a heatmap offscreen at a size that suits its rows and save it as a PNG (for a model card)."""
    widget = Heatmap("")
    widget.set_data(data)
    widget.resize(width, 160 + 34 * len(data.row_labels))
    if not widget.grab().save(str(path), "PNG"):
        raise OSError(f"could not write {path}")
