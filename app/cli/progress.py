"""tqdm progress bars driven by core Progress records: one bar per stage.

A stage that another interrupts (the merge's writing waits for the gates) keeps its bar, which
resumes where it was; the other stage gets a bar of its own below it. A record that reports no
progress but a message (``waiting for the gates``) shows the message beside the bar until progress
resumes. Sizes are decimal (``format_bytes``), as in the lines printed after the bars; step bars
show no rate, since records may arrive in bursts (a stage's records are queued while another runs).
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO

from tqdm import tqdm

from app.core.merge.leftovers import LEFTOVERS_STAGE
from app.core.progress import Progress, format_bytes

BYTES_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {size_done} / {size_total} [{elapsed}<{remaining}, {speed}{postfix}]"
STEPS_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class _Bar(tqdm):  # type: ignore[type-arg]
    """A tqdm bar that also knows its counts as decimal sizes, for BYTES_FORMAT."""

    @property
    def format_dict(self) -> dict[str, Any]:
        values = dict(super().format_dict)
        elapsed = values.get("elapsed") or 0
        values["size_done"] = format_bytes(self.n)
        values["size_total"] = format_bytes(self.total or 0)
        values["speed"] = f"{format_bytes(self.n / elapsed)}/s" if elapsed else "?/s"
        return values


def bytes_bar(total: int, desc: str, file: TextIO | None = None) -> tqdm:  # type: ignore[type-arg]
    """A bar counting bytes, shown as decimal sizes (``1.2 GB / 4.9 GB``) like every size the CLI prints."""
    return _Bar(total=total, desc=desc, bar_format=BYTES_FORMAT, file=file or sys.stderr, dynamic_ncols=True)


class ProgressBars:
    def __init__(self, enabled: bool = True, file: TextIO | None = None) -> None:
        self.enabled = enabled
        self._file = file
        self._bars: dict[str, tqdm] = {}  # type: ignore[type-arg]
        self._positions: dict[str, tuple[int, int]] = {}

    @property
    def file(self) -> TextIO:
        return self._file or sys.stderr

    def __call__(self, record: Progress) -> None:
        if not self.enabled or record.stage == "done":
            return
        if record.stage == LEFTOVERS_STAGE:
            tqdm.write(record.message, file=self.file)
            return
        if record.total <= 1 and not record.bytes_total:
            if record.message and record.done == 0:
                tqdm.write(f"{record.message}...", file=self.file)
            return
        by_bytes = record.bytes_total > 0
        bar = self._bars.get(record.stage)
        if bar is None:
            bar = _Bar(
                total=record.bytes_total if by_bytes else record.total,
                desc=record.stage,
                bar_format=BYTES_FORMAT if by_bytes else STEPS_FORMAT,
                file=self.file,
                leave=True,
                dynamic_ncols=True,
            )
            self._bars[record.stage] = bar
        if not by_bytes and record.total != bar.total:  # a job that learns its size as it goes (lm-eval)
            bar.total = record.total
        position = (record.bytes_done, record.done)
        if position == self._positions.get(record.stage) and record.message:
            bar.set_postfix_str(record.message, refresh=False)  # news without progress: a wait
        elif position != self._positions.get(record.stage) and bar.postfix:
            bar.set_postfix_str("", refresh=False)
        self._positions[record.stage] = position
        bar.n = record.bytes_done if by_bytes else record.done
        bar.refresh()
        if bar.total and bar.n >= bar.total:
            bar.close()
            del self._bars[record.stage]
            del self._positions[record.stage]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self._positions.clear()

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
