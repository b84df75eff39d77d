"""Install the torch build that suits this machine into the running Python (the Makefile's venv).

PyPI's Linux torch wheel is the CUDA build (several GB with its NVIDIA libraries), which is wasted
on a machine without an NVIDIA GPU. So:

- macOS: PyPI's wheel (CPU and Apple's MPS; there is no other build);
- Linux or Windows without an NVIDIA driver (no ``nvidia-smi`` on PATH, no /proc/driver/nvidia):
  the CPU build, from PyTorch's CPU index;
- Linux or Windows with an NVIDIA driver: PyPI's wheel (the CUDA build on Linux);
- ``--cpu`` (``make test``): the CPU build everywhere, so that the suite runs the same on every machine.

The torch already installed is checked, not assumed: a build of the wrong kind (a CUDA build where
the CPU one is wanted, or the other way round) is replaced, and a version outside SPEC is changed by
pip. ``TORCH_INDEX_URL`` overrides the index (e.g. a ROCm one); then any build from it is accepted.
Says what it chose on stderr. ``--dry-run`` prints the pip commands instead of running them.

Usage: python packaging/choose_torch.py [--cpu] [--dry-run] [SPEC]   (SPEC: torch, torch==2.13.0, ...)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
NVIDIA_PROC_FILE = Path("/proc/driver/nvidia/version")


@dataclass(frozen=True)
class Choice:
    build: str  # "cpu", "cuda" or "any" (macOS, or an index chosen by TORCH_INDEX_URL)
    index_url: str | None  # None: the configured indexes (PyPI)
    reason: str


def has_nvidia_driver(path: str | None, proc_file: Path = NVIDIA_PROC_FILE) -> bool:
    return shutil.which("nvidia-smi", path=path) is not None or proc_file.exists()


def choose(platform: str, nvidia_driver: bool, cpu_only: bool, index_override: str | None) -> Choice:
    if index_override:
        return Choice("any", index_override, f"the index in TORCH_INDEX_URL ({index_override})")
    if platform == "darwin":
        return Choice("any", None, "PyPI's build for macOS (CPU and Apple's MPS)")
    if cpu_only:
        return Choice("cpu", CPU_INDEX_URL, "the CPU build, which make test uses on every machine")
    if not nvidia_driver:
        return Choice("cpu", CPU_INDEX_URL, "the CPU build: no NVIDIA driver here (no nvidia-smi on PATH)")
    if platform == "win32":
        return Choice(
            "any",
            None,
            "PyPI's build; it is CPU-only on Windows: for CUDA, see https://pytorch.org/get-started/locally/",
        )
    return Choice("cuda", None, "the CUDA build: an NVIDIA driver is installed")


def installed_build() -> tuple[str, str] | None:
    """(version, "cpu" or "cuda") of the torch installed in this Python, without importing it."""
    try:
        distribution = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return None
    version = distribution.version
    local = version.partition("+")[2]
    requires = distribution.requires or []
    cuda = local.startswith("cu") or any(requirement.startswith("nvidia-") for requirement in requires)
    return version, "cuda" if cuda else "cpu"


def clearly_satisfies(spec: str, version: str) -> bool:
    """Whether the installed version surely meets spec, judged without pip (which takes seconds to start)."""
    name, pinned, wanted = spec.replace(" ", "").partition("==")
    return name == "torch" and (not pinned or version.partition("+")[0] == wanted)


def pip_commands(spec: str, choice: Choice, installed: tuple[str, str] | None) -> list[list[str]]:
    """What to run so that torch is of the chosen build and meets spec; nothing when it already is."""
    pip = [sys.executable, "-m", "pip"]
    right_build = installed is not None and choice.build in ("any", installed[1])
    if right_build and installed is not None and clearly_satisfies(spec, installed[0]):
        return []
    commands = []
    if installed is not None and not right_build:
        commands.append([*pip, "uninstall", "--yes", "--quiet", "torch"])
    index = ["--index-url", choice.index_url] if choice.index_url else []
    # Only torch comes from its index; its dependencies come with the app's, from PyPI. Without an
    # index change, a torch that already satisfies spec makes this a no-op that needs no network.
    # One retry, not pip's five: where PyTorch's index cannot be reached but a local wheel or mirror
    # holds torch (find-links in pip.conf), five backed-off retries cost minutes before pip uses it.
    only_torch = ["--no-deps", "--retries", "1"] if index else []
    commands.append([*pip, "install", "--quiet", *only_torch, *index, spec])
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", nargs="?", default="torch", help="pip requirement, e.g. torch or torch==2.13.0")
    parser.add_argument("--cpu", action="store_true", help="the CPU build whatever the machine has")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands instead of running them")
    args = parser.parse_args(argv)

    choice = choose(
        sys.platform, has_nvidia_driver(os.environ.get("PATH")), args.cpu, os.environ.get("TORCH_INDEX_URL")
    )
    installed = installed_build()
    now = f"; installed: torch {installed[0]} ({installed[1]} build)" if installed else ""
    print(f"torch: {args.spec}, {choice.reason}{now}", file=sys.stderr)
    commands = pip_commands(args.spec, choice, installed)
    if not commands:
        print("torch: nothing to install", file=sys.stderr)
    for command in commands:
        if args.dry_run:
            print(shlex.join(command))
        else:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
