"""The Train routers page's cost: training speed through the page against the core run directly, and the
longest GUI-thread stall (a 5 ms timer heartbeat) while the page trains, draws its live charts and then
compares the old and the new routers.

Merges a tiny Llama MoE (3 experts, top-2) from generated donors, warms torch up with one untimed run,
then alternates runs of the same training (same settings, data and seed) driven directly by ``run_job``
and through the page, so that load from other processes hits both alike. The speed is the trainer's own
tokens/s of its training loop (its last "train" record). Targets: through the page at least 0.95x the
direct speed; no stall over 50 ms on an otherwise idle machine (the load average is printed: on an
oversubscribed one both figures are noise).

Run from the repository root:
    QT_QPA_PLATFORM=offscreen PYTHONPATH=. python bench/router_training_gui.py [--steps 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HEARTBEAT_MS = 5
RECIPE = """
base_model: {base}
gate_mode: hidden
dtype: float32
experts_per_token: 2
experts:
  - source_model: {expert0}
    positive_prompts: ["What is 12 plus 30?"]
  - source_model: {expert1}
    positive_prompts: ["def add(a, b): return a + b"]
  - source_model: {expert2}
    positive_prompts: ["The old lighthouse keeper watched the storm."]
frankenmoe:
  experts:
    - {{label: maths, test_prompts: ["What is 9 times 9?"]}}
    - {{label: code, test_prompts: ["def square(x): return x * x"]}}
    - {{label: stories, test_prompts: ["The keeper climbed the tower at dawn."]}}
"""


def build_merged_model(root: Path) -> Path:
    """Donors and their merge, in a process of their own: building the donors changes this process's torch
    threading state (the demo trainer's one-thread context), which would slow the direct runs that follow."""
    subprocess.run([sys.executable, __file__, "--build", str(root)], check=True, capture_output=True)
    return root / "merged"


def merged_model(root: Path) -> Path:
    from app.core.merge.pipeline import MergeOptions, merge_moe
    from app.core.progress import run_job
    from app.core.recipe import parse_recipe
    from tests.models import CORPUS, make_tiny_model

    donors = {"base": make_tiny_model(root / "base", "llama", seed=0)}
    for index in range(3):
        donors[f"expert{index}"] = make_tiny_model(root / f"expert{index}", "llama", seed=index + 1)
    out = root / "merged"
    run_job(merge_moe(parse_recipe(RECIPE.format(**donors)), MergeOptions(out_dir=out)))
    (root / "train.txt").write_text("\n\n".join(CORPUS * 40), encoding="utf-8")
    return out


def last_speed(history: tuple) -> float:
    return next(r.tokens_per_s for r in reversed(history) if r.stage == "train" and r.tokens_per_s)


def direct_run(model: Path, out: Path, data: Path, steps: int) -> float:
    """The core run by ``run_job`` in a plain thread: like with like, since the page trains in a worker
    thread, and on a loaded machine the same run in the main thread measured several times slower."""
    from app.core.progress import run_job
    from app.core.training.settings import RouterTrainingSettings, TrainingData
    from app.core.training.trainer import train_routers

    settings = RouterTrainingSettings(steps=steps, seq_len=64, batch_size=4, eval_every=10, device="cpu")
    speeds: list[float] = []

    def train() -> None:
        result = run_job(train_routers(model, out, settings, TrainingData(files=(data,))))
        speeds.append(last_speed(result.history))

    worker = threading.Thread(target=train, name="direct router training")
    worker.start()
    worker.join()
    if not speeds:
        raise SystemExit("the direct run failed")
    return speeds[0]


def page_run(page: object, out: Path, steps: int) -> tuple[float, float]:
    """Tokens/s through the page, and the longest gap between heartbeats while it trained and compared."""
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    page.out_dir.setText(str(out))  # type: ignore[attr-defined]
    form = page.form  # type: ignore[attr-defined]
    form.budget_kind.setCurrentText("Steps")
    form.budget.setValue(steps)
    form.seq_len.setValue(64)
    form.batch_size.setValue(4)
    form.eval_every.setValue(10)
    form.device.setCurrentText("cpu")
    beats: list[float] = []
    timer = QTimer()
    timer.setInterval(HEARTBEAT_MS)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    timer.start()
    page.start_button.click()  # type: ignore[attr-defined]
    while page.is_running or page.job.is_running:  # type: ignore[attr-defined]
        QApplication.processEvents()
        time.sleep(0.001)
    timer.stop()
    QApplication.processEvents()
    result = page.result  # type: ignore[attr-defined]
    if result is None:
        raise SystemExit(f"the page's run failed: {page.message.text()}")  # type: ignore[attr-defined]
    return last_speed(result.history), max((b - a for a, b in itertools.pairwise(beats)), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # the subprocess that builds the model
    args = parser.parse_args()
    if args.build is not None:
        merged_model(args.build)
        return

    from PySide6.QtWidgets import QApplication

    from app.gui.context import AppContext
    from app.gui.pages.train import TrainPage
    from app.gui.settings import AppSettings

    application = QApplication.instance() or QApplication([])
    root = Path(tempfile.mkdtemp(prefix="router-gui-bench-"))
    model = build_merged_model(root)
    data = root / "train.txt"
    page = TrainPage(AppContext(AppSettings(cache_dir=root / "cache", device="cpu")))
    page.resize(1180, 760)
    page.show()
    page.set_model(model)
    page.form.recipe_prompts.setChecked(False)
    page.form.data_files.add([data])
    # The first run in a process is several times slower than the next (torch's first-call costs): untimed.
    direct_run(model, root / "warm-up", data, args.steps)
    direct, through_page, stalls = [], [], []
    for repeat in range(args.repeats):
        direct.append(direct_run(model, root / f"direct-{repeat}", data, args.steps))
        speed, stall = page_run(page, root / f"page-{repeat}", args.steps)
        through_page.append(speed)
        stalls.append(stall)
        print(f"run {repeat + 1}: direct {direct[-1]:,.0f} tokens/s · page {speed:,.0f} tokens/s · "
              f"longest stall {stall * 1000:.0f} ms")
    ratio = statistics.median(through_page) / statistics.median(direct)
    print(f"median: direct {statistics.median(direct):,.0f} tokens/s, through the page "
          f"{statistics.median(through_page):,.0f} tokens/s (ratio {ratio:.2f}, target >= 0.95); "
          f"longest GUI stall {max(stalls) * 1000:.0f} ms (target <= 50)")
    if hasattr(os, "getloadavg"):  # a loaded machine starves any GUI thread: say how loaded this one was
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    page.shutdown()
    page.context.shutdown()
    application.processEvents()


if __name__ == "__main__":
    main()
