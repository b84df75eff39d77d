"""`frankenmoe --demo` opens the window with the demo recipe; plain `frankenmoe` opens it empty.

The app's own process freezes its long-lived objects once the engine is loaded; a test's does not.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
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
        assert "transformers" in sys.modules
        assert gc.get_freeze_count() == 0  # the engine is loaded, and this process's objects are still collected
        assert windows["plain"].document.path is None
        assert windows["demo"].settings.cache_dir == cache
    finally:
        for window in windows.values():
            window.document.undo_stack.setClean()
            window.close()


REPO = Path(__file__).resolve().parents[2]
# The app as `frankenmoe` starts it, in its own process (holding a model's worth of tensor first when
# told to): once its engine has loaded, print how many objects are frozen, how many of torch's and
# transformers' namespaces are loaded and how many of those later collections still go through; quit.
LAUNCH_UNTIL_ENGINE_LOADED = """
import gc, sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
from app.gui.launch import launch
from app.gui.workers import running_jobs

if sys.argv[1] == "model":
    import torch
    weight = torch.zeros(1024, 1024)

application = QApplication(sys.argv[:1])
polls_since_loaded = []

def report_once_loaded():
    if "transformers" in sys.modules and not running_jobs():
        polls_since_loaded.append(1)
    if len(polls_since_loaded) == 2:  # one poll more: the warm-up's last signals have been delivered
        engine = [vars(sys.modules[name]) for name in ("torch", "transformers")]
        collected = [namespace for namespace in engine if any(seen is namespace for seen in gc.get_objects())]
        print(gc.get_freeze_count(), len(engine), len(collected))
        application.quit()

timer = QTimer()
timer.timeout.connect(report_once_loaded)
timer.start(50)
sys.exit(launch([]))
"""


def launched_until_engine_loaded(tmp_path: Path, holding: str) -> tuple[int, int, int]:
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_STATE_HOME": str(tmp_path / "state"),
        "QT_QPA_PLATFORM": "offscreen",
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", LAUNCH_UNTIL_ENGINE_LOADED, holding],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert str(Path("app", "gui", "garbage.py")) not in done.stderr  # no warning from looking for a model
    frozen, loaded, still_collected = (int(count) for count in done.stdout.split())
    return frozen, loaded, still_collected


def test_the_app_leaves_what_it_has_loaded_out_of_later_collections(tmp_path: Path) -> None:
    # torch's and transformers' objects live as long as the app; a full collection in the GUI thread
    # went through them all each time, holding the GIL (bench/gui_garbage.py).
    frozen, loaded, still_collected = launched_until_engine_loaded(tmp_path, "nothing")
    assert loaded == 2 and still_collected == 0  # torch's and transformers' namespaces were frozen with the rest
    assert frozen > 10_000


def test_a_model_in_memory_when_the_engine_has_loaded_keeps_everything_collected(tmp_path: Path) -> None:
    # Frozen, a model that is dropped later would keep its memory wherever a reference cycle runs through it.
    frozen, loaded, still_collected = launched_until_engine_loaded(tmp_path, "model")
    assert (frozen, loaded, still_collected) == (0, 2, 2)
