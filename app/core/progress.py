"""Progress records and cancellation for long jobs written as generators.

A job is a generator that yields :class:`Progress` records and returns its result; the caller
(CLI loop, GUI worker) drives it and may set the cancel event at any time. Jobs check the event
between steps and raise :class:`Cancelled`, cleaning up anything half-made on the way out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

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
