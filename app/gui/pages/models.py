"""Models page: the base model and the experts, each with its family, size, parameters and its
compatibility with the base, every reason written out on its row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QColorDialog,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.core.problems import Problem, explain
from app.core.progress import Progress
from app.core.recipe import ModelRef, ModelRefError, Recipe, validate_recipe
from app.gui import recipe_edits
from app.gui.context import AppContext, describe_error, describe_problems
from app.gui.document import RecipeDocument
from app.gui.engine import ModelInfo, check_compatibility, inspect_models
from app.gui.hub_jobs import download
from app.gui.models.adapters import AdapterPanel, model_cell_text, row_problems
from app.gui.widgets import MessageLabel, color_icon, explanation, format_bytes, format_count, heading
from app.gui.workers import JobHandle

COLUMNS = ("Colour", "Label", "Model", "Family", "Size", "Parameters", "Compatibility", "Download")
COLOR, LABEL, MODEL, FAMILY, SIZE, PARAMETERS, COMPATIBILITY, DOWNLOAD = range(len(COLUMNS))
# Edits of one expert's label merge into one undo step.
LABEL_MERGE_ID = 1000

CHECK_DELAY_MS = 300
NOT_DOWNLOADED_BADGE = "↓ Not downloaded"
NOT_DOWNLOADED_TOOLTIP = (
    "This Hub model is not in the Hugging Face cache yet. Download it (the button in this row) to check "
    "it against the base model; Preview and Merge also download what they need first."
)


def problems_for_expert(problems: list[Problem], index: int) -> list[Problem]:
    """The problems of one expert's model; its prompts are the Prompts page's business."""
    prefixes = (f"experts.{index}.", f"experts[{index}]")
    mine = [p for p in problems if p.field == f"experts.{index}" or p.field.startswith(prefixes)]
    return [p for p in mine if not p.field.endswith("_prompts")]


def compatibility_text(problems: list[Problem]) -> str:
    """Every reason and fix: the cell shows it all, wrapped, not only in a tooltip."""
    return describe_problems(problems) if problems else "✓ Compatible"


class ModelsPage(QWidget):
    add_from_hub_requested = Signal()
    base_from_hub_requested = Signal()
    adapter_from_hub_requested = Signal()
    # (recipe, problems): the compatibility check's answer for that recipe, recipe validation included.
    checked = Signal(object, object)

    def __init__(self, document: RecipeDocument, context: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.document = document
        self.context = context
        self.infos: dict[ModelRef, ModelInfo] = {}
        self.problems: list[Problem] = []
        self.checked_recipe: Recipe | None = None
        self._inspecting: set[ModelRef] = set()
        self._check_job: JobHandle | None = None
        self._checking = document.recipe  # the recipe _check_job checks
        self._folder_job: JobHandle | None = None
        self._refreshing = False

        self.base_edit = QLineEdit()
        self.base_edit.setPlaceholderText("A local folder or a Hub id such as mistralai/Mistral-7B-v0.1")
        self.base_edit.editingFinished.connect(self._base_edited)
        base_folder = QPushButton("Folder…")
        base_folder.clicked.connect(self._choose_base_folder)
        base_hub = QPushButton("Hub…")
        base_hub.clicked.connect(self.base_from_hub_requested)
        self.base_download: DownloadCell | None = None
        self.base_download_slot = QHBoxLayout()
        # Model descriptions and errors quote names and messages from the Hub: plain text only.
        self.base_info = MessageLabel()

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        # Rows grow to show every compatibility reason, wrapped.
        self.table.setWordWrap(True)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(MODEL, QHeaderView.ResizeMode.Stretch)
        header.setSectionResizeMode(COMPATIBILITY, QHeaderView.ResizeMode.Stretch)
        self.table.itemChanged.connect(self._item_changed)
        self.table.cellDoubleClicked.connect(self._cell_double_clicked)

        self.add_folder_button = QPushButton("Add from folder…")
        self.add_hub_button = QPushButton("Add from Hub…")
        self.remove_button = QPushButton("Remove")
        self.up_button = QPushButton("Move up")
        self.down_button = QPushButton("Move down")
        self.color_button = QPushButton("Colour…")
        self.add_folder_button.clicked.connect(self._add_from_folder)
        self.add_hub_button.clicked.connect(self.add_from_hub_requested)
        self.remove_button.clicked.connect(self._remove)
        self.up_button.clicked.connect(lambda: self._move(-1))
        self.down_button.clicked.connect(lambda: self._move(1))
        self.color_button.clicked.connect(lambda: self._choose_color(self.table.currentRow()))
        self.table.itemSelectionChanged.connect(self._update_buttons)

        self.general_problems = MessageLabel()
        self.adapter_panel = AdapterPanel(document, context, self.table)
        self.adapter_panel.hub_requested.connect(self.adapter_from_hub_requested)
        self.adapter_panel.reports_changed.connect(lambda: self._refresh(self.document.recipe))

        base_row = QHBoxLayout()
        base_row.addWidget(QLabel("Base model"))
        base_row.addWidget(self.base_edit, 1)
        base_row.addWidget(base_folder)
        base_row.addWidget(base_hub)
        buttons = QHBoxLayout()
        for button in (self.add_folder_button, self.add_hub_button):
            buttons.addWidget(button)
        buttons.addStretch(1)
        for button in (self.color_button, self.up_button, self.down_button, self.remove_button):
            buttons.addWidget(button)

        layout = QVBoxLayout(self)
        layout.addWidget(heading("1  Models"))
        layout.addWidget(
            explanation(
                "The base model gives the merged model its attention, embeddings and tokenizer; each expert "
                "gives its MLPs. All must share the base's architecture and tokenizer. Double-click a label "
                "to rename an expert, or its colour to change it; the colour marks the expert everywhere."
            )
        )
        layout.addLayout(base_row)
        base_info_row = QHBoxLayout()
        base_info_row.addWidget(self.base_info, 1)
        base_info_row.addLayout(self.base_download_slot)
        layout.addLayout(base_info_row)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.adapter_panel)
        layout.addWidget(self.general_problems)

        self._shut_down = False
        self._check_timer = QTimer(self)
        self._check_timer.setSingleShot(True)
        self._check_timer.setInterval(CHECK_DELAY_MS)
        self._check_timer.timeout.connect(self._start_check)
        document.changed.connect(self._recipe_changed)
        document.opened.connect(self._document_opened)
        self._recipe_changed(document.recipe)

    # ------------------------------------------------------------------ reacting to the recipe

    def _recipe_changed(self, recipe: Recipe) -> None:
        self._refresh(recipe)
        missing = [ref for ref in recipe.model_refs() if ref.path and ref not in self.infos]
        missing = [ref for ref in missing if ref not in self._inspecting]
        if missing:
            self._inspecting.update(missing)
            handle = self.context.run("Read models", inspect_models(missing), quiet=True)
            handle.succeeded.connect(self._models_inspected)
            handle.finished.connect(lambda: self._inspecting.difference_update(missing))
        self.adapter_panel.recipe_changed(recipe)
        self._check_timer.start()

    def _document_opened(self) -> None:
        # The previous recipe's answers must not show, even for a moment, against this one.
        self.problems, self.checked_recipe = [], None

    def _models_inspected(self, found: dict[ModelRef, ModelInfo]) -> None:
        self.infos.update(found)
        self._refresh(self.document.recipe)

    def _start_check(self) -> None:
        recipe = self.document.recipe
        if not recipe.base_model.path or not recipe.experts:
            self._checked(recipe, validate_recipe(recipe))
            return
        if self._check_job is not None and self._check_job.is_running:
            self._check_job.cancel()
        self._check_job = self.context.run("Check compatibility", check_compatibility(recipe), quiet=True)
        self._checking = recipe
        # Bound methods, not lambdas: Qt drops them with the page, should a check outlive its window.
        self._check_job.succeeded.connect(self._check_succeeded)
        self._check_job.failed.connect(self._check_failed)

    def _check_succeeded(self, problems: list[Problem]) -> None:
        if self.sender() is self._check_job:  # not a cancelled check's late answer
            self._checked(self._checking, problems)

    def _check_failed(self, error: BaseException) -> None:
        if self.sender() is self._check_job:
            self._checked(self._checking, [Problem("recipe", str(error))])

    def _checked(self, recipe: Recipe, problems: list[Problem]) -> None:
        if recipe != self.document.recipe:
            return  # an answer about a recipe that has since changed; a fresh check is on its way
        self.problems, self.checked_recipe = problems, recipe
        self._refresh(recipe)
        self.checked.emit(recipe, problems)

    # ------------------------------------------------------------------ drawing

    def _info_text(self, reference: ModelRef) -> str:
        info = self.infos.get(reference)
        if info is None:
            return "reading…" if reference.path else ""
        if info.error:
            return explain(info.error, info.hint)
        parameters = format_count(info.parameter_count)
        text = f"{info.family}, {parameters} parameters, {format_bytes(info.size_bytes)}, {info.dtype}"
        if info.downloadable:
            text += f"; not downloaded yet ({info.to_fetch})"
        return text

    def _refresh(self, recipe: Recipe) -> None:
        self._refreshing = True
        try:
            if not self.base_edit.hasFocus():
                self.base_edit.setText(str(recipe.base_model) if recipe.base_model.path else "")
            base = self.infos.get(recipe.base_model)
            base_downloadable = base is not None and base.downloadable
            # A base not downloaded yet cannot be opened; its download button says so already.
            base_problems = [p for p in self.problems if p.field.startswith("base_model") and not base_downloadable]
            self._fill_base_download(base)
            base_text = self._info_text(recipe.base_model)
            if base_problems:
                base_text += "\n" + "\n".join(f"✗ {p.text}" for p in base_problems)
            self.base_info.setText(base_text)
            selected = self.table.currentRow()
            self.table.setRowCount(len(recipe.experts))
            checked = self.checked_recipe == recipe
            for row, expert in enumerate(recipe.experts):
                self._fill_row(recipe, row, expert.source_model, checked)
            if 0 <= selected < len(recipe.experts):
                self.table.selectRow(selected)
            general = [
                p
                for p in self.problems
                if (not p.field.startswith(("experts.", "base_model")) and p.field != "recipe") or p.field == "experts"
            ]
            self.general_problems.setText("\n".join(f"{'✗' if p.is_error else '⚠'} {p.text}" for p in general))
        finally:
            self._refreshing = False
        self._update_buttons()

    def _fill_row(self, recipe: Recipe, row: int, reference: ModelRef, checked: bool) -> None:
        def cell(column: int, text: str, tooltip: str = "", editable: bool = False) -> QTableWidgetItem:
            item = self.table.item(row, column)
            if item is None:
                item = QTableWidgetItem()
                self.table.setItem(row, column, item)
            item.setText(text)
            item.setToolTip(tooltip)
            flags = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
            item.setFlags(flags | Qt.ItemFlag.ItemIsEditable if editable else flags)
            return item

        color = recipe_edits.expert_color(recipe, row)
        swatch = cell(COLOR, "", "Double-click to choose this expert's colour")
        swatch.setIcon(color_icon(color, 16))
        swatch.setData(Qt.ItemDataRole.UserRole, color)
        cell(LABEL, recipe.expert_label(row), "Double-click to rename", editable=True)
        model_text = model_cell_text(reference, self.adapter_panel.reports.get(reference))
        cell(MODEL, model_text, model_text)
        info = self.infos.get(reference)
        if info is None:
            cell(FAMILY, "reading…")
            cell(SIZE, "")
            cell(PARAMETERS, "")
        elif info.error:
            cell(FAMILY, "—", explain(info.error, info.hint))
            cell(SIZE, "—")
            cell(PARAMETERS, "—")
        else:
            cell(FAMILY, info.family)
            cell(SIZE, format_bytes(info.size_bytes))
            cell(PARAMETERS, format_count(info.parameter_count))
        if info is not None and info.downloadable:
            reason = f"{explain(info.error, info.hint)}\n\n" if info.error else ""
            text, tooltip = NOT_DOWNLOADED_BADGE, reason + NOT_DOWNLOADED_TOOLTIP
        elif checked:
            adapter = self.adapter_panel.reports.get(reference)
            text = compatibility_text(row_problems(problems_for_expert(self.problems, row), adapter))
            tooltip = text
        else:
            text, tooltip = "… checking", "Checking compatibility with the base model"
        badge_item = cell(COMPATIBILITY, text, tooltip)
        if text.startswith("✗"):
            badge_item.setForeground(QColor("#d93025"))
        elif text.startswith("⚠"):
            badge_item.setForeground(QColor("#e37400"))
        elif text.startswith("✓"):
            badge_item.setForeground(QColor("#1e8e3e"))
        self._fill_download_cell(row, info)

    def _fill_download_cell(self, row: int, info: ModelInfo | None) -> None:
        if info is None or not info.downloadable:
            self.table.removeCellWidget(row, DOWNLOAD)
            parts = [] if info is None else [info.reference.model, info.reference.lora]
            local = all(part.is_local for part in parts if part is not None)
            where = "" if info is None or info.error else "local" if local else "downloaded"
            self.table.setItem(row, DOWNLOAD, QTableWidgetItem(where))
            return
        current = self.table.cellWidget(row, DOWNLOAD)
        if isinstance(current, DownloadCell) and current.reference == info.reference:
            return
        self.table.setItem(row, DOWNLOAD, QTableWidgetItem(""))
        self.table.setCellWidget(row, DOWNLOAD, DownloadCell(info.reference, self.context, self._downloaded))

    def _fill_base_download(self, info: ModelInfo | None) -> None:
        wanted = info is not None and info.downloadable
        if self.base_download is not None and (not wanted or self.base_download.reference != info.reference):
            self.base_download.deleteLater()
            self.base_download = None
        if wanted and self.base_download is None:
            assert info is not None
            self.base_download = DownloadCell(info.reference, self.context, self._downloaded)
            self.base_download_slot.addWidget(self.base_download)

    def _downloaded(self, reference: ModelRef) -> None:
        self.infos.pop(reference, None)
        self.adapter_panel.forget(reference)
        self._recipe_changed(self.document.recipe)

    def shutdown(self) -> None:
        """No new checks once the window is closing."""
        self._check_timer.stop()
        if not self._shut_down:  # a window can be closed twice; the second close has nothing to undo
            self.document.changed.disconnect(self._recipe_changed)
            self._shut_down = True

    # ------------------------------------------------------------------ edits

    def _edit(self, recipe: Recipe, text: str, merge_id: int = -1) -> None:
        self.document.edit(recipe, text, merge_id)

    def _base_edited(self) -> None:
        text = self.base_edit.text().strip()
        if text == str(self.document.recipe.base_model):
            return
        try:
            recipe = recipe_edits.set_base(self.document.recipe, text)
        except ModelRefError as error:  # MODEL+ADAPTER with an empty part, or more than one '+'
            QMessageBox.warning(self, "Not a model", explain(error.message, error.hint))
            self.base_edit.setText(str(self.document.recipe.base_model))
            return
        self._edit(recipe, "Change base model")

    def _choose_base_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the base model's folder")
        if folder:
            self.add_model_folder(folder, as_base=True)

    def set_base(self, reference: str) -> None:
        if reference != str(self.document.recipe.base_model):
            self._edit(recipe_edits.set_base(self.document.recipe, reference), "Change base model")

    def add_expert(self, reference: str, label: str | None = None) -> None:
        recipe = self.document.recipe
        if not recipe.base_model.path:
            # The first model chosen is the natural base; the user can change it.
            self._edit(recipe_edits.set_base(recipe, reference), "Set base model")
            recipe = self.document.recipe
        self._edit(recipe_edits.add_expert(recipe, reference, label), "Add expert")
        self.table.selectRow(len(self.document.recipe.experts) - 1)

    def _add_from_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose an expert model's folder")
        if folder:
            self.add_model_folder(folder)

    def add_model_folder(self, folder: str, as_base: bool = False) -> None:
        """Read the folder off the GUI thread (config.json and the weights' headers); use it if it is a
        model, and refuse it at once, saying what it lacks, if it is not."""
        reference = ModelRef.parse(folder)
        self._folder_job = self.context.run("Read model", inspect_models([reference]), quiet=True)
        self._folder_job.succeeded.connect(lambda found: self._folder_read(found[reference], folder, as_base))
        self._folder_job.failed.connect(lambda error: self._refuse_folder(folder, describe_error(error), as_base))

    def _folder_read(self, info: ModelInfo, folder: str, as_base: bool) -> None:
        if info.error:
            self._refuse_folder(folder, explain(info.error, info.hint), as_base)
            return
        self.infos[info.reference] = info
        if as_base:
            self.set_base(folder)
        else:
            self.add_expert(folder, Path(folder).name)

    def _refuse_folder(self, folder: str, reason: str, as_base: bool) -> None:
        role = "the base model" if as_base else "an expert"
        QMessageBox.warning(
            self,
            "Not a model folder",
            f"{folder} cannot be used as {role}.\n\n{reason}\n\n"
            "Choose the folder that holds the model's config.json and .safetensors files, such as one "
            "written by save_pretrained or downloaded from the Hub.",
        )

    def _remove(self) -> None:
        row = self.table.currentRow()
        if row >= 0:
            self._edit(recipe_edits.remove_expert(self.document.recipe, row), "Remove expert")

    def _move(self, offset: int) -> None:
        row = self.table.currentRow()
        if row >= 0:
            self._edit(recipe_edits.move_expert(self.document.recipe, row, offset), "Move expert")
            self.table.selectRow(row + offset)

    def _choose_color(self, row: int) -> None:
        if row < 0:
            return
        current = QColor(recipe_edits.expert_color(self.document.recipe, row))
        chosen = QColorDialog.getColor(current, self, "Expert colour")
        if chosen.isValid():
            self.set_color(row, chosen.name())

    def set_color(self, row: int, color: str) -> None:
        self._edit(recipe_edits.update_extras(self.document.recipe, row, color=color), "Change expert colour")

    def _cell_double_clicked(self, row: int, column: int) -> None:
        if column == COLOR:
            self._choose_color(row)

    def _item_changed(self, item: QTableWidgetItem) -> None:
        if self._refreshing or item.column() != LABEL:
            return
        row = item.row()
        label = item.text().strip() or None
        self._edit(
            recipe_edits.update_extras(self.document.recipe, row, label=label),
            "Rename expert",
            LABEL_MERGE_ID + row,
        )

    def _update_buttons(self) -> None:
        row = self.table.currentRow()
        has_row = row >= 0
        self.remove_button.setEnabled(has_row)
        self.color_button.setEnabled(has_row)
        self.up_button.setEnabled(has_row and row > 0)
        self.down_button.setEnabled(has_row and row < self.table.rowCount() - 1)
        self.adapter_panel.show_selection(self.document.recipe)


class DownloadCell(QWidget):
    """A Download button that becomes a progress bar with a cancel button while it runs."""

    def __init__(self, reference: ModelRef, context: AppContext, on_done: Callable[[ModelRef], None]) -> None:
        super().__init__()
        self.reference = reference
        self.context = context
        self.on_done = on_done
        self.job: JobHandle | None = None
        self.button = QPushButton("Download")
        self.button.setToolTip(f"Download {reference} into the Hugging Face cache")
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.progress.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setVisible(False)
        self.button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(2, 0, 2, 0)
        layout.addWidget(self.button)
        layout.addWidget(self.progress, 1)
        layout.addWidget(self.cancel_button)

    def start(self) -> None:
        self.job = self.context.run(f"Download {self.reference}", download(self.reference))
        self.button.setVisible(False)
        self.progress.setValue(0)
        self.progress.setFormat("starting…")
        self.progress.setVisible(True)
        self.cancel_button.setVisible(True)
        self.cancel_button.setEnabled(True)
        self.job.progress.connect(self._progress)
        self.job.succeeded.connect(self._succeeded)
        self.job.failed.connect(self._failed)
        self.job.cancelled.connect(self._cancelled)
        self.job.finished.connect(self._finished)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.cancel_button.setEnabled(False)
            self.progress.setFormat("cancelling…")

    def _progress(self, record: Progress) -> None:
        # A table cell has room for the percentage only; the sizes, speed and time left are in
        # its tooltip.
        self.progress.setValue(int(record.fraction * 100))
        self.progress.setFormat("%p%")
        self.progress.setToolTip(record.message)

    def _succeeded(self, _folder: Path) -> None:
        self.on_done(self.reference)

    def _failed(self, error: BaseException) -> None:
        self.button.setText("Retry download")
        self.button.setToolTip(describe_error(error))

    def _cancelled(self) -> None:
        self.button.setText("Download")
        self.button.setToolTip("Cancelled; files already finished are kept, so the download resumes.")

    def _finished(self) -> None:
        self.button.setVisible(True)
        self.progress.setVisible(False)
        self.cancel_button.setVisible(False)
