"""Settings: Hub token (stored only by huggingface_hub's own login), cache folder, device, dtype, theme."""

from __future__ import annotations

import threading
from pathlib import Path

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

from app.core.progress import Job, Progress
from app.gui.context import AppContext, describe_error
from app.gui.settings import DEVICES, DTYPES, AppSettings
from app.gui.theme import SCHEMES
from app.gui.widgets import explanation


def hub_login(token: str) -> object:
    def job(cancel: threading.Event) -> Job[str]:
        yield Progress("hub login", 0, 1, message="checking the token with the Hub")
        from huggingface_hub import HfApi, login

        user = HfApi().whoami(token=token)
        login(token=token, add_to_git_credential=False)
        return str(user.get("name", "?"))

    return job


class SettingsDialog(QDialog):
    def __init__(self, settings: AppSettings, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.settings = settings
        self.context = context
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("hf_… (only needed for gated or private models)")
        self.login_button = QPushButton("Log in")
        self.login_button.clicked.connect(self._login)
        self.login_status = QLabel("")
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
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Cache folder", self.cache_dir.text())
        if folder:
            self.cache_dir.setText(folder)

    def _login(self) -> None:
        token = self.token.text().strip()
        if not token:
            self.login_status.setText("Paste a token from huggingface.co/settings/tokens first.")
            return
        self.login_button.setEnabled(False)
        self.login_status.setText("Checking…")
        job = self.context.run("Hub login", hub_login(token), quiet=True)
        job.succeeded.connect(lambda name: self.login_status.setText(f"✓ Logged in as {name}."))
        job.failed.connect(lambda error: self.login_status.setText(f"✗ {describe_error(error)}"))
        job.finished.connect(lambda: self.login_button.setEnabled(True))
        self.token.clear()

    def apply(self) -> None:
        self.settings.cache_dir = Path(self.cache_dir.text().strip()).expanduser()
        self.settings.device = self.device.currentText()
        self.settings.dtype = self.dtype.currentText()
        self.settings.theme = self.theme.currentText()
        self.settings.save()
