"""Files shipped beside the code (icons), found the same way from a source checkout, a wheel and a bundle.

From source (or an editable install) they are in ``resources/`` at the repository root; a wheel
(``pip install .``) carries a copy as ``app/_resources`` (setup.py copies it there); in a
PyInstaller bundle the spec copies that folder to ``resources/`` under ``sys._MEIPASS``, the
bundle's data folder.
"""

from __future__ import annotations

import sys
from pathlib import Path


def resources_dir() -> Path:
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        return Path(bundle) / "resources"
    package = Path(__file__).resolve().parent
    installed = package / "_resources"
    return installed if installed.is_dir() else package.parent / "resources"


def resource_path(name: str) -> Path:
    """The path of resources/NAME, e.g. ``resource_path("icons/frankenmoe-64.png")``; it may not exist."""
    return resources_dir() / name


def icon_paths() -> list[Path]:
    """The app icon's PNG renderings, smallest first."""
    return sorted(resources_dir().glob("icons/frankenmoe-*.png"), key=lambda path: int(path.stem.rsplit("-", 1)[1]))
