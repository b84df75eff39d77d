"""A plain `pip install .` (a wheel, not editable) carries resources/ and gives a working app."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Build outputs and environments that are no part of the source a wheel is built from.
NOT_SOURCE_NAMES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "_resources"
)
# Ignored folders of this checkout's own: the benches' models (many GB on a developer's machine) and screenshots.
NOT_SOURCE_FOLDERS = {REPO / "bench": {"out"}, REPO / "tests": {"screenshots"}}


def not_source(folder: str, names: list[str]) -> set[str]:
    return set(NOT_SOURCE_NAMES(folder, names)) | (NOT_SOURCE_FOLDERS.get(Path(folder), set()) & set(names))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout (the build writes build/ and egg-info beside the sources)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=not_source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", str(source)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    [built] = root.glob("frankenmoe_studio-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_carries_every_resource(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    resources = [path.relative_to(REPO / "resources").as_posix() for path in (REPO / "resources").rglob("*")]
    files = [name for name in resources if (REPO / "resources" / name).is_file()]
    assert files
    missing = [name for name in files if f"app/_resources/{name}" not in names]
    assert not missing


@pytest.mark.slow
def test_an_installed_wheel_finds_its_icons_and_passes_the_window_check(wheel, tmp_path):
    """Installed into a fresh venv; only its libraries (torch, Qt, ...) come from this environment's site-packages."""
    # Without PYTHONPATH: a checkout on it (with its egg-info) would pass for the installed app.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120, env=env)
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert install.returncode == 0, install.stderr
    fresh_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout.strip()
    )
    # Appended after the venv's own site-packages, so `app` is the installed wheel's, not the checkout's.
    (fresh_site / "libraries.pth").write_text(sysconfig.get_path("purelib") + "\n")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import app, app.resources as resources\n"
        "from app.selftest import open_main_window\n"
        "print(Path(app.__file__).parent)\n"
        "print(resources.resource_path('icons/frankenmoe-64.png').is_file())\n"
        "print(open_main_window(Path(sys.argv[1]) / 'cache', Path(sys.argv[1]) / 'settings'))\n"
    )
    result = subprocess.run(
        [str(python), "-c", code, str(tmp_path)],
        cwd=tmp_path,
        env={**env, "QT_QPA_PLATFORM": "offscreen", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    package, icon_found, window = result.stdout.splitlines()
    assert Path(package) == fresh_site / "app"
    assert icon_found == "True"
    assert window == "'FrankenMoE Studio' on the offscreen platform"
