"""`frankenmoe --demo` opens the window with the demo recipe; plain `frankenmoe` opens it empty."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QCoreApplication

from app.gui import launch
from app.gui.launch import create_window
from app.gui.settings import AppSettings
from app.gui.workers import running_jobs

TIMEOUT_MS = 60_000


def test_the_demo_flag_opens_the_demo(qtbot, answer, monkeypatch, demo_recipe: Path, tmp_path: Path) -> None:
    # The app names its settings store; keep the tests' isolated one (tests/gui/conftest.py).
    monkeypatch.setattr(launch, "ORGANIZATION", QCoreApplication.organizationName())
    monkeypatch.setattr(launch, "APPLICATION", QCoreApplication.applicationName())
    cache = tmp_path / "cache"
    cache.mkdir()
    # The app's demo folder is the session's demo, already built: the app finds it and opens it.
    (cache / "demo").symlink_to(demo_recipe.parents[1], target_is_directory=True)
    AppSettings(cache_dir=cache, device="cpu", theme="light").save()
    windows = {"plain": create_window([]), "demo": create_window(["--demo"])}
    for window in windows.values():
        qtbot.addWidget(window)
    try:
        qtbot.waitUntil(lambda: windows["demo"].document.path is not None, timeout=TIMEOUT_MS)
        assert windows["demo"].document.path.resolve() == demo_recipe.resolve()
        qtbot.waitUntil(lambda: not running_jobs(), timeout=TIMEOUT_MS)
        assert windows["plain"].document.path is None
        assert windows["demo"].settings.cache_dir == cache
    finally:
        for window in windows.values():
            window.document.undo_stack.setClean()
            window.close()
