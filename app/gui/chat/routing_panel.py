"""The routing panel: the expert legend, which layer colours the tokens, the router weights of one
token, and expert usage over the transcript; or, for a dense model, why there is none."""

from __future__ import annotations

import html

from PySide6.QtCore import QSize, Qt
from PySide6.QtWidgets import (
    QComboBox,
    QFrame,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QScrollArea,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.chat import ExpertUsage, TokenRouting
from app.core.chat.trace import token_heatmap
from app.gui.chat.style import SHARED_EXPERT_COLOR, ExpertStyle
from app.gui.plots import Heatmap, HeatmapData
from app.gui.widgets import explanation

# Enough for a row label and its cell to read; a model with many layers makes the panel scroll instead.
MIN_ROW_HEIGHT = 22


class RoutingPanel(QStackedWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.legend_label = QLabel()
        self.legend_label.setWordWrap(True)
        self.legend_label.setTextFormat(Qt.TextFormat.RichText)
        self.color_by = QComboBox()
        self.color_by.setToolTip(
            "Which expert colours each token: the one most layers chose first, or one layer's first choice"
        )
        self.token_map = Heatmap(
            "Point at a token of an answer to see which experts every layer chose for it.",
            minimum=QSize(260, 140),
            min_row_height=MIN_ROW_HEIGHT,
        )
        self.usage_map = Heatmap(
            "Expert usage appears once the model answers.", minimum=QSize(260, 140), min_row_height=MIN_ROW_HEIGHT
        )
        self.usage_map.setToolTip(
            "Each layer's row: the share of its top-k choices that went to each expert. The last row: each "
            "expert's share of the tokens, counting for each token the expert most layers chose."
        )
        self.export_trace_button = QPushButton("Export trace (JSONL)…")
        self.export_trace_button.setToolTip("Every token of the latest answer, prompt included, with its routing")
        self.export_usage_button = QPushButton("Export usage (CSV)…")

        colour_row = QHBoxLayout()
        colour_row.addWidget(QLabel("Colour tokens by"))
        colour_row.addWidget(self.color_by, 1)
        exports = QHBoxLayout()
        exports.addWidget(self.export_trace_button)
        exports.addWidget(self.export_usage_button)
        exports.addStretch(1)
        plots = QWidget()
        plots_layout = QVBoxLayout(plots)
        plots_layout.setContentsMargins(0, 0, 0, 0)
        plots_layout.addWidget(self.token_map)
        plots_layout.addWidget(self.usage_map)
        self.plots_area = QScrollArea()
        self.plots_area.setWidget(plots)
        self.plots_area.setWidgetResizable(True)
        self.plots_area.setFrameShape(QFrame.Shape.NoFrame)
        self.plots_area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        panel = QWidget()
        layout = QVBoxLayout(panel)
        layout.addWidget(self.legend_label)
        layout.addLayout(colour_row)
        layout.addWidget(self.plots_area, 1)
        layout.addLayout(exports)

        self.panel_reason = explanation("")
        self.panel_reason.setTextFormat(Qt.TextFormat.PlainText)  # it names the model
        self.panel_reason.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.addWidget(panel)
        self.addWidget(self.panel_reason)

    def show_unavailable(self, reason: str) -> None:
        """The panel for an MoE model (reason ""), or the reason a dense model has none."""
        self.panel_reason.setText(reason)
        self.setCurrentIndex(1 if reason else 0)

    def fill_color_by(self, layers: tuple[int, ...]) -> None:
        self.color_by.blockSignals(True)
        self.color_by.clear()
        self.color_by.addItem("Most layers' choice", None)
        for slot, layer in enumerate(layers):
            self.color_by.addItem(f"Layer {layer}'s choice", slot)
        self.color_by.blockSignals(False)

    def color_slot(self) -> int | None:
        """The routed layer whose first choice colours the tokens, or None for the majority choice."""
        slot = self.color_by.currentData()
        return slot if isinstance(slot, int) else None

    def show_token(self, token: TokenRouting | None, style: ExpertStyle) -> None:
        if token is None or not token.experts:
            self.token_map.set_data(None)
            return
        num_experts = len(token.probs[0]) if token.probs else max(max(e) for e in token.experts) + 1
        labels, colors = style.column_labels(num_experts)
        shared = [1.0] if style.shared_expert else []
        values = [[*row, *shared] for row in token.probs] if token.probs else None
        if values is None:
            values = [[*row, *shared] for row in token_heatmap(token, num_experts).tolist()]
        marked = [[*experts, *([num_experts] if shared else [])] for experts in token.experts]
        self.token_map.set_data(
            HeatmapData(
                values=values,
                row_labels=[f"layer {layer}" for layer in token.layers],
                column_labels=labels,
                # A no-break space keeps "(position N)" together when the title wraps.
                title=f"Router weights for {token.token!r} (position\u00a0{token.position})",
                x_label="expert",
                y_label="layer",
                legend_label="router probability",
                marked=marked,
                outline_legend="chosen (top-k)" + ("; shared: always" if shared else ""),
                column_colors=colors,
            )
        )

    def show_usage(self, usage: ExpertUsage | None, style: ExpertStyle) -> None:
        if usage is None or usage.tokens == 0:
            self.usage_map.set_data(None)
            return
        labels, colors = style.column_labels(usage.num_experts)
        shared = [1.0] if style.shared_expert else []
        rows = [[*row, *shared] for row in usage.layer_shares().tolist()]
        rows.append([*usage.token_shares().tolist(), *shared])
        self.usage_map.set_data(
            HeatmapData(
                values=rows,
                row_labels=[*(f"layer {layer}" for layer in usage.layers), "all tokens"],
                column_labels=labels,
                title=f"Expert usage over {usage.tokens} generated tokens",
                x_label="expert",
                y_label="layer",
                legend_label="share",
                column_colors=colors,
            )
        )

    def show_legend(self, style: ExpertStyle) -> None:
        legend = style.legend
        # Non-breaking spaces keep each entry on one line; the lines break between entries.
        entries = [
            f'<span style="background-color:{color}">&nbsp;&nbsp;&nbsp;&nbsp;</span>&nbsp;'
            + html.escape(label).replace(" ", "&nbsp;")
            for label, color in zip(legend.labels, legend.colors, strict=True)
        ]
        if style.shared_expert:
            entries.append(
                f'<span style="background-color:{SHARED_EXPERT_COLOR}">&nbsp;&nbsp;&nbsp;&nbsp;</span>'
                "&nbsp;shared expert (always active)"
            )
        self.legend_label.setText(" &nbsp; ".join(entries))
