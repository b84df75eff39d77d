"""The self-test (`frankenmoe --self-test`), frozen-app start-up, and resources found from source."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

import app.__main__ as entry
import app.selftest as selftest
from app import resources, startup

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_self_test_passes_offline_in_a_fresh_process(tmp_path):
    """The whole self-test, as a user or a packaging check runs it: every step reports ok."""
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CACHE_HOME": "", "XDG_CONFIG_HOME": ""}
    env.pop("QT_QPA_PLATFORM", None)  # the self-test chooses offscreen itself
    result = subprocess.run(
        [sys.executable, "-m", "app", "--self-test"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for step in ("imports", "accelerator", "build tiny models", "merge", "generate with routing", "main window"):
        assert any(line.startswith(f"ok  {step} ") for line in lines), result.stdout
    assert "offscreen platform" in result.stdout
    assert lines[-1].startswith("self-test passed in ")
    assert "propagateSizeHints" not in result.stdout + result.stderr  # Qt's offscreen chatter stays out
    assert not list(tmp_path.rglob("*.ini")), "the self-test wrote settings into the user's home"


def test_the_window_step_prints_no_stray_qt_warning(tmp_path):
    """Qt's offscreen plugin warns about size hints; the self-test's report must not be interleaved with it."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from app.selftest import open_main_window\n"
        f"print(open_main_window(Path({str(tmp_path / 'cache')!r}), Path({str(tmp_path / 'settings')!r})))\n"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": str(REPO), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "'FrankenMoE Studio' on the offscreen platform"
    assert result.stderr == ""


def test_a_failing_step_stops_the_self_test_with_its_traceback(monkeypatch):
    def broken() -> str:
        raise RuntimeError("no tokenizers here")

    monkeypatch.setattr(selftest, "check_imports", broken)
    out = io.StringIO()
    assert selftest.run_self_test(out) == 1
    report = out.getvalue()
    assert "FAIL imports" in report and "RuntimeError: no tokenizers here" in report
    assert "ok  " not in report


def test_main_dispatches_the_self_test_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))  # main() logs; not into the user's log
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path))
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    monkeypatch.setattr(selftest, "run_self_test", lambda: 7)
    handlers = list(startup.logging.getLogger().handlers)
    try:
        assert entry.main(["--self-test"]) == 7
    finally:
        for handler in startup.logging.getLogger().handlers:
            if handler not in handlers:
                startup.logging.getLogger().removeHandler(handler)
                handler.close()


def test_resources_come_from_the_repository_from_source_and_from_meipass_when_frozen(monkeypatch, tmp_path):
    assert resources.resource_path("icons/frankenmoe.svg") == REPO / "resources" / "icons" / "frankenmoe.svg"
    assert resources.resource_path("icons/frankenmoe.svg").is_file()
    sizes = [int(path.stem.rsplit("-", 1)[1]) for path in resources.icon_paths()]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[-1] == 512
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    assert resources.resource_path("icons/x.png") == tmp_path / "resources" / "icons" / "x.png"


def test_hub_cache_keeps_explicit_settings_and_an_existing_default_cache(tmp_path):
    existing = tmp_path / "home-cache" / "huggingface"
    missing = tmp_path / "nowhere"
    cache = tmp_path / "platform-cache"
    assert startup.hub_home({"HF_HOME": "/x"}, missing, cache) is None
    assert startup.hub_home({"HF_HUB_CACHE": "/x"}, missing, cache) is None
    existing.mkdir(parents=True)
    assert startup.hub_home({}, existing, cache) is None
    assert startup.hub_home({}, missing, cache) == str(cache / "huggingface")


@pytest.mark.parametrize(
    ("platform", "log_tail", "cache_tail"),
    [
        ("linux", (".local", "state", "frankenmoe", "log"), (".cache",)),
        ("darwin", ("Library", "Logs", "FrankenMoE Studio"), ("Library", "Caches")),
        ("win32", ("AppData", "Local", "FrankenMoE Studio", "Logs"), ("AppData", "Local")),
    ],
)
def test_user_folders_follow_each_platforms_convention(monkeypatch, tmp_path, platform, log_tail, cache_tail):
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    for variable in ("XDG_STATE_HOME", "XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(variable, raising=False)
    assert startup.user_log_dir() == tmp_path.joinpath(*log_tail)
    assert startup.user_cache_dir() == tmp_path.joinpath(*cache_tail)


def test_frozen_windowed_start_sends_missing_streams_to_the_log(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "stdout", None)
    monkeypatch.setattr(sys, "stderr", None)
    monkeypatch.setattr(startup, "user_log_dir", lambda: tmp_path / "logs")
    monkeypatch.setattr(startup, "user_cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    handlers = list(startup.logging.getLogger().handlers)
    try:
        startup.prepare_process()
        assert os.environ["HF_HOME"] == str(tmp_path / "cache" / "huggingface")
        print("a progress line")
        startup.logging.getLogger("frankenmoe.test").warning("a warning")
        log = sys.stdout
        assert sys.stderr is log
    finally:
        os.environ.pop("HF_HOME", None)
        for handler in startup.logging.getLogger().handlers:
            if handler not in handlers:
                startup.logging.getLogger().removeHandler(handler)
    log.close()
    text = (tmp_path / "logs" / "frankenmoe.log").read_text(encoding="utf-8")
    assert "a progress line" in text and "WARNING: a warning" in text


def test_log_is_rotated_once_it_is_large(tmp_path):
    (tmp_path / "frankenmoe.log").write_text("x" * (startup.LOG_BYTES + 1), encoding="utf-8")
    with startup.open_log(tmp_path) as log:
        log.write("fresh\n")
    assert (tmp_path / "frankenmoe.log").read_text(encoding="utf-8") == "fresh\n"
    assert (tmp_path / "frankenmoe.log.1").stat().st_size == startup.LOG_BYTES + 1
