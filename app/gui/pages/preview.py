"""Preview page: compute the routers in a worker, then show how alike the experts look to them,
where the test prompts go, and a routing quality score."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.core.progress import Progress
from app.core.recipe import Recipe, validate_recipe
from app.gui import recipe_edits
from app.gui.context import AppContext, describe_error
from app.gui.document import RecipeDocument
from app.gui.engine import GateSession, PreviewResult
from app.gui.plots import Heatmap, HeatmapData
from app.gui.widgets import explanation, heading
from app.gui.workers import JobHandle


def short(text: str, length: int = 40) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= length else text[: length - 1] + "…"


class PreviewPage(QWidget):
    computed = Signal(object)

    def __init__(self, document: RecipeDocument, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.context = context
        settings = context.settings
        self.session = GateSession(settings.device, settings.torch_dtype_name, None)
        self.result: PreviewResult | None = None
        self.job: JobHandle | None = None

        self.compute_button = QPushButton("Compute preview")
        self.compute_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.compute_button.clicked.connect(self.compute)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("")
        self.status = QLabel("Compute the routers to see how they will send text to the experts.")
        self.status.setWordWrap(True)
        self.quality = QLabel()
        quality_font = self.quality.font()
        quality_font.setPointSizeF(quality_font.pointSizeF() * 1.2)
        quality_font.setBold(True)
        self.quality.setFont(quality_font)
        self.quality.setWordWrap(True)
        self.warnings = QLabel()
        self.warnings.setWordWrap(True)

        self.layer = QSlider(Qt.Orientation.Horizontal)
        self.layer.setRange(0, 0)
        self.layer.setPageStep(1)
        self.layer.valueChanged.connect(self._draw_similarity)
        self.layer_label = QLabel("Layer")
        self.similarity = Heatmap("The experts' similarity to the router appears here after Compute preview.")
        self.prompt_choice = QComboBox()
        self.prompt_choice.currentIndexChanged.connect(self._draw_routing)
        self.routing = Heatmap("Add test prompts on the Prompts page to see where they go.")

        controls = QHBoxLayout()
        controls.addWidget(self.compute_button)
        controls.addWidget(self.cancel_button)
        controls.addWidget(self.progress, 1)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        layer_row = QHBoxLayout()
        layer_row.addWidget(self.layer_label)
        layer_row.addWidget(self.layer, 1)
        left_layout.addWidget(self.similarity, 1)
        left_layout.addLayout(layer_row)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.routing, 1)
        prompt_row = QHBoxLayout()
        prompt_row.addWidget(QLabel("Test prompt"))
        prompt_row.addWidget(self.prompt_choice, 1)
        right_layout.addLayout(prompt_row)
        plots = QSplitter()
        plots.addWidget(left)
        plots.addWidget(right)

        layout = QVBoxLayout(self)
        layout.addWidget(heading("3  Preview"))
        layout.addWidget(
            explanation(
                "Before merging, see what the router will do. Left: how alike each pair of experts "
                "looks to the router in one layer (1 means it cannot tell them apart). Right: for a "
                "test prompt, each layer's router weights; the outlined cell is the expert that layer picks."
            )
        )
        layout.addLayout(controls)
        layout.addWidget(self.status)
        layout.addWidget(self.quality)
        layout.addWidget(self.warnings)
        layout.addWidget(plots, 1)
        document.changed.connect(self._recipe_changed)
        document.opened.connect(self._document_opened)

    # ------------------------------------------------------------------ computing

    def compute(self) -> None:
        recipe = self.document.recipe
        errors = [p for p in validate_recipe(recipe) if p.is_error]
        if errors:
            self.status.setText("Fix these first:\n" + "\n".join(f"✗ {p.text}" for p in errors))
            return
        if self.job is not None and self.job.is_running:
            return
        self.compute_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)
        self.status.setText("Computing the routers…")
        self.job = self.context.run("Preview", self.session.preview(recipe))
        self.job.progress.connect(self._progress)
        self.job.succeeded.connect(self._computed)
        self.job.failed.connect(lambda error: self.status.setText(f"The preview failed: {describe_error(error)}"))
        self.job.cancelled.connect(lambda: self.status.setText("Preview cancelled."))
        self.job.finished.connect(self._job_finished)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.status.setText("Cancelling…")

    def _progress(self, record: Progress) -> None:
        if record.total:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(record.fraction * 1000))
        self.progress.setFormat(record.message or record.stage)

    def _job_finished(self) -> None:
        self.compute_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("")

    def _computed(self, result: PreviewResult) -> None:
        self.result = result
        recipe = result.recipe
        self.status.setText(
            f"Routers computed with gate mode {recipe.gate_mode!r} for {len(recipe.experts)} experts "
            f"over {len(result.gates.diagnostics)} layers."
        )
        labels = [recipe.expert_label(i) for i in range(len(recipe.experts))]
        warnings = result.gates.degenerate_warnings(labels)
        self.warnings.setText("\n".join(f"⚠ {w}" for w in warnings))
        self.warnings.setVisible(bool(warnings))
        if result.routing is not None:
            quality = result.routing.quality
            self.quality.setText(
                f"Routing quality: {quality.prompt_share:.0%} of {quality.prompts} test prompts and "
                f"{quality.token_share:.0%} of their {quality.tokens} tokens go to their own expert."
            )
        else:
            self.quality.setText("Add test prompts on the Prompts page to get a routing quality score.")
        self.layer.blockSignals(True)
        self.layer.setRange(0, len(result.gates.diagnostics) - 1)
        self.layer.blockSignals(False)
        self._draw_similarity()
        self.prompt_choice.blockSignals(True)
        self.prompt_choice.clear()
        for routing in result.routing.routings if result.routing else ():
            expert = recipe.expert_label(routing.intended_expert)
            self.prompt_choice.addItem(f"{expert}: {short(routing.text)}")
        self.prompt_choice.blockSignals(False)
        self._draw_routing()
        self.computed.emit(result)

    # ------------------------------------------------------------------ drawing

    def _labels_and_colors(self, recipe: Recipe) -> tuple[list[str], list[str]]:
        count = len(recipe.experts)
        return (
            [recipe.expert_label(i) for i in range(count)],
            [recipe_edits.expert_color(recipe, i) for i in range(count)],
        )

    def _draw_similarity(self) -> None:
        if self.result is None:
            return
        diagnostics = self.result.gates.diagnostics
        layer = self.layer.value()
        self.layer_label.setText(f"Layer {layer} of {len(diagnostics) - 1}")
        labels, colors = self._labels_and_colors(self.result.recipe)
        diag = diagnostics[layer]
        note = " (degenerate)" if diag.is_degenerate else ""
        self.similarity.set_data(
            HeatmapData(
                values=diag.similarity,
                row_labels=labels,
                column_labels=labels,
                title=f"Expert similarity to the router, layer {layer}{note}",
                x_label="Expert",
                y_label="Expert",
                value_range=(-1.0, 1.0),
                legend_label="cosine similarity",
                column_colors=colors,
                diverging=True,
            )
        )

    def _draw_routing(self) -> None:
        if self.result is None or self.result.routing is None or self.prompt_choice.currentIndex() < 0:
            self.routing.set_data(None)
            return
        routing = self.result.routing.routings[self.prompt_choice.currentIndex()]
        labels, colors = self._labels_and_colors(self.result.recipe)
        per_layer = routing.weights.mean(axis=1)  # layers x experts, averaged over the prompt's tokens
        picked = [int(row.argmax()) for row in per_layer]
        self.routing.set_data(
            HeatmapData(
                values=per_layer.tolist(),
                row_labels=[f"layer {i}" for i in range(len(per_layer))],
                column_labels=labels,
                title=f"Router weights for “{short(routing.text, 32)}”",
                x_label=f"Expert (this prompt belongs to {labels[routing.intended_expert]})",
                y_label="Layer",
                value_range=(0.0, 1.0),
                legend_label="mean router weight",
                outlined=picked,
                outline_legend="expert the layer picks",
                column_colors=colors,
            )
        )

    # ------------------------------------------------------------------ document

    def _recipe_changed(self, recipe: Recipe) -> None:
        if self.result is not None and self.result.recipe != recipe:
            self.status.setText("The recipe changed since this preview: compute again to update it.")

    def _document_opened(self) -> None:
        self.result = None
        self.similarity.set_data(None)
        self.routing.set_data(None)
        self.quality.clear()
        self.warnings.clear()
        self.prompt_choice.clear()
        self.status.setText("Compute the routers to see how they will send text to the experts.")

    def shutdown(self) -> None:
        """Release the kept model; called after every worker has stopped."""
        self.session.close()
