"""The generic job worker: progress, result, error and cancel arrive in the GUI thread."""

from __future__ import annotations

import threading

import pytest
from PySide6.QtCore import QThread

from app.core.problems import FrankenMoEError
from app.core.progress import Progress, check_cancel
from app.gui.workers import JobHandle, running_jobs, stop_all


def counting_job(steps: int, release: threading.Event | None = None):
    """Counts to steps; with release, the second step waits for the test to release it."""

    def job(cancel: threading.Event):
        for step in range(steps):
            if release is not None and step == 1:
                release.wait(60)  # a guard against a hung test, never reached when the test passes
            check_cancel(cancel)
            yield Progress("counting", step + 1, steps)
        return steps * 10

    return job


def outcomes(handle: JobHandle) -> list[str]:
    seen: list[str] = []
    handle.succeeded.connect(lambda _result: seen.append("succeeded"))
    handle.failed.connect(lambda _error: seen.append("failed"))
    handle.cancelled.connect(lambda: seen.append("cancelled"))
    return seen


def test_result_and_progress_arrive_in_gui_thread(qtbot) -> None:
    gui_thread = QThread.currentThread()
    seen_threads = []
    handle = JobHandle("count", counting_job(3))
    handle.progress.connect(lambda _record: seen_threads.append(QThread.currentThread()))
    with qtbot.waitSignal(handle.succeeded, timeout=5000) as result:
        handle.start()
    assert result.args == [30]
    assert seen_threads and all(thread is gui_thread for thread in seen_threads)
    qtbot.waitUntil(lambda: not running_jobs())


def test_failure_is_reported_not_raised(qtbot) -> None:
    def failing(cancel: threading.Event):
        yield Progress("x", 0, 1)
        raise FrankenMoEError("the model is missing", "download it first")

    handle = JobHandle("fail", failing)
    with qtbot.waitSignal(handle.failed, timeout=5000) as failure:
        handle.start()
    assert failure.args[0].hint == "download it first"
    qtbot.waitUntil(lambda: not running_jobs())


def test_cancel_takes_effect_at_the_next_step(qtbot) -> None:
    release = threading.Event()
    handle = JobHandle("slow", counting_job(1000, release))
    seen = outcomes(handle)
    with qtbot.waitSignal(handle.progress, timeout=30_000):
        handle.start()
    # The job is now waiting inside its second step, so it is certainly still running.
    handle.cancel()
    release.set()
    with qtbot.waitSignal(handle.finished, timeout=30_000):
        pass
    assert seen == ["cancelled"]
    assert handle.last_progress is not None and handle.last_progress.done == 1


def test_stop_all_cancels_and_joins(qtbot) -> None:
    # Far too long to finish by itself: only a cancel ends it.
    handle = JobHandle("endless", counting_job(10**9))
    seen = outcomes(handle)
    with qtbot.waitSignal(handle.progress, timeout=30_000):
        handle.start()
    assert handle.is_running
    assert stop_all(30_000)
    assert not handle.is_running
    qtbot.waitUntil(lambda: seen == ["cancelled"], timeout=30_000)


@pytest.mark.parametrize(
    "module", ["app.gui.main_window", "app.gui.launch", "app.gui.ship.export_dialog", "app.gui.ship.publish_dialog"]
)
def test_gui_import_does_not_load_torch(module: str) -> None:
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
