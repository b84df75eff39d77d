"""Progress records and cancellation for long jobs written as generators.

A job is a generator that yields :class:`Progress` records and returns its result; the caller
(CLI loop, GUI worker) drives it and may set the cancel event at any time. Jobs check the event
between steps and raise :class:`Cancelled`, cleaning up anything half-made on the way out.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Progress:
    stage: str
    done: int
    total: int
    bytes_done: int = 0
    bytes_total: int = 0
    message: str = ""

    @property
    def fraction(self) -> float:
        if self.bytes_total:
            return min(1.0, self.bytes_done / self.bytes_total)
        return min(1.0, self.done / self.total) if self.total else 0.0


class Cancelled(Exception):
    """The user asked the job to stop; whatever it had started has been cleaned up."""


Job = Generator[Progress, None, T]


def check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


def run_job(job: Job[T], on_progress: Callable[[Progress], None] | None = None) -> T:
    """Drive a job to its end and return its result."""
    while True:
        try:
            record = next(job)
        except StopIteration as stop:
            return stop.value
        if on_progress is not None:
            on_progress(record)


def relabelled(job: Job[T], stage: str) -> Job[T]:
    """The job, its progress records under another stage name (one job's parts shown as one stage)."""
    while True:
        try:
            record = next(job)
        except StopIteration as stop:
            return stop.value
        yield replace(record, stage=stage)


def format_bytes(count: float) -> str:
    """Human-readable decimal size, as disks and the Hub show them."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


class BackgroundJob(Generic[T]):
    """Runs a job in a thread of its own, so that its caller can do other work meanwhile.

    Progress records queue up for the caller to take with :meth:`drain`; the result or the error
    comes out of :meth:`result`. The thread stops at the job's next step once the cancel event is
    set, and :meth:`close` always joins it.
    """

    def __init__(self, job: Job[T], name: str) -> None:
        self._job = job
        self._records: queue.SimpleQueue[Progress] = queue.SimpleQueue()
        self._outcome: list[T] = []
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome.append(run_job(self._job, self._records.put))
        except BaseException as exc:  # handed over to the caller's thread by result()
            self._error.append(exc)

    def drain(self) -> list[Progress]:
        records = []
        while True:
            try:
                records.append(self._records.get_nowait())
            except queue.Empty:
                return records

    @property
    def failed(self) -> bool:
        return bool(self._error)

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self) -> T:
        self._thread.join()
        if self._error:
            raise self._error[0]
        return self._outcome[0]

    def close(self) -> None:
        self._thread.join()
