"""Process start-up for every way the app runs: from source, pip-installed, or frozen by PyInstaller.

A frozen build differs from a source run in ways that break naive code:
- multiprocessing's spawned children re-run the executable, which must hand them to multiprocessing
  instead of opening the app again (``freeze_support``);
- a windowed build (Windows, macOS) has no console: ``sys.stdout`` and ``sys.stderr`` are None, and
  the first print or tqdm bar would raise, so they go to a log file instead;
- it is started from a desktop menu, so its logs belong in the platform's user log folder, and its
  Hub downloads in the platform's user cache folder rather than wherever the working directory is.
Every run, from source too, writes its warnings to that log file.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

APP_DIR_NAME = "FrankenMoE Studio"
LOG_FILE = "frankenmoe.log"
LOG_BYTES = 2_000_000
LOGGER_NAME = "frankenmoe"


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


def missing_display(environ: Mapping[str, str], platform: str) -> str | None:
    """Why the window cannot open here, or None. Linux only: Windows and macOS always have a screen.

    Qt would otherwise abort with its own output and a hint about libxcb-cursor0, which misleads.
    """
    if not platform.startswith("linux"):
        return None
    chosen = environ.get("QT_QPA_PLATFORM", "").split(":", 1)[0].split(";", 1)[0]
    if chosen and chosen not in ("xcb", "wayland", "wayland-egl"):
        return None  # offscreen, vnc, eglfs...: the user chose a platform that needs no desktop
    if environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY"):
        return None
    return "there is no display to open the window on: neither DISPLAY nor WAYLAND_DISPLAY is set"


def open_log(log_dir: Path) -> TextIO:
    """The app's log file, appended to; the previous one is kept once it grows past LOG_BYTES."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / LOG_FILE
    if path.is_file() and path.stat().st_size > LOG_BYTES:
        path.replace(path.with_name(LOG_FILE + ".1"))
    # Line-buffered, so that a crash still leaves everything printed before it in the file.
    return open(path, "a", encoding="utf-8", buffering=1)


def prepare_process() -> None:
    """Run first thing in main(): every run logs to the user's log folder; a frozen one needs more."""
    # Must come before anything else: in a spawned child it runs the child's work and exits.
    multiprocessing.freeze_support()
    if is_frozen():
        home = hub_home(dict(os.environ), Path.home() / ".cache" / "huggingface", user_cache_dir())
        if home is not None:
            os.environ["HF_HOME"] = home
    try:
        log = open_log(user_log_dir())
    except OSError:
        # A read-only or full home must not stop the app; a terminal, if any, still shows everything.
        return
    if sys.stdout is None:
        sys.stdout = log
    if sys.stderr is None:
        sys.stderr = log
    start_logging(log)


def start_logging(log: TextIO) -> None:
    """Send warnings (and the app's own notes) to the log file, as well as wherever they go already.

    Warnings are kept even when a terminal shows them too: a desktop launch has nobody watching.
    """
    from app import __version__

    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "frankenmoe_log", False):
            root.removeHandler(handler)  # a second start in one process (tests) replaces the first
            handler.close()
    handler = logging.StreamHandler(log)
    handler.frankenmoe_log = True  # type: ignore[attr-defined]
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root.addHandler(handler)
    # Other libraries' notes stay out (the root logger passes warnings only); the app's own come in.
    app_logger = logging.getLogger(LOGGER_NAME)
    app_logger.setLevel(logging.INFO)
    how = "bundle" if is_frozen() else "source"
    app_logger.info("FrankenMoE Studio %s started (%s, Python %s)", __version__, how, sys.version.split()[0])
