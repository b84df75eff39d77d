"""GUI garbage collection: how long a full collection holds the GIL with a model loaded, unfrozen and frozen.

The app collects in its GUI thread (app/gui/garbage.py), so a full collection is a GUI stall as
long as the collection. Once torch and transformers are loaded, the app freezes what is in memory
(GuiThreadGarbageCollector.freeze_long_lived, from app/gui/launch.py). Each way in its own process:
the main window opened offscreen, the engine's warm-up run (its imports of torch and
transformers), frozen or not, then a tiny Llama loaded with transformers as the Chat page loads a
model (which imports transformers' model code, 1,400 modules), and full collections (gc.collect())
timed.

Figures (2 virtual cores, torch 2.13, transformers 5.25; median of 5 collections):
  2026-12-03: unfrozen 513 ms and 452 ms over 413,270 objects, frozen 208 ms and 209 ms over 189,319
    (0.41x, 0.46x): what the model load imports stays unfrozen. Had the warm-up imported transformers'
    PreTrainedModel and GenerationMixin too, 14,439 objects would stay (2.3 ms), but the warm-up took
    6.7 s instead of 2.9 s and its peak RSS was 556 MB instead of 353 MB, in every session.

Run from the repository root: QT_QPA_PLATFORM=offscreen python bench/gui_garbage.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One way, in a fresh process: prints the warm-up's seconds, the median full collection in seconds
# with the model loaded, and the objects it goes through.
CHILD = """
import gc, statistics, sys, threading, time
from PySide6.QtWidgets import QApplication
from app.core.progress import run_job
from app.gui.engine import warm_up
from app.gui.garbage import collect_in_gui_thread
from app.gui.main_window import MainWindow
from app.gui.settings import AppSettings

way, model_folder, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
application = QApplication([])
collector = collect_in_gui_thread(application)
window = MainWindow(AppSettings(device="cpu"))
window.show()
application.processEvents()
started = time.perf_counter()
run_job(warm_up(threading.Event()))
warm_up_seconds = time.perf_counter() - started
if way == "frozen":
    collector.freeze_long_lived()
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(model_folder)
seconds = []
for _ in range(repeats):
    started = time.perf_counter()
    gc.collect()
    seconds.append(time.perf_counter() - started)
print(warm_up_seconds, statistics.median(seconds), len(gc.get_objects()))
window.document.undo_stack.setClean()
window.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "offscreen")}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        make = f"import pathlib, tests.models as m; m.make_tiny_model(pathlib.Path({str(folder)!r}))"
        subprocess.run([sys.executable, "-c", make], check=True, cwd=REPO, env=env, capture_output=True)
        results = {}
        for way in ("unfrozen", "frozen"):
            done = subprocess.run(
                [sys.executable, "-c", CHILD, way, str(folder), str(args.repeats)],
                check=True,
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
            )
            warm_up_seconds, seconds, objects = (float(value) for value in done.stdout.split())
            results[way] = {"warm_up_s": warm_up_seconds, "collection_s": seconds, "objects": int(objects)}
    for way, result in results.items():
        print(
            f"{way:8s}: full collection with a model loaded {result['collection_s'] * 1000:.0f} ms over "
            f"{result['objects']} objects (warm-up {result['warm_up_s']:.1f} s)"
        )
    ratio = results["frozen"]["collection_s"] / results["unfrozen"]["collection_s"]
    print(f"frozen / unfrozen: {ratio:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
