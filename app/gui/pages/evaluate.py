"""Evaluate page: is the MoE better than its experts? Perplexity of the MoE, its base and each expert on
the recipe's prompts and on data files, the MoE's routing per dataset, a k sweep, and lm-eval tasks.

The evaluation runs in a worker (:mod:`app.gui.evaluate.jobs`); its widgets live in
:mod:`app.gui.evaluate`. Results export as CSV or JSON (the layout ``frankenmoe eval --json`` writes),
and go into the merged model's card as its Evaluation section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from app.core.eval.card import add_to_model_card, results_csv, write_text_atomically
from app.core.problems import FrankenMoEError
from app.core.progress import Progress
from app.gui.context import AppContext, describe_error
from app.gui.evaluate.jobs import EvaluateChoices, EvaluateOutcome, evaluate_job, lm_eval_installed, recipe_beside
from app.gui.evaluate.results import ResultsView
from app.gui.widgets import FileList, MessageLabel, explanation, heading
from app.gui.workers import JobHandle

DATA_FILTER = "Evaluation data (*.txt *.jsonl *.parquet);;All files (*)"
LM_EVAL_MISSING = (
    "lm-eval is not installed, so benchmark tasks are off. Install it with pip install 'frankenmoe-studio[eval]' "
    "and restart the app."
)
MAX_SWEEP_K = 64


def parse_sweep(text: str) -> tuple[int, ...]:
    """The experts-per-token values of a sweep, written "1, 2, 4" or "1-4"; raises FrankenMoEError."""
    values: set[int] = set()
    for piece in text.replace(";", ",").split(","):
        piece = piece.strip()
        if not piece:
            continue
        low, _dash, high = piece.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise FrankenMoEError(
                f"{piece!r} is not a number of experts per token", "Write whole numbers, e.g. 1, 2, 4 or 1-4."
            ) from None
        if not 1 <= first <= last <= MAX_SWEEP_K:
            raise FrankenMoEError(
                f"{piece!r} is not a number of experts per token from 1 up", "Write whole numbers, e.g. 1, 2, 4 or 1-4."
            )
        values.update(range(first, last + 1))
    return tuple(sorted(values))


class EvaluatePage(QWidget):
    def __init__(self, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.context = context
        self.job: JobHandle | None = None
        self.outcome: EvaluateOutcome | None = None
        self.evaluated_folder: Path | None = None
        self.has_lm_eval = lm_eval_installed()

        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("The merged model's folder, or any causal LM folder")
        self.model_path.textChanged.connect(self._model_changed)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_model)
        self.model_note = MessageLabel()

        self.recipe_prompts = QCheckBox("The recipe's prompts, one dataset per expert")
        self.recipe_prompts.setToolTip("Each expert's positive and test prompts: does its domain get a lower loss?")
        self.data_files = FileList("Evaluation data", DATA_FILTER, height=90)

        self.compare_donors = QCheckBox("Compare with the base and every expert")
        self.compare_donors.setToolTip(
            "Read from the recipe the merge saved beside the model; one model in memory at a time."
        )
        self.sweep = QLineEdit()
        self.sweep.setPlaceholderText("e.g. 1, 2, 4 or 1-4; empty: no sweep")
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 256)
        self.batch_size.setValue(8)

        self.tasks = QLineEdit()
        self.tasks.setPlaceholderText("lm-eval task names, e.g. arc_easy, hellaswag")
        self.include_path = QLineEdit()
        self.include_path.setPlaceholderText("Optional: a folder of custom task YAMLs")
        self.limit = QSpinBox()
        self.limit.setRange(0, 1_000_000)
        self.limit.setSpecialValueText("all")
        self.limit.setValue(0)
        self.tasks_note = explanation(LM_EVAL_MISSING)
        self.tasks_note.setVisible(not self.has_lm_eval)
        for field in (self.tasks, self.include_path, self.limit):
            field.setEnabled(self.has_lm_eval)

        self.run_button = QPushButton("Evaluate")
        self.run_button.setDefault(True)
        self.run_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.stage = MessageLabel()

        self.results = ResultsView()
        self.export_csv_button = QPushButton("Export CSV…")
        self.export_csv_button.clicked.connect(self._export_csv_dialog)
        self.export_json_button = QPushButton("Export JSON…")
        self.export_json_button.clicked.connect(self._export_json_dialog)
        self.card_button = QPushButton("Add to model card")
        self.card_button.setToolTip("Writes an Evaluation section into the model's README.md, replacing an earlier one")
        self.card_button.clicked.connect(self.add_to_card)
        self.result_note = MessageLabel()

        self.setLayout(self._build_layout(browse))
        self._model_changed()
        self._update_buttons()

    def _build_layout(self, browse: QPushButton) -> QVBoxLayout:
        model_box = QGroupBox("Model")
        model_layout = QVBoxLayout(model_box)
        row = QHBoxLayout()
        row.addWidget(self.model_path, 1)
        row.addWidget(browse)
        model_layout.addLayout(row)
        model_layout.addWidget(self.model_note)

        data_box = QGroupBox("Datasets")
        data_layout = QVBoxLayout(data_box)
        data_layout.addWidget(self.recipe_prompts)
        data_layout.addWidget(self.data_files)
        data_layout.addWidget(
            explanation("Text (a record per blank-line-separated block), JSONL (text or messages) or Parquet.")
        )

        compare_box = QGroupBox("Comparison")
        compare_form = QFormLayout(compare_box)
        compare_form.addRow(self.compare_donors)
        compare_form.addRow("Experts per token", self.sweep)
        compare_form.addRow("", explanation("Scores the MoE again with each k; the model's own k is always scored."))
        compare_form.addRow("Batch size", self.batch_size)

        tasks_box = QGroupBox("Benchmarks (lm-eval)")
        tasks_form = QFormLayout(tasks_box)
        tasks_form.addRow("Tasks", self.tasks)
        tasks_form.addRow("Include path", self.include_path)
        tasks_form.addRow("Limit per task", self.limit)
        tasks_form.addRow(self.tasks_note)

        run_row = QHBoxLayout()
        run_row.addWidget(self.run_button)
        run_row.addWidget(self.cancel_button)
        run_row.addWidget(self.progress, 1)

        settings = QWidget()
        settings_layout = QVBoxLayout(settings)
        settings_layout.setContentsMargins(0, 0, 6, 0)
        for box in (model_box, data_box, compare_box, tasks_box):
            settings_layout.addWidget(box)
        settings_layout.addStretch(1)
        settings_area = QScrollArea()
        settings_area.setWidget(settings)
        settings_area.setWidgetResizable(True)
        settings_area.setFrameShape(QScrollArea.Shape.NoFrame)
        settings_area.setMinimumWidth(340)

        results_column = QWidget()
        results_layout = QVBoxLayout(results_column)
        results_layout.setContentsMargins(6, 0, 0, 0)
        results_layout.addWidget(self.results, 1)
        export_row = QHBoxLayout()
        export_row.addStretch(1)
        for button in (self.export_csv_button, self.export_json_button, self.card_button):
            export_row.addWidget(button)
        results_layout.addLayout(export_row)
        results_layout.addWidget(self.result_note)

        splitter = QSplitter()
        splitter.addWidget(settings_area)
        splitter.addWidget(results_column)
        splitter.setStretchFactor(0, 2)
        splitter.setStretchFactor(1, 3)
        splitter.setChildrenCollapsible(False)

        layout = QVBoxLayout()
        layout.addWidget(heading("6  Evaluate"))
        layout.addWidget(
            explanation(
                "Is the MoE better than its experts? Measures the perplexity of any causal LM on the recipe's prompts "
                "and your data files, beside its base and every expert, and shows which experts each dataset uses."
            )
        )
        layout.addWidget(splitter, 1)
        layout.addLayout(run_row)
        layout.addWidget(self.stage)
        return layout

    # ------------------------------------------------------------------ choices

    def set_model(self, folder: Path) -> None:
        """Evaluate this model next (from the Merge page's result, the Chat page or the start screen)."""
        self.model_path.setText(str(folder))

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "The model to evaluate")
        if folder:
            self.set_model(Path(folder))

    def _model_changed(self) -> None:
        text = self.model_path.text().strip()
        has_recipe = bool(text) and recipe_beside(Path(text).expanduser()).is_file()
        if has_recipe != self.recipe_prompts.isEnabled():
            # A model with a recipe starts with its prompts ticked; the user's choices stay while it stays.
            self.recipe_prompts.setChecked(has_recipe)
            self.compare_donors.setChecked(False)
        for box in (self.recipe_prompts, self.compare_donors):
            box.setEnabled(has_recipe)
        if not text:
            self.model_note.setText("")
        elif has_recipe:
            self.model_note.setText("A merged model: its recipe gives the experts' prompts and the models to compare.")
        else:
            self.model_note.setText("No recipe beside this model: add data files; there is nothing to compare with.")
        self._update_buttons()

    def choices(self) -> EvaluateChoices:
        """What the controls say; raises FrankenMoEError for what cannot run."""
        text = self.model_path.text().strip()
        if not text:
            raise FrankenMoEError("No model is chosen", "Choose the folder of the model to evaluate.")
        tasks = tuple(t.strip() for t in self.tasks.text().replace(" ", ",").split(",") if t.strip())
        if tasks and not self.has_lm_eval:
            raise FrankenMoEError(
                "The lm-eval package is not installed, so benchmark tasks cannot run",
                "Install frankenmoe-studio[eval], or clear the tasks.",
            )
        include = self.include_path.text().strip()
        settings = self.context.settings
        return EvaluateChoices(
            model_dir=Path(text).expanduser(),
            recipe_prompts=self.recipe_prompts.isEnabled() and self.recipe_prompts.isChecked(),
            data_files=tuple(self.data_files.paths()),
            compare_donors=self.compare_donors.isEnabled() and self.compare_donors.isChecked(),
            top_ks=(None, *parse_sweep(self.sweep.text())),
            tasks=tasks,
            include_path=Path(include).expanduser() if include else None,
            limit=self.limit.value() or None,
            batch_size=self.batch_size.value(),
            device=settings.device,
            dtype=settings.dtype,
            cache_dir=settings.cache_dir,
        )

    # ------------------------------------------------------------------ running

    @property
    def is_running(self) -> bool:
        return self.job is not None and self.job.is_running

    def _update_buttons(self) -> None:
        running = self.is_running
        self.run_button.setEnabled(not running and bool(self.model_path.text().strip()))
        self.cancel_button.setEnabled(running)
        has_results = self.outcome is not None
        for button in (self.export_csv_button, self.export_json_button):
            button.setEnabled(has_results and not running)
        self.card_button.setEnabled(
            has_results and not running and self.evaluated_folder is not None and self.evaluated_folder.is_dir()
        )

    def start(self) -> None:
        if self.is_running:
            return
        try:
            choices = self.choices()
        except FrankenMoEError as error:
            self._fail(error)
            self.context.log(f"Evaluate: {describe_error(error)}")
            return
        self.progress.setValue(0)
        self.stage.setText("Starting…")
        self.result_note.clear()
        self.job = self.context.run("Evaluate", evaluate_job(choices))
        self.job.progress.connect(self._progress)
        self.job.succeeded.connect(lambda outcome: self._finished(outcome, choices.model_dir))
        self.job.failed.connect(self._fail)
        self.job.cancelled.connect(self._cancelled)
        self.job.finished.connect(self._update_buttons)
        self._update_buttons()

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.stage.setText("Cancelling…")

    def _progress(self, record: Progress) -> None:
        self.progress.setValue(int(record.fraction * 1000))
        self.stage.setText(f"{record.stage}: {record.message}" if record.message else record.stage)

    def _finished(self, outcome: EvaluateOutcome, folder: Path) -> None:
        self.outcome = outcome
        self.evaluated_folder = folder
        self.progress.setValue(1000)
        self.stage.setText(f"✓ Evaluated {folder}.")
        self.results.show_report(outcome.report, outcome.expert_labels, outcome.moe_top_k)
        self._update_buttons()

    def _fail(self, error: BaseException) -> None:
        """Bad input or a failed run: the reason and its fix, and the previous results stay."""
        self.progress.setValue(0)
        self.stage.setText(f"✗ {describe_error(error)}")
        self._update_buttons()

    def _cancelled(self) -> None:
        self.progress.setValue(0)
        self.stage.setText("Evaluation cancelled.")

    # ------------------------------------------------------------------ export

    @property
    def report(self) -> dict[str, Any]:
        assert self.outcome is not None
        return self.outcome.report

    def export_csv(self, path: Path) -> None:
        write_text_atomically(Path(path), results_csv(self.report))
        self.result_note.setText(f"Saved {path}")

    def export_json(self, path: Path) -> None:
        """The report as ``frankenmoe eval --json`` writes it, lm-eval's own results beside it."""
        path = Path(path)
        document = self.report
        assert self.outcome is not None
        if self.outcome.lm_eval_runs:
            from app.cli.eval_commands import LM_EVAL_SUFFIX
            from app.core.eval.harness import write_results_json

            lm_eval_path = path.with_name(path.stem + LM_EVAL_SUFFIX)
            document = {**document, "lm_eval": {**(document["lm_eval"] or {}), "file": lm_eval_path.name}}
            write_results_json({"runs": list(self.outcome.lm_eval_runs)}, lm_eval_path)
        write_text_atomically(path, json.dumps(document, indent=2) + "\n")
        self.result_note.setText(f"Saved {path}")

    def add_to_card(self) -> None:
        if self.outcome is None or self.evaluated_folder is None:
            return
        try:
            readme = add_to_model_card(self.evaluated_folder, self.report)
        except OSError as error:
            self.result_note.setText(f"✗ The model card could not be written: {error.strerror or error}")
            return
        self.result_note.setText(f"✓ Evaluation section written to {readme}")
        self.context.log(f"Evaluate: wrote the Evaluation section of {readme}")

    def _save_dialog(self, title: str, file_filter: str, name: str, write: Any) -> None:
        chosen, _filter = QFileDialog.getSaveFileName(self, title, name, file_filter)
        if not chosen:
            return
        try:
            write(Path(chosen))
        except OSError as error:
            self.result_note.setText(f"✗ {chosen} could not be written: {error.strerror or error}")

    def _export_csv_dialog(self) -> None:
        self._save_dialog("Export the results", "CSV (*.csv)", "evaluation.csv", self.export_csv)

    def _export_json_dialog(self) -> None:
        self._save_dialog("Export the report", "JSON (*.json)", "evaluation.json", self.export_json)

    # ------------------------------------------------------------------ shutdown

    def shutdown(self) -> None:
        """Cancel a running evaluation; the window's context waits for its worker."""
        if self.job is not None:
            self.job.cancel()
