"""The CLI's progress bars: one bar per stage that resumes after an interruption, decimal sizes, no burst rates."""

from __future__ import annotations

import io
import re

from app.cli.progress import ProgressBars
from app.core.progress import Progress

KB = 1000


def rendered_lines(output: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]", output) if line.strip()]


def percentages(lines: list[str], stage: str) -> list[int]:
    return [int(match.group(1)) for line in lines if (match := re.match(rf"{stage}:\s+(\d+)%", line))]


def merge_like_records() -> list[Progress]:
    """What a merge yields: the writer waits at the routers while the gates are computed, then finishes."""
    records = [Progress("checking", 0, 1, message="checking the recipe and models")]
    records += [Progress("writing", i, 10, i * 100 * KB, 1000 * KB + 10, message=f"tensor {i}") for i in range(1, 10)]
    records.append(Progress("writing", 9, 10, 900 * KB, 1000 * KB + 10, message="waiting for the gates"))
    records += [Progress("gates", layer, 4) for layer in range(1, 5)]  # drained in one burst
    records.append(Progress("gates", 1, 1, message="hidden gates for 3 experts"))
    records.append(Progress("writing", 10, 10, 1000 * KB + 10, 1000 * KB + 10, message="router"))
    records.append(Progress("done", 1, 1))
    return records


def test_writing_resumes_its_bar_after_the_gates_and_says_why_it_waited():
    out = io.StringIO()
    with ProgressBars(file=out) as bars:
        for record in merge_like_records():
            bars(record)
    lines = rendered_lines(out.getvalue())
    writing = percentages(lines, "writing")
    assert writing == sorted(writing) and writing[-1] == 100, writing  # never restarts from 0
    waiting = [line for line in lines if "waiting for the gates" in line]
    assert waiting and all(line.startswith("writing:") for line in waiting)
    assert percentages(lines, "gates")[-1] == 100
    assert "checking the recipe and models..." in lines
    # The wait's message goes once progress resumes.
    assert "waiting for the gates" not in [line for line in lines if line.startswith("writing: 100%")][-1]


def test_sizes_are_decimal_like_the_summary_and_steps_show_no_rate():
    out = io.StringIO()
    with ProgressBars(file=out) as bars:
        for record in merge_like_records():
            bars(record)
    text = out.getvalue()
    assert "1.0 MB / 1.0 MB" in text and "900.0 kB / 1.0 MB" in text
    assert "step/s" not in text and "it/s" not in text
    assert not re.search(r"\d[kMG]B?/\d", text)  # tqdm's own "977k/977k" style binary sizes


def test_quiet_bars_print_nothing():
    out = io.StringIO()
    with ProgressBars(enabled=False, file=out) as bars:
        for record in merge_like_records():
            bars(record)
    assert out.getvalue() == ""
