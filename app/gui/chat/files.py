"""The chat's files: a file dialog that runs an action and explains what fails, and the
conversations autosaved per model (see :mod:`app.core.chat.autosave`), with failures logged."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QMessageBox, QWidget

from app.core.chat import Conversation
from app.core.chat.autosave import autosave_conversation, restore_conversation
from app.core.problems import FrankenMoEError
from app.gui.context import AppContext, describe_error

AUTOSAVE_FOLDER = "conversations"  # in the cache folder: one autosaved conversation per model


def run_file_action(
    parent: QWidget, action: str, write: bool, file_filter: str, suggested: str, run: Callable[[Path], None]
) -> None:
    """Ask for a file to write (or read) and run the action on it; a failure is explained, never raised."""
    if write:
        name, _ = QFileDialog.getSaveFileName(parent, action, suggested, file_filter)
    else:
        name, _ = QFileDialog.getOpenFileName(parent, action, "", file_filter)
    if not name:
        return
    try:
        run(Path(name))
    except (OSError, FrankenMoEError) as error:
        message = describe_error(error) if isinstance(error, FrankenMoEError) else str(error)
        QMessageBox.warning(parent, action, message)


class AutosavedConversations:
    """Conversations kept per model in the cache folder; what cannot be written or read is logged."""

    def __init__(self, context: AppContext) -> None:
        self.context = context

    @property
    def folder(self) -> Path:
        return self.context.settings.cache_dir / AUTOSAVE_FOLDER

    def save(self, conversation: Conversation, model: str) -> None:
        try:
            autosave_conversation(conversation, self.folder, model)
        except OSError as error:
            self.context.log(f"Chat: the conversation could not be autosaved: {error}")

    def last(self, model: str) -> Conversation | None:
        try:
            return restore_conversation(self.folder, model)
        except FrankenMoEError as error:
            self.context.log(f"Chat: the autosaved conversation cannot be restored: {describe_error(error)}")
            return None
