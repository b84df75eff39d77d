"""Garbage collection in the GUI thread only.

Python collects reference cycles in whichever thread allocates when a generation's count passes
its threshold. A cycle that holds a Qt object (a closed widget's wrapper, a slot's closure) is then
destroyed in that thread, and Qt objects destroyed outside their own thread take the process down:
a test run crashed so, in a worker loading a model for the Evaluate page. As pyqtgraph does, the
app turns automatic collection off and a timer in the GUI thread collects instead, generation by
generation, as Python's own thresholds would. Each full collection holds the GIL, so the GUI
stalls for as long as it takes: once torch and transformers are loaded, the app freezes what is in
memory (freeze_long_lived), and full collections go through what came after only (with a model
loaded, 450-510 ms -> 210-225 ms: bench/gui_garbage.py).
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QCoreApplication, QObject, QTimer

# Often enough that garbage from a busy worker (a training run, a merge) does not pile up.
COLLECT_INTERVAL_MS = 500
# A tensor this large is a model's weight: a model is being loaded or is loaded.
MODEL_TENSOR_BYTES = 2**20


class GuiThreadGarbageCollector(QObject):
    """Turns Python's automatic collection off; collects on a timer in the thread that made it (the GUI's)."""

    def __init__(self, parent: QObject | None = None, interval_ms: int = COLLECT_INTERVAL_MS) -> None:
        super().__init__(parent)
        self._timer = QTimer(self)
        self._timer.timeout.connect(self.collect_due)
        self._timer.start(interval_ms)
        gc.disable()

    def collect_due(self) -> None:
        """Collect the generations whose counts have passed their thresholds, the youngest first."""
        counts, thresholds = gc.get_count(), gc.get_threshold()
        for generation in range(3):
            if counts[generation] <= thresholds[generation]:
                break
            gc.collect(generation)

    def freeze_long_lived(self) -> bool:
        """Leave the objects there are now out of every later collection, unless a model is in memory; True if frozen.

        For once torch and transformers are imported: their modules' objects, hundreds of thousands,
        live as long as the process, and a full collection went through all of them again each time
        (bench/gui_garbage.py). What is garbage among them stays; it is reclaimed with the process.
        A model caught in the freeze and dropped later would keep its memory for good wherever a
        reference cycle runs through it (accelerate's hooks make some), so with one in memory
        (loading or loaded: the chat, the preview) nothing is frozen. Looking takes about 0.1 s.
        """
        import torch

        # type(), not isinstance(): isinstance reads __class__, which some deprecated objects warn about.
        tensors = (held for held in gc.get_objects() if issubclass(type(held), torch.Tensor))
        if any(tensor.numel() * tensor.element_size() >= MODEL_TENSOR_BYTES for tensor in tensors):
            return False
        gc.freeze()
        return True

    def stop(self) -> None:
        """Automatic collection again (the app is quitting: its threads have been joined)."""
        self._timer.stop()
        gc.enable()


def collect_in_gui_thread(application: QCoreApplication) -> GuiThreadGarbageCollector:
    """Install the collector for the application's lifetime (once: a second call returns the first)."""
    existing = application.findChild(GuiThreadGarbageCollector)
    if existing is not None:
        return existing
    collector = GuiThreadGarbageCollector(application)
    application.aboutToQuit.connect(collector.stop)
    return collector
