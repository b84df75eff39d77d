"""Preview page: compute the routers in a worker, then show how alike the experts look to them,
where the test prompts go, and a routing quality score."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QShowEvent
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
from app.gui.engine import GateSession, PreviewResult, base_parameter_count
from app.gui.plots import Heatmap, HeatmapData, prompt_routing_heatmap
from app.gui.widgets import MessageLabel, explanation, heading, short
from app.gui.workers import JobHandle

# A preview computes by itself on arrival when the base model is at most this big: a few seconds
# on a CPU. Bigger ones wait for Compute preview, since they take minutes and much memory.
AUTO_PREVIEW_MAX_PARAMETERS = 150_000_000
COMPUTE_HINT = "Compute the routers to see how they will send text to the experts."


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
        self.estimate_job: JobHandle | None = None
        # The recipe the page last judged for a preview on arrival: judged once, so that a failed
        # or cancelled preview is not started again behind the user's back.
        self._judged_recipe: Recipe | None = None

        self.compute_button = QPushButton("Compute preview")
        self.compute_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.compute_button.clicked.connect(self.compute)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("")
        self.progress.setVisible(False)  # empty, it looks like a text field: shown while working
        self.status = MessageLabel(COMPUTE_HINT)
        self.quality = MessageLabel()
        quality_font = self.quality.font()
        quality_font.setPointSizeF(quality_font.pointSizeF() * 1.2)
        quality_font.setBold(True)
        self.quality.setFont(quality_font)
        self.warnings = MessageLabel()

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
        controls.addStretch(0)
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
                "test prompt, each layer's router weights; the outlined cells are the experts that layer picks "
                "(as many as the recipe's experts per token)."
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
        self.progress.setVisible(True)
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
        self.progress.setVisible(False)
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setFormat("")

    # ------------------------------------------------------------------ computing on arrival

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self._judge_on_arrival()

    def _judge_on_arrival(self) -> None:
        """Arriving at a page without a preview of this recipe: compute it if that is quick."""
        recipe = self.document.recipe
        busy = any(job is not None and job.is_running for job in (self.job, self.estimate_job))
        current = self.result is not None and self.result.recipe == recipe
        if busy or current or recipe == self._judged_recipe or not self.document.is_open:
            return
        self._judged_recipe = recipe
        if any(p.is_error for p in validate_recipe(recipe)):
            return  # Compute preview lists what to fix
        # The size is read from the weights' headers in a worker: the GUI never waits on a disk.
        self.estimate_job = self.context.run("Preview estimate", base_parameter_count(recipe), quiet=True)
        self.estimate_job.succeeded.connect(lambda parameters: self._estimated(recipe, parameters))

    def _estimated(self, recipe: Recipe, parameters: int | None) -> None:
        quick = parameters is not None and parameters <= AUTO_PREVIEW_MAX_PARAMETERS
        if quick and recipe == self.document.recipe and (self.result is None or self.result.recipe != recipe):
            self.compute()

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
        self._update_routing_placeholder(recipe)
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
        self.routing.set_data(
            prompt_routing_heatmap(
                routing,
                labels,
                colors,
                self.result.recipe.experts_per_token,
                f"Router weights for “{short(routing.text, 32)}”",
            )
        )

    # ------------------------------------------------------------------ document

    def _recipe_changed(self, recipe: Recipe) -> None:
        if self.result is not None and self.result.recipe != recipe:
            self.status.setText("The recipe changed since this preview: compute again to update it.")
        self._update_routing_placeholder(recipe)

    def _update_routing_placeholder(self, recipe: Recipe) -> None:
        """What the empty routing plot says follows the recipe: add test prompts, or compute."""
        count = sum(len(extras.test_prompts) for extras in recipe.studio.experts[: len(recipe.experts)])
        if count == 0:
            text = "Add test prompts on the Prompts page to see where they go."
        elif self.result is None:
            where = "the test prompt goes" if count == 1 else f"the {count} test prompts go"
            text = f"Compute the preview to see where {where}."
        else:
            text = "The preview was computed without test prompts: compute again to see where they go."
        self.routing.set_empty_text(text)

    def _document_opened(self) -> None:
        self.result = None
        self.similarity.set_data(None)
        self.routing.set_data(None)
        self.quality.clear()
        self.warnings.clear()
        self.prompt_choice.clear()
        self.status.setText(COMPUTE_HINT)
        self._judged_recipe = None
        self._update_routing_placeholder(self.document.recipe)
        if self.isVisible():
            self._judge_on_arrival()

    def shutdown(self) -> None:
        """Release the kept model; called after every worker has stopped."""
        self.session.close()
