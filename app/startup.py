"""Process start-up for every way the app runs: from source, pip-installed, or frozen by PyInstaller.

A frozen build differs from a source run in ways that break naive code:
- multiprocessing's spawned children re-run the executable, which must hand them to multiprocessing
  instead of opening the app again (``freeze_support``);
- a windowed build (Windows, macOS) has no console: ``sys.stdout`` and ``sys.stderr`` are None, and
  the first print or tqdm bar would raise, so they go to a log file instead;
- it is started from a desktop menu, so its logs belong in the platform's user log folder, and its
  Hub downloads in the platform's user cache folder rather than wherever the working directory is.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from pathlib import Path
from typing import TextIO

APP_DIR_NAME = "FrankenMoE Studio"
LOG_FILE = "frankenmoe.log"
LOG_BYTES = 2_000_000


def is_frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def user_cache_dir() -> Path:
    """The platform's per-user cache folder (not the app's own subfolder)."""
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    if sys.platform == "darwin":
        return home / "Library" / "Caches"
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache")


def user_log_dir() -> Path:
    """Where the app's log files go: the platform's convention for per-user logs."""
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / APP_DIR_NAME / "Logs"
    if sys.platform == "darwin":
        return home / "Library" / "Logs" / APP_DIR_NAME
    return Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "frankenmoe" / "log"


def hub_home(environ: dict[str, str], default_cache: Path, cache_dir: Path) -> str | None:
    """The HF_HOME a frozen app should use, or None to leave huggingface_hub's choice alone.

    An explicit HF_HOME or HF_HUB_CACHE wins, and so does an existing ~/.cache/huggingface, so that
    models downloaded with other tools are found; otherwise the platform's cache folder is used.
    """
    if environ.get("HF_HOME") or environ.get("HF_HUB_CACHE") or default_cache.is_dir():
        return None
    return str(cache_dir / "huggingface")


def open_log(log_dir: Path) -> TextIO:
    """The app's log file, appended to; the previous one is kept once it grows past LOG_BYTES."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / LOG_FILE
    if path.is_file() and path.stat().st_size > LOG_BYTES:
        path.replace(path.with_name(LOG_FILE + ".1"))
    # Line-buffered, so that a crash still leaves everything printed before it in the file.
    return open(path, "a", encoding="utf-8", buffering=1)


def prepare_process() -> None:
    """Run first thing in main(); beyond freeze_support, nothing changes when run from source."""
    # Must come before anything else: in a spawned child it runs the child's work and exits.
    multiprocessing.freeze_support()
    if not is_frozen():
        return
    home = hub_home(dict(os.environ), Path.home() / ".cache" / "huggingface", user_cache_dir())
    if home is not None:
        os.environ["HF_HOME"] = home
    log = open_log(user_log_dir())
    if sys.stdout is None:
        sys.stdout = log
    if sys.stderr is None:
        sys.stderr = log
    # Warnings are kept even when a terminal shows them too: a desktop launch has nobody watching.
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    logging.getLogger().addHandler(handler)
