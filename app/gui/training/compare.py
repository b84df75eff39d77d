"""The old routers against the new, side by side: the held-out loss table, the routing quality of the
recipe's test prompts, and the Preview page's routing heatmap of one test prompt under each."""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QBrush, QFont, QPalette
from PySide6.QtWidgets import (
    QAbstractScrollArea,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.gui.plots import Heatmap, prompt_routing_heatmap
from app.gui.training.jobs import Comparison, LossRow
from app.gui.widgets import MessageLabel, explanation, short

COLUMNS = ("old routers", "new routers", "change")
PROMPT_TITLE_LENGTH = 32
HEATMAP_MINIMUM = QSize(220, 200)


def _cell(text: str, tooltip: str) -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    item.setToolTip(tooltip)
    return item


class BeforeAfterView(QWidget):
    """Shows one :class:`Comparison`; :meth:`show_comparison` with None empties it."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.comparison: Comparison | None = None
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAsNeeded)
        # As tall as its rows, up to a limit: no empty space under a short table.
        self.table.setSizeAdjustPolicy(QAbstractScrollArea.SizeAdjustPolicy.AdjustToContents)
        self.table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Maximum)
        self.table.setMaximumHeight(200)
        self.quality = MessageLabel()
        self.prompt_choice = QComboBox()
        self.prompt_choice.currentIndexChanged.connect(self._draw_routing)
        # Side by side in the page's right column: each may be narrower than a heatmap alone.
        self.before = Heatmap("The old routers' choices for a test prompt appear here.", minimum=HEATMAP_MINIMUM)
        self.after = Heatmap("The new routers' choices for the same prompt appear here.", minimum=HEATMAP_MINIMUM)

        heatmaps = QSplitter()
        heatmaps.addWidget(self.before)
        heatmaps.addWidget(self.after)
        heatmaps.setChildrenCollapsible(False)
        prompt_row = QHBoxLayout()
        prompt_row.addWidget(QLabel("Test prompt"))
        prompt_row.addWidget(self.prompt_choice, 1)
        layout = QVBoxLayout(self)
        layout.addWidget(
            explanation(
                "Mean next-token loss in nats per token (lower is better; the better of each row is in bold). "
                "The validation split is the trainer's own held-out share of the training text."
            )
        )
        layout.addWidget(self.table)
        layout.addWidget(self.quality)
        layout.addLayout(prompt_row)
        layout.addWidget(heatmaps, 1)
        self.show_comparison(None)

    def show_comparison(self, comparison: Comparison | None) -> None:
        self.comparison = comparison
        self._fill_table(comparison.losses if comparison else ())
        self.prompt_choice.blockSignals(True)
        self.prompt_choice.clear()
        routing = comparison.before_routing if comparison else None
        for prompt in routing.routings if routing else ():
            assert comparison is not None
            self.prompt_choice.addItem(f"{comparison.labels[prompt.intended_expert]}: {short(prompt.text, 60)}")
        self.prompt_choice.blockSignals(False)
        self.prompt_choice.setEnabled(self.prompt_choice.count() > 0)
        if comparison is None:
            self.quality.setText("")
        elif comparison.before_routing is None or comparison.after_routing is None:
            self.quality.setText("The recipe beside the model has no test prompts, so there is no routing to compare.")
        else:
            self.quality.setText(
                f"Old routers: {comparison.before_routing.quality.summary()}.\n"
                f"New routers: {comparison.after_routing.quality.summary()}."
            )
        self._draw_routing()

    def _fill_table(self, rows: tuple[LossRow, ...]) -> None:
        self.table.setRowCount(len(rows))
        self.table.setVerticalHeaderLabels([row.dataset for row in rows])
        highlight = self.palette().color(QPalette.ColorRole.Highlight)
        highlight.setAlphaF(0.35)
        for index, row in enumerate(rows):
            tokens = f" on {row.tokens} tokens" if row.tokens is not None else ""
            cells = (
                _cell(f"{row.before:.4f}", f"NLL {row.before:.6f} nats per token{tokens}"),
                _cell(f"{row.after:.4f}", f"NLL {row.after:.6f} nats per token{tokens}"),
                _cell(f"{row.change:+.4f}", "the new routers' loss minus the old routers'"),
            )
            # Bold only where the shown figures differ: a tie at four decimals has no winner to show.
            before, after = round(row.before, 4), round(row.after, 4)
            better = cells[1] if after < before else cells[0] if before < after else None
            if better is not None:
                font = QFont(better.font())
                font.setBold(True)
                better.setFont(font)
                better.setBackground(QBrush(highlight))
            for column, cell in enumerate(cells):
                self.table.setItem(index, column, cell)

    def table_cells(self) -> dict[tuple[str, str], str]:
        """What the table shows, by (dataset, column)."""
        return {
            (self.table.verticalHeaderItem(r).text(), COLUMNS[c]): self.table.item(r, c).text()
            for r in range(self.table.rowCount())
            for c in range(self.table.columnCount())
        }

    def _draw_routing(self) -> None:
        comparison, index = self.comparison, self.prompt_choice.currentIndex()
        if comparison is None or comparison.before_routing is None or comparison.after_routing is None or index < 0:
            self.before.set_data(None)
            self.after.set_data(None)
            return
        for heatmap, name, routing in (
            (self.before, "Old", comparison.before_routing),
            (self.after, "New", comparison.after_routing),
        ):
            prompt = routing.routings[index]
            title = f"{name} routers: “{short(prompt.text, PROMPT_TITLE_LENGTH)}”"
            data = prompt_routing_heatmap(prompt, comparison.labels, comparison.colors, comparison.top_k, title)
            heatmap.set_data(data)
