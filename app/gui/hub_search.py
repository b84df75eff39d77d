"""Find a model on the Hub: a sortable results table with paging, and a detail pane that says what
the model is, what it costs to fetch, and whether it can join the recipe.

Everything the Hub says (names, licences, messages) is escaped before it goes into rich text.
"""

from __future__ import annotations

import html
from enum import Enum
from typing import TYPE_CHECKING

from PySide6.QtCore import QEvent, QModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtGui import QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSplitter,
    QTableView,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app.core.recipe import Recipe
from app.gui import hub_jobs
from app.gui.context import AppContext, describe_error
from app.gui.hub_jobs import HubDetails, SearchAnswer
from app.gui.widgets import format_bytes, format_count
from app.gui.workers import JobHandle

if TYPE_CHECKING:
    from app.core.hub import ModelSummary, SearchPage, SortKey
    from app.core.problems import Problem

HUB_COLUMNS = (
    "Model",
    "Parameters",
    "Size",
    "dtype",
    "Licence",
    "Gated",
    "Downloads",
    "Likes",
    "Updated",
    "Base model",
)
# An adapter's row names the model it was trained on in this column; a full model's leaves it empty.
BASE_COLUMN = HUB_COLUMNS.index("Base model")
PAGE_SIZE = 50
# Sorting on the number, not on the text "7.2B".
SORT_ROLE = Qt.ItemDataRole.UserRole + 1
OK_COLOR = "#1e8e3e"
ERROR_COLOR = "#d93025"
WARNING_COLOR = "#e37400"


class Purpose(Enum):
    """What the dialog was opened for: what a double-click chooses, and whether the model is
    checked against the recipe's base (as an expert) or not (as the new base). ``ADAPTER`` looks for
    a LoRA adapter to apply to an expert of the recipe."""

    EXPERT = "expert"
    BASE = "base"
    ADAPTER = "adapter"


def _item(text: str, sort_value: object, tooltip: str = "") -> QStandardItem:
    item = QStandardItem(text)
    item.setEditable(False)
    item.setData(sort_value, SORT_ROLE)
    if tooltip:
        item.setToolTip(tooltip)
    return item


def _e(value: object) -> str:
    return html.escape(str(value))


def _link(url: str) -> str:
    return f'<a href="{html.escape(url, quote=True)}">{_e(url)}</a>'


def _problem_items(problems: tuple[Problem, ...] | list[Problem]) -> str:
    items = []
    for problem in problems:
        color = ERROR_COLOR if problem.is_error else WARNING_COLOR
        mark = "✗" if problem.is_error else "⚠"
        fix = f"<br><i>Fix:</i> {_e(problem.hint)}" if problem.hint else ""
        items.append(f'<li><span style="color:{color}">{mark}</span> {_e(problem.message)}{fix}</li>')
    return f"<ul>{''.join(items)}</ul>"


def summary_html(model: ModelSummary) -> str:
    """The search row's facts, shown at once while the model's files are read."""
    parameters = format_count(model.parameters) if model.parameters else "unknown"
    size = format_bytes(model.size_bytes) if model.size_bytes else "unknown size"
    updated = model.last_modified.date().isoformat() if model.last_modified else "unknown"
    parts = [
        f"<h3>{_e(model.repo_id)}</h3>",
        f"<p>{_e(parameters)} parameters · {_e(size)} · {_e(model.dtype or 'dtype unknown')}<br>",
        f"Licence: {_e(model.license or 'not stated')}<br>",
        f"{model.downloads or 0:,} downloads · {model.likes or 0:,} likes · updated {_e(updated)}</p>",
    ]
    if model.is_adapter:
        base = _e(model.base_model) if model.base_model else "a base model its tags do not name"
        parts.insert(1, f"<p><b>LoRA adapter</b> (PEFT) of {base}: the sizes are the adapter's own.</p>")
    if model.gated:
        parts.append("<p><b>Gated:</b> its authors ask you to accept their terms on the Hub before downloading.</p>")
    return "".join(parts)


