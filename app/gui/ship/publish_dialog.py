"""The Publish dialog: a repo, what goes in it, a check of everything before any upload (the
account's rights, the folder, licences, the model card), then the upload with byte progress.

Who is logged in, the check and the upload run in workers. A token pasted here is used for this
publish only: it is handed to the publishing core and never saved, shown or logged by the app.
Text from the Hub (user names, the card, the repo's address) is shown as plain text, or escaped
where it becomes a link.
"""

from __future__ import annotations

import glob
import re
import threading
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QListWidget,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.core.merge.modelcard import base_license
from app.core.problems import Problem
from app.core.progress import Job, Progress
from app.gui.context import AppContext, describe_error
from app.gui.ship.common import RateMeter, has_errors, link_html, link_label, plan_messages, with_note
from app.gui.widgets import MessageLabel, explanation, format_bytes, heading
from app.gui.workers import JobHandle

if TYPE_CHECKING:
    from app.core.hub import HubUser
    from app.core.publish import PublishPlan, PublishRequest, PublishResult

# Characters a Hub repo name may hold; others in a folder's name become "-" in the suggested id.
NOT_IN_REPO_NAMES = re.compile(r"[^A-Za-z0-9._-]+")
FILES_LISTED = 6
# The core's fixes name the command line's flags; in this dialog the same fixes are its fields.
DIALOG_HINTS = {
    "token": "paste a token with the write role in the Token field above (huggingface.co/settings/tokens makes "
    "them), or log in with one in Settings",
    "license": "read the donors' terms and type the licence in the Licence field (e.g. apache-2.0, or other)",
}


def in_dialog_terms(problems: Iterable[Problem]) -> list[Problem]:
    return [replace(p, hint=DIALOG_HINTS[p.field]) if p.field in DIALOG_HINTS else p for p in problems]


def suggested_repo_id(user: str, model_dir: Path) -> str:
    name = NOT_IN_REPO_NAMES.sub("-", model_dir.name).strip("-.") or "frankenmoe"
    return f"{user}/{name}"


def ggufs_beside(model_dir: Path) -> list[Path]:
    """GGUF files exported from this model with the export dialog's default names (NAME-TYPE.gguf)."""
    try:
        return sorted(model_dir.parent.glob(f"{glob.escape(model_dir.name)}-*.gguf"))
    except OSError:
        return []


def who_is_logged_in(token: str | None) -> Job[HubUser | None]:
    """The account of `token`, or of the token huggingface_hub has; None when there is none."""
    from app.core.hub import check_token, has_token

    yield Progress("hub login", 0, 1, message="asking the Hub who the token belongs to")
    if token is None and not has_token():
        return None
    return check_token(token)


