"""Start-up from source: the log file the README promises, a clear refusal without a display, and a quick exit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import startup

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(REPO)},
    )


def clean_env(home: Path) -> dict[str, str]:
    drop = ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM", "XDG_STATE_HOME", "LOCALAPPDATA")
    env = {key: value for key, value in os.environ.items() if key not in drop}
    return {**env, "HOME": str(home)}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux log folder")
def test_a_source_run_writes_its_log_where_the_readme_says(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "app", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean_env(tmp_path), "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    log = tmp_path / ".local" / "state" / "frankenmoe" / "log" / "frankenmoe.log"
    assert "frankenmoe INFO: FrankenMoE Studio" in log.read_text(encoding="utf-8")
    assert "started (source, Python" in log.read_text(encoding="utf-8")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_STATE_HOME is the Linux convention")
def test_library_warnings_and_app_notes_reach_the_log_but_library_chatter_does_not(tmp_path):
    code = (
        "import logging\n"
        "from app.startup import prepare_process\n"
        "prepare_process()\n"
        "logging.getLogger('transformers.modeling_utils').warning('a library warning')\n"
        "logging.getLogger('httpx').info('a library chatter line')\n"
        "logging.getLogger('frankenmoe.gui').info('Demo: finished')\n"
    )
    result = run_python(code, {**clean_env(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "state")})
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "state" / "frankenmoe" / "log" / "frankenmoe.log").read_text(encoding="utf-8")
    assert "transformers.modeling_utils WARNING: a library warning" in text
    assert "frankenmoe.gui INFO: Demo: finished" in text
    assert "chatter" not in text
    assert not (tmp_path / "home").exists()


def test_an_unwritable_log_folder_does_not_stop_the_app(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the folder should be")
    code = "import app.__main__ as entry, sys\nsys.exit(entry.main(['--version']))"
    result = run_python(code, {**clean_env(tmp_path), "XDG_STATE_HOME": str(blocker)})
    assert result.returncode == 0, result.stderr
    assert "FrankenMoE Studio" in result.stdout


@pytest.mark.parametrize(
    ("environ", "platform", "missing"),
    [
        ({}, "linux", True),
        ({"DISPLAY": ":0"}, "linux", False),
        ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", False),
        ({"QT_QPA_PLATFORM": "offscreen"}, "linux", False),
        ({"QT_QPA_PLATFORM": "xcb"}, "linux", True),
        ({"QT_QPA_PLATFORM": "wayland;xcb"}, "linux", True),
        ({"DISPLAY": ""}, "linux", True),
        ({}, "darwin", False),
        ({}, "win32", False),
    ],
)
def test_missing_display(environ, platform, missing):
    assert (startup.missing_display(environ, platform) is not None) == missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux can lack a display")
@pytest.mark.parametrize("args", [[], ["--demo"]])
def test_without_a_display_the_window_is_refused_before_qt_with_the_cli_named(tmp_path, args):
    code = (
        "import sys\n"
        "import app.__main__ as entry\n"
        f"code = entry.main({args!r})\n"
        "print('qt loaded' if any(name.startswith('PySide6') for name in sys.modules) else 'qt untouched')\n"
        "sys.exit(code)\n"
    )
    result = run_python(code, clean_env(tmp_path))
    assert result.returncode == 1
    assert result.stdout.strip() == "qt untouched"
    assert result.stderr.splitlines() == [
        "error: there is no display to open the window on: neither DISPLAY nor WAYLAND_DISPLAY is set.",
        "fix: start it in a desktop session (or with ssh -X), or use the command line instead: "
        "frankenmoe --help lists its commands.",
    ]


# Loaded at start-up from PYTHONPATH, this registers the first atexit handler, which runs last: after
# the command and every other handler, right before the interpreter's shutdown collects whatever is
# not frozen.
EXIT_PROBE = "import atexit, gc\natexit.register(lambda: print('frozen at exit:', gc.get_freeze_count()))\n"


@pytest.mark.parametrize("entry", ["frankenmoe script", "python -m app"])
def test_a_command_leaves_its_objects_to_the_os_at_exit(entry, llama_donors, tmp_path):
    # Collecting them all again while Python shuts down took 0.5 s with torch loaded (bench/cli_exit.py).
    if entry == "frankenmoe script":
        script = Path(sys.executable).parent / ("frankenmoe.exe" if sys.platform == "win32" else "frankenmoe")
        if not script.exists():
            pytest.skip("the frankenmoe script is not installed beside this Python (pip install -e .)")
        command = [str(script)]
    else:
        command = [sys.executable, "-m", "app"]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(
        f"base_model: {llama_donors['base']}\nexperts:\n"
        f"  - source_model: {llama_donors['expert0']}\n    positive_prompts: ['What is 12 plus 30?']\n"
        f"  - source_model: {llama_donors['expert1']}\n    positive_prompts: ['def add(a, b): return a + b']\n"
    )
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(EXIT_PROBE)
    result = subprocess.run(
        [*command, "check", str(recipe), "--no-gates"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean_env(tmp_path / "home"), "PYTHONPATH": f"{probe}{os.pathsep}{REPO}"},
    )
    assert result.returncode == 0, result.stderr
    assert "recipe OK: 2 experts" in result.stdout
    frozen = int(result.stdout.rsplit("frozen at exit:", 1)[1])
    assert frozen > 1000  # the app's modules and objects at least
