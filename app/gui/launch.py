"""Start the app: the window first, torch and transformers in the background afterwards."""

from __future__ import annotations

import sys

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication

from app.gui.engine import warm_up
from app.gui.main_window import MainWindow
from app.gui.settings import AppSettings
from app.gui.theme import apply_theme, follow_system_theme

ORGANIZATION = "FrankenMoE"
APPLICATION = "FrankenMoE Studio"


def create_window(args: list[str]) -> MainWindow:
    application = QApplication.instance()
    if not isinstance(application, QApplication):
        application = QApplication(sys.argv[:1])
    application.setOrganizationName(ORGANIZATION)
    application.setApplicationName(APPLICATION)
    settings = AppSettings.load()
    apply_theme(application, settings.theme)
    if settings.theme == "system":
        follow_system_theme(application)
    window = MainWindow(settings)
    window.show()
    QTimer.singleShot(0, lambda: window.context.run("Load engine", warm_up, quiet=True))
    if "--demo" in args:
        QTimer.singleShot(0, window.try_demo)
    return window


def launch(args: list[str]) -> int:
    window = create_window(args)
    application = QApplication.instance()
    assert application is not None
    code = application.exec()
    del window
    return code
