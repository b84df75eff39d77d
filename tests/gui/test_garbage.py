"""Reference cycles are collected in the GUI thread, never in a worker (app/gui/garbage.py)."""

from __future__ import annotations

import gc
import threading
from typing import ClassVar

from PySide6.QtWidgets import QApplication

from app.gui.garbage import collect_in_gui_thread


class Cycle:
    """Refers to itself, so only a collection frees it; records the thread that finalizes it."""

    finalized_in: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.itself = self

    def __del__(self) -> None:
        Cycle.finalized_in.append(threading.current_thread().name)


def allocate_as_a_model_load_does(loaded: list[object]) -> None:
    # Thousands of containers kept: far past the first generation's threshold (700), where Python
    # would collect in this thread.
    loaded.extend([] for _ in range(20 * gc.get_threshold()[0]))


def test_a_cycle_is_collected_in_the_gui_thread_while_a_worker_allocates(qtbot, qapp: QApplication) -> None:
    assert collect_in_gui_thread(qapp) is collect_in_gui_thread(qapp)  # one collector per app
    assert not gc.isenabled()
    Cycle.finalized_in.clear()
    Cycle()
    loaded: list[object] = []
    worker = threading.Thread(target=allocate_as_a_model_load_does, args=(loaded,), name="worker")
    worker.start()
    worker.join()
    assert Cycle.finalized_in == []
    qtbot.waitUntil(lambda: Cycle.finalized_in != [], timeout=5000)
    assert Cycle.finalized_in == [threading.main_thread().name]
