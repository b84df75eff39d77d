"""GUI garbage collection: how long a full collection holds the GIL once the engine is loaded, unfrozen and frozen.

The app collects in its GUI thread (app/gui/garbage.py), so a full collection is a GUI stall as
long as the collection. Once torch and transformers are loaded the app freezes what is in memory
(GuiThreadGarbageCollector.freeze_long_lived). This opens the main window offscreen, runs the
engine's warm-up (its imports of torch and transformers' model classes), then times full
collections (gc.collect(), the GIL held throughout) before and after the freeze, and after a model
has been loaded since, as the Chat page loads one.

Figures (2 virtual cores, torch 2.13, transformers 5.25; median of 5 collections):
  2026-12-03: 431 ms over 401,643 objects unfrozen; 0.0 ms frozen; 2.3 ms over 14,439 objects with a
    tiny Llama loaded since (0.005x). Before the warm-up imported PreTrainedModel and GenerationMixin,
    loading that model imported 1,435 modules after the freeze: 182 ms over 178,452 objects (0.80x)

Run from the repository root: QT_QPA_PLATFORM=offscreen python bench/gui_garbage.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def full_collections(repeats: int) -> tuple[float, int]:
    """The median seconds of a full collection, and the objects it goes through."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), len(gc.get_objects())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from PySide6.QtWidgets import QApplication

    from app.gui.garbage import collect_in_gui_thread
    from app.gui.main_window import MainWindow
    from app.gui.settings import AppSettings

    application = QApplication.instance() or QApplication([])
    collector = collect_in_gui_thread(application)
    window = MainWindow(AppSettings(device="cpu"))
    window.show()
    application.processEvents()
    from app.core.progress import run_job
    from app.gui.engine import warm_up

    run_job(warm_up(threading.Event()))  # the engine's imports, as the app makes them once its window is shown

    before, tracked_before = full_collections(args.repeats)
    collector.freeze_long_lived()
    after, tracked_after = full_collections(args.repeats)
    print(
        f"full collection: {before * 1000:.0f} ms over {tracked_before} objects -> {after * 1000:.1f} ms over "
        f"{tracked_after} objects after freezing ({after / before:.3f}x)"
    )
    # What later work adds is collected as before: a model loaded after the freeze, as the Chat page loads one.
    with tempfile.TemporaryDirectory() as scratch:
        from transformers import AutoModelForCausalLM

        # Made in another process: making it here would import what the app never does.
        folder = Path(scratch) / "model"
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"from tests.models import make_tiny_model; make_tiny_model({str(folder)!r}, 'llama', 0)",
            ],
            check=True,
            cwd=REPO,
            capture_output=True,
        )
        model = AutoModelForCausalLM.from_pretrained(folder)
        loaded, tracked_loaded = full_collections(args.repeats)
        del model
    print(
        f"  with a model loaded afterwards: {loaded * 1000:.1f} ms over {tracked_loaded} objects "
        f"({loaded / before:.3f}x the unfrozen collection)"
    )
    window.document.undo_stack.setClean()
    window.close()


if __name__ == "__main__":
    main()
