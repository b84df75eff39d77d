"""Work folders of killed merges: removed once their process is gone, not when its pid is merely reused."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from app.core.merge.leftovers import (
    LEFTOVERS_STAGE,
    PARTIAL_MARK,
    REPLACED_MARK,
    clean_leftovers_job,
    record_output_folder,
    recorded_output_folders,
    work_folder,
)
from app.core.progress import format_bytes, run_job


@pytest.fixture
def exited_pid() -> int:
    """The pid of a process that has run and exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert not psutil.pid_exists(process.pid)
    return process.pid


@pytest.fixture
def running() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield process
    process.kill()
    process.wait()


def start_ms(pid: int) -> int:
    return int(psutil.Process(pid).create_time() * 1000)


def work(folder: Path, target: str, mark: str, owner: str, payload: int = 1000) -> Path:
    path = folder / f".{target}{mark}{owner}"
    path.mkdir(parents=True)
    (path / "model-00001-of-00002.safetensors").write_bytes(b"\0" * payload)
    (path / "config.json").write_text("{}")
    return path


def test_at_start_the_recorded_folders_lose_the_partial_folders_of_exited_processes(tmp_path, exited_pid, monkeypatch):
    monkeypatch.setenv("FRANKENMOE_STATE_DIR", str(tmp_path / "state"))
    models = tmp_path / "models"
    dead = work(models, "moe", PARTIAL_MARK, f"{exited_pid}-1700000000000-0a1b2c3d", payload=5000)
    old_style = work(models, "other-moe", PARTIAL_MARK, f"{exited_pid}-deadbeef", payload=3000)
    record_output_folder(models)
    assert recorded_output_folders()[0] == models
    records = []
    cleanup = run_job(clean_leftovers_job(), records.append)
    assert not dead.exists() and not old_style.exists()
    assert cleanup.bytes_freed == 5000 + 3000 + 2 * len("{}")
    assert [(r.stage, r.bytes_done) for r in records] == [(LEFTOVERS_STAGE, cleanup.bytes_freed)]
    assert f"freed {format_bytes(cleanup.bytes_freed)}" in records[0].message
    assert "removed 2 unfinished merge folder(s)" in records[0].message
    # Nothing left: nothing to say.
    records.clear()
    assert not run_job(clean_leftovers_job(), records.append).anything
    assert records == []


def test_a_running_owner_keeps_its_folder_and_a_reused_pid_does_not(tmp_path, running):
    pid = running.pid
    live = work(tmp_path, "moe", PARTIAL_MARK, f"{pid}-{start_ms(pid)}-00000001")
    # The same pid with another start time: the pid was reused by an unrelated process since.
    reused = work(tmp_path, "moe", PARTIAL_MARK, f"{pid}-{start_ms(pid) - 60_000}-00000002")
    mine = work_folder(tmp_path / "moe", PARTIAL_MARK)
    mine.mkdir()
    cleanup = run_job(clean_leftovers_job([tmp_path]))
    assert cleanup.removed == (reused,)
    assert live.is_dir() and mine.is_dir()
    running.kill()
    running.wait()
    assert run_job(clean_leftovers_job([tmp_path])).removed == (live,)
    assert mine.is_dir()  # this process still runs


def test_a_model_a_killed_overwrite_set_aside_is_put_back(tmp_path, exited_pid):
    set_aside = work(tmp_path, "moe", REPLACED_MARK, f"{exited_pid}-1700000000000-0a1b2c3d")
    cleanup = run_job(clean_leftovers_job([tmp_path]))
    assert cleanup.restored == (tmp_path / "moe",)
    assert (tmp_path / "moe" / "config.json").is_file() and not set_aside.exists()


def test_folders_that_only_look_alike_are_left_alone(tmp_path, exited_pid):
    keep = [
        tmp_path / f"moe{PARTIAL_MARK}{exited_pid}-0a1b2c3d",  # not hidden: not ours
        tmp_path / f".moe{PARTIAL_MARK}someone-0a1b2c3d",  # no pid
        tmp_path / "notes",
    ]
    for path in keep:
        path.mkdir()
    assert not run_job(clean_leftovers_job([tmp_path, tmp_path / "does-not-exist"])).anything
    assert all(path.is_dir() for path in keep)
