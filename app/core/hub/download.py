"""Downloading Hub models into the standard Hugging Face cache, as a cancellable job with progress.

``snapshot_download`` does the work, so the cache stays exactly what every other Hugging Face tool
expects. It runs in a worker thread; a ``tqdm_class`` of ours receives its byte and file counts
(without ever drawing, so it works without a terminal, where huggingface_hub's own bars switch
themselves off) and raises :class:`Cancelled` from ``update`` once the user cancels. That happens
before the chunk at hand is written, and huggingface_hub then deletes the unfinished temporary
file, so the cache only ever holds finished files: the next download fetches the rest.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any

from huggingface_hub import snapshot_download
from tqdm.std import tqdm

from app.core.hub.config import HubConfig, resolve_config
from app.core.hub.errors import (
    DiskFullError,
    HubError,
    NoSafetensorsError,
    hub_errors,
    is_transient,
    translate_error,
)
from app.core.hub.files import (
    ADAPTER_WEIGHTS_FILE,
    RemoteFile,
    cached_adapter_snapshot,
    cached_snapshot,
    has_weights,
    is_adapter_repo,
    refresh_cached,
    remote_merge_files,
)
from app.core.hub.network import call_cancellable, require_hub
from app.core.progress import Cancelled, Job, Progress, check_cancel, format_bytes
from app.core.recipe import ModelRef, Recipe

STAGE = "download"
# How often the job reports while bytes flow; each record is cheap, but a GUI redraws on each.
REPORT_INTERVAL_S = 0.2
SPEED_WINDOW_S = 5.0
MAX_RETRY_DELAY_S = 60.0
# Room left on the disk beyond the files themselves, for the OS and the merge's own output later.
DISK_MARGIN_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DownloadProgress(Progress):
    """Progress of a download: ``done``/``total`` count files, the bytes count what is being fetched."""

    repo_id: str = ""
    bytes_per_second: float = 0.0
    eta_seconds: float | None = None
    retry: int = 0


class _NullWriter:
    """Where our bars "draw": nowhere. They report through the tracker instead."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _Tracker:
    """Counts shared between the download thread's bars and the job that reports them."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop
        self.lock = threading.Lock()
        self.bytes_by_bar: dict[int, int] = {}
        self.files_done = 0

    @property
    def bytes_done(self) -> int:
        # snapshot_download feeds the same HTTP bytes to two bars (network and disk); for Xet
        # downloads the disk bar lags, so the larger count is the bytes received so far.
        with self.lock:
            return max(self.bytes_by_bar.values(), default=0)

    def bar_class(self) -> type[tqdm]:
        tracker = self

        class ReportingBar(tqdm):
            monitor_interval = 0  # no tqdm monitor thread: nothing is drawn

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                self.counts_bytes = kwargs.get("unit") == "B"
                kwargs.update(file=_NullWriter(), mininterval=3600)
                super().__init__(*args, **kwargs)

            def update(self, n: float | None = 1) -> bool | None:
                if tracker.should_stop():
                    raise Cancelled("download cancelled")
                shown = super().update(n)
                with tracker.lock:
                    if self.counts_bytes:
                        tracker.bytes_by_bar[id(self)] = int(self.n)
                    else:
                        tracker.files_done = int(self.n)
                return shown

        return ReportingBar


def _check_disk_space(needed: int, config: HubConfig, repo_id: str) -> None:
    folder = config.cache_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed + DISK_MARGIN_BYTES > free:
        raise DiskFullError(
            f"{repo_id} needs {format_bytes(needed)} more on disk, but only {format_bytes(free)} is free "
            f"where the Hugging Face cache is ({config.cache_dir})",
            "free some disk space, or set HF_HUB_CACHE to a folder on a larger disk",
        )


def plan_download(ref: ModelRef, config: HubConfig, adapter: bool = False) -> tuple[str, list[RemoteFile]]:
    """The commit a download will fetch and the files it needs; raises if the model or adapter has no
    safetensors weights.

    An adapter (``adapter``, or a repository that holds only one) needs just its own files: its config,
    its safetensors weights, tokenizer files if any and its card (see ``select_adapter_files``).
    """
    with hub_errors(ref.path, ref.revision, config):
        info = config.api().model_info(
            ref.path, revision=ref.revision, files_metadata=True, timeout=config.request_timeout_s
        )
    adapter = adapter or is_adapter_repo(s.rfilename for s in info.siblings or [])
    files = remote_merge_files(info, config, adapter)
    if adapter and ADAPTER_WEIGHTS_FILE not in {f.path for f in files}:
        raise NoSafetensorsError(
            f"{ref} is a LoRA adapter without {ADAPTER_WEIGHTS_FILE}, which merging needs (a pickle "
            "adapter_model.bin is not loaded, as it can run code)",
            "pick a version of the adapter saved as safetensors (peft's save_pretrained writes it by default)",
        )
    if not has_weights(f.path for f in files):
        raise NoSafetensorsError(
            f"{ref} has no safetensors weights, which merging needs (pickle checkpoints are not loaded, "
            "as they can run code)",
            "pick a version of the model published as .safetensors",
        )
    return info.sha or ref.revision or "main", files


def download_model(
    ref: ModelRef | str,
    cancel: threading.Event | None = None,
    config: HubConfig | None = None,
    adapter: bool = False,
) -> Job[Path]:
    """Fetch what a merge and a chat need of a Hub model into the cache; returns its snapshot folder.

    For ``MODEL+ADAPTER``, the model (unless local) and then the adapter, returning the model's
    folder; of an adapter (``adapter``, or a repository that is one) only its own files.

    Files already in the cache are not fetched again. When no connection to the Hub opens at the
    start, that is reported at once (:class:`HubOfflineError`); a connection lost later is retried
    ``config.max_retries`` times with growing pauses, each attempt resuming with the files finished
    so far. The revision is fetched by its name (main by default), as huggingface_hub then records
    it in the cache's refs, which is how later offline runs find the snapshot.
    """
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    config = resolve_config(config)
    if ref.lora is not None:
        folders = yield from ensure_models([ref], cancel, config)
        return folders[ref]
    plan: tuple[str, list[RemoteFile]] | None = None
    cached_before: set[str] = set()
    attempt = 0
    while True:
        check_cancel(cancel)
        try:
            if plan is None:
                yield DownloadProgress(STAGE, 0, 0, message=f"looking up {ref}", repo_id=ref.path, retry=attempt)
                if attempt == 0:
                    require_hub(config)  # offline from the start: no point in retrying
                plan = call_cancellable(lambda: plan_download(ref, config, adapter), cancel)
                cached_before = {f.path for f in plan[1] if f.cached}
                _check_disk_space(sum(f.size for f in plan[1] if not f.cached), config, ref.path)
            files = plan[1]
            # Bytes of files finished in earlier attempts; a file cut off midway starts again.
            carried = sum(
                f.size for f in refresh_cached(files, ref.path, config) if f.cached and f.path not in cached_before
            )
            bytes_total = sum(f.size for f in files if f.path not in cached_before)
            return (
                yield from _run_snapshot_download(
                    ref, [f.path for f in files], bytes_total, carried, attempt, cancel, config
                )
            )
        except Cancelled:
            raise
        except Exception as exc:
            if not is_transient(exc) or attempt >= config.max_retries:
                if isinstance(exc, HubError):
                    raise
                translated = translate_error(exc, ref.path, ref.revision, config)
                if translated is None:
                    raise
                raise translated from exc
            attempt += 1
            delay = min(MAX_RETRY_DELAY_S, config.retry_delay_s * 2 ** (attempt - 1))
            yield DownloadProgress(
                STAGE,
                0,
                0,
                message=f"connection lost; retrying in {delay:.0f} s ({attempt} of {config.max_retries})",
                repo_id=ref.path,
                retry=attempt,
            )
            _sleep_unless_cancelled(delay, cancel)


def _sleep_unless_cancelled(seconds: float, cancel: threading.Event | None) -> None:
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        raise Cancelled("download cancelled")


def _run_snapshot_download(
    ref: ModelRef,
    names: list[str],
    bytes_total: int,
    bytes_before: int,
    retry: int,
    cancel: threading.Event | None,
    config: HubConfig,
) -> Job[Path]:
    stop = threading.Event()
    tracker = _Tracker(lambda: stop.is_set() or (cancel is not None and cancel.is_set()))
    outcome: SimpleQueue[tuple[str | None, BaseException | None]] = SimpleQueue()

    def work() -> None:
        try:
            folder = snapshot_download(
                ref.path,
                revision=ref.revision or "main",
                # allow_patterns are fnmatch patterns: a file named "*.safetensors" would match them all.
                allow_patterns=[exact_name_pattern(name) for name in names],
                cache_dir=config.cache_dir,
                endpoint=config.endpoint,
                token=config.token,
                etag_timeout=config.request_timeout_s,
                max_workers=config.max_workers,
                tqdm_class=tracker.bar_class(),
            )
        except BaseException as exc:  # handed to the job, which re-raises it in its own thread
            outcome.put((None, exc))
        else:
            outcome.put((str(folder), None))

    worker = threading.Thread(target=work, name=f"download {ref}", daemon=True)
    samples: deque[tuple[float, int]] = deque()
    worker.start()
    try:
        while True:
            try:
                folder, error = outcome.get(timeout=REPORT_INTERVAL_S)
            except Empty:
                yield _progress(ref, tracker, len(names), bytes_total, bytes_before, retry, samples)
                continue
            if error is not None:
                raise error
            assert folder is not None
            yield _progress(ref, tracker, len(names), bytes_total, bytes_before, retry, samples)
            return Path(folder)
    finally:
        # Also reached when the caller abandons the job (GeneratorExit) or is interrupted: stop the
        # worker at its next chunk and wait, so no thread keeps writing into the cache behind us.
        stop.set()
        worker.join()


def exact_name_pattern(name: str) -> str:
    """An fnmatch pattern that matches name alone: its wildcard characters each in a bracket."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _progress(
    ref: ModelRef,
    tracker: _Tracker,
    files_total: int,
    bytes_total: int,
    bytes_before: int,
    retry: int,
    samples: deque[tuple[float, int]],
) -> DownloadProgress:
    now = time.monotonic()
    done = min(bytes_total, bytes_before + tracker.bytes_done)
    samples.append((now, done))
    while len(samples) > 2 and now - samples[0][0] > SPEED_WINDOW_S:
        samples.popleft()
    elapsed = now - samples[0][0]
    speed = (done - samples[0][1]) / elapsed if elapsed > 0 else 0.0
    eta = (bytes_total - done) / speed if speed > 0 else None
    text = f"{format_bytes(done)} of {format_bytes(bytes_total)}"
    if speed > 0:
        text += f" at {format_bytes(speed)}/s"
    return DownloadProgress(
        STAGE,
        tracker.files_done,
        files_total,
        done,
        bytes_total,
        message=text,
        repo_id=ref.path,
        bytes_per_second=speed,
        eta_seconds=eta,
        retry=retry,
    )


