"""Run core job generators off the GUI thread.

A :class:`JobWorker` lives in its own ``QThread`` and drives one job; a :class:`JobHandle` lives in
the GUI thread and re-emits what the worker reports, so every slot a page connects runs in the GUI
thread and no widget is ever touched from a worker. Cancel sets the job's event; the job notices at
its next step and raises :class:`~app.core.progress.Cancelled`.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from app.core.progress import Cancelled, Job, Progress

JobFactory = Callable[[threading.Event], Job[Any]]

# Progress records arrive far faster than anyone can read them; forwarding each one would flood
# the GUI thread's event queue during a merge. Stage changes always go through.
PROGRESS_INTERVAL_S = 0.05

# Strong references: a QThread destroyed while running would take the process down with it.
_live_handles: set[JobHandle] = set()


class JobWorker(QObject):
    """Drives one job generator in a worker thread. Touches nothing but its own signals."""

    progress = Signal(object)
    succeeded = Signal(object)
    failed = Signal(object)
    cancelled = Signal()
    done = Signal()

    def __init__(self, make_job: JobFactory, cancel: threading.Event) -> None:
        super().__init__()
        self._make_job = make_job
        self._cancel = cancel

    @Slot()
    def run(self) -> None:
        last_sent = 0.0
        last_stage = None
        try:
            job = self._make_job(self._cancel)
            while True:
                if self._cancel.is_set():
                    job.close()
                    raise Cancelled("cancelled")
                try:
                    record = next(job)
                except StopIteration as stop:
                    self.succeeded.emit(stop.value)
                    break
                now = time.monotonic()
                if record.stage != last_stage or now - last_sent >= PROGRESS_INTERVAL_S:
                    self.progress.emit(record)
                    last_sent, last_stage = now, record.stage
        except Cancelled:
            self.cancelled.emit()
        except Exception as exc:
            self.failed.emit(exc)
        finally:
            self.done.emit()


class JobHandle(QObject):
    """The GUI thread's side of a running job: its signals always fire in the GUI thread."""

    progress = Signal(object)
    succeeded = Signal(object)
    failed = Signal(object)
    cancelled = Signal()
    finished = Signal()

    def __init__(self, name: str, make_job: JobFactory, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.name = name
        self.last_progress: Progress | None = None
        self._cancel = threading.Event()
        self._thread = QThread()
        self._thread.setObjectName(f"job: {name}")
        self._worker = JobWorker(make_job, self._cancel)
        self._worker.moveToThread(self._thread)
        self._thread.started.connect(self._worker.run)
        queued = Qt.ConnectionType.QueuedConnection
        self._worker.progress.connect(self._on_progress, queued)
        self._worker.succeeded.connect(self.succeeded, queued)
        self._worker.failed.connect(self.failed, queued)
        self._worker.cancelled.connect(self.cancelled, queued)
        self._worker.done.connect(self._thread.quit, Qt.ConnectionType.DirectConnection)
        self._thread.finished.connect(self._on_thread_finished, queued)
        _live_handles.add(self)

    def start(self) -> JobHandle:
        self._thread.start()
        return self

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def is_running(self) -> bool:
        return self._thread.isRunning()

    def detach(self) -> None:
        """Stop delivering to whoever listens, for a window that is going away; the job still ends."""
        # PySide warns about a signal that had no receivers to disconnect; having none is fine here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "libpyside: Failed to disconnect", RuntimeWarning)
            for signal in (self.progress, self.succeeded, self.failed, self.cancelled, self.finished):
                signal.disconnect()

    def wait(self, timeout_ms: int = 30_000) -> bool:
        """Block until the thread ends; for shutdown, after :meth:`cancel`."""
        return self._thread.wait(timeout_ms)

    @Slot(object)
    def _on_progress(self, record: Progress) -> None:
        self.last_progress = record
        self.progress.emit(record)

    @Slot()
    def _on_thread_finished(self) -> None:
        _live_handles.discard(self)
        self.finished.emit()
        self._worker.deleteLater()


def start_job(name: str, make_job: JobFactory, parent: QObject | None = None) -> JobHandle:
    return JobHandle(name, make_job, parent).start()


def running_jobs() -> list[JobHandle]:
    return [handle for handle in list(_live_handles) if handle.is_running]


def stop_all(timeout_ms: int = 30_000) -> bool:
    """Cancel every running job and wait for their threads; True when all have ended."""
    jobs = running_jobs()
    for handle in jobs:
        handle.cancel()
    return all(handle.wait(timeout_ms) for handle in jobs)


def call_in_worker(function: Callable[[], Any]) -> JobFactory:
    """Wrap a plain, quick-ish call (no progress) as a job, so that it too runs off the GUI thread."""

    def make_job(cancel: threading.Event) -> Job[Any]:
        yield from ()
        if cancel.is_set():
            raise Cancelled("cancelled")
        return function()

    return make_job
