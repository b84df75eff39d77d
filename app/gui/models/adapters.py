"""LoRA adapters on experts (``MODEL+ADAPTER``): the jobs that read them off the GUI thread, the text
of an expert's row, and the panel that adds, shows and removes the selected expert's adapter.

Reading an adapter means its ``adapter_config.json`` and its safetensors header, then checking it
against its model's weights' headers (:func:`app.core.lora.adapter_problems`): quick, but files, so
never on the GUI thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QVBoxLayout,
    QWidget,
)

from app.core.problems import FrankenMoEError, Problem
from app.core.progress import Job, Progress, check_cancel
from app.core.recipe import ModelRef, Recipe, looks_local
from app.gui import recipe_edits
from app.gui.context import AppContext, describe_error, describe_problems
from app.gui.document import RecipeDocument
from app.gui.widgets import MessageLabel
from app.gui.workers import JobFactory, JobHandle

if TYPE_CHECKING:
    from app.core.lora import AdapterInfo


@dataclass(frozen=True)
class AdapterReport:
    """What the Models page shows of an expert's adapter. ``reference`` is the whole MODEL+ADAPTER."""

    reference: ModelRef
    summary: str = ""  # AdapterInfo.summary(), once the adapter could be read
    problems: tuple[Problem, ...] = ()
    # Why the adapter cannot be read (then no summary), or what is still to come (a download).
    error: str = ""
    waiting: str = ""

    @property
    def text(self) -> str:
        """The whole story, for the panel: summary, then problems with fixes, or the error."""
        if self.error:
            return f"✗ {self.error}"
        lines = [self.summary] if self.summary else []
        if self.waiting:
            lines.append(self.waiting)
        if self.problems:
            lines.append(describe_problems(list(self.problems)))
        elif self.summary and not self.waiting:
            lines.append("✓ It fits its model.")
        return "\n".join(lines)


def model_cell_text(reference: ModelRef, report: AdapterReport | None) -> str:
    """An expert's Model cell: ``base + adapter (r=16, alpha=32, MLP part 41 % of the adapter)``."""
    if reference.lora is None:
        return str(reference)
    text = f"{reference.model} + {reference.lora}"
    if report is None:
        return f"{text} (reading the adapter…)"
    if report.summary:
        return f"{text} ({report.summary})"
    return f"{text} (adapter not read yet)" if report.waiting else f"{text} (adapter unreadable)"


def row_problems(compatibility: list[Problem], report: AdapterReport | None) -> list[Problem]:
    """The expert's compatibility problems with its adapter's, each once: the recipe check also files
    the adapter's problems (prefixed with the expert's name) under the expert."""
    if report is None:
        return compatibility
    adapter_problems = list(report.problems)
    if report.error:
        adapter_problems.insert(0, Problem("lora", report.error))
    others = [p for p in compatibility if not any(p.message.endswith(a.message) for a in adapter_problems)]
    return [*adapter_problems, *others]


def read_expert_adapters(references: list[ModelRef], cache_dir: Path | None = None) -> JobFactory:
    """Each MODEL+ADAPTER's summary and its problems against its model; a Hub part not downloaded yet
    is said to be waiting (its row's Download button fetches both)."""

    def job(cancel: threading.Event) -> Job[dict[ModelRef, AdapterReport]]:
        from app.core.lora import adapter_problems, read_adapter
        from app.core.sources import ModelNotDownloaded, resolve_adapter_dir, resolve_model_dir

        found: dict[ModelRef, AdapterReport] = {}
        for done, reference in enumerate(references):
            check_cancel(cancel)
            assert reference.lora is not None
            yield Progress("reading adapters", done, len(references), message=f"reading {reference.lora}")
            try:
                info = read_adapter(resolve_adapter_dir(reference.lora, cache_dir), str(reference.lora))
            except ModelNotDownloaded:
                found[reference] = AdapterReport(
                    reference, waiting=f"The adapter {reference.lora} is not downloaded yet."
                )
                continue
            except FrankenMoEError as error:
                found[reference] = AdapterReport(reference, error=describe_error(error))
                continue
            try:
                model_folder = resolve_model_dir(reference.model, cache_dir)
            except ModelNotDownloaded:
                waiting = f"Checked against {reference.model} once it is downloaded."
                found[reference] = AdapterReport(reference, info.summary(), waiting=waiting)
                continue
            except FrankenMoEError as error:
                found[reference] = AdapterReport(reference, info.summary(), error=describe_error(error))
                continue
            problems = adapter_problems(info, model_folder, str(reference.model))
            found[reference] = AdapterReport(reference, info.summary(), tuple(problems))
        return found

    return job


