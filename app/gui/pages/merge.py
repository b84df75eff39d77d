"""Merge page: where to write the MoE and how, its model card, and the merge with progress,
speed, ETA and cancel."""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.core.merge.leftovers import LEFTOVERS_STAGE
from app.core.merge.modelcard import ROUTING_PREVIEW_IMAGE
from app.core.problems import Problem
from app.core.progress import Progress
from app.core.recipe import Recipe, validate_recipe
from app.gui import recipe_edits
from app.gui.context import AppContext, describe_error, describe_problems
from app.gui.document import RecipeDocument
from app.gui.engine import MergeRequest, PreviewResult, merge
from app.gui.plots import routing_overview_heatmap, save_heatmap_png
from app.gui.ship import open_export_dialog, open_publish_dialog
from app.gui.widgets import MessageLabel, explanation, format_bytes, format_duration, heading
from app.gui.workers import JobHandle

DEFAULT_SHARD_GB = 5.0


class MergePage(QWidget):
    open_in_chat = Signal(object)
    open_in_evaluate = Signal(object)
    open_in_training = Signal(object)

    def __init__(self, document: RecipeDocument, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.context = context
        self.preview: PreviewResult | None = None
        self._merged_preview: PreviewResult | None = None
        self.job: JobHandle | None = None
        self.merged_folder: Path | None = None
        # The Models page's compatibility check, for the recipe it checked; Merge waits for it.
        self.check: tuple[Recipe, list[Problem]] | None = None
        self.blocked = True
        # The stage whose speed is shown, when it started, and its bytes then.
        self._speed_start: tuple[str, float, int] | None = None

        self.out_dir = QLineEdit()
        self.out_dir.setPlaceholderText("Folder for the merged model")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.shard_size = QDoubleSpinBox()
        self.shard_size.setRange(0.01, 100.0)
        self.shard_size.setDecimals(2)
        self.shard_size.setSuffix(" GB")
        self.shard_size.setValue(DEFAULT_SHARD_GB)
        self.overwrite = QCheckBox("Replace the folder if it already holds files")
        self.name = QLineEdit()
        self.name.setPlaceholderText("Defaults to the folder's name")
        self.description = QPlainTextEdit()
        self.description.setPlaceholderText("What this model is for; goes at the top of its README.md")
        self.description.setMaximumHeight(70)
        self.license = QLineEdit()
        self.license.setPlaceholderText("Defaults to the base model's licence, e.g. apache-2.0")

        self.merge_button = QPushButton("Merge")
        self.merge_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.merge_button.clicked.connect(self.start_merge)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.stage = MessageLabel()
        self.speed = MessageLabel()
        self.problems = MessageLabel()
        self.result_label = MessageLabel()
        self.chat_button = QPushButton("Open in Chat")
        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.setToolTip("Is the MoE better than its experts? Measure it on the Evaluate page.")
        self.train_button = QPushButton("Train routers")
        self.train_button.setToolTip("Train the routers on your text, on the Train routers page.")
        self.train_button.clicked.connect(lambda: self.open_in_training.emit(self.merged_folder))
        self.show_button = QPushButton("Show folder")
        self.export_button = QPushButton("Export GGUF…")
        self.export_button.setToolTip("One file for llama.cpp, LM Studio, Ollama and other llama.cpp-based apps")
        self.publish_button = QPushButton("Publish…")
        self.publish_button.setToolTip("Upload the model with its card to the Hugging Face Hub")
        self.chat_button.clicked.connect(lambda: self.open_in_chat.emit(self.merged_folder))
        self.evaluate_button.clicked.connect(lambda: self.open_in_evaluate.emit(self.merged_folder))
        self.show_button.clicked.connect(self._show_folder)
        self.export_button.clicked.connect(self._export)
        self.publish_button.clicked.connect(self._publish)
        for button in self._result_buttons:
            button.setVisible(False)

        output = QGroupBox("Output")
        output_form = QFormLayout(output)
        folder_row = QHBoxLayout()
        folder_row.addWidget(self.out_dir, 1)
        folder_row.addWidget(browse)
        output_form.addRow("Folder", folder_row)
        output_form.addRow("Shard size", self.shard_size)
        output_form.addRow("", explanation("Weights are written in files of at most this size."))
        output_form.addRow("", self.overwrite)
        card = QGroupBox("Model card")
        card_form = QFormLayout(card)
        card_form.addRow("Name", self.name)
        card_form.addRow("Description", self.description)
        card_form.addRow("Licence", self.license)

        buttons = QHBoxLayout()
        buttons.addWidget(self.merge_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.progress, 1)
        done_row = QHBoxLayout()
        done_row.addWidget(self.result_label, 1)
        done_row.addWidget(self.train_button)
        done_row.addWidget(self.evaluate_button)
        done_row.addWidget(self.chat_button)
        done_row.addWidget(self.show_button)
        done_row.addWidget(self.export_button)
        done_row.addWidget(self.publish_button)

        layout = QVBoxLayout(self)
        layout.addWidget(heading("4  Merge"))
        layout.addWidget(
            explanation(
                "Writes a Mixtral-architecture model that transformers loads directly. "
                "It is built beside the target folder and moved into place only when complete, "
                "so cancelling leaves nothing behind."
            )
        )
        layout.addWidget(output)
        layout.addWidget(card)
        layout.addWidget(self.problems)
        layout.addLayout(buttons)
        layout.addWidget(self.stage)
        layout.addWidget(self.speed)
        layout.addLayout(done_row)
        layout.addStretch(1)
        document.changed.connect(self._recipe_changed)
        document.path_changed.connect(self._suggest_folder)
        document.opened.connect(self._document_opened)
        self._recipe_changed(document.recipe)

    def use_preview(self, result: PreviewResult) -> None:
        self.preview = result

    def use_check(self, recipe: Recipe, problems: list[Problem]) -> None:
        self.check = (recipe, problems)
        self._recipe_changed(self.document.recipe)

    def _document_opened(self) -> None:
        """Nothing of the previous recipe carries over: above all not its folder with "Replace" ticked."""
        self.preview = None
        self.check = None
        path = self.document.path
        self.out_dir.setText(str(path.parent / f"{path.stem}-moe") if path is not None else "")
        self.overwrite.setChecked(False)
        for field in (self.name, self.license):
            field.clear()
        self.description.clear()
        if self.job is not None and self.job.is_running:
            return  # a merge of the previous recipe is still running: its progress and result stay
        self.merged_folder = None
        self._speed_start = None
        self.progress.setValue(0)
        for label in (self.stage, self.speed, self.result_label):
            label.clear()
        for button in self._result_buttons:
            button.setVisible(False)

    def _suggest_folder(self, path: Path | None) -> None:
        if path is not None and not self.out_dir.text():
            self.out_dir.setText(str(path.parent / f"{path.stem}-moe"))

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder for the merged model")
        if folder:
            self.out_dir.setText(folder)

    def _recipe_changed(self, recipe: Recipe) -> None:
        """Recipe validation at once; the models' compatibility once the Models page has checked them."""
        checked = self.check is not None and self.check[0] == recipe
        problems = self.check[1] if self.check is not None and checked else validate_recipe(recipe)
        errors = [p for p in problems if p.is_error]
        waiting = "" if checked or errors else "Checking the models against the base model…"
        self.problems.setText(describe_problems(errors) or waiting)
        self.blocked = not checked or any(p.is_error for p in problems)
        self._update_buttons()

    def _update_buttons(self) -> None:
        running = self.job is not None and self.job.is_running
        self.merge_button.setEnabled(not running and not self.blocked)
        self.cancel_button.setEnabled(running)

    def request(self) -> MergeRequest:
        settings = self.context.settings
        return MergeRequest(
            out_dir=Path(self.out_dir.text().strip()).expanduser(),
            shard_size=int(self.shard_size.value() * 1e9),
            overwrite=self.overwrite.isChecked(),
            device=settings.device,
            name=self.name.text().strip(),
            description=self.description.toPlainText().strip(),
            license=self.license.text().strip(),
        )

    def start_merge(self) -> None:
        if self.blocked or (self.job is not None and self.job.is_running):
            return
        if not self.out_dir.text().strip():
            self.stage.setText("✗ Choose a folder for the merged model first.")
            return
        recipe = self.document.recipe
        # The preview's routers are the merge's routers when nothing has changed since.
        same_preview = self.preview is not None and self.preview.recipe == recipe
        gates = self.preview.gates if same_preview else None
        # The preview's routing of the test prompts describes this merge's routers: it goes into its folder.
        self._merged_preview = self.preview if same_preview else None
        self.merged_folder = None
        self._speed_start = None
        for button in self._result_buttons:
            button.setVisible(False)
        self.result_label.clear()
        self.merge_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.stage.setText("Starting…")
        self.speed.clear()
        self.job = self.context.run("Merge", merge(recipe, self.request(), gates))
        self.job.progress.connect(self._progress)
        self.job.succeeded.connect(self._merged)
        self.job.failed.connect(lambda error: self._stopped(f"✗ The merge failed: {describe_error(error)}"))
        self.job.cancelled.connect(lambda: self._stopped("Merge cancelled; nothing was left behind."))
        self.job.finished.connect(self._update_buttons)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.stage.setText("Cancelling…")

    def _progress(self, record: Progress) -> None:
        if record.stage == LEFTOVERS_STAGE:
            self.context.status.emit(f"Cleaned up after stopped merges: {record.message}.")
        self.progress.setValue(int(record.fraction * 1000))
        self.stage.setText(f"{record.stage}: {record.message}" if record.message else record.stage)
        if not record.bytes_total:
            return
        now = time.monotonic()
        # Downloads come before writing, at their own pace: each stage's speed is measured apart.
        if self._speed_start is None or self._speed_start[0] != record.stage:
            self._speed_start = (record.stage, now, record.bytes_done)
            return
        _stage, started, first_bytes = self._speed_start
        elapsed = now - started
        if elapsed > 0.2:
            rate = (record.bytes_done - first_bytes) / elapsed
            remaining = (record.bytes_total - record.bytes_done) / rate if rate > 0 else 0
            self.speed.setText(
                f"{format_bytes(record.bytes_done)} of {format_bytes(record.bytes_total)} · "
                f"{format_bytes(rate)}/s · about {format_duration(remaining)} left"
            )

    def _merged(self, result: object) -> None:
        self.merged_folder = Path(result.out_dir)  # type: ignore[attr-defined]
        self.progress.setValue(1000)
        self.stage.setText("Merged.")
        self.result_label.setText(
            f"✓ {self.merged_folder} · {format_bytes(result.bytes_written)} "  # type: ignore[attr-defined]
            f"in {format_duration(result.seconds)}"  # type: ignore[attr-defined]
        )
        for button in self._result_buttons:
            button.setVisible(True)
        self._save_routing_preview(self.merged_folder)

    def _save_routing_preview(self, folder: Path) -> None:
        """The preview's routing of the test prompts as routing-preview.png, which a published card shows."""
        preview = self._merged_preview
        if preview is None or preview.routing is None or not preview.routing.routings:
            return
        recipe = preview.recipe
        labels = [recipe.expert_label(i) for i in range(len(recipe.experts))]
        colors = [recipe_edits.expert_color(recipe, i) for i in range(len(recipe.experts))]
        try:
            save_heatmap_png(
                routing_overview_heatmap(preview.routing.routings, labels, colors), folder / ROUTING_PREVIEW_IMAGE
            )
        except OSError as exc:  # the model is complete without it; say so and carry on
            self.stage.setText(f"Merged. The routing preview image was not saved ({exc}).")

    def _stopped(self, message: str) -> None:
        """A merge that ends without a model shows no progress and no time left."""
        self.progress.setValue(0)
        self.speed.clear()
        self.stage.setText(message)

    @property
    def _result_buttons(self) -> tuple[QPushButton, ...]:
        """What can be done with a merged model, shown beside it once the merge has finished."""
        return (
            self.chat_button,
            self.evaluate_button,
            self.train_button,
            self.show_button,
            self.export_button,
            self.publish_button,
        )

    def _export(self) -> None:
        if self.merged_folder is not None:
            open_export_dialog(self.merged_folder, self.context, self)

    def _publish(self) -> None:
        if self.merged_folder is not None:
            open_publish_dialog(self.merged_folder, self.context, self)

    def _show_folder(self) -> None:
        if self.merged_folder is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.merged_folder)))
