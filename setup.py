"""Only to ship resources/ (the icons) inside the wheel; everything else is in pyproject.toml.

The folder stays at the repository root, where the installers' scripts and PyInstaller spec take
it from; a wheel gets a copy as app/_resources, where app.resources.resource_path looks first.
An editable install needs no copy: it runs from the checkout.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

RESOURCES = Path(__file__).resolve().parent / "resources"


class BuildPyWithResources(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            shutil.copytree(RESOURCES, Path(self.build_lib) / "app" / "_resources", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithResources})