def read_adapter_folder(folder: Path) -> JobFactory:
    """The adapter in ``folder``; the job fails with the reason when it is no (readable) adapter."""

    def job(cancel: threading.Event) -> Job[AdapterInfo]:
        from app.core.lora import read_adapter

        yield Progress("reading adapter", 0, 1, message=f"reading {folder}")
        check_cancel(cancel)
        return read_adapter(folder)

    return job


class AdapterPanel(QWidget):
    """The selected expert's adapter: what it is and how it fits, and buttons to add one from a folder
    or the Hub, or to remove it. Reads adapters in workers; ``reports_changed`` asks the page to redraw."""

    hub_requested = Signal()
    reports_changed = Signal()

    def __init__(
        self,
        document: RecipeDocument,
        context: AppContext,
        experts: QTableWidget,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.document = document
        self.context = context
        # The Models page's expert table: its selected row is the expert this panel is about.
        self.experts = experts
        self.reports: dict[ModelRef, AdapterReport] = {}
        self._reading: set[ModelRef] = set()
        self._folder_job: JobHandle | None = None

        self.title = QLabel()
        self.details = MessageLabel()
        # Every line of it stays readable, however tall the expert table grows.
        self.details.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        self.folder_button = QPushButton("Adapter from folder…")
        self.folder_button.setToolTip("Apply a PEFT LoRA adapter saved in a folder to the selected expert")
        self.hub_button = QPushButton("Adapter from Hub…")
        self.hub_button.setToolTip("Find a LoRA adapter on the Hub for the selected expert")
        self.remove_button = QPushButton("Remove adapter")
        self.remove_button.setToolTip("Keep the expert's model, without its adapter")
        self.folder_button.clicked.connect(self._choose_folder)
        self.hub_button.clicked.connect(self.hub_requested)
        self.remove_button.clicked.connect(self.remove_adapter)

        buttons = QHBoxLayout()
        buttons.setContentsMargins(0, 0, 0, 0)
        buttons.addWidget(self.title, 1)
        for button in (self.folder_button, self.hub_button, self.remove_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(buttons)
        layout.addWidget(self.details)
        self.show_selection(document.recipe)

    # ------------------------------------------------------------------ reading

    def recipe_changed(self, recipe: Recipe) -> None:
        """Read the adapters the recipe names that have not been read yet."""
        wanted = [e.source_model for e in recipe.experts if e.source_model.lora is not None]
        missing = [ref for ref in dict.fromkeys(wanted) if ref not in self.reports and ref not in self._reading]
        if missing:
            self._reading.update(missing)
            handle = self.context.run("Read adapters", read_expert_adapters(missing), quiet=True)
            handle.succeeded.connect(self._read)
            handle.finished.connect(lambda: self._reading.difference_update(missing))
        self.show_selection(recipe)

    def forget(self, reference: ModelRef) -> None:
        """Read again the adapters that use ``reference`` (a model or adapter just downloaded)."""
        stale = [ref for ref in self.reports if reference in (ref, ref.model, ref.lora)]
        for ref in stale:
            del self.reports[ref]

    def _read(self, found: dict[ModelRef, AdapterReport]) -> None:
        self.reports.update(found)
        self.show_selection(self.document.recipe)
        self.reports_changed.emit()

    # ------------------------------------------------------------------ showing

    def show_selection(self, recipe: Recipe) -> None:
        row = self.experts.currentRow()
        has_row = 0 <= row < len(recipe.experts)
        for button in (self.folder_button, self.hub_button):
            button.setEnabled(has_row)
        if not has_row:
            self.title.setText("LoRA adapter: select an expert to give it one")
            self.details.clear()
            self.remove_button.setEnabled(False)
            return
        reference = recipe.experts[row].source_model
        label = recipe.expert_label(row)
        self.remove_button.setEnabled(reference.lora is not None)
        if reference.lora is None:
            self.title.setText(f"LoRA adapter of {label}: none")
            self.details.setText(
                "An expert can be its model plus a PEFT LoRA adapter (MODEL+ADAPTER, as in mergekit): "
                "the adapter's MLP deltas are merged into the expert's MLP."
            )
            return
        self.title.setText(f"LoRA adapter of {label}: {reference.lora}")
        report = self.reports.get(reference)
        self.details.setText(report.text if report is not None else "Reading the adapter…")

    # ------------------------------------------------------------------ edits

    def _choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose the LoRA adapter's folder")
        if folder:
            self.add_adapter_folder(self.experts.currentRow(), folder)

    def add_adapter_folder(self, row: int, folder: str) -> None:
        """Read the folder in a worker; apply it to expert ``row`` if it is an adapter, else say why not."""
        self._folder_job = self.context.run("Read adapter", read_adapter_folder(Path(folder)), quiet=True)
        self._folder_job.succeeded.connect(lambda _info: self.set_adapter(row, folder))
        self._folder_job.failed.connect(lambda error: self._refuse_folder(folder, describe_error(error)))

    def _refuse_folder(self, folder: str, reason: str) -> None:
        QMessageBox.warning(
            self,
            "Not an adapter folder",
            f"{folder} cannot be used as a LoRA adapter.\n\n{reason}\n\n"
            "Choose the folder that holds adapter_config.json and adapter_model.safetensors, such as one "
            "written by PEFT's save_pretrained or downloaded from the Hub.",
        )

    def set_adapter(self, row: int, adapter: str) -> None:
        recipe = self.document.recipe
        if not 0 <= row < len(recipe.experts):
            return
        label = recipe.expert_label(row)
        self.document.edit(recipe_edits.set_adapter(recipe, row, adapter), f"Add adapter to {label}")

    def add_adapter_expert(self, adapter: str, adapter_base: str | None) -> None:
        """A new expert made of a model + this Hub adapter: the recipe's base, or the adapter's own base
        (which then becomes the recipe's) while the recipe has none."""
        recipe = self.document.recipe
        model = hub_adapter_expert_model(recipe, adapter_base)
        if model is None:
            QMessageBox.warning(
                self,
                "No model for the adapter",
                f"{adapter} does not name the model it was trained on, and the recipe has no base model yet."
                "\n\nChoose the base model first; the adapter is then applied to it.",
            )
            return
        if not recipe.base_model.path:
            self.document.edit(recipe_edits.set_base(recipe, model), "Set base model")
        label = adapter.rsplit("/", 1)[-1]
        self.document.edit(recipe_edits.add_adapter_expert(self.document.recipe, model, adapter, label), "Add expert")
        self.experts.selectRow(len(self.document.recipe.experts) - 1)

    def remove_adapter(self) -> None:
        row = self.experts.currentRow()
        recipe = self.document.recipe
        if 0 <= row < len(recipe.experts) and recipe.experts[row].source_model.lora is not None:
            label = recipe.expert_label(row)
            self.document.edit(recipe_edits.set_adapter(recipe, row, None), f"Remove adapter of {label}")


def hub_adapter_expert_model(recipe: Recipe, adapter_base: str | None) -> str | None:
    """The model a Hub adapter chosen as a new expert is applied to: the recipe's base (every expert
    shares it), or the adapter's own base while the recipe has none. None when neither is known."""
    if recipe.base_model.path:
        return str(recipe.base_model.model)
    return adapter_base if adapter_base and not looks_local(adapter_base) else None

