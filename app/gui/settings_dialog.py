"""Settings: Hub token (stored only by huggingface_hub's own login), cache folder, device, dtype, theme,
llama-quantize."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QWidget,
)

from app.gui import hub_jobs
from app.gui.context import AppContext, describe_error
from app.gui.hub_jobs import HubLogin
from app.gui.settings import DEVICES, DTYPES, AppSettings
from app.gui.theme import SCHEMES
from app.gui.widgets import explanation
from app.gui.workers import JobFactory, JobHandle


class SettingsDialog(QDialog):
    def __init__(self, settings: AppSettings, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.setMinimumWidth(560)
        self.settings = settings
        self.context = context
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("hf_… (for gated or private models, and for publishing)")
        self.login_button = QPushButton("Log in")
        self.login_button.clicked.connect(self._login)
        self.login_status = QLabel("Checking the saved token…")
        self.login_status.setWordWrap(True)
        # The user and token names come from the Hub: never let them be read as markup.
        self.login_status.setTextFormat(Qt.TextFormat.PlainText)
        self._login_job: JobHandle | None = None
        self.cache_dir = QLineEdit(str(settings.cache_dir))
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.device.setCurrentText(settings.device)
        self.dtype = QComboBox()
        self.dtype.addItems(DTYPES)
        self.dtype.setCurrentText(settings.dtype)
        self.theme = QComboBox()
        self.theme.addItems(SCHEMES)
        self.theme.setCurrentText(settings.theme)
        self.llama_quantize = QLineEdit(settings.llama_quantize)
        self.llama_quantize.setPlaceholderText("Looked for on PATH when empty")
        browse_quantize = QPushButton("Browse…")
        browse_quantize.clicked.connect(self._browse_quantize)

        token_row = QHBoxLayout()
        token_row.addWidget(self.token, 1)
        token_row.addWidget(self.login_button)
        cache_row = QHBoxLayout()
        cache_row.addWidget(self.cache_dir, 1)
        cache_row.addWidget(browse)
        form = QFormLayout(self)
        form.addRow("Hub token", token_row)
        form.addRow("", self.login_status)
        form.addRow(
            "",
            explanation("The token is checked with the Hub and stored by huggingface_hub, never by this app."),
        )
        form.addRow("Cache folder", cache_row)
        form.addRow("", explanation("Where the demo models and other app data are kept."))
        form.addRow("Default device", self.device)
        form.addRow("", explanation("Where router gates are computed: auto picks a GPU when there is one."))
        form.addRow("Default dtype", self.dtype)
        form.addRow("", explanation("Precision for computing gates: auto is bfloat16 on GPUs, float32 on CPUs."))
        form.addRow("Theme", self.theme)
        quantize_row = QHBoxLayout()
        quantize_row.addWidget(self.llama_quantize, 1)
        quantize_row.addWidget(browse_quantize)
        form.addRow("llama-quantize", quantize_row)
        form.addRow("", explanation("llama.cpp's quantizer, for K-quant GGUF exports."))
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self._run_login_job(hub_jobs.saved_login())

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Cache folder", self.cache_dir.text())
        if folder:
            self.cache_dir.setText(folder)

    def _browse_quantize(self) -> None:
        path, _filter = QFileDialog.getOpenFileName(self, "llama.cpp's llama-quantize", self.llama_quantize.text())
        if path:
            self.llama_quantize.setText(path)

    def _login(self) -> None:
        token = self.token.text().strip()
        if not token:
            self.login_status.setText("Paste a token from huggingface.co/settings/tokens first.")
            return
        # The field is emptied at once: the token lives on only in the job that checks and saves it.
        self.token.clear()
        self.login_status.setText("Checking the token with the Hub…")
        self._run_login_job(hub_jobs.log_in(token))

    def _run_login_job(self, make_job: JobFactory) -> None:
        self.login_button.setEnabled(False)
        self._login_job = self.context.run("Hub login", make_job, quiet=True)
        self._login_job.succeeded.connect(self._show_login)
        self._login_job.failed.connect(self._login_failed)
        self._login_job.finished.connect(self._login_finished)

    def _show_login(self, login: HubLogin | None) -> None:
        if login is None:
            self.login_status.setText("Not logged in: public models only. Gated and private models need a token.")
            return
        token_name = f" (token “{login.token_name}”)" if login.token_name else ""
        self.login_status.setText(f"✓ Logged in to the Hub as {login.user}{token_name}.")

    def _login_failed(self, error: BaseException) -> None:
        self.login_status.setText(f"✗ {describe_error(error)}")

    def _login_finished(self) -> None:
        self.login_button.setEnabled(True)

    def done(self, result: int) -> None:
        if self._login_job is not None and self._login_job.is_running:
            self._login_job.cancel()
        super().done(result)

    def apply(self) -> None:
        self.settings.cache_dir = Path(self.cache_dir.text().strip()).expanduser()
        self.settings.device = self.device.currentText()
        self.settings.dtype = self.dtype.currentText()
        self.settings.theme = self.theme.currentText()
        self.settings.llama_quantize = self.llama_quantize.text().strip()
        self.settings.save()
