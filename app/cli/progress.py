"""tqdm progress bars driven by core Progress records: one bar per stage."""

from __future__ import annotations

import sys
from types import TracebackType

from tqdm import tqdm

from app.core.merge.leftovers import LEFTOVERS_STAGE
from app.core.progress import Progress


class ProgressBars:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._stage: str | None = None

    def __call__(self, record: Progress) -> None:
        if not self.enabled or record.stage == "done":
            return
        if record.stage == LEFTOVERS_STAGE:
            self.close()
            print(record.message, file=sys.stderr)
            return
        if record.total <= 1 and not record.bytes_total:
            if record.message and record.done == 0:
                self.close()
                print(f"{record.message}...", file=sys.stderr)
            return
        by_bytes = record.bytes_total > 0
        if record.stage != self._stage:
            self.close()
            self._stage = record.stage
            self._bar = tqdm(
                total=record.bytes_total if by_bytes else record.total,
                desc=record.stage,
                unit="B" if by_bytes else "step",
                unit_scale=by_bytes,
                unit_divisor=1024,
                file=sys.stderr,
                leave=True,
                dynamic_ncols=True,
            )
        assert self._bar is not None
        if not by_bytes and record.total != self._bar.total:  # a job that learns its size as it goes (lm-eval)
            self._bar.total = record.total
        self._bar.n = record.bytes_done if by_bytes else record.done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
