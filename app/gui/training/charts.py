"""Live charts of a router training run, painted in the style of the Evaluate page's charts: the training
and validation loss by step, and each expert's share of the routed tokens now against at the start."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QFontMetricsF, QPaintEvent, QPen
from PySide6.QtWidgets import QWidget

# The Evaluate page's chart base: title, y axis, legend and empty text drawn the same way on both pages.
from app.gui.evaluate.charts import TICKS, Chart, nice_ceiling, series_color

TRAIN_SERIES = "training loss (with the balance and z terms)"
VALIDATION_SERIES = "validation loss"
X_TICKS = 6


def nice_range(values: Sequence[float]) -> tuple[float, float, int]:
    """Round axis ends around values, and how many ticks of 1, 2 or 5 times a power of ten lie between."""
    spread = (max(values) - min(values)) or max(abs(max(values)), 1.0) * 0.1
    step = nice_ceiling(spread / TICKS)
    low, high = math.floor(min(values) / step) * step, math.ceil(max(values) / step) * step
    high = high if high > low else low + step
    return low, high, max(1, round((high - low) / step))


class LossPlot(Chart):
    """The training loss at every step it arrives for, and the validation loss at each evaluation."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("The training and validation loss appear here while the routers train.", parent)
        self.train: list[tuple[int, float]] = []
        self.validation: list[tuple[int, float]] = []

    def clear(self) -> None:
        self.train.clear()
        self.validation.clear()
        self.update()

    def add(self, step: int, loss: float | None, val_loss: float | None) -> None:
        for points, value in ((self.train, loss), (self.validation, val_loss)):
            if value is not None and math.isfinite(value) and (not points or points[-1] != (step, value)):
                points.append((step, value))
        self.update()

    def set_curves(self, train: Sequence[tuple[int, float]], validation: Sequence[tuple[int, float]]) -> None:
        self.train, self.validation = list(train), list(validation)
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        painter, text = self._begin()
        values = [value for _step, value in (*self.train, *self.validation)]
        if not values:
            self._draw_empty(painter)
            painter.end()
            return
        metrics = QFontMetricsF(self.fonts()[0])
        line = metrics.height()
        top = self._draw_title(painter, "Training and validation loss (nats per token; lower is better)")
        low, high, ticks = nice_range(values)
        series = [TRAIN_SERIES, VALIDATION_SERIES]
        left = self._left_margin(high)
        bottom_space = 3 * line + 18 + self._legend_height(series)
        plot = QRectF(left, top, self.width() - left - 16, self.height() - top - bottom_space)
        if plot.width() < 40 or plot.height() < 40:
            painter.end()
            return
        self._draw_y_axis(painter, plot, low, high, "loss", text, ticks)
        last_step = max(step for step, _value in (*self.train, *self.validation))
        # Round steps between ticks (1, 2 or 5 times a power of ten), and the axis to the tick after the last step.
        x_step = nice_ceiling(max(last_step, 1) / X_TICKS)
        x_ticks = max(1, math.ceil(max(last_step, 1) / x_step))
        x_high = x_step * x_ticks

        def point(step: float, value: float) -> QPointF:
            return QPointF(
                plot.left() + plot.width() * step / x_high,
                plot.bottom() - plot.height() * (value - low) / (high - low),
            )

        for tick in range(x_ticks + 1):
            step = x_step * tick
            tick_rect = QRectF(point(step, low).x() - 30, plot.bottom() + 4, 60, line)
            painter.drawText(tick_rect, Qt.AlignmentFlag.AlignCenter, f"{step:g}")
        painter.drawText(
            QRectF(plot.left(), plot.bottom() + line + 6, plot.width(), line), Qt.AlignmentFlag.AlignCenter, "step"
        )
        for index, (points, markers) in enumerate(((self.train, len(self.train) == 1), (self.validation, True))):
            color = series_color(index)
            painter.setPen(QPen(color, 2))
            painter.setBrush(color)
            where = [point(step, value) for step, value in points]
            for start, end in itertools.pairwise(where):
                painter.drawLine(start, end)
            if markers:
                for spot in where:
                    painter.drawEllipse(spot, 3.5, 3.5)
        painter.setBrush(Qt.BrushStyle.NoBrush)
        self._draw_legend(painter, series, plot.bottom() + 2 * line + 12, text)
        painter.end()


class ExpertLoadChart(Chart):
    """Each expert's share of the routed tokens (mean over layers): a bar now, an outline at the start, and
    a dashed line at the even share every expert would get under perfect balance."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Each expert's share of the routed tokens appears here while the routers train.", parent)
        self.labels: tuple[str, ...] = ()
        self.start: tuple[float, ...] = ()
        self.now: tuple[float, ...] = ()

    def clear(self) -> None:
        self.start, self.now = (), ()
        self.update()

    def set_labels(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self.update()

    def add(self, load: Sequence[float]) -> None:
        """The latest load; the first one a run reports stays as its start."""
        if not load:
            return
        if not self.start:
            self.start = tuple(load)
        self.now = tuple(load)
        self.update()

    def label(self, expert: int) -> str:
        return self.labels[expert] if expert < len(self.labels) else f"expert {expert}"

    def paintEvent(self, event: QPaintEvent) -> None:
        painter, text = self._begin()
        if not self.now:
            self._draw_empty(painter)
            painter.end()
            return
        metrics = QFontMetricsF(self.fonts()[0])
        line = metrics.height()
        top = self._draw_title(painter, "Share of routed tokens per expert (mean over layers)") + line
        experts = len(self.now)
        even = 1 / experts
        high = nice_ceiling(max(*self.now, *self.start, even))
        legend = ["now", "at the start (outline)", f"even share ({even:.0%}, dashed)"]
        left = self._left_margin(high)
        bottom_space = 2 * line + 14 + self._legend_height(legend)
        plot = QRectF(left, top, self.width() - left - 10, self.height() - top - bottom_space)
        if plot.width() < 40 or plot.height() < 40:
            painter.end()
            return
        self._draw_y_axis(painter, plot, 0.0, high, "share of tokens", text)
        slot = plot.width() / experts
        for expert, share in enumerate(self.now):
            height = plot.height() * share / high
            bar = QRectF(plot.left() + expert * slot + slot * 0.2, plot.bottom() - height, slot * 0.6, height)
            painter.fillRect(bar, series_color(0))
            label_bottom = bar.top()
            if expert < len(self.start):
                start_height = plot.height() * self.start[expert] / high
                painter.setPen(QPen(series_color(1), 2))
                painter.setBrush(Qt.BrushStyle.NoBrush)
                painter.drawRect(QRectF(bar.left(), plot.bottom() - start_height, bar.width(), start_height))
                label_bottom = min(label_bottom, plot.bottom() - start_height)
            painter.setPen(text)
            value_rect = QRectF(bar.left() - slot * 0.2, label_bottom - line - 2, slot, line)
            painter.drawText(value_rect, Qt.AlignmentFlag.AlignCenter, f"{share:.0%}")
            painter.setPen(text)
            name = metrics.elidedText(self.label(expert), Qt.TextElideMode.ElideMiddle, slot - 4)
            painter.drawText(
                QRectF(plot.left() + expert * slot, plot.bottom() + 4, slot, line), Qt.AlignmentFlag.AlignCenter, name
            )
        even_y = plot.bottom() - plot.height() * even / high
        painter.setPen(QPen(series_color(2), 2, Qt.PenStyle.DashLine))
        painter.drawLine(QPointF(plot.left(), even_y), QPointF(plot.right(), even_y))
        self._draw_legend(painter, legend, plot.bottom() + line + 12, text)
        painter.end()
