"""GUI test fixtures: isolated settings, a demo built once per session, screenshots, garbage
collected in the GUI thread as in the app, and a guard that fails any test leaving a worker thread
running."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import QCoreApplication, QSettings
from PySide6.QtWidgets import QApplication, QMessageBox, QWidget

from app.core.demo import build_demo
from app.core.progress import run_job
from app.gui.garbage import collect_in_gui_thread
from app.gui.settings import AppSettings
from app.gui.theme import apply_theme
from app.gui.workers import running_jobs

SCREENSHOTS = Path(__file__).resolve().parents[1] / "screenshots"
THREAD_GRACE_S = 5.0


@pytest.fixture(scope="session", autouse=True)
def isolated_settings(tmp_path_factory: pytest.TempPathFactory) -> None:
    QCoreApplication.setOrganizationName("FrankenMoE-tests")
    QCoreApplication.setApplicationName("FrankenMoE Studio tests")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp_path_factory.mktemp("settings")))


@pytest.fixture(scope="package", autouse=True)
def garbage_collected_in_the_gui_thread(qapp: QApplication) -> Iterator[None]:
    """As the app does (app/gui/garbage.py): a worker thread collecting a cycle with a widget in it crashes."""
    collector = collect_in_gui_thread(qapp)
    yield
    collector.stop()


@pytest.fixture(autouse=True)
def no_thread_left_running(qapp: QApplication) -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE_S
    while time.monotonic() < deadline:
        QCoreApplication.processEvents()
        leftover_threads = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        if not running_jobs() and not leftover_threads:
            break
        time.sleep(0.02)
    jobs = [job.name for job in running_jobs()]
    threads = [t.name for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for job in running_jobs():
        job.cancel()
        job.wait()
    assert not jobs, f"the test left worker jobs running: {jobs}"
    assert not threads, f"the test left threads running: {threads}"


@pytest.fixture(scope="session")
def demo_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo, built once with fewer training steps than the app: tests need its shape, not its skill."""
    return run_job(build_demo(tmp_path_factory.mktemp("demo"), base_steps=60, expert_steps=30))


@pytest.fixture
def settings(tmp_path: Path) -> AppSettings:
    return AppSettings(cache_dir=tmp_path / "cache", device="cpu")


@pytest.fixture
def answer(monkeypatch: pytest.MonkeyPatch) -> dict[str, QMessageBox.StandardButton]:
    """Answers for the window's questions; tests set `answer["question"]`. Warnings are recorded."""
    answers: dict[str, object] = {"question": QMessageBox.StandardButton.Discard, "warnings": []}

    def question(*args: object, **kwargs: object) -> QMessageBox.StandardButton:
        answers.setdefault("asked", []).append(args[2] if len(args) > 2 else "")  # type: ignore[union-attr]
        return answers["question"]  # type: ignore[return-value]

    def warning(parent: object, title: str, text: str, *args: object) -> QMessageBox.StandardButton:
        answers["warnings"].append((title, text))  # type: ignore[union-attr]
        return QMessageBox.StandardButton.Ok

    monkeypatch.setattr(QMessageBox, "question", staticmethod(question))
    monkeypatch.setattr(QMessageBox, "warning", staticmethod(warning))
    return answers  # type: ignore[return-value]


@pytest.fixture
def window(qtbot, settings: AppSettings, answer: dict) -> Iterator[object]:
    from app.gui.main_window import MainWindow

    main = MainWindow(settings)
    qtbot.addWidget(main)
    main.resize(1180, 800)
    main.show()
    yield main
    main.document.undo_stack.setClean()
    main.close()


def screenshot(widget: QWidget, name: str) -> Path:
    """Save `widget` in light and dark themes as tests/screenshots/NAME-light.png and NAME-dark.png."""
    SCREENSHOTS.mkdir(exist_ok=True)
    application = QApplication.instance()
    assert isinstance(application, QApplication)
    for theme in ("light", "dark"):
        apply_theme(application, theme)
        QCoreApplication.processEvents()
        widget.grab().save(str(SCREENSHOTS / f"{name}-{theme}.png"))
    apply_theme(application, "light")
    return SCREENSHOTS / f"{name}-light.png"
