"""The chat's model box: which model to load and how, the loading progress, and the fallbacks
offered when a model does not fit."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.core.chat import LoadRequest, ModelDoesNotFit
from app.core.devices import DEVICE_CHOICES
from app.core.progress import Progress
from app.gui.widgets import MessageLabel

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
REMOTE_CODE_WARNING = (
    "Remote code is Python from the model's repository, run with your permissions. Allow it only for "
    "models whose authors you trust; it is never run otherwise."
)


class ModelBox(QGroupBox):
    load_requested = Signal(object)  # LoadRequest

    def __init__(self, device: str, dtype: str, parent: QWidget | None = None) -> None:
        super().__init__("Model", parent)
        self.model_path = QLineEdit()
        self.model_path.setPlaceholderText("A model folder, or a Hub id already downloaded (org/name)")
        self.model_path.textEdited.connect(lambda _text: self.allow_remote_code.setChecked(False))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse_model)
        self.device = QComboBox()
        self.device.addItems(DEVICE_CHOICES)
        self.device.setToolTip("auto: a CUDA GPU, then Apple MPS, then the CPU")
        self.device.setCurrentText(device)
        self.dtype = QComboBox()
        self.dtype.addItems(DTYPE_CHOICES)
        self.dtype.setToolTip("auto: bfloat16 or float16 on GPUs, float32 on the CPU")
        self.dtype.setCurrentText(dtype)
        self.allow_remote_code = QCheckBox("Allow this model's own code")
        self.allow_remote_code.setToolTip(REMOTE_CODE_WARNING)
        self.remote_code_warning = QLabel(f"⚠ {REMOTE_CODE_WARNING}")
        self.remote_code_warning.setWordWrap(True)
        self.remote_code_warning.setVisible(False)
        self.allow_remote_code.toggled.connect(self.remote_code_warning.setVisible)
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(lambda: self.load_requested.emit(self.request_from_controls()))
        self.cancel_button = QPushButton("Cancel")
        self.unload_button = QPushButton("Unload")
        self.unload_button.setToolTip("Frees the memory the model takes")
        self.evaluate_button = QPushButton("Evaluate…")
        self.evaluate_button.setToolTip("Opens the Evaluate page for this model: its perplexity beside its experts'")
        self.export_button = QPushButton("Export GGUF…")
        self.export_button.setToolTip("Exports the loaded model's folder to one GGUF file for llama.cpp-based apps")
        self.publish_button = QPushButton("Publish…")
        self.publish_button.setToolTip("Uploads the loaded model's folder, with its card, to the Hugging Face Hub")
        self.load_progress = QProgressBar()
        self.load_progress.setRange(0, 1000)
        self.load_progress.setMaximumWidth(220)
        # Model names, paths and errors are never markup: these labels show them as plain text.
        self.model_status = MessageLabel("No model loaded.")
        self.model_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.fit_box = QGroupBox("The model does not fit")
        self.fit_message = MessageLabel()
        self.fit_buttons_layout = QHBoxLayout()
        self.fallback_buttons: list[QPushButton] = []
        fit_layout = QVBoxLayout(self.fit_box)
        fit_layout.addWidget(self.fit_message)
        fit_layout.addLayout(self.fit_buttons_layout)
        self.fit_box.setVisible(False)

        first = QHBoxLayout()
        first.addWidget(self.model_path, 1)
        first.addWidget(browse)
        first.addWidget(QLabel("Device"))
        first.addWidget(self.device)
        first.addWidget(QLabel("Dtype"))
        first.addWidget(self.dtype)
        first.addWidget(self.allow_remote_code)
        second = QHBoxLayout()
        for button in (self.load_button, self.cancel_button, self.unload_button):
            second.addWidget(button)
        second.addWidget(self.load_progress)
        second.addWidget(self.model_status, 1)
        second.addWidget(self.evaluate_button)
        second.addWidget(self.export_button)
        second.addWidget(self.publish_button)
        layout = QVBoxLayout(self)
        layout.addLayout(first)
        layout.addWidget(self.remote_code_warning)
        layout.addLayout(second)
        layout.addWidget(self.fit_box)

    def set_model(self, folder: str) -> None:
        self.model_path.setText(folder)
        self.allow_remote_code.setChecked(False)

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "A model folder to chat with", self.model_path.text())
        if folder:
            self.set_model(folder)

    def request_from_controls(self) -> LoadRequest:
        dtype = self.dtype.currentText()
        return LoadRequest(
            model=self.model_path.text().strip(),
            device=self.device.currentText(),
            dtype=None if dtype == "auto" else dtype,
            trust_remote_code=self.allow_remote_code.isChecked(),
        )

    def set_enabled_for(self, idle: bool, loading: bool, ready: bool) -> None:
        self.load_button.setEnabled(idle)
        self.cancel_button.setEnabled(loading)
        self.unload_button.setEnabled(ready)
        self.load_progress.setVisible(loading)
        for widget in (self.model_path, self.device, self.dtype, self.allow_remote_code):
            widget.setEnabled(idle)

    def show_progress(self, record: Progress) -> None:
        # from_pretrained cannot report progress: its stage shows as busy rather than stuck at 0 %.
        busy = record.stage == "loading"
        self.load_progress.setRange(0, 0 if busy else 1000)
        self.load_progress.setValue(int(record.fraction * 1000))
        message = record.message
        if message.lower().startswith(record.stage):
            self.model_status.setText(message[:1].upper() + message[1:])
        else:
            self.model_status.setText(
                f"{record.stage.capitalize()}: {message}" if message else record.stage.capitalize()
            )

    def offer_fallbacks(self, error: ModelDoesNotFit) -> None:
        plan = error.plan
        for button in self.fallback_buttons:
            button.deleteLater()
        self.fallback_buttons = []
        self.fit_message.setText(f"{error.message}.\nFix: {error.hint}.")
        for option in plan.alternatives:
            button = QPushButton(f"Load {option.describe().split(':')[0]}")
            button.setToolTip(option.describe())
            request = plan.request_for(option)
            button.clicked.connect(lambda _checked=False, request=request: self.load_requested.emit(request))
            self.fit_buttons_layout.addWidget(button)
            self.fallback_buttons.append(button)
        self.fit_box.setVisible(True)