class PublishDialog(QDialog):
    def __init__(self, model_dir: Path, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Publish to the Hub")
        self.setMinimumWidth(640)
        self.resize(760, 820)
        self.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.model_dir = model_dir
        self.context = context
        self.user: HubUser | None = None
        self.plan: PublishPlan | None = None
        self.result: PublishResult | None = None
        self.login_job: JobHandle | None = None
        self.check_job: JobHandle | None = None
        self.publish_job: JobHandle | None = None
        self._suggested_id = ""
        self._rate = RateMeter()

        self.model_label = MessageLabel(str(model_dir))
        self.model_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # User and token names come from the Hub: MessageLabel shows them as plain text.
        self.account = MessageLabel("Asking the Hub who you are…")
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("Empty: the token saved by huggingface_hub (Settings › Log in) or HF_TOKEN")
        self.repo_id = QLineEdit()
        self.repo_id.setPlaceholderText("user-or-organisation/model-name")
        self.private = QCheckBox("Private")
        self.revision = QLineEdit()
        self.revision.setPlaceholderText("main")
        self.gguf_list = QListWidget()
        self.gguf_list.setMaximumHeight(80)
        for path in ggufs_beside(model_dir):
            self.gguf_list.addItem(str(path))
        self.add_gguf_button = QPushButton("Add…")
        self.add_gguf_button.clicked.connect(self._add_gguf)
        self.remove_gguf_button = QPushButton("Remove")
        self.remove_gguf_button.clicked.connect(self._remove_gguf)
        self.message = QLineEdit()
        self.message.setPlaceholderText("Upload a FrankenMoE merge")
        # Empty by default: the core then takes the most restrictive of the donors' licences, or refuses to
        # guess. The merge's own card may state one chosen without every donor's terms: shown, not used.
        self.license = QLineEdit()
        card_license = base_license(model_dir)
        stated = f" (the merge's card says {card_license})" if card_license and card_license != "other" else ""
        self.license.setPlaceholderText(f"Empty: the most restrictive of the donors' licences{stated}")

        self.check_button = QPushButton("Check")
        self.check_button.setToolTip("Checks the account, the folder, the licences and the card; uploads nothing")
        self.check_button.clicked.connect(self.start_check)
        self.messages = MessageLabel()
        self.summary = MessageLabel()
        self.card_preview = QPlainTextEdit()
        self.card_preview.setReadOnly(True)
        self.card_preview.setPlaceholderText("The model card (README.md) appears here after the check.")
        self.card_preview.setMinimumHeight(140)
        self.publish_button = QPushButton("Publish")
        self.publish_button.clicked.connect(self.start_publish)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.stage = MessageLabel()
        self.link = link_label()
        self.close_button = QPushButton("Close")
        self.close_button.clicked.connect(self.close)

        repo_row = QHBoxLayout()
        repo_row.addWidget(self.repo_id, 1)
        repo_row.addWidget(self.private)
        gguf_buttons = QVBoxLayout()
        gguf_buttons.addWidget(self.add_gguf_button)
        gguf_buttons.addWidget(self.remove_gguf_button)
        gguf_buttons.addStretch(1)
        gguf_row = QHBoxLayout()
        gguf_row.addWidget(self.gguf_list, 1)
        gguf_row.addLayout(gguf_buttons)
        form = QFormLayout()
        form.addRow("Model", self.model_label)
        form.addRow("Account", self.account)
        token_note = explanation("A token pasted here is used for this publish only: it is never saved.")
        form.addRow("Token", with_note(self.token, token_note))
        form.addRow("Repository", repo_row)
        form.addRow("Branch", self.revision)
        form.addRow("GGUF files", gguf_row)
        form.addRow("Message", self.message)
        license_note = explanation(
            "The licence the card states, e.g. apache-2.0. Check that every donor's terms allow it."
        )
        form.addRow("Licence", with_note(self.license, license_note))
        check_row = QHBoxLayout()
        check_row.addWidget(self.check_button)
        check_row.addWidget(self.summary, 1)
        publish_row = QHBoxLayout()
        publish_row.addWidget(self.publish_button)
        publish_row.addWidget(self.cancel_button)
        publish_row.addWidget(self.progress, 1)
        closing = QHBoxLayout()
        closing.addStretch(1)
        closing.addWidget(self.close_button)
        layout = QVBoxLayout(self)
        layout.addWidget(heading("Publish to the Hub"))
        layout.addWidget(
            explanation(
                "Uploads the model folder, with a model card naming its donors, and any GGUF files you add. "
                "Everything is checked before the first byte leaves; an interrupted upload resumes when "
                "published again."
            )
        )
        layout.addLayout(form)
        layout.addLayout(check_row)
        layout.addWidget(self.messages)
        layout.addWidget(self.card_preview, 1)
        layout.addLayout(publish_row)
        layout.addWidget(self.stage)
        layout.addWidget(self.link)
        layout.addLayout(closing)

        for field in (self.repo_id, self.revision, self.message, self.license):
            field.textChanged.connect(self._inputs_changed)
        self.token.textChanged.connect(self._inputs_changed)
        self.token.editingFinished.connect(self._ask_who)
        self.private.toggled.connect(self._inputs_changed)
        self.gguf_list.model().rowsInserted.connect(self._inputs_changed)
        self.gguf_list.model().rowsRemoved.connect(self._inputs_changed)
        self.gguf_list.itemSelectionChanged.connect(self._update_buttons)
        self._ask_who()
        self._update_buttons()

    # ------------------------------------------------------------------ state

    @property
    def busy(self) -> bool:
        return any(job is not None and job.is_running for job in (self.check_job, self.publish_job))

    @property
    def publishing(self) -> bool:
        return self.publish_job is not None and self.publish_job.is_running

    def _update_buttons(self) -> None:
        busy = self.busy
        self.check_button.setEnabled(not busy and bool(self.repo_id.text().strip()))
        ready = self.plan is not None and not has_errors(self.plan.problems)
        self.publish_button.setEnabled(ready and not busy)
        self.cancel_button.setEnabled(busy)
        inputs = (self.token, self.repo_id, self.private, self.revision, self.gguf_list, self.message, self.license)
        for widget in (*inputs, self.add_gguf_button):
            widget.setEnabled(not busy)
        self.remove_gguf_button.setEnabled(not busy and bool(self.gguf_list.selectedItems()))

    def _inputs_changed(self) -> None:
        """What was checked no longer holds: it needs checking again before publishing."""
        if self.busy:
            return
        if self.plan is not None:
            self.summary.setText("Changed since the check: check again.")
        self.plan = None
        self._update_buttons()

    def request(self) -> PublishRequest:
        from app.core.publish import PublishRequest

        return PublishRequest(
            model_dir=self.model_dir,
            repo_id=self.repo_id.text().strip(),
            private=self.private.isChecked(),
            revision=self.revision.text().strip() or None,
            include_gguf=tuple(Path(self.gguf_list.item(row).text()) for row in range(self.gguf_list.count())),
            message=self.message.text().strip() or None,
            token=self.token.text().strip() or None,
            license=self.license.text().strip() or None,
        )

    # ------------------------------------------------------------------ inputs

    def _add_gguf(self) -> None:
        paths, _filter = QFileDialog.getOpenFileNames(
            self, "GGUF files to upload", str(self.model_dir.parent), "GGUF files (*.gguf)"
        )
        self.add_gguf_files([Path(path) for path in paths])

    def add_gguf_files(self, paths: list[Path]) -> None:
        listed = {self.gguf_list.item(row).text() for row in range(self.gguf_list.count())}
        for path in paths:
            if str(path) not in listed:
                self.gguf_list.addItem(str(path))
                listed.add(str(path))

    def _remove_gguf(self) -> None:
        for item in self.gguf_list.selectedItems():
            self.gguf_list.takeItem(self.gguf_list.row(item))

    def _ask_who(self) -> None:
        token = self.token.text().strip() or None
        if self.login_job is not None and self.login_job.is_running:
            self.login_job.cancel()
        self.account.setText("Asking the Hub who the token belongs to…")
        job = self.context.run("Hub account", lambda _cancel: who_is_logged_in(token), quiet=True)
        self.login_job = job
        job.succeeded.connect(lambda user: self._show_user(user) if job is self.login_job else None)
        job.failed.connect(lambda error: self._user_failed(error) if job is self.login_job else None)

    def _show_user(self, user: HubUser | None) -> None:
        self.user = user
        if user is None:
            self.account.setText(
                "✗ Not logged in. Log in in Settings, or paste a token with the write role below for this publish."
            )
            return
        token_name = f"token “{user.token_name}”" if user.token_name else "token"
        role = f", role {user.role}" if user.role else ""
        needs_write = " Publishing needs a token with the write role." if user.role == "read" else ""
        self.account.setText(f"Logged in as {user.name} ({token_name}{role}).{needs_write}")
        if not self.repo_id.text().strip() or self.repo_id.text() == self._suggested_id:
            self._suggested_id = suggested_repo_id(user.name, self.model_dir)
            self.repo_id.setText(self._suggested_id)

    def _user_failed(self, error: BaseException) -> None:
        self.user = None
        self.account.setText(f"✗ {describe_error(error)}")

    # ------------------------------------------------------------------ check

    def start_check(self) -> None:
        if self.busy:
            return
        request = self.request()

        def make_job(cancel: threading.Event) -> Job[PublishPlan]:
            from app.core.publish import plan_publish

            yield Progress("checking", 0, 1, message=f"checking {request.repo_id} and the model folder")
            return plan_publish(request, cancel=cancel)

        self.plan = None
        self.messages.clear()
        self.summary.setText("Checking…")
        self.card_preview.clear()
        self.link.clear()
        self.check_job = self.context.run("Publish check", make_job, quiet=True)
        self.check_job.succeeded.connect(self._checked)
        self.check_job.failed.connect(self._check_failed)
        self.check_job.cancelled.connect(lambda: self.summary.setText("Check cancelled."))
        self.check_job.finished.connect(self._update_buttons)
        self._update_buttons()

    def _checked(self, plan: PublishPlan) -> None:
        self.plan = plan
        self.messages.setText(plan_messages(in_dialog_terms(plan.problems), plan.warnings))
        self.card_preview.setPlainText(plan.card_text)
        request = plan.request
        where = "existing repo" if plan.repo_exists else ("new private repo" if request.private else "new repo")
        branch = f", branch {request.revision}" if request.revision else ""
        names = ", ".join(plan.files[:FILES_LISTED]) + (" …" if len(plan.files) > FILES_LISTED else "")
        size = f"{len(plan.files)} files, {format_bytes(plan.total_bytes)}"
        if has_errors(plan.problems):
            # Where it would go is not known for sure until the account can write there.
            self.summary.setText(f"✗ Cannot publish yet: see below. {size}: {names}")
        else:
            self.summary.setText(f"✓ Ready. {size}, to the {where} {request.repo_id}{branch} as {plan.user}: {names}")

    def _check_failed(self, error: BaseException) -> None:
        self.summary.setText("✗ The check failed.")
        self.messages.setText(describe_error(error))

    # ------------------------------------------------------------------ publish

    def start_publish(self) -> None:
        plan = self.plan
        if plan is None or has_errors(plan.problems) or self.busy:
            return

        def make_job(cancel: threading.Event) -> Job[PublishResult]:
            from app.core.publish import publish

            return publish(plan, cancel=cancel)

        self.result = None
        self.link.clear()
        self._rate.reset()
        self.progress.setValue(0)
        self.stage.setText("Starting…")
        self.publish_job = self.context.run(f"Publish to {plan.request.repo_id}", make_job)
        self.publish_job.progress.connect(self._progress)
        self.publish_job.succeeded.connect(self._published)
        self.publish_job.failed.connect(self._publish_failed)
        self.publish_job.cancelled.connect(self._publish_cancelled)
        self.publish_job.finished.connect(self._update_buttons)
        self._update_buttons()

    def cancel(self) -> None:
        if self.check_job is not None and self.check_job.is_running:
            self.check_job.cancel()
            self.summary.setText("Cancelling the check…")
        if self.publishing:
            assert self.publish_job is not None
            self.publish_job.cancel()
            # A file or commit on its way to the Hub finishes or fails first: stops come between files.
            self.stage.setText("Cancelling… the upload stops once the file being sent is through.")

    def _progress(self, record: Progress) -> None:
        self.progress.setValue(int(record.fraction * 1000))
        self.stage.setText(self._rate.describe(record))

    def _published(self, result: PublishResult) -> None:
        self.result = result
        self.progress.setValue(1000)
        commit = f" (commit {result.commit[:10]})" if result.commit else ""
        self.stage.setText(f"Published{commit}.")
        self.link.setText(link_html(result.url, "✓ On the Hub: "))

    def _publish_failed(self, error: BaseException) -> None:
        self.progress.setValue(0)
        self.stage.setText(f"✗ Publishing failed: {describe_error(error)}")

    def _publish_cancelled(self) -> None:
        self.progress.setValue(0)
        self.stage.setText("Publishing cancelled. Publishing again sends only what the Hub has not received.")

    def done(self, result: int) -> None:
        """Closing stops what runs and forgets a pasted token."""
        for job in (self.login_job, self.check_job, self.publish_job):
            if job is not None and job.is_running:
                job.detach()
                job.cancel()
        self.token.clear()
        super().done(result)