def details_html(details: HubDetails) -> str:
    """Architecture, sizes, whether the model can join the recipe, and memory, as rich text."""
    if details.access_url:
        return (
            f"<h4>How to get access</h4><p>{_e(details.error)}.</p><ol>"
            "<li>Log in to the Hub with an access token (File ▸ Settings).</li>"
            f"<li>Open {_link(details.access_url)} while logged in and accept the terms.</li>"
            "<li>Search again: the model's details then appear here.</li></ol>"
        )
    if details.report is None:
        fix = f"<br><i>Fix:</i> {_e(details.hint)}" if details.hint else ""
        return f'<p><span style="color:{ERROR_COLOR}">✗</span> {_e(details.error)}{fix}</p>'
    report = details.report
    arch = report.architecture
    adapter_part = ""
    if report.adapter is not None:
        card = report.adapter
        adapter_rows = [
            ("Rank", card.rank_text()),
            ("Base model", card.base_model or "not named"),
            ("Changes", ", ".join(card.target_modules) or "?"),
            ("Files", f"{len(report.files)}: {report.size_text()}"),
            ("Download", card.fetch_text()),
        ]
        adapter_table = "".join(
            f"<tr><td><b>{_e(name)}</b>&nbsp;&nbsp;</td><td>{_e(value)}</td></tr>" for name, value in adapter_rows
        )
        adapter_part = (
            f"<h4>LoRA adapter</h4><table>{adapter_table}</table>"
            "<p>As an expert it joins as its model + the adapter; only its MLP part is used.</p>"
        )
    rows = [
        ("Family", f"{arch.family or '?'} ({', '.join(arch.architectures) or '?'})"),
        ("Layers", arch.layers),
        ("Hidden size", f"{arch.hidden_size}, intermediate {arch.intermediate_size}"),
        ("Heads", f"{arch.attention_heads} attention, {arch.kv_heads} key/value"),
        ("Vocabulary", arch.vocab_size),
        ("Context", arch.max_positions),
        ("Chat template", "yes" if arch.has_chat_template else "no"),
    ]
    if report.adapter is None:  # an adapter's files are listed with the adapter
        rows.append(("Files", f"{len(report.files)}: {report.size_text()}"))
    table = "".join(f"<tr><td><b>{_e(name)}</b>&nbsp;&nbsp;</td><td>{_e(value)}</td></tr>" for name, value in rows)
    heading_text = "Its base model's architecture" if report.adapter is not None else "Architecture and size"
    parts = [adapter_part, f"<h4>{heading_text}</h4><table>{table}</table>", "<h4>This recipe</h4>"]
    if report.can_join and not details.base_note:
        parts.append(f'<p><span style="color:{OK_COLOR}">✓</span> Can join this recipe: it matches the base model.</p>')
    elif not report.can_join:
        parts.append(f'<p><span style="color:{ERROR_COLOR}">✗</span> Cannot join this recipe as it is:</p>')
    if details.base_note:
        parts.append(f"<p>{_e(details.base_note)}</p>")
    if report.problems:
        parts.append(_problem_items(report.problems))
    if details.fit is not None:
        fit = details.fit
        parts.append(
            "<h4>Memory</h4>"
            f"<p>Computing the routers needs about {_e(format_bytes(fit.gate_bytes))}; chatting with the "
            f"{_e(format_count(fit.moe_parameters))}-parameter MoE about {_e(format_bytes(fit.chat_bytes))}.</p>"
        )
        if fit.problems:
            parts.append(_problem_items(fit.problems))
    parts.append(f"<p>{_link(report.url)}</p>")
    return "".join(parts)


