"""Start the app: the window first, torch and transformers in the background afterwards."""

from __future__ import annotations

import sys

from PySide6.QtCore import QTimer
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from app.gui.engine import warm_up
from app.gui.garbage import GuiThreadGarbageCollector, collect_in_gui_thread
from app.gui.main_window import MainWindow
from app.gui.settings import AppSettings
from app.gui.theme import apply_theme, follow_system_theme
from app.resources import icon_paths

ORGANIZATION = "FrankenMoE"
APPLICATION = "FrankenMoE Studio"
# The installed desktop entry's name without .desktop: Wayland compositors find the icon through it.
DESKTOP_FILE = "frankenmoe-studio"


def app_icon() -> QIcon:
    """The app icon from its PNG renderings (no SVG plugin needed); null if resources/ is missing."""
    icon = QIcon()
    for path in icon_paths():
        icon.addFile(str(path))
    return icon


def create_window(args: list[str], freeze_engine: bool = False) -> MainWindow:
    """The main window, shown, with torch and transformers loading in the background.

    With freeze_engine, what is in memory once they are loaded is left out of later garbage
    collections (GuiThreadGarbageCollector.freeze_long_lived): for the app's own process only, not
    a test's, where the objects that earlier tests left would then never be collected.
    """
    application = QApplication.instance()
    if not isinstance(application, QApplication):
        application = QApplication(sys.argv[:1])
    application.setOrganizationName(ORGANIZATION)
    application.setApplicationName(APPLICATION)
    application.setDesktopFileName(DESKTOP_FILE)
    application.setWindowIcon(app_icon())
    collector = collect_in_gui_thread(application)
    settings = AppSettings.load()
    apply_theme(application, settings.theme)
    if settings.theme == "system":
        follow_system_theme(application)
    window = MainWindow(settings)
    window.show()
    QTimer.singleShot(0, lambda: _load_engine(window, collector if freeze_engine else None))
    if "--demo" in args:
        QTimer.singleShot(0, window.try_demo)
    return window


def _load_engine(window: MainWindow, freezer: GuiThreadGarbageCollector | None) -> None:
    handle = window.context.run("Load engine", warm_up, quiet=True)
    if freezer is not None:
        handle.succeeded.connect(lambda _result: freezer.freeze_long_lived())


def launch(args: list[str]) -> int:
    window = create_window(args, freeze_engine=True)
    application = QApplication.instance()
    assert application is not None
    code = application.exec()
    del window
    return code