def ensure_models(
    refs: list[ModelRef],
    cancel: threading.Event | None = None,
    config: HubConfig | None = None,
) -> Job[dict[ModelRef, Path]]:
    """The folder of every model, downloading the Hub models the cache lacks; local refs pass through.

    A ``MODEL+ADAPTER`` reference maps to the model's folder, its adapter part to the adapter's.
    """
    config = resolve_config(config)
    folders: dict[ModelRef, Path] = {}
    for ref in refs:
        check_cancel(cancel)
        model = ref.model
        if model.is_local:
            folders[ref] = Path(model.path).expanduser()
        else:
            folders[ref] = cached_snapshot(model, config) or (yield from download_model(model, cancel, config))
        if ref.lora is None:
            continue
        # The adapter part: also under its own reference, for callers that want its folder.
        if ref.lora.is_local:
            folders[ref.lora] = Path(ref.lora.path).expanduser()
        else:
            folders[ref.lora] = cached_adapter_snapshot(ref.lora, config) or (
                yield from download_model(ref.lora, cancel, config, adapter=True)
            )
    return folders


def ensure_recipe_models(
    recipe: Recipe,
    cancel: threading.Event | None = None,
    config: HubConfig | None = None,
) -> Job[dict[ModelRef, Path]]:
    """Before a merge: every model the recipe names, from the cache or downloaded now."""
    return (yield from ensure_models(recipe.model_refs(), cancel, config))