class HubSearchDialog(QDialog):
    def __init__(
        self,
        recipe: Recipe,
        context: AppContext,
        purpose: Purpose = Purpose.EXPERT,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        titles = {
            Purpose.BASE: "Choose a base model from the Hub",
            Purpose.EXPERT: "Add a model from the Hub",
            Purpose.ADAPTER: "Add a LoRA adapter from the Hub to the expert",
        }
        self.setWindowTitle(titles[purpose])
        self.resize(1240, 640)
        self.recipe = recipe
        self.context = context
        self.page_size = PAGE_SIZE
        self.models: dict[str, ModelSummary] = {}
        self.details: dict[str, HubDetails] = {}
        self.last_page: SearchPage | None = None
        self.chosen_purpose: Purpose | None = None
        self._search_job: JobHandle | None = None
        self._inspect_job: JobHandle | None = None
        self._query = ""
        self._sort: SortKey = "downloads"
        self._adapters = purpose is Purpose.ADAPTER

        self.query = QLineEdit()
        self.query.setPlaceholderText("Search models, e.g. mistral 7b instruct")
        self.sort = QComboBox()
        self.sort.addItems(list(hub_jobs.SORTS))
        self.search_button = QPushButton("Search")
        # Enter anywhere searches; choosing a model takes a button or a double-click.
        self.search_button.setDefault(True)
        self.search_button.clicked.connect(self.search)
        # Ends a search or a model's reading at once, however long the Hub takes to answer.
        self.stop_button = QPushButton("Stop")
        self.stop_button.setAutoDefault(False)
        self.stop_button.setEnabled(False)
        self.stop_button.setToolTip("Stop asking the Hub")
        self.stop_button.clicked.connect(self.stop)
        self.sort.currentIndexChanged.connect(self._sort_changed)
        # PEFT adapters (library peft) instead of full models: an adapter joins as model + adapter.
        self.adapters_only = QCheckBox("LoRA adapters")
        self.adapters_only.setToolTip("Search PEFT LoRA adapters (library peft) instead of full models")
        self.adapters_only.setChecked(self._adapters)
        self.adapters_only.toggled.connect(self._sort_changed)

        self.model = QStandardItemModel(0, len(HUB_COLUMNS), self)
        self.model.setHorizontalHeaderLabels(HUB_COLUMNS)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        # Until the user sorts by a column, rows stay in the Hub's order for the chosen sort.
        self.table.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        # One line per model: long names are elided, and their tooltip gives them whole.
        self.table.setWordWrap(False)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        # Base model names are as long as model names: a fixed share of the width, elided in the middle.
        self.table.horizontalHeader().setSectionResizeMode(BASE_COLUMN, QHeaderView.ResizeMode.Interactive)
        self.table.setColumnWidth(BASE_COLUMN, 190)
        self._show_adapter_columns()
        self.table.selectionModel().currentRowChanged.connect(self._selected)
        self.table.doubleClicked.connect(lambda _index: self._choose(self.purpose))
        self.more_button = QPushButton("More results")
        self.more_button.setEnabled(False)
        self.more_button.clicked.connect(self.load_more)
        self.status = QLabel("Search the Hub's text-generation models.")

        self.detail_pane = QTextBrowser()
        self.detail_pane.setOpenExternalLinks(True)
        self.detail_pane.setMinimumWidth(280)
        self.detail_pane.setHtml("<p>Pick a model to see whether it fits the recipe.</p>")

        self.buttons = QDialogButtonBox()
        self.base_button = self.buttons.addButton("Use as base model", QDialogButtonBox.ButtonRole.AcceptRole)
        self.add_button = self.buttons.addButton("Add as expert", QDialogButtonBox.ButtonRole.AcceptRole)
        self.adapter_button = self.buttons.addButton(
            "Add to the selected expert", QDialogButtonBox.ButtonRole.AcceptRole
        )
        self.adapter_button.setToolTip("Apply this LoRA adapter to the expert the Models page has selected")
        self.adapter_button.setVisible(purpose is Purpose.ADAPTER)
        self.buttons.addButton(QDialogButtonBox.StandardButton.Cancel)
        self.base_button.clicked.connect(lambda: self._choose(Purpose.BASE))
        self.add_button.clicked.connect(lambda: self._choose(Purpose.EXPERT))
        self.adapter_button.clicked.connect(lambda: self._choose(Purpose.ADAPTER))
        self.buttons.rejected.connect(self.reject)
        self.purpose = purpose
        for button in (self.base_button, self.add_button, self.adapter_button):
            button.setEnabled(False)
            button.setAutoDefault(False)

        search_row = QHBoxLayout()
        search_row.addWidget(self.query, 1)
        search_row.addWidget(QLabel("Sort by"))
        search_row.addWidget(self.sort)
        search_row.addWidget(self.adapters_only)
        search_row.addWidget(self.search_button)
        search_row.addWidget(self.stop_button)
        results = QWidget()
        results_layout = QVBoxLayout(results)
        results_layout.setContentsMargins(0, 0, 0, 0)
        results_layout.addWidget(self.table, 1)
        paging_row = QHBoxLayout()
        paging_row.addWidget(self.status, 1)
        paging_row.addWidget(self.more_button)
        results_layout.addLayout(paging_row)
        splitter = QSplitter()
        splitter.addWidget(results)
        splitter.addWidget(self.detail_pane)
        splitter.setStretchFactor(0, 1)
        splitter.setStretchFactor(1, 0)
        splitter.setSizes([880, 360])
        layout = QVBoxLayout(self)
        layout.addLayout(search_row)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.buttons)

    @property
    def chosen_repo(self) -> str | None:
        index = self.table.currentIndex()
        if not index.isValid():
            return None
        return self.proxy.index(index.row(), 0).data()

    @property
    def chosen_summary(self) -> ModelSummary | None:
        repo = self.chosen_repo
        return self.models.get(repo) if repo is not None else None

    # ------------------------------------------------------------------ searching

    def search(self) -> None:
        self._query = self.query.text().strip()
        self.model.removeRows(0, self.model.rowCount())
        self.models.clear()
        self.more_button.setEnabled(False)
        self._fetch(offset=0)

    def load_more(self) -> None:
        if self.last_page is not None and self.last_page.has_more:
            self.more_button.setEnabled(False)
            self._fetch(offset=self.last_page.next_offset)

    def _fetch(self, offset: int) -> None:
        if self._search_job is not None and self._search_job.is_running:
            self._search_job.cancel()
        self.status.setText("Searching…")
        self._sort = hub_jobs.SORTS[self.sort.currentText()]
        self._adapters = self.adapters_only.isChecked()
        self._show_adapter_columns()
        job = self.context.run(
            "Hub search",
            hub_jobs.search(self._query, self._sort, self.page_size, offset, self._adapters),
            quiet=True,
        )
        self._search_job = job
        job.succeeded.connect(self.show_answer)
        job.failed.connect(self._search_failed)
        job.cancelled.connect(lambda: self._search_stopped(job))
        job.finished.connect(self._update_stop_button)
        self._update_stop_button()

    def _show_adapter_columns(self) -> None:
        """Adapters show their base model; their parameters and dtype (the size says as much) make room."""
        self.table.setColumnHidden(BASE_COLUMN, not self._adapters)
        for name in ("Parameters", "dtype"):
            self.table.setColumnHidden(HUB_COLUMNS.index(name), self._adapters)

    def stop(self) -> None:
        """Cancel the search and the model reading under way; their workers end at once."""
        for job in (self._search_job, self._inspect_job):
            if job is not None and job.is_running:
                job.cancel()
        self.stop_button.setEnabled(False)

    def _update_stop_button(self) -> None:
        self.stop_button.setEnabled(
            any(job is not None and job.is_running for job in (self._search_job, self._inspect_job))
        )

    def _search_stopped(self, job: JobHandle) -> None:
        if job is self._search_job:  # not one replaced by a newer search
            self.status.setText("Search stopped.")
            self.more_button.setEnabled(self.last_page is not None and self.last_page.has_more and bool(self.models))

    def _search_failed(self, error: BaseException) -> None:
        self.status.setText("The search failed.")
        self.detail_pane.setPlainText(describe_error(error))

    def _sort_changed(self) -> None:
        if self.models:
            self.search()

    def show_answer(self, answer: SearchAnswer) -> None:
        page = answer.page
        asked = (answer.query, answer.sort, answer.adapters, page.offset)
        if asked != (self._query, self._sort, self._adapters, len(self.models)):
            return  # the answer to a search that has since been replaced
        self.last_page = page
        for model in page.models:
            self.models[model.repo_id] = model
            self.model.appendRow(self._row(model))
        self.more_button.setEnabled(page.has_more)
        found = len(self.models)
        more = ", more on the Hub" if page.has_more else ""
        kind = "adapter" if self._adapters else "model"
        nothing = "No LoRA adapters match." if self._adapters else "No text-generation models match."
        self.status.setText(f"{found} {kind}{'s' * (found != 1)}{more}." if found else nothing)

    @staticmethod
    def _row(model: ModelSummary) -> list[QStandardItem]:
        updated = model.last_modified.date().isoformat() if model.last_modified else "?"
        return [
            _item(model.repo_id, model.repo_id.lower(), model.repo_id),
            _item(format_count(model.parameters) if model.parameters else "?", model.parameters or 0),
            _item(format_bytes(model.size_bytes) if model.size_bytes else "?", model.size_bytes or 0),
            _item(model.dtype or "?", model.dtype or ""),
            _item(model.license or "?", model.license or "", model.license or ""),
            _item("gated" if model.gated else "open", int(model.gated)),
            _item(format_count(model.downloads or 0), model.downloads or 0),
            _item(format_count(model.likes or 0), model.likes or 0),
            _item(updated, updated),
            _item(model.base_model or "", (model.base_model or "").lower(), model.base_model or ""),
        ]

    # ------------------------------------------------------------------ details

    def _selected(self, _current: QModelIndex, _previous: QModelIndex) -> None:
        repo = self.chosen_repo
        summary = self.chosen_summary
        is_adapter = summary is not None and summary.is_adapter
        # An adapter is no model on its own: it cannot be the base, and only an adapter goes onto an expert.
        self.base_button.setEnabled(repo is not None and not is_adapter)
        self.add_button.setEnabled(repo is not None)
        self.adapter_button.setEnabled(is_adapter)
        if repo is None:
            return
        self._show_details(repo)
        if repo in self.details:
            return
        if self._inspect_job is not None and self._inspect_job.is_running:
            self._inspect_job.cancel()
        as_base = self.purpose is Purpose.BASE
        new_expert = self.purpose is not Purpose.ADAPTER
        job = self.context.run(
            f"Inspect {repo}", hub_jobs.inspect(repo, self.recipe, as_base, new_expert), quiet=True
        )
        self._inspect_job = job
        job.succeeded.connect(self._inspected)
        job.failed.connect(self._inspect_failed)
        job.cancelled.connect(lambda: self._inspect_stopped(job, repo))
        job.finished.connect(self._update_stop_button)
        self._update_stop_button()

    def _inspected(self, details: HubDetails) -> None:
        self.details[details.repo_id] = details
        if self.chosen_repo == details.repo_id:
            self._show_details(details.repo_id)

    def _inspect_failed(self, error: BaseException) -> None:
        self.detail_pane.append(describe_error(error))

    def _inspect_stopped(self, job: JobHandle, repo: str) -> None:
        # Nothing is remembered for the model: choosing it again reads it afresh.
        if job is self._inspect_job and self.chosen_repo == repo:
            self.detail_pane.setHtml(
                summary_html(self.models[repo]) + "<p><i>Stopped reading its configuration.</i></p>"
            )

    def _show_details(self, repo: str) -> None:
        details = self.details.get(repo)
        more = details_html(details) if details is not None else "<p><i>Reading its configuration…</i></p>"
        self.detail_pane.setHtml(summary_html(self.models[repo]) + more)

    def changeEvent(self, event: QEvent) -> None:
        # Rich text takes its link colour from the palette when it is set: set it again after a
        # switch between light and dark themes.
        if event.type() == QEvent.Type.PaletteChange and self.chosen_repo is not None:
            self._show_details(self.chosen_repo)
        super().changeEvent(event)

    # ------------------------------------------------------------------ closing

    def _choose(self, purpose: Purpose) -> None:
        self.chosen_purpose = purpose
        self.accept()

    def done(self, result: int) -> None:
        # Answers arriving after the dialog has gone would have nowhere to go.
        for job in (self._search_job, self._inspect_job):
            if job is not None and job.is_running:
                job.cancel()
        super().done(result)
