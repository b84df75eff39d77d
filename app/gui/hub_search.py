"""Search the Hub for a model: a sortable results table and a detail pane."""

from __future__ import annotations

from PySide6.QtCore import QModelIndex, QSortFilterProxyModel, Qt
from PySide6.QtGui import QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QPushButton,
    QSplitter,
    QTableView,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from app.core.recipe import Recipe
from app.gui.context import AppContext, describe_error
from app.gui.hub_backend import SORTS, HubBackend, HubModelRow
from app.gui.widgets import format_bytes, format_count
from app.gui.workers import JobHandle

HUB_COLUMNS = ("Model", "Parameters", "Size", "dtype", "Licence", "Gated", "Downloads", "Likes", "Updated")
SEARCH_LIMIT = 50
# Sorting on the number, not on the text "7.2B".
SORT_ROLE = Qt.ItemDataRole.UserRole + 1


def _item(text: str, sort_value: object) -> QStandardItem:
    item = QStandardItem(text)
    item.setEditable(False)
    item.setData(sort_value, SORT_ROLE)
    return item


class HubSearchDialog(QDialog):
    def __init__(
        self, hub: HubBackend | None, recipe: Recipe, context: AppContext, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Add a model from the Hub")
        self.resize(980, 560)
        self.hub = hub
        self.recipe = recipe
        self.context = context
        self.rows: list[HubModelRow] = []
        self.job: JobHandle | None = None

        self.query = QLineEdit()
        self.query.setPlaceholderText("Search models, e.g. mistral 7b instruct")
        self.sort = QComboBox()
        self.sort.addItems(SORTS)
        self.search_button = QPushButton("Search")
        self.search_button.setDefault(True)
        self.search_button.clicked.connect(self.search)
        self.query.returnPressed.connect(self.search)

        self.model = QStandardItemModel(0, len(HUB_COLUMNS), self)
        self.model.setHorizontalHeaderLabels(HUB_COLUMNS)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(SORT_ROLE)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.selectionModel().currentRowChanged.connect(self._selected)

        self.details = QTextBrowser()
        self.details.setMinimumWidth(260)
        self.buttons = QDialogButtonBox()
        self.add_button = self.buttons.addButton("Add as expert", QDialogButtonBox.ButtonRole.AcceptRole)
        self.buttons.addButton(QDialogButtonBox.StandardButton.Cancel)
        self.add_button.setEnabled(False)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)

        search_row = QHBoxLayout()
        search_row.addWidget(self.query, 1)
        search_row.addWidget(self.sort)
        search_row.addWidget(self.search_button)
        splitter = QSplitter()
        splitter.addWidget(self.table)
        splitter.addWidget(self.details)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(search_row)
        layout.addWidget(splitter, 1)
        layout.addWidget(self.buttons)

        if hub is None:
            for widget in (self.query, self.sort, self.search_button):
                widget.setEnabled(False)
            self.details.setPlainText(
                "Hub search is not available in this build yet. Meanwhile, add experts from local folders "
                "(Models page, Add from folder…), or from models already in your Hugging Face cache "
                "by typing their id."
            )

    @property
    def chosen_repo(self) -> str | None:
        index = self.table.currentIndex()
        if not index.isValid():
            return None
        return self.proxy.index(index.row(), 0).data()

    def search(self) -> None:
        if self.hub is None or not self.query.text().strip():
            return
        if self.job is not None and self.job.is_running:
            self.job.cancel()
        self.details.setPlainText("Searching…")
        self.job = self.context.run(
            "Hub search", self.hub.search(self.query.text().strip(), self.sort.currentText(), SEARCH_LIMIT)
        )
        self.job.succeeded.connect(self.show_results)
        self.job.failed.connect(lambda error: self.details.setPlainText(describe_error(error)))

    def show_results(self, rows: list[HubModelRow]) -> None:
        self.rows = list(rows)
        self.model.removeRows(0, self.model.rowCount())
        for row in self.rows:
            self.model.appendRow(
                [
                    _item(row.repo_id, row.repo_id.lower()),
                    _item(format_count(row.parameters) if row.parameters else "?", row.parameters or 0),
                    _item(format_bytes(row.size_bytes) if row.size_bytes else "?", row.size_bytes or 0),
                    _item(row.dtype or "?", row.dtype),
                    _item(row.license or "?", row.license),
                    _item("gated" if row.gated else "open", int(row.gated)),
                    _item(format_count(row.downloads), row.downloads),
                    _item(format_count(row.likes), row.likes),
                    _item(row.last_modified, row.last_modified),
                ]
            )
        self.details.setPlainText(f"{len(self.rows)} models. Pick one to see whether it fits the recipe.")

    def _selected(self, current: QModelIndex, _previous: QModelIndex) -> None:
        repo = self.chosen_repo
        self.add_button.setEnabled(repo is not None)
        if repo is None:
            return
        row = next(r for r in self.rows if r.repo_id == repo)
        lines = [
            f"{row.repo_id}",
            f"Parameters: {format_count(row.parameters) if row.parameters else 'unknown'}",
            f"Size: {format_bytes(row.size_bytes) if row.size_bytes else 'unknown'}",
            f"dtype: {row.dtype or 'unknown'}",
            f"Licence: {row.license or 'unknown'}",
            "Gated: accept the terms on the Hub first" if row.gated else "Open: no terms to accept",
            f"{row.downloads:,} downloads, {row.likes:,} likes, updated {row.last_modified}",
        ]
        self.details.setPlainText("\n".join(lines))
        if self.hub is not None:
            inspect = self.context.run(f"Inspect {repo}", self.hub.inspect(repo, self.recipe), quiet=True)
            inspect.succeeded.connect(
                lambda text: self.chosen_repo == repo and self.details.setPlainText("\n".join([*lines, "", text]))
            )
