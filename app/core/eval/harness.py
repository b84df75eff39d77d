"""Benchmarks through EleutherAI's lm-evaluation-harness, on a model that is already loaded.

lm-eval is an optional extra (``pip install 'frankenmoe-studio[eval]'``); this module imports it only
inside :func:`run_harness`, so the rest of the app works without it. The model is wrapped in lm-eval's
``HFLM`` as the object it is (no second load), so routing overrides applied to it hold during the run.

The harness runs in a thread of its own while the job yields progress: one step per answered request,
counted through lm-eval's cache hook, which it calls after every request. The same hook checks the
cancel event, so a cancelled run stops at the next request.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.problems import FrankenMoEError
from app.core.progress import Cancelled, Job, Progress, check_cancel

HARNESS_STAGE = "lm-eval"
INSTALL_HINT = "install the eval extra: pip install 'frankenmoe-studio[eval]'"
# How often the job looks at the cancel event while the harness thread has nothing new to report.
_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class HarnessRequest:
    """Which lm-eval tasks to run, and how."""

    tasks: tuple[str, ...]
    limit: int | None = None
    num_fewshot: int | None = None
    include_path: Path | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.tasks:
            raise FrankenMoEError("no lm-eval task was named", "name one or more tasks, e.g. --tasks arc_easy")
        if self.limit is not None and self.limit < 1:
            raise FrankenMoEError(f"the limit must be at least 1, not {self.limit}", "give --limit 1 or more")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise FrankenMoEError(
                f"the number of few-shot examples cannot be negative ({self.num_fewshot})",
                "give --num-fewshot 0 or more",
            )
        if self.batch_size < 1:
            raise FrankenMoEError(f"the batch size must be at least 1, not {self.batch_size}", "give 1 or more")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise FrankenMoEError(
                f"the task folder {self.include_path} does not exist",
                "give --include-path a folder that holds lm-eval task YAML files",
            )


@dataclass
class HarnessResult:
    """lm-eval's own results (JSON-ready) and a short summary: task -> metric -> value."""

    results: dict[str, Any]
    summary: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"tasks": self.summary}


def lm_eval_installed() -> bool:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


def _require_lm_eval() -> None:
    if not lm_eval_installed():
        raise FrankenMoEError("lm-evaluation-harness (lm-eval) is not installed", INSTALL_HINT)


def known_tasks(include_path: Path | None = None) -> Any:
    """lm-eval's task index, with the custom task folder if one is given."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None)


def check_tasks(task_manager: Any, tasks: Iterable[str]) -> None:
    """FrankenMoEError naming every task lm-eval does not know."""
    known = set(task_manager.all_tasks)
    unknown = [task for task in tasks if task not in known and not task_manager.match_tasks([task])]
    if unknown:
        names = ", ".join(unknown)
        raise FrankenMoEError(
            f"lm-eval does not know the task(s) {names}",
            "check the spelling (lm-eval --tasks list shows every task), or give --include-path the folder "
            "that holds the task's YAML file",
        )


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> metric -> value from lm-eval's results, leaving out aliases and non-numbers."""
    summary: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        summary[task] = {
            metric.replace(",none", ""): float(value)
            for metric, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and metric != "sample_len"
        }
    return summary


def write_results_json(results: dict[str, Any], path: Path) -> Path:
    """lm-eval's results as lm-eval writes them, atomically (a temporary file renamed into place)."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(
            json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False), encoding="utf-8"
        )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def run_harness(
    model: Any,
    tokenizer: Any,
    request: HarnessRequest,
    cancel: threading.Event | None = None,
    task_manager: Any = None,
) -> Job[HarnessResult]:
    """Run lm-eval tasks on a loaded causal LM; yields a Progress record per answered request.

    ``task_manager``: a :func:`known_tasks` index already checked against the tasks (it takes seconds
    to build, so a caller running several models builds it once)."""
    _require_lm_eval()
    if task_manager is None:
        yield Progress(HARNESS_STAGE, 0, 1, message="Indexing lm-eval tasks")
        task_manager = known_tasks(request.include_path)
        check_tasks(task_manager, request.tasks)
    check_cancel(cancel)
    # Custom tasks read local files through `datasets`; nothing may reach the network unless the user allows it.
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    logging.getLogger("lm_eval").setLevel(logging.WARNING)

    # (requests answered, requests announced) increments from the harness thread.
    records: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    outcome: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    # Set when the caller cancels or abandons the job; the harness thread stops at its next request.
    stop = threading.Event()

    def work() -> None:
        try:
            outcome.append(_evaluate(model, tokenizer, request, task_manager, (cancel, stop), records.put))
        except BaseException as exc:  # handed to the job's thread below
            errors.append(exc)

    thread = threading.Thread(target=work, name="lm-eval", daemon=True)
    thread.start()
    answered = announced = 0
    try:
        while thread.is_alive() or not records.empty():
            if cancel is not None and cancel.is_set():
                stop.set()
            try:
                newly_answered, newly_announced = records.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            answered += newly_answered
            announced += newly_announced
            yield Progress(HARNESS_STAGE, answered, max(announced, answered, 1), message="Running lm-eval tasks")
    finally:
        # Reached also when the caller closes the job early: the harness stops at its next request.
        if thread.is_alive():
            stop.set()
        thread.join()
    if errors:
        error = errors[0]
        if isinstance(error, Cancelled | FrankenMoEError):
            raise error
        raise FrankenMoEError(
            f"lm-eval failed: {type(error).__name__}: {error}",
            "check the task's YAML file and its data files, or run with fewer tasks to find the one that fails",
        ) from error
    results = outcome[0]
    return HarnessResult(results=results, summary=summarize(results))


def _evaluate(
    model: Any,
    tokenizer: Any,
    request: HarnessRequest,
    task_manager: Any,
    cancel_events: tuple[threading.Event | None, threading.Event],
    on_progress: Any,
) -> dict[str, Any]:
    from lm_eval import simple_evaluate
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    class CountingHook(CacheHook):
        """Called by HFLM after every answered request: counts it and stops the run when cancelled."""

        def __init__(self) -> None:
            super().__init__(None)

        def add_partial(self, attr: str, req: Iterable[Any], res: Any) -> None:
            for event in cancel_events:
                check_cancel(event)
            on_progress((1, 0))

    class LoadedModelLM(HFLM):
        # simple_evaluate installs its own (no-op) hook; keep ours.
        def set_cache_hook(self, cache_hook: CacheHook) -> None:
            self.cache_hook = CountingHook()

        # Each request type arrives as one list: announce its size; our progress replaces lm-eval's own bars.
        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            on_progress((0, len(requests)))
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            on_progress((0, len(requests)))
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
            on_progress((0, len(requests)))
            return super().generate_until(requests, disable_tqdm=True)

        # loglikelihood_rolling asks for a bar per batch of windows whatever it was told.
        def _loglikelihood_tokens(self, requests: list[Any], disable_tqdm: bool = False, **kwargs: Any) -> list[Any]:
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, **kwargs)

    lm = LoadedModelLM(pretrained=model, tokenizer=tokenizer, batch_size=request.batch_size)
    lm.set_cache_hook(CountingHook())
    results = simple_evaluate(
        model=lm,
        tasks=list(request.tasks),
        num_fewshot=request.num_fewshot,
        limit=request.limit,
        task_manager=task_manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    if results is None:  # only on non-zero ranks of a distributed run, which the app never starts
        raise FrankenMoEError("lm-eval returned no results", "run the evaluation again")
    return dict(results)
