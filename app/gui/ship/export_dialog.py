"""The GGUF export dialog: a type, a file, the size and disk space before writing, then the export
with progress and cancel, and where the file went.

The plan (size, free space, problems) and the export both run in workers: the dialog never waits
on the disk. The core writes beside the target and renames at the end, so a cancelled or failed
export leaves no file.
"""

from __future__ import annotations

import threading
from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QStandardItemModel
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.core import export as gguf_export
from app.core.progress import Job, Progress
from app.gui.context import AppContext, describe_error
from app.gui.ship.common import RateMeter, has_errors, plan_messages, show_in_folder, with_note
from app.gui.widgets import MessageLabel, explanation, format_bytes, heading
from app.gui.workers import JobHandle, call_in_worker

# Listed as people choose: the lossless types first, then the smaller ones, then those needing llama.cpp.
TYPE_ORDER = ("f16", "bf16", "f32", "q8_0", "q4_0", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
TYPE_NOTES = {
    "f16": "16-bit floats: the model as it is, the usual choice for converting further.",
    "bf16": "bfloat16: the model as it is, in the type most models are trained in.",
    "f32": "32-bit floats: exact, and twice the size of f16.",
    "q8_0": "8-bit: close to f16 at about half its size.",
    "q4_0": "4-bit: a quarter of f16's size, with some loss of quality.",
    "q5_0": "5-bit: between q4_0 and q8_0 in size and quality.",
    "q5_1": "5-bit with offsets: a little larger and closer than q5_0.",
    "q4_k_m": "4-bit K-quant: the common choice for running on a laptop.",
    "q5_k_m": "5-bit K-quant: a little larger than q4_k_m, closer to the original.",
    "q6_k": "6-bit K-quant: close to q8_0 at three quarters of its size.",
}
NEEDS_QUANTIZER = "Needs llama.cpp's llama-quantize: set where it is below or in Settings."
# The plan's problem for a file that exists: a warning, since the export may replace it when told to.
EXISTS_FIELD = "overwrite"
# Typing in the file field re-plans once the typing pauses, not at every key.
PLAN_DELAY_MS = 250


def export_types() -> list[str]:
    """Every type the export core offers, in TYPE_ORDER first."""
    offered = [*gguf_export.IN_PROCESS_TYPES, *gguf_export.QUANTIZER_TYPES]
    return [t for t in TYPE_ORDER if t in offered] + [t for t in offered if t not in TYPE_ORDER]


def default_output(model_dir: Path, out_type: str) -> Path:
    """NAME-TYPE.gguf beside the model folder."""
    return model_dir.parent / f"{model_dir.name}-{out_type}.gguf"


class ExportDialog(QDialog):
    def __init__(self, model_dir: Path, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export to GGUF")
        self.setMinimumWidth(620)
        self.resize(720, 560)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.model_dir = model_dir
        self.context = context
        self.plan: gguf_export.GgufPlan | None = None
        self.result: gguf_export.GgufResult | None = None
        self.plan_job: JobHandle | None = None
        self.export_job: JobHandle | None = None
        self.quantizer: Path | None = None
        # The file field follows the type until the user picks a file of their own.
        self._own_path = False
        self._rate = RateMeter()
        self._plan_timer = QTimer(self)
        self._plan_timer.setSingleShot(True)
        self._plan_timer.setInterval(PLAN_DELAY_MS)
        self._plan_timer.timeout.connect(self._start_plan)

        self.model_label = MessageLabel(str(model_dir))
        self.model_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.type_box = QComboBox()
        self.type_box.addItems(export_types())
        self.type_note = explanation("")
        self.quantizer_path = QLineEdit(context.settings.llama_quantize)
        self.quantizer_path.setPlaceholderText("Looked for on PATH when empty")
        browse_quantizer = QPushButton("Browse…")
        browse_quantizer.clicked.connect(self._browse_quantizer)
        self.quantizer_status = MessageLabel()
        self.out_path = QLineEdit()
        browse_out = QPushButton("Browse…")
        browse_out.clicked.connect(self._browse_output)
        self.replace = QCheckBox()
        self.replace.setVisible(False)
        self.replace.toggled.connect(self._update_buttons)
        self.size_label = MessageLabel("Estimating the size…")
        self.messages = MessageLabel()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.stage = MessageLabel()
        self.result_label = MessageLabel()
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.show_button = QPushButton("Show in folder")
        self.show_button.setVisible(False)
        self.show_button.clicked.connect(self._show_in_folder)
        self.apps_note = explanation(gguf_export.COMPATIBLE_APPS)
        self.export_button = QPushButton("Export")
        self.export_button.setDefault(True)
        self.export_button.clicked.connect(self.start_export)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.close)

        quantizer_row = QHBoxLayout()
        quantizer_row.addWidget(self.quantizer_path, 1)
        quantizer_row.addWidget(browse_quantizer)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_path, 1)
        out_row.addWidget(browse_out)
        form = QFormLayout()
        form.addRow("Model", self.model_label)
        form.addRow("Type", with_note(self.type_box, self.type_note))
        form.addRow("llama-quantize", with_note(quantizer_row, self.quantizer_status))
        form.addRow("File", with_note(out_row, self.replace))
        form.addRow("Size", self.size_label)
        buttons = QHBoxLayout()
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.progress, 1)
        done_row = QHBoxLayout()
        done_row.addWidget(self.result_label, 1)
        done_row.addWidget(self.show_button)
        closing = QHBoxLayout()
        closing.addStretch(1)
        closing.addWidget(self.close_button)
        layout = QVBoxLayout(self)
        layout.addWidget(heading("Export to GGUF"))
        layout.addWidget(
            explanation(
                "One file with the weights, the tokenizer and the chat template, for llama.cpp and the apps "
                "built on it. It is written beside its final name and renamed when complete."
            )
        )
        layout.addLayout(form)
        layout.addWidget(self.messages)
        layout.addLayout(buttons)
        layout.addWidget(self.stage)
        layout.addLayout(done_row)
        layout.addWidget(self.apps_note)
        layout.addStretch(1)
        layout.addLayout(closing)

        self.type_box.currentTextChanged.connect(self._type_changed)
        self.out_path.textEdited.connect(self._path_edited)
        self.quantizer_path.editingFinished.connect(self._quantizer_changed)
        self._find_quantizer()
        self._type_changed(self.type_box.currentText())

    # ------------------------------------------------------------------ inputs

    @property
    def out_type(self) -> str:
        return self.type_box.currentText()

    @property
    def running(self) -> bool:
        return self.export_job is not None and self.export_job.is_running

    def set_type(self, out_type: str) -> None:
        self.type_box.setCurrentText(out_type)

    def set_output(self, path: Path) -> None:
        self._own_path = True
        self.out_path.setText(str(path))
        self._inputs_changed()

    def type_enabled(self, out_type: str) -> bool:
        model = self.type_box.model()
        assert isinstance(model, QStandardItemModel)
        item = model.item(self.type_box.findText(out_type))
        return item is not None and item.isEnabled()

    def _type_changed(self, out_type: str) -> None:
        note = TYPE_NOTES.get(out_type, "")
        if out_type in gguf_export.QUANTIZER_TYPES:
            note = f"{note} Made by llama.cpp's llama-quantize.".strip()
        self.type_note.setText(note)
        if not self._own_path:
            self.out_path.setText(str(default_output(self.model_dir, out_type)))
        self._inputs_changed()

    def _path_edited(self, _text: str) -> None:
        self._own_path = True
        self._inputs_changed()

    def _browse_output(self) -> None:
        # No "replace?" question here: the Replace box asks it, for the file as the plan finds it.
        path, _filter = QFileDialog.getSaveFileName(
            self,
            "GGUF file",
            self.out_path.text(),
            "GGUF files (*.gguf)",
            options=QFileDialog.Option.DontConfirmOverwrite,
        )
        if path:
            self.set_output(Path(path) if path.endswith(".gguf") else Path(f"{path}.gguf"))

    def _browse_quantizer(self) -> None:
        path, _filter = QFileDialog.getOpenFileName(self, "llama.cpp's llama-quantize", self.quantizer_path.text())
        if path:
            self.quantizer_path.setText(path)
            self._quantizer_changed()

    def _quantizer_changed(self) -> None:
        configured = self.quantizer_path.text().strip()
        if configured != self.context.settings.llama_quantize:
            # Chosen here, kept for next time as if set in Settings.
            self.context.settings.llama_quantize = configured
            self.context.settings.save()
        self._find_quantizer()
        self._inputs_changed()

    def _find_quantizer(self) -> None:
        """K-quant types are offered only with a llama-quantize to make them."""
        configured = self.quantizer_path.text().strip() or None
        self.quantizer = gguf_export.find_llama_quantize(configured)
        if self.quantizer is not None:
            self.quantizer_status.setText(f"✓ K-quants are made with {self.quantizer}.")
        elif configured:
            self.quantizer_status.setText(f"✗ No llama-quantize program at {configured}: K-quant types are off.")
        else:
            self.quantizer_status.setText(
                "No llama-quantize on PATH: K-quant types are off. Build llama.cpp or install it "
                "(e.g. brew install llama.cpp), then choose its llama-quantize here."
            )
        model = self.type_box.model()
        assert isinstance(model, QStandardItemModel)
        for index in range(self.type_box.count()):
            item = model.item(index)
            if item.text() in gguf_export.QUANTIZER_TYPES:
                item.setEnabled(self.quantizer is not None)
                item.setToolTip("" if self.quantizer is not None else NEEDS_QUANTIZER)
        if not self.type_enabled(self.out_type):
            self.set_type("f16")

    # ------------------------------------------------------------------ plan

    def _inputs_changed(self) -> None:
        """Whatever was planned no longer holds: plan again once the input settles."""
        self.plan = None
        # Consent to replace a file holds for that file as it was seen, not for the next one.
        self.replace.setChecked(False)
        self.replace.setVisible(False)
        self.size_label.setText("Estimating the size…")
        self._update_buttons()
        if not self.running:
            self._plan_timer.start()

    def _start_plan(self) -> None:
        text = self.out_path.text().strip()
        if not text:
            self.size_label.clear()
            self.messages.setText("✗ Choose a file to write.")
            return
        model_dir, out_path, out_type = self.model_dir, Path(text).expanduser(), self.out_type
        quantizer = self.quantizer
        if self.plan_job is not None and self.plan_job.is_running:
            self.plan_job.cancel()
        job = self.context.run(
            "GGUF export plan",
            call_in_worker(
                lambda: gguf_export.plan_gguf_export(model_dir, out_path, out_type, quantizer=quantizer)
            ),
            quiet=True,
        )
        self.plan_job = job
        # A later change may start another plan before this one answers: only the latest one counts.
        job.succeeded.connect(lambda plan: self._planned(plan) if job is self.plan_job else None)
        job.failed.connect(lambda error: self._plan_failed(error) if job is self.plan_job else None)

    def _planned(self, plan: gguf_export.GgufPlan) -> None:
        self.plan = plan
        self.size_label.setText(
            f"About {format_bytes(plan.estimated_bytes)}; {format_bytes(plan.free_bytes)} free on that disk. "
            f"llama.cpp architecture: {plan.architecture or 'none'}."
        )
        others = [problem for problem in plan.problems if problem.field != EXISTS_FIELD]
        messages = plan_messages(others, plan.warnings)
        if self.file_exists:
            self.replace.setText(f"Replace {plan.out_path.name}, which already exists")
            self.replace.setVisible(True)
            just_written = self.result is not None and self.result.out_path == plan.out_path
            if not just_written:  # the result line already says where it is
                exists = f"⚠ {plan.out_path} already exists: tick Replace to write over it, or choose another file."
                messages = f"{exists}\n{messages}".strip()
        self.messages.setText(messages)
        self._update_buttons()

    @property
    def file_exists(self) -> bool:
        """Whether the plan found a file where the export would write."""
        return self.plan is not None and any(problem.field == EXISTS_FIELD for problem in self.plan.problems)

    def _plan_failed(self, error: BaseException) -> None:
        self.size_label.clear()
        self.messages.setText(f"✗ {describe_error(error)}")

    def _update_buttons(self) -> None:
        ready = self.plan is not None and not has_errors(self.plan.problems)
        allowed = not self.file_exists or self.replace.isChecked()
        self.export_button.setEnabled(ready and allowed and not self.running)
        self.cancel_button.setEnabled(self.running)
        for widget in (self.type_box, self.out_path, self.quantizer_path, self.replace):
            widget.setEnabled(not self.running)

    # ------------------------------------------------------------------ export

    def start_export(self) -> None:
        plan = self.plan
        if plan is None or not self.export_button.isEnabled():
            return
        quantizer, overwrite = self.quantizer, self.file_exists and self.replace.isChecked()

        def make_job(cancel: threading.Event) -> Job[gguf_export.GgufResult]:
            return gguf_export.export_gguf(
                plan.model_dir, plan.out_path, plan.out_type, quantizer=quantizer, overwrite=overwrite, cancel=cancel
            )

        # Whatever the export does to the disk, this plan is spent: the end of the export plans again.
        self.plan = None
        self.result = None
        self.show_button.setVisible(False)
        self.result_label.clear()
        self._rate.reset()
        self.progress.setValue(0)
        self.stage.setText("Starting…")
        self.export_job = self.context.run(f"GGUF export ({plan.out_type})", make_job)
        self.export_job.progress.connect(self._progress)
        self.export_job.succeeded.connect(self._exported)
        self.export_job.failed.connect(lambda error: self._stopped(f"✗ The export failed: {describe_error(error)}"))
        self.export_job.cancelled.connect(lambda: self._stopped("Export cancelled; no file was left behind."))
        self.export_job.finished.connect(self._export_finished)
        self._update_buttons()

    def cancel(self) -> None:
        if self.running:
            assert self.export_job is not None
            self.export_job.cancel()
            self.stage.setText("Cancelling…")

    def _progress(self, record: Progress) -> None:
        # llama-quantize says nothing of how far it is: its stage shows as busy rather than stuck.
        measurable = record.bytes_total > 0 or record.total > 1
        self.progress.setRange(0, 1000 if measurable else 0)
        self.progress.setValue(int(record.fraction * 1000))
        self.stage.setText(self._rate.describe(record))

    def _exported(self, result: gguf_export.GgufResult) -> None:
        self.result = result
        self.progress.setRange(0, 1000)
        self.progress.setValue(1000)
        self.stage.setText("Exported.")
        lines = [f"✓ {result.out_path} · {format_bytes(result.bytes)} · {result.tensor_count} tensors"]
        lines += [f"⚠ {warning}" for warning in result.warnings]
        self.result_label.setText("\n".join(lines))
        self.show_button.setVisible(True)

    def _show_in_folder(self) -> None:
        if self.result is not None:
            show_in_folder(self.result.out_path)

    def _stopped(self, message: str) -> None:
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.stage.setText(message)

    def _export_finished(self) -> None:
        # The file now exists (or not): the plan says what a second export would do.
        self._inputs_changed()

    def done(self, result: int) -> None:
        """Closing stops the export; the core removes what it had written."""
        self._plan_timer.stop()
        for job in (self.plan_job, self.export_job):
            if job is not None and job.is_running:
                job.detach()
                job.cancel()
        super().done(result)
