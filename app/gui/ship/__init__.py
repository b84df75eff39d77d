"""Ship a merged model: the GGUF export and Hub publishing dialogs.

The dialogs load the export and publishing cores (and with them gguf, numpy and huggingface_hub)
only when opened, so pages that offer them start as fast as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtWidgets import QWidget

if TYPE_CHECKING:
    from app.gui.context import AppContext
    from app.gui.ship.export_dialog import ExportDialog
    from app.gui.ship.publish_dialog import PublishDialog


def open_export_dialog(folder: Path, context: AppContext, parent: QWidget | None = None) -> ExportDialog:
    from app.gui.ship.export_dialog import ExportDialog

    dialog = ExportDialog(folder, context, parent)
    dialog.show()
    return dialog


def open_publish_dialog(folder: Path, context: AppContext, parent: QWidget | None = None) -> PublishDialog:
    from app.gui.ship.publish_dialog import PublishDialog

    dialog = PublishDialog(folder, context, parent)
    dialog.show()
    return dialog
