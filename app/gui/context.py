"""What every page shares: settings, the log, and starting jobs that report into the log."""

from __future__ import annotations

import logging
import time

from PySide6.QtCore import QObject, Signal

from app.core.problems import FrankenMoEError, Problem, ProblemsError, sentence
from app.core.progress import Progress
from app.gui.settings import AppSettings
from app.gui.workers import JobFactory, JobHandle


def describe_problems(problems: list[Problem]) -> str:
    """Errors, then warnings, each on a line, then each distinct fix once (most problems of one
    donor share theirs)."""
    ordered = [*(p for p in problems if p.is_error), *(p for p in problems if not p.is_error)]
    lines = [f"{'✗' if p.is_error else '⚠'} {sentence(p.message)}" for p in ordered]
    fixes = dict.fromkeys(sentence(p.hint) for p in ordered if p.hint)
    return "\n".join([*lines, *(f"Fix: {fix}" for fix in fixes)])


def describe_error(error: BaseException) -> str:
    """One readable paragraph: the problem and its fix, never a traceback."""
    if isinstance(error, ProblemsError):
        return "\n".join(f"{'✗' if p.is_error else '⚠'} {p.text}" for p in error.problems)
    if isinstance(error, FrankenMoEError):
        message = sentence(error.message)
        return f"{message}\nFix: {sentence(error.hint)}" if error.hint else message
    return f"{type(error).__name__}: {error}"


class AppContext(QObject):
    logged = Signal(str)
    status = Signal(str)
    jobs_changed = Signal()
    chat_requested = Signal(object)

    def __init__(self, settings: AppSettings, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.settings = settings
        self._running: list[JobHandle] = []

    def log(self, message: str) -> None:
        logging.getLogger("frankenmoe.gui").info(message)  # the log file keeps what the panel shows
        self.logged.emit(f"{time.strftime('%H:%M:%S')}  {message}")

    @property
    def running(self) -> list[JobHandle]:
        return [handle for handle in self._running if handle.is_running]

    def run(self, name: str, make_job: JobFactory, *, quiet: bool = False) -> JobHandle:
        """Start a job whose stages, errors and end are written to the log (unless ``quiet``)."""
        # No Qt parent: pages may keep a finished handle, and Python alone decides when it goes.
        handle = JobHandle(name, make_job)
        self._running.append(handle)
        if not quiet:
            self.log(f"{name}: started")
            stages: list[str] = []

            def on_progress(record: Progress) -> None:
                if not stages or stages[-1] != record.stage:
                    stages.append(record.stage)
                    detail = f" ({record.message})" if record.message else ""
                    self.log(f"{name}: {record.stage}{detail}")

            handle.progress.connect(on_progress)
            handle.succeeded.connect(lambda _result: self.log(f"{name}: finished"))
            handle.cancelled.connect(lambda: self.log(f"{name}: cancelled"))
        handle.failed.connect(lambda error: self.log(f"{name}: failed: {describe_error(error)}"))
        # A bound method, not a lambda: Qt drops it with the context, should a job outlive its window.
        handle.finished.connect(self._forget_sender)
        handle.start()
        self.jobs_changed.emit()
        return handle

    def shutdown(self) -> None:
        """Cancel every job, wait for them, and deliver nothing more: the pages are going away."""
        for handle in self._running:
            handle.detach()
            handle.cancel()
        for handle in self._running:
            handle.wait()
        self._running.clear()

    def _forget_sender(self) -> None:
        handle = self.sender()
        if handle in self._running:
            self._running.remove(handle)
        self.jobs_changed.emit()
