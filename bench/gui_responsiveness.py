"""GUI responsiveness: time from launch to the window shown, and the longest GUI-thread stall
(a 5 ms timer heartbeat) while gates are computed and while a merge runs, on the demo models.

Run: QT_QPA_PLATFORM=offscreen PYTHONPATH=. python bench/gui_responsiveness.py
Targets: window shown within 1 s; no stall over 50 ms.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEARTBEAT_MS = 5

SHOW_WINDOW = """
import time
from PySide6.QtWidgets import QApplication
from app.gui.launch import create_window
window = create_window([])
while not window.isVisible() or not window.windowHandle().isExposed():
    QApplication.processEvents()
QApplication.processEvents()
print(time.time())
window.context.shutdown()
"""


def time_to_window() -> float:
    started = time.time()
    output = subprocess.run(
        [sys.executable, "-c", SHOW_WINDOW], capture_output=True, text=True, check=True, env=os.environ
    ).stdout
    return float(output.strip().splitlines()[-1]) - started


def longest_stall(window: object, start: object, done: object) -> float:
    """Run `start()`, beat a timer until `done()` is true, return the longest gap between beats."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    beats: list[float] = []
    timer = QTimer()
    timer.setInterval(HEARTBEAT_MS)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    timer.start()
    start()  # type: ignore[operator]
    while not done():  # type: ignore[operator]
        QApplication.processEvents()
        time.sleep(0.001)
    timer.stop()
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    return max(gaps, default=0.0)


def main() -> None:
    from PySide6.QtWidgets import QApplication

    from app.core.demo import build_demo
    from app.core.progress import run_job
    from app.gui.main_window import MainWindow
    from app.gui.settings import AppSettings

    shown = min(time_to_window() for _ in range(3))
    print(f"launch to window shown: {shown * 1000:.0f} ms (target 1000 ms)")

    application = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch)
        recipe = run_job(build_demo(cache))
        window = MainWindow(AppSettings(cache_dir=cache, device="cpu"))
        window.show()
        window.open_recipe(recipe)
        page = window.preview_page
        for label in ("cold (loads torch and the base model)", "warm (model kept loaded)"):
            page.result = None
            stall = longest_stall(window, page.compute, lambda: page.result is not None)
            print(f"gate computation, {label}: longest GUI stall {stall * 1000:.0f} ms (target 50 ms)")
        merge = window.merge_page
        merge.out_dir.setText(str(cache / "merged"))
        merge.overwrite.setChecked(True)
        merge.preview = None  # make the merge compute its own gates too
        stall = longest_stall(window, merge.start_merge, lambda: merge.merged_folder is not None)
        print(f"merge: longest GUI stall {stall * 1000:.0f} ms (target 50 ms)")
        window.document.undo_stack.setClean()
        window.close()
    del application


if __name__ == "__main__":
    main()
