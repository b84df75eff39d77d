"""The main window: the recipe as a document, the seven steps, the log, and orderly shutdown."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QStackedWidget,
    QWidget,
)

from app.core.demo import DEMO_DURATION, build_demo
from app.core.merge.leftovers import Cleanup, clean_leftovers_job
from app.core.problems import ProblemsError
from app.core.progress import Progress
from app.gui.context import AppContext, describe_error
from app.gui.document import RecipeDocument
from app.gui.hub_search import HubSearchDialog, Purpose
from app.gui.log_panel import LogPanel
from app.gui.pages.chat import ChatPage
from app.gui.pages.evaluate import EvaluatePage
from app.gui.pages.merge import MergePage
from app.gui.pages.models import ModelsPage
from app.gui.pages.preview import PreviewPage
from app.gui.pages.prompts import PromptsPage
from app.gui.pages.start import StartPage
from app.gui.pages.train import TrainPage
from app.gui.settings import AppSettings
from app.gui.settings_dialog import SettingsDialog
from app.gui.theme import apply_theme
from app.gui.workers import JobHandle

STEPS = ("1  Models", "2  Prompts", "3  Preview", "4  Merge", "5  Train routers", "6  Evaluate", "7  Chat")
RECIPE_FILTER = "mergekit-moe recipes (*.yml *.yaml);;All files (*)"
STATUS_NOTICE_MS = 15_000
PROGRESS_STEPS = 1000  # the status bar's progress range, when a job reports its share done


class Step(int, Enum):
    MODELS = 0
    PROMPTS = 1
    PREVIEW = 2
    MERGE = 3
    TRAIN = 4
    EVALUATE = 5
    CHAT = 6


# Steps that need no recipe: any model folder, straight from the start screen.
MODEL_STEPS = (Step.TRAIN, Step.EVALUATE, Step.CHAT)


class MainWindow(QMainWindow):
    def __init__(self, settings: AppSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or AppSettings.load()
        self.context = AppContext(self.settings, self)
        self.document = RecipeDocument(self)
        self.hub_dialog: HubSearchDialog | None = None

        self.start_page = StartPage()
        self.models_page = ModelsPage(self.document, self.context)
        self.prompts_page = PromptsPage(self.document)
        self.preview_page = PreviewPage(self.document, self.context)
        self.merge_page = MergePage(self.document, self.context)
        self.train_page = TrainPage(self.context)
        self.evaluate_page = EvaluatePage(self.context)
        self.chat_page = ChatPage(self.context)
        self.pages = QStackedWidget()
        pages = (
            self.models_page,
            self.prompts_page,
            self.preview_page,
            self.merge_page,
            self.train_page,
            self.evaluate_page,
            self.chat_page,
        )
        for page in pages:
            self.pages.addWidget(page)
        self.steps = QListWidget()
        self.steps.addItems(STEPS)
        self.steps.setIconSize(QSize(0, 0))
        font = self.steps.font()
        font.setPointSizeF(font.pointSizeF() * 1.1)
        self.steps.setFont(font)
        self.steps.setSpacing(4)
        # A fixed width from the step names: a page that asks for more room can never crush the sidebar.
        self.steps.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.steps.setFixedWidth(
            self.steps.sizeHintForColumn(0) + 2 * (self.steps.frameWidth() + self.steps.spacing()) + 24
        )
        self.steps.currentRowChanged.connect(self.pages.setCurrentIndex)
        self.workspace = QWidget()
        workspace_layout = QHBoxLayout(self.workspace)
        workspace_layout.addWidget(self.steps)
        workspace_layout.addWidget(self.pages, 1)
        self.central = QStackedWidget()
        self.central.addWidget(self.start_page)
        self.central.addWidget(self.workspace)
        self.setCentralWidget(self.central)

        self.log_panel = LogPanel(self)
        self.addDockWidget(Qt.DockWidgetArea.BottomDockWidgetArea, self.log_panel)
        self.context.logged.connect(self.log_panel.append)
        self.jobs_label = QLabel("")
        self.demo_job: JobHandle | None = None
        self.job_progress = QProgressBar()
        self.job_progress.setMaximumWidth(160)
        self.job_progress.setRange(0, 0)
        self.job_progress.setVisible(False)
        self.statusBar().addPermanentWidget(self.jobs_label)
        self.statusBar().addPermanentWidget(self.job_progress)
        self.context.jobs_changed.connect(self._jobs_changed)

        self._make_actions()
        self.start_page.new_requested.connect(self.new_recipe)
        self.start_page.open_requested.connect(self.open_recipe_dialog)
        self.start_page.demo_requested.connect(self.try_demo)
        self.start_page.chat_requested.connect(self.chat_without_recipe)
        self.start_page.evaluate_requested.connect(self.evaluate_without_recipe)
        self.start_page.recent_requested.connect(self.open_recent)
        self.start_page.set_recent_files(self.settings.recent_files)
        self.models_page.add_from_hub_requested.connect(lambda: self.search_hub(Purpose.EXPERT))
        self.models_page.base_from_hub_requested.connect(lambda: self.search_hub(Purpose.BASE))
        self.models_page.adapter_from_hub_requested.connect(lambda: self.search_hub(Purpose.ADAPTER))
        self.preview_page.computed.connect(self.merge_page.use_preview)
        self.models_page.checked.connect(self.merge_page.use_check)
        self.merge_page.open_in_chat.connect(self.open_in_chat)
        self.merge_page.open_in_evaluate.connect(self.open_in_evaluate)
        self.merge_page.open_in_training.connect(self.open_in_training)
        self.train_page.open_in_evaluate.connect(self.open_in_evaluate)
        self.train_page.open_in_chat.connect(self.open_in_chat)
        self.chat_page.evaluate_requested.connect(self.open_in_evaluate)
        self.document.undo_stack.cleanChanged.connect(self._update_title)
        self.document.path_changed.connect(lambda _path: self._update_title())
        self.document.opened.connect(self._document_opened)

        self.resize(1180, 800)
        self.resizeDocks([self.log_panel], [self.log_panel.sizeHint().height()], Qt.Orientation.Vertical)
        self._update_title()
        self._update_actions()
        self.context.status.connect(lambda message: self.statusBar().showMessage(message, STATUS_NOTICE_MS))
        # Killed merges leave hidden work folders in their output folders: clean those of past runs, off the GUI thread.
        self.cleanup_job = self.context.run("Cleanup", lambda _cancel: clean_leftovers_job(), quiet=True)
        self.cleanup_job.succeeded.connect(self._cleaned_up)

    # ------------------------------------------------------------------ actions

    def _action(self, text: str, slot: object, shortcut: QKeySequence | str | None = None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(slot)
        return action

    def _make_actions(self) -> None:
        keys = QKeySequence.StandardKey
        self.new_action = self._action("&New recipe", self.new_recipe, keys.New)
        self.open_action = self._action("&Open recipe…", self.open_recipe_dialog, keys.Open)
        self.save_action = self._action("&Save", self.save, keys.Save)
        self.save_as_action = self._action("Save &As…", self.save_as, keys.SaveAs)
        self.settings_action = self._action("Se&ttings…", self.show_settings, keys.Preferences)
        self.quit_action = self._action("&Quit", self.close, keys.Quit)
        self.undo_action = self.document.undo_stack.createUndoAction(self, "&Undo")
        self.undo_action.setShortcut(keys.Undo)
        self.redo_action = self.document.undo_stack.createRedoAction(self, "&Redo")
        self.redo_action.setShortcuts([QKeySequence(keys.Redo), QKeySequence("Ctrl+Y")])
        self.demo_action = self._action("Try the &demo", self.try_demo)
        self.step_actions = [
            self._action(name.split("  ")[1], lambda _checked=False, i=i: self.show_step(Step(i)), f"Ctrl+{i + 1}")
            for i, name in enumerate(STEPS)
        ]

        file_menu = self.menuBar().addMenu("&File")
        file_menu.addActions([self.new_action, self.open_action])
        self.recent_menu = file_menu.addMenu("Open &Recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        file_menu.addActions([self.save_action, self.save_as_action])
        file_menu.addSeparator()
        file_menu.addAction(self.settings_action)
        file_menu.addSeparator()
        file_menu.addAction(self.quit_action)
        edit_menu = self.menuBar().addMenu("&Edit")
        edit_menu.addActions([self.undo_action, self.redo_action])
        view_menu = self.menuBar().addMenu("&View")
        view_menu.addActions(self.step_actions)
        view_menu.addSeparator()
        view_menu.addAction(self.log_panel.toggleViewAction())
        help_menu = self.menuBar().addMenu("&Help")
        help_menu.addAction(self.demo_action)

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        for path in self.settings.recent_files:
            self.recent_menu.addAction(str(path), lambda p=path: self.open_recent(p))
        self.recent_menu.setEnabled(bool(self.settings.recent_files))

    def _update_actions(self) -> None:
        is_open = self.document.is_open
        # Train routers, Evaluate and Chat need no recipe: any model folder, straight from the start screen.
        recipe_steps = [step for step in Step if step not in MODEL_STEPS]
        for action in (self.save_action, self.save_as_action, *(self.step_actions[step] for step in recipe_steps)):
            action.setEnabled(is_open)
        for step in recipe_steps:
            item = self.steps.item(step)
            flags = item.flags()
            enabled = Qt.ItemFlag.ItemIsEnabled
            item.setFlags(flags | enabled if is_open else flags & ~enabled)
            item.setToolTip("" if is_open else "Start a new recipe or open one first (File menu).")

    def _update_title(self) -> None:
        if not self.document.is_open:
            self.setWindowTitle("FrankenMoE Studio")
            return
        self.setWindowModified(self.document.is_modified)
        self.setWindowTitle(f"{self.document.display_name}[*] — FrankenMoE Studio")

    def _jobs_changed(self) -> None:
        running = self.context.running
        self.job_progress.setVisible(bool(running))
        if self.demo_job is None or not self.demo_job.is_running:
            self.job_progress.setRange(0, 0)  # other jobs report no share done: busy, not a percentage
        self.jobs_label.setText(", ".join(handle.name for handle in running))

    def show_step(self, step: Step) -> None:
        if step in MODEL_STEPS or self.document.is_open:
            self.central.setCurrentWidget(self.workspace)
            self.steps.setCurrentRow(int(step))

    # ------------------------------------------------------------------ document

    def _document_opened(self) -> None:
        self.central.setCurrentWidget(self.workspace)
        self.show_step(Step.MODELS)
        self._update_actions()
        self._update_title()

    def confirm_discard(self) -> bool:
        """True when there is nothing unsaved, or the user saved or chose to discard it."""
        if not self.document.is_open or not self.document.is_modified:
            return True
        answer = QMessageBox.question(
            self,
            "Unsaved changes",
            f"Save the changes to {self.document.display_name} first?",
            QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Save,
        )
        if answer == QMessageBox.StandardButton.Save:
            return self.save()
        return answer == QMessageBox.StandardButton.Discard

    def new_recipe(self) -> None:
        if self.confirm_discard():
            self.document.new()
            self.statusBar().showMessage("New recipe: add a base model and experts.", 5000)

    def open_recipe_dialog(self) -> None:
        if not self.confirm_discard():
            return
        name, _filter = QFileDialog.getOpenFileName(self, "Open a recipe", "", RECIPE_FILTER)
        if name:
            self.open_recipe(Path(name), confirmed=True)

    def open_recipe(self, path: Path, confirmed: bool = False) -> bool:
        if not confirmed and not self.confirm_discard():
            return False
        try:
            self.document.open(Path(path))
        except ProblemsError as error:
            self.report_problems(f"{Path(path).name} is not a valid recipe", error)
            return False
        self.settings.remember(Path(path))
        self.start_page.set_recent_files(self.settings.recent_files)
        self.context.log(f"opened {path}")
        self.statusBar().showMessage(f"Opened {path}", 5000)
        return True

    def open_recent(self, path: Path) -> bool:
        """Open a recent recipe; one that no longer exists leaves the list, with a word why."""
        if not Path(path).exists():
            self.settings.forget(Path(path))
            self.start_page.set_recent_files(self.settings.recent_files)
            self.statusBar().showMessage(f"{path} no longer exists: it is removed from the recent recipes.", 8000)
            return False
        return self.open_recipe(path)

    def report_problems(self, title: str, error: ProblemsError) -> None:
        lines = []
        for problem in error.problems:
            where = f"line {problem.line}: " if problem.line is not None else ""
            lines.append(f"{where}{problem.text}")
        self.context.log(f"{title}: " + "; ".join(lines))
        QMessageBox.warning(self, title, "\n\n".join(lines))

    def save(self) -> bool:
        if self.document.path is None:
            return self.save_as()
        return self._save_to(self.document.path)

    def save_as(self) -> bool:
        name, _filter = QFileDialog.getSaveFileName(self, "Save the recipe", self.document.display_name, RECIPE_FILTER)
        return bool(name) and self._save_to(Path(name))

    def _save_to(self, path: Path) -> bool:
        try:
            self.document.save(path)
        except OSError as error:
            QMessageBox.warning(self, "Cannot save", f"{path} could not be written: {error.strerror or error}")
            return False
        self.settings.remember(path)
        self.statusBar().showMessage(f"Saved {path}", 5000)
        return True

    # ------------------------------------------------------------------ demo, Hub, settings, chat

    def try_demo(self) -> None:
        if not self.confirm_discard():
            return
        self.statusBar().showMessage(f"Building the demo models ({DEMO_DURATION} the first time)…")
        self.start_page.demo_button.setEnabled(False)
        self.demo_job = self.context.run("Demo", lambda cancel: build_demo(self.settings.demo_dir, cancel))
        self.demo_job.progress.connect(self._demo_progress)
        self.demo_job.succeeded.connect(self._demo_built)
        self.demo_job.failed.connect(lambda error: QMessageBox.warning(self, "The demo failed", describe_error(error)))
        self.demo_job.finished.connect(lambda: self.start_page.demo_button.setEnabled(True))

    def _demo_progress(self, record: Progress) -> None:
        self.statusBar().showMessage(f"Demo: {record.message} ({record.fraction:.0%})")
        # The status bar's progress shows the demo's share done, while the demo runs.
        self.job_progress.setRange(0, PROGRESS_STEPS)
        self.job_progress.setValue(round(record.fraction * PROGRESS_STEPS))

    def _demo_built(self, recipe_path: Path) -> None:
        if self.open_recipe(recipe_path, confirmed=True):
            self.merge_page.out_dir.setText(str(self.settings.demo_dir / "merged-demo-moe"))
            self.merge_page.overwrite.setChecked(True)
            self.show_step(Step.PREVIEW)
            self.statusBar().showMessage("Demo ready: the preview computes by itself; then merge.", 8000)

    def search_hub(self, purpose: Purpose = Purpose.EXPERT) -> None:
        self.hub_dialog = HubSearchDialog(self.document.recipe, self.context, purpose, self)
        self.hub_dialog.finished.connect(self._hub_dialog_finished)
        self.hub_dialog.open()

    def _hub_dialog_finished(self, result: int) -> None:
        dialog = self.hub_dialog
        assert dialog is not None
        self.hub_dialog = None
        repo = dialog.chosen_repo
        if result and repo:
            summary = dialog.chosen_summary
            if dialog.chosen_purpose is Purpose.BASE:
                self.models_page.set_base(repo)
            elif dialog.chosen_purpose is Purpose.ADAPTER:
                self.models_page.adapter_panel.set_adapter(self.models_page.table.currentRow(), repo)
            elif summary is not None and summary.is_adapter:
                self.models_page.adapter_panel.add_adapter_expert(repo, summary.base_model)
            else:
                self.models_page.add_expert(repo, repo.rsplit("/", 1)[-1])
        dialog.deleteLater()

    def show_settings(self) -> None:
        dialog = SettingsDialog(self.settings, self.context, self)
        if dialog.exec():
            dialog.apply()
            application = QApplication.instance()
            if isinstance(application, QApplication):
                apply_theme(application, self.settings.theme)

    def chat_without_recipe(self) -> None:
        self.show_step(Step.CHAT)
        self.chat_page.model_box.model_path.setFocus()

    def evaluate_without_recipe(self) -> None:
        self.show_step(Step.EVALUATE)
        self.evaluate_page.model_path.setFocus()

    def open_in_evaluate(self, folder: Path | str) -> None:
        self.evaluate_page.set_model(Path(folder))
        self.show_step(Step.EVALUATE)

    def open_in_training(self, folder: Path) -> None:
        self.train_page.set_model(Path(folder))
        self.show_step(Step.TRAIN)

    def open_in_chat(self, folder: Path) -> None:
        self.chat_page.set_model(folder)
        self.show_step(Step.CHAT)

    def _cleaned_up(self, cleanup: object) -> None:
        assert isinstance(cleanup, Cleanup)
        if cleanup.anything:
            message = f"Cleaned up after stopped merges: {cleanup.describe()}."
            self.context.log(message)
            self.context.status.emit(message)

    # ------------------------------------------------------------------ shutdown

    def closeEvent(self, event: QCloseEvent) -> None:
        if not self.confirm_discard():
            event.ignore()
            return
        # The start-up cleanup is no work of the user's to ask about; shutdown waits for it.
        running = [handle.name for handle in self.context.running if handle is not self.cleanup_job]
        kept = ""
        if self.chat_page.is_answering:
            running.append("the chat's answer")
            kept = " The chat's conversation is kept and comes back with its model."
        if running:
            answer = QMessageBox.question(
                self,
                "Work is running",
                f"Stop {', '.join(running)} and quit? Anything half-written is removed.{kept}",
                QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                QMessageBox.StandardButton.No,
            )
            if answer != QMessageBox.StandardButton.Yes:
                event.ignore()
                return
            self.statusBar().showMessage("Stopping running work…")
        # Cancel first, then join: each job stops at its next step, so this is quick.
        self.models_page.shutdown()
        self.context.shutdown()
        self.preview_page.shutdown()
        self.train_page.shutdown()
        self.evaluate_page.shutdown()
        self.chat_page.shutdown()
        event.accept()
