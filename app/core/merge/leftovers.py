"""What killed merges leave behind, and removing it once the process that made it no longer runs.

A merge writes into a hidden folder beside its target, ``.NAME.frankenmoe-partial-PID-START-TOKEN``,
and renames the model it replaces to ``.NAME.frankenmoe-replaced-PID-START-TOKEN`` for the moment of
the swap. PID and START (the process's creation time, in milliseconds) name the owner: a PID alone
could have been reused by another process since. A folder whose owner is gone is removed (a replaced
model is put back if its target is missing) by the next merge into any target of the same folder,
and at the app's start for the folders recent merges wrote into, which a small record remembers.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.core.progress import Job, Progress, format_bytes

PARTIAL_MARK = ".frankenmoe-partial-"
REPLACED_MARK = ".frankenmoe-replaced-"
LEFTOVERS_STAGE = "leftovers"
STATE_DIR_ENV = "FRANKENMOE_STATE_DIR"
RECORD_FILE = "output-folders.json"
MAX_RECORDED_FOLDERS = 16
# psutil reads creation times in clock ticks; the same process gives the same value, this is slack.
START_TOLERANCE_MS = 20


@dataclass(frozen=True, slots=True)
class Owner:
    pid: int
    start_ms: int | None  # None in folders named by versions that recorded the pid only


@dataclass(frozen=True, slots=True)
class Cleanup:
    removed: tuple[Path, ...] = ()
    restored: tuple[Path, ...] = ()  # models a killed overwrite had set aside, put back in place
    bytes_freed: int = 0

    def __add__(self, other: Cleanup) -> Cleanup:
        return Cleanup(
            self.removed + other.removed, self.restored + other.restored, self.bytes_freed + other.bytes_freed
        )

    @property
    def anything(self) -> bool:
        return bool(self.removed or self.restored)

    def describe(self) -> str:
        parts = []
        if self.removed:
            folders = sorted({str(path.parent) for path in self.removed})
            parts.append(
                f"freed {format_bytes(self.bytes_freed)}: removed {len(self.removed)} unfinished merge folder(s) "
                f"left by stopped merges in {', '.join(folders)}"
            )
        if self.restored:
            restored = ", ".join(str(path) for path in self.restored)
            parts.append(f"put back {restored}, which a stopped merge was replacing")
        return "; ".join(parts)


def _process_start_ms(pid: int) -> int | None:
    """When the process started, in ms since the epoch; None if it does not run (or is a zombie)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return int(process.create_time() * 1000)
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return -1  # it runs, but whose it is cannot be told: taken as the owner, to be safe


def this_process() -> Owner:
    start = _process_start_ms(os.getpid())
    return Owner(os.getpid(), start if start is not None and start >= 0 else None)


def owner_alive(owner: Owner) -> bool:
    start = _process_start_ms(owner.pid)
    if start is None:
        return False
    if start < 0 or owner.start_ms is None:
        return True
    # The pid runs, but a process started at another time is not the one that made the folder.
    return abs(start - owner.start_ms) <= START_TOLERANCE_MS


def work_folder(out_dir: Path, mark: str) -> Path:
    """A new hidden folder name beside out_dir, owned by this process."""
    owner = this_process()
    start = owner.start_ms if owner.start_ms is not None else 0
    return out_dir.parent / f".{out_dir.name}{mark}{owner.pid}-{start}-{secrets.token_hex(4)}"


def _parse(name: str, mark: str) -> tuple[str, Owner] | None:
    """(target name, owner) of a hidden work folder's name, or None if it is not one."""
    if not name.startswith(".") or mark not in name:
        return None
    target, _, rest = name[1:].rpartition(mark)
    fields = rest.split("-")
    if not target or not fields[0].isdigit():
        return None
    if len(fields) == 3 and fields[1].isdigit():
        start = int(fields[1])
        return target, Owner(int(fields[0]), start or None)
    return target, Owner(int(fields[0]), None)


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for file in files:
            try:
                total += os.lstat(os.path.join(root, file)).st_size
            except OSError:
                continue
    return total


def clean_folder(folder: Path) -> Cleanup:
    """Remove the work folders in folder whose owner process no longer runs; put back models they set aside."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return Cleanup()
    cleanup = Cleanup()
    for path in entries:
        partial = _parse(path.name, PARTIAL_MARK)
        if partial is not None and not owner_alive(partial[1]):
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                cleanup += Cleanup(removed=(path,), bytes_freed=size)
    for path in entries:
        replaced = _parse(path.name, REPLACED_MARK)
        if replaced is None or owner_alive(replaced[1]):
            continue
        target = folder / replaced[0]
        if target.exists() or target.is_symlink():
            size = _size(path)
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                cleanup += Cleanup(removed=(path,), bytes_freed=size)
        else:
            path.rename(target)
            cleanup += Cleanup(restored=(target,))
    return cleanup


def clean_folders(folders: Iterable[Path]) -> Cleanup:
    cleanup = Cleanup()
    for folder in dict.fromkeys(Path(f) for f in folders):
        cleanup += clean_folder(folder)
    return cleanup


def clean_leftovers_job(folders: Sequence[Path] | None = None) -> Job[Cleanup]:
    """Clean the given folders (by default those recent merges wrote into); reports what was freed."""
    cleanup = clean_folders(recorded_output_folders() if folders is None else folders)
    if cleanup.anything:
        yield Progress(LEFTOVERS_STAGE, 1, 1, bytes_done=cleanup.bytes_freed, message=cleanup.describe())
    return cleanup


# --------------------------------------------------------------------------- the record of output folders


def state_dir() -> Path:
    """The app's per-user state folder (FRANKENMOE_STATE_DIR overrides it)."""
    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV])
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local") / "FrankenMoE Studio"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "FrankenMoE Studio"
    return Path(os.environ.get("XDG_STATE_HOME") or home / ".local" / "state") / "frankenmoe"


def recorded_output_folders() -> list[Path]:
    """The folders recent merges wrote into, most recent first."""
    try:
        data = json.loads((state_dir() / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [Path(item) for item in data if isinstance(item, str)] if isinstance(data, list) else []


def record_output_folder(folder: Path) -> None:
    """Remember a folder a merge writes into, so that the app's next start can clean up after it.

    Best effort: a state folder that cannot be written costs only the cleanup at start.
    """
    folders = [str(folder), *(str(f) for f in recorded_output_folders() if f != folder)][:MAX_RECORDED_FOLDERS]
    record = state_dir() / RECORD_FILE
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        temporary = record.with_name(f".{record.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(folders, indent=1), encoding="utf-8")
        os.replace(temporary, record)
    except OSError:
        return
