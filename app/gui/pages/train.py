"""Train routers page: train only the router weights of a merged MoE on the user's text, watch the
training and validation loss and each expert's load live, then compare the old and the new routers.

The training is the core's :func:`app.core.training.trainer.train_routers` in a worker; the before/after
comparison (held-out losses as the Evaluate page measures them, and the routing of the recipe's test
prompts as the Preview page shows it) runs in a second worker once the new model is written. The
model it starts from is never touched: the new one goes to another folder.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.problems import FrankenMoEError
from app.core.progress import Progress
from app.gui.context import AppContext, describe_error
from app.gui.evaluate.jobs import recipe_beside
from app.gui.training.charts import ExpertLoadChart, LossPlot
from app.gui.training.compare import BeforeAfterView
from app.gui.training.form import TrainingForm
from app.gui.training.jobs import Comparison, TrainChoices, compare_job, default_out_dir, expert_legend_job, train_job
from app.gui.widgets import MessageLabel, explanation, format_count, heading
from app.gui.workers import JobHandle

PROGRESS_STEPS = 1000
WARNING_PREFIX = "warning: "  # how the trainer words a warning in a progress record's message


class TrainPage(QWidget):
    open_in_evaluate = Signal(object)
    open_in_chat = Signal(object)

    def __init__(self, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.context = context
        self.job: JobHandle | None = None
        self.compare: JobHandle | None = None
        self.legend_job: JobHandle | None = None
        self.result: object | None = None  # the core's RouterTrainingResult of the last run
        self.comparison: Comparison | None = None
        self.trained_folder: Path | None = None
        self._suggested_out = ""  # the output folder the page filled in, replaced when the model changes
        self._summary = ""  # what the last run achieved, kept above the comparison's news

        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("The merged MoE's folder")
        self.model_path.textChanged.connect(self._model_changed)
        browse_model = QPushButton("Browse…")
        browse_model.clicked.connect(self._browse_model)
        self.model_note = MessageLabel()
        self.out_dir = QLineEdit()
        self.out_dir.setPlaceholderText("A new, empty folder for the model with trained routers")
        self.out_dir.textChanged.connect(self._check_resumable)
        browse_out = QPushButton("Browse…")
        browse_out.clicked.connect(self._browse_out)
        self.resume = QCheckBox("Continue the stopped run from its checkpoint (same data and settings)")
        self.resume.setToolTip("A run writing this folder stopped after saving a checkpoint beside it.")
        self.resume.setVisible(False)
        settings = context.settings
        self.form = TrainingForm(settings.device, settings.dtype)

        self.start_button = QPushButton("Train routers")
        self.start_button.setDefault(True)
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, PROGRESS_STEPS)
        self.message = MessageLabel()
        self.warnings = MessageLabel()  # what the trainer warned about: kept in view for the whole run and after
        self.warnings.setVisible(False)
        self.loss_plot = LossPlot()
        self.load_chart = ExpertLoadChart()
        self.before_after = BeforeAfterView()
        self.evaluate_button = QPushButton("Evaluate")
        self.evaluate_button.setToolTip("Measure the model with trained routers on the Evaluate page.")
        self.evaluate_button.clicked.connect(lambda: self.open_in_evaluate.emit(self.trained_folder))
        self.chat_button = QPushButton("Open in Chat")
        self.chat_button.clicked.connect(lambda: self.open_in_chat.emit(self.trained_folder))
        self.show_button = QPushButton("Show folder")
        self.show_button.clicked.connect(self._show_folder)

        self.setLayout(self._build_layout(browse_model, browse_out))
        self._model_changed()
        self._update_buttons()

    def _build_layout(self, browse_model: QPushButton, browse_out: QPushButton) -> QVBoxLayout:
        model_box = QGroupBox("Model")
        model_form = QFormLayout(model_box)
        folders = (("Merged MoE", self.model_path, browse_model), ("Write to", self.out_dir, browse_out))
        for label, field, browse in folders:
            row = QHBoxLayout()
            row.addWidget(field, 1)
            row.addWidget(browse)
            model_form.addRow(label, row)
            if field is self.model_path:
                model_form.addRow(self.model_note)
        model_form.addRow(self.resume)

        settings = QWidget()
        settings_layout = QVBoxLayout(settings)
        settings_layout.setContentsMargins(0, 0, 6, 0)
        settings_layout.addWidget(model_box)
        settings_layout.addWidget(self.form)
        settings_layout.addStretch(1)
        settings_area = QScrollArea()
        settings_area.setWidget(settings)
        settings_area.setWidgetResizable(True)
        settings_area.setFrameShape(QScrollArea.Shape.NoFrame)
        settings_area.setMinimumWidth(340)
        settings_area.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

        charts = QSplitter(Qt.Orientation.Vertical)
        charts.addWidget(self.loss_plot)
        charts.addWidget(self.load_chart)
        charts.setChildrenCollapsible(False)
        self.tabs = QTabWidget()
        self.tabs.addTab(charts, "Training")
        self.tabs.addTab(self.before_after, "Before / after")
        results = QWidget()
        results_layout = QVBoxLayout(results)
        results_layout.setContentsMargins(6, 0, 0, 0)
        results_layout.addWidget(self.tabs, 1)
        done_row = QHBoxLayout()
        done_row.addStretch(1)
        for button in (self.evaluate_button, self.chat_button, self.show_button):
            done_row.addWidget(button)
        results_layout.addLayout(done_row)

        splitter = QSplitter()
        splitter.addWidget(settings_area)
        splitter.addWidget(results)
        splitter.setStretchFactor(0, 2)
        splitter.setStretchFactor(1, 3)
        splitter.setChildrenCollapsible(False)

        run_row = QHBoxLayout()
        run_row.addWidget(self.start_button)
        run_row.addWidget(self.cancel_button)
        run_row.addWidget(self.progress, 1)

        layout = QVBoxLayout()
        layout.addWidget(heading("5  Train routers"))
        layout.addWidget(
            explanation(
                "Routers set from prompts are a guess. This trains only the router weights of a merged MoE on your "
                "text (next-token loss plus a load-balancing term; everything else stays frozen) and writes a new "
                "model folder; the model you start from is never changed."
            )
        )
        layout.addWidget(splitter, 1)
        layout.addLayout(run_row)
        layout.addWidget(self.message)
        layout.addWidget(self.warnings)
        return layout

    # ------------------------------------------------------------------ choices

    def set_model(self, folder: Path) -> None:
        """Train this model's routers next (from the Merge page's result or the start screen)."""
        self.model_path.setText(str(folder))

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "The merged model whose routers to train")
        if folder:
            self.set_model(Path(folder))

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "A new, empty folder for the trained model")
        if folder:
            self.out_dir.setText(folder)

    def _model_changed(self) -> None:
        text = self.model_path.text().strip()
        has_recipe = bool(text) and recipe_beside(Path(text).expanduser()).is_file()
        self.form.set_recipe_available(has_recipe)
        if not text:
            self.model_note.setText("")
        elif has_recipe:
            self.model_note.setText("A merged model: its recipe gives prompts to train on and test prompts to compare.")
        else:
            self.model_note.setText("No recipe beside this model: add training text; there are no test prompts.")
        if self.out_dir.text().strip() in ("", self._suggested_out):
            self._suggested_out = str(default_out_dir(Path(text).expanduser())) if text else ""
            self.out_dir.setText(self._suggested_out)
        self._update_buttons()

    def _check_resumable(self) -> None:
        """Offer to continue when a stopped run left a checkpoint for this output folder (ticked: the likely wish)."""
        from app.core.training.trainer import checkpoint_dir, latest_checkpoint

        text = self.out_dir.text().strip()
        resumable = bool(text) and latest_checkpoint(checkpoint_dir(Path(text).expanduser())) is not None
        if resumable != self.resume.isVisible():
            self.resume.setChecked(resumable)
        self.resume.setVisible(resumable)
        self._update_buttons()

    def choices(self) -> TrainChoices:
        """What the page says to do; raises FrankenMoEError for what cannot even be handed to the core."""
        model, out = self.model_path.text().strip(), self.out_dir.text().strip()
        if not model:
            raise FrankenMoEError("No model is chosen", "Choose the folder of the merged MoE whose routers to train.")
        if not out:
            raise FrankenMoEError("No output folder is chosen", "Choose a new, empty folder for the trained model.")
        return TrainChoices(
            model_dir=Path(model).expanduser(),
            out_dir=Path(out).expanduser(),
            settings=self.form.settings(),
            data=self.form.data(),
            resume=self.resume.isVisible() and self.resume.isChecked(),
        )

    # ------------------------------------------------------------------ running

    @property
    def is_running(self) -> bool:
        return any(job is not None and job.is_running for job in (self.job, self.compare))

    def _update_buttons(self) -> None:
        running = self.is_running
        self.start_button.setEnabled(not running and bool(self.model_path.text().strip()))
        self.cancel_button.setEnabled(running)
        for field in (self.model_path, self.out_dir, self.form):
            field.setEnabled(not running)
        trained = self.trained_folder is not None and not (self.job is not None and self.job.is_running)
        for button in (self.evaluate_button, self.chat_button, self.show_button):
            button.setVisible(trained)

    def start(self) -> None:
        if self.is_running:
            return
        try:
            choices = self.choices()
        except FrankenMoEError as error:
            self._fail(error)
            self.context.log(f"Train routers: {describe_error(error)}")
            return
        self.result = self.comparison = self.trained_folder = None
        self._summary = ""
        self.loss_plot.clear()
        self.load_chart.clear()
        self.before_after.show_comparison(None)
        self.tabs.setCurrentIndex(0)
        self.progress.setValue(0)
        self.message.setText("Starting…")
        self.warnings.clear()
        self.warnings.setVisible(False)
        self.legend_job = self.context.run("Expert names", expert_legend_job(choices.model_dir), quiet=True)
        self.legend_job.succeeded.connect(lambda legend: self.load_chart.set_labels(legend.labels))
        self.job = self.context.run("Train routers", train_job(choices))
        self.job.progress.connect(self._progress)
        self.job.succeeded.connect(lambda result: self._trained(result, choices))
        self.job.failed.connect(self._fail)
        self.job.cancelled.connect(self._cancelled)
        self.job.finished.connect(self._check_resumable)
        self._update_buttons()

    def cancel(self) -> None:
        for job in (self.job, self.compare):
            if job is not None and job.is_running:
                job.cancel()
                self.message.setText("Cancelling…")

    def _progress(self, record: Progress) -> None:
        from app.core.training.trainer import TrainingProgress

        self.progress.setValue(round(record.fraction * PROGRESS_STEPS))
        if record.message.startswith(WARNING_PREFIX):
            warning = f"⚠ {record.message.removeprefix(WARNING_PREFIX)}"
            self.warnings.setText("\n".join(filter(None, (self.warnings.text(), warning))))
            self.warnings.setVisible(True)
            return
        if not isinstance(record, TrainingProgress) or record.stage not in ("train", "validate"):
            self.message.setText(f"{record.stage}: {record.message}" if record.message else f"{record.stage}…")
            return
        self.loss_plot.add(record.step, record.loss, record.val_loss)
        self.load_chart.add(record.expert_load)
        parts = [f"step {record.step} of {record.total}"]
        if record.loss is not None:
            parts.append(f"loss {record.loss:.4f}")
        if record.val_loss is not None:
            parts.append(f"validation loss {record.val_loss:.4f}")
        if record.tokens_per_s:
            parts.append(f"{format_count(round(record.tokens_per_s))} tokens/s")
        self.message.setText(f"{'Training' if record.stage == 'train' else 'Validating'}: {' · '.join(parts)}")

    def _trained(self, result: object, choices: TrainChoices) -> None:
        from app.core.training.trainer import RouterTrainingResult

        assert isinstance(result, RouterTrainingResult)
        self.result = result
        self.trained_folder = result.out_dir
        self.progress.setValue(PROGRESS_STEPS)
        history = result.history
        # Every record, including those the worker's rate limit kept from the live view.
        self.loss_plot.set_curves(
            [(r.step, r.loss) for r in history if r.stage == "train" and r.loss is not None],
            [(r.step, r.val_loss) for r in history if r.val_loss is not None],
        )
        loads = [r.expert_load for r in history if r.expert_load]
        if loads:
            self.load_chart.clear()
            self.load_chart.add(loads[0])
            self.load_chart.add(loads[-1])
        early = " (stopped early: the validation loss stopped improving)" if result.stopped_early else ""
        self._summary = (
            f"✓ Trained {result.steps} steps on {result.tokens:,} tokens{early}: validation loss "
            f"{result.initial_val_loss:.4f} → {result.final_val_loss:.4f}. Written to {result.out_dir}."
        )
        self.message.setText(f"{self._summary}\nComparing the old and the new routers…")
        self.context.log(f"Train routers: wrote {result.out_dir}")
        # Both models are scored where and how the training ran.
        self.compare = self.context.run(
            "Compare routers",
            compare_job(
                choices.model_dir,
                result.out_dir,
                result,
                tuple(self.form.held_out.paths()),
                choices.settings.device,
                choices.settings.dtype,
            ),
        )
        self.compare.progress.connect(lambda record: self.progress.setValue(round(record.fraction * PROGRESS_STEPS)))
        self.compare.succeeded.connect(self._compared)
        self.compare.failed.connect(
            lambda error: self._stopped(f"✗ The comparison failed: {describe_error(error)}")
        )
        self.compare.cancelled.connect(lambda: self._stopped("Comparison cancelled."))
        self.compare.finished.connect(self._update_buttons)
        self._update_buttons()

    def _compared(self, comparison: Comparison) -> None:
        self.comparison = comparison
        self.before_after.show_comparison(comparison)
        self.load_chart.set_labels(comparison.labels)
        self.tabs.setCurrentWidget(self.before_after)
        self.message.setText(self._summary)

    def _fail(self, error: BaseException) -> None:
        """Bad input or a failed run: one message with the reason and the fix; the page stays usable."""
        self.progress.setValue(0)
        text = describe_error(error)
        # A list of problems marks each of its lines already; a single error gets the mark here.
        self.message.setText(text if text.startswith(("✗", "⚠")) else f"✗ {text}")
        self._update_buttons()

    def _cancelled(self) -> None:
        self._check_resumable()
        kept = " Its last checkpoint is kept: start again with Continue ticked to go on from there."
        self._stopped(f"Training cancelled: no model was written.{kept if self.resume.isVisible() else ''}")

    def _stopped(self, text: str) -> None:
        """A run or comparison that ends without its result; what an earlier step achieved stays said."""
        self.progress.setValue(0)
        self.message.setText(f"{self._summary}\n{text}" if self._summary else text)

    def _show_folder(self) -> None:
        if self.trained_folder is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.trained_folder)))

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Cancel running work; the window's context waits for the workers."""
        for job in (self.job, self.compare, self.legend_job):
            if job is not None:
                job.cancel()
