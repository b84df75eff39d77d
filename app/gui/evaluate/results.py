"""The Evaluate page's results: a table, the grouped bar chart, the routing heatmap per dataset, the
k sweep and lm-eval's scores, all drawn from the report's JSON layout (what ``--json`` writes)."""

from __future__ import annotations

import math
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QFont, QPalette
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QScrollArea,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.eval.card import (
    card_model_name,
    is_default_routing,
    lm_eval_table,
    perplexity_table,
    result_disabled,
    result_top_k,
)
from app.gui.evaluate.charts import BarChart, BarChartData, LinePlot, LinePlotData
from app.gui.plots import Heatmap, HeatmapData
from app.gui.widgets import explanation

MIN_HEATMAP_ROW = 22
ALL_DATASETS = "All datasets: dataset × expert"


def model_label(model: str) -> str:
    """A model's column title: "MoE", "base", or the donor's name without its folders."""
    return {"moe": "MoE", "base": "base"}.get(model, card_model_name(model))


def _item(text: str, tooltip: str = "") -> QTableWidgetItem:
    item = QTableWidgetItem(text)
    item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
    if tooltip:
        item.setToolTip(tooltip)
    return item


class ResultsView(QTabWidget):
    """Shows one report; :meth:`show_report` replaces whatever was shown."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.report: dict[str, Any] | None = None
        self.expert_labels: tuple[str, ...] = ()
        self.moe_top_k: int | None = None

        self.table = QTableWidget()
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.horizontalHeader().setMinimumSectionSize(80)
        self.table_note = explanation("")
        table_tab = QWidget()
        table_layout = QVBoxLayout(table_tab)
        table_layout.addWidget(self.table, 1)
        table_layout.addWidget(self.table_note)

        self.bars = BarChart("Evaluate a model to compare it with its base and experts here.")

        self.routing_dataset = QComboBox()
        self.routing_dataset.currentIndexChanged.connect(self._show_routing)
        self.routing_note = explanation("")
        self.heatmap = Heatmap(
            "Evaluate a mixture-of-experts model to see which experts each dataset uses.",
            min_row_height=MIN_HEATMAP_ROW,
        )
        heatmap_area = QScrollArea()
        heatmap_area.setWidget(self.heatmap)
        heatmap_area.setWidgetResizable(True)
        routing_tab = QWidget()
        routing_layout = QVBoxLayout(routing_tab)
        picker = QHBoxLayout()
        picker.addWidget(QLabel("Dataset"))
        picker.addWidget(self.routing_dataset, 1)
        routing_layout.addLayout(picker)
        routing_layout.addWidget(heatmap_area, 1)
        routing_layout.addWidget(self.routing_note)

        self.sweep = LinePlot(
            "Give several experts-per-token values (a k sweep) to see how the MoE's perplexity moves with k."
        )

        self.benchmarks = QTableWidget()
        self.benchmarks.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)

        self.addTab(table_tab, "Table")
        self.addTab(self.bars, "Chart")
        self.addTab(routing_tab, "Routing")
        self.addTab(self.sweep, "k sweep")
        self.addTab(self.benchmarks, "Benchmarks")
        self.show_report(None)

    def show_report(
        self, report: dict[str, Any] | None, expert_labels: tuple[str, ...] = (), moe_top_k: int | None = None
    ) -> None:
        """``moe_top_k`` places the MoE's own-routing results in the k sweep."""
        self.report = report
        self.expert_labels = expert_labels
        self.moe_top_k = moe_top_k
        self._fill_table()
        self._fill_bars()
        self._fill_routing()
        self._fill_sweep()
        self._fill_benchmarks()

    # ------------------------------------------------------------------ table and bars

    def _fill_table(self) -> None:
        report = self.report or {}
        datasets, models, values = perplexity_table(report)
        tokens = {
            (r["dataset"], r["model"]): int(r["tokens"]) for r in report.get("results", []) if is_default_routing(r)
        }
        nll = {(r["dataset"], r["model"]): float(r["nll"]) for r in report.get("results", []) if is_default_routing(r)}
        self.table.clear()
        self.table.setRowCount(len(datasets))
        self.table.setColumnCount(len(models))
        self.table.setHorizontalHeaderLabels([model_label(m) for m in models])
        self.table.setVerticalHeaderLabels(datasets)
        for column, model in enumerate(models):
            self.table.horizontalHeaderItem(column).setToolTip(model)
        highlight = self.palette().color(QPalette.ColorRole.Highlight)
        highlight.setAlphaF(0.35)
        for row, dataset in enumerate(datasets):
            measured = {m: values[(dataset, m)] for m in models if (dataset, m) in values}
            best = min(measured.values()) if measured else math.inf
            for column, model in enumerate(models):
                if model not in measured:
                    self.table.setItem(row, column, _item("—", "not measured"))
                    continue
                ppl = measured[model]
                item = _item(
                    f"{ppl:.3f}",
                    f"perplexity {ppl:.4f} · NLL {nll[(dataset, model)]:.4f} nats per token · "
                    f"{tokens[(dataset, model)]} tokens",
                )
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if ppl == best:
                    font = QFont(item.font())
                    font.setBold(True)
                    item.setFont(font)
                    item.setBackground(QBrush(highlight))
                    item.setText(f"★ {ppl:.3f}")
                self.table.setItem(row, column, item)
        self.table_note.setText(
            "Perplexity per dataset (rows) and model (columns); lower is better, the best of each row is starred. "
            "Point at a cell for its NLL and token count."
            if datasets
            else "No results yet."
        )

    def _fill_bars(self) -> None:
        datasets, models, values = perplexity_table(self.report or {})
        if not datasets:
            self.bars.set_data(None)
            return
        self.bars.set_data(
            BarChartData(
                groups=datasets,
                series=[model_label(m) for m in models],
                values=[[values.get((d, m)) for m in models] for d in datasets],
                title="Perplexity per dataset: MoE, base and experts (lower is better; ★ the best)",
                y_label="perplexity",
            )
        )

    # ------------------------------------------------------------------ routing

    def moe_routing(self) -> dict[str, Any]:
        """The MoE's routing section with its own routing (the first override when none is default)."""
        by_override = ((self.report or {}).get("routing") or {}).get("moe") or {}
        if not by_override:
            return {}
        return dict(by_override.get("default") or next(iter(by_override.values())))

    def routing_sections(self) -> dict[str, dict[str, Any]]:
        """The MoE's routing statistics per dataset."""
        return dict(self.moe_routing().get("datasets") or {})

    def _fill_routing(self) -> None:
        sections = self.routing_sections()
        self.routing_dataset.blockSignals(True)
        self.routing_dataset.clear()
        self.routing_dataset.addItems(list(sections))
        if len(sections) > 1 and self.moe_routing().get("confusion"):
            self.routing_dataset.addItem(ALL_DATASETS)
        self.routing_dataset.blockSignals(False)
        self.routing_dataset.setEnabled(bool(sections))
        self._show_routing()

    def _show_routing(self) -> None:
        sections = self.routing_sections()
        name = self.routing_dataset.currentText()
        if name == ALL_DATASETS:
            self._show_confusion(self.moe_routing()["confusion"])
            return
        stats = sections.get(name)
        if not stats or not stats.get("top1_share"):
            self.heatmap.set_data(None)
            self.routing_note.setText("")
            return
        shares = stats["top1_share"]
        num_experts = len(shares[0])
        labels = [self.expert_labels[e] if e < len(self.expert_labels) else str(e) for e in range(num_experts)]
        self.heatmap.set_data(
            HeatmapData(
                values=shares,
                row_labels=[f"layer {layer}" for layer in stats.get("layers", range(len(shares)))],
                column_labels=labels,
                title=f"Top-1 share of each expert on {name}",
                x_label="expert",
                y_label="MoE layer",
                legend_label="share of tokens",
            )
        )
        dead = [labels[e] for e in stats.get("dead_experts", []) if e < len(labels)]
        entropy = stats.get("entropy") or []
        parts = [f"{stats.get('tokens', 0)} tokens"]
        if entropy:
            parts.append(f"load entropy {sum(entropy) / len(entropy):.2f} (1 = evenly spread)")
        parts.append(
            f"⚠ under 1 % of tokens: {', '.join(dead)}" if dead else "every expert gets at least 1 % of tokens"
        )
        self.routing_note.setText(" · ".join(parts))

    def _show_confusion(self, confusion: dict[str, Any]) -> None:
        """Each dataset's top-1 share per expert over all layers; a dataset named after an expert outlines it."""
        datasets, shares = confusion["datasets"], confusion["shares"]
        matched = confusion.get("matched") or {}
        num_experts = len(shares[0]) if shares else 0
        labels = [self.expert_labels[e] if e < len(self.expert_labels) else str(e) for e in range(num_experts)]
        self.heatmap.set_data(
            HeatmapData(
                values=shares,
                row_labels=datasets,
                column_labels=labels,
                title="Top-1 share of each expert per dataset, over all MoE layers",
                x_label="expert",
                y_label="dataset",
                legend_label="share of tokens",
                outlined=[matched.get(dataset) for dataset in datasets],
                outline_legend="the expert a dataset is named after" if matched else "",
            )
        )
        accuracy = confusion.get("accuracy")
        self.routing_note.setText(
            f"Datasets named after an expert give it {accuracy:.0%} of their top-1 picks on average."
            if accuracy is not None
            else "No dataset is named after an expert, so none has an expert of its own to check."
        )

    # ------------------------------------------------------------------ sweep and benchmarks

    def sweep_points(self) -> tuple[list[int], dict[str, dict[int, float]]]:
        """The MoE's perplexity per dataset at each k measured: each k given, and its own k when known."""
        report = self.report or {}
        per_dataset: dict[str, dict[int, float]] = {}
        for result in report.get("results", []):
            if result["model"] != "moe":
                continue
            k = result_top_k(result)
            if result_disabled(result) or (k is None and self.moe_top_k is None):
                continue
            k = k if k is not None else self.moe_top_k
            per_dataset.setdefault(result["dataset"], {})[int(k)] = float(result["ppl"])
        ks = sorted({k for values in per_dataset.values() for k in values})
        return ks, per_dataset

    def _fill_sweep(self) -> None:
        ks, per_dataset = self.sweep_points()
        if len(ks) < 2:
            self.sweep.set_data(None)
            return
        datasets = list(per_dataset)
        self.sweep.set_data(
            LinePlotData(
                x_values=ks,
                series=datasets,
                values=[[per_dataset[d].get(k) for k in ks] for d in datasets],
                title="The MoE's perplexity by experts per token",
                x_label="experts per token (k)",
                y_label="perplexity",
            )
        )

    def _fill_benchmarks(self) -> None:
        rows, models, scores = lm_eval_table(self.report or {})
        self.benchmarks.clear()
        self.benchmarks.setRowCount(len(rows))
        self.benchmarks.setColumnCount(len(models))
        self.benchmarks.setHorizontalHeaderLabels([model_label(m) for m in models])
        self.benchmarks.setVerticalHeaderLabels([f"{task} · {metric}" for task, metric in rows])
        for row, (task, metric) in enumerate(rows):
            for column, model in enumerate(models):
                value = scores.get((task, metric, model))
                self.benchmarks.setItem(row, column, _item("—" if value is None else f"{value:.4f}"))
        self.setTabEnabled(self.indexOf(self.benchmarks), bool(rows))
