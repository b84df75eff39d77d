"""packaging/choose_torch.py: which torch build `make run` and `make test` install, checked not assumed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "packaging" / "choose_torch.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("choose_torch", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["choose_torch"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


choose_torch = load_script()


def fake_nvidia_smi(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    program = folder / "nvidia-smi"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    return folder


def run_script(*args: str, path: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "TORCH_INDEX_URL"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "PATH": path, **(extra_env or {})},
    )


def test_the_driver_is_found_through_nvidia_smi_or_proc(tmp_path):
    missing_proc = tmp_path / "no-proc-file"
    assert not choose_torch.has_nvidia_driver(str(tmp_path), missing_proc)
    assert choose_torch.has_nvidia_driver(str(fake_nvidia_smi(tmp_path / "bin")), missing_proc)
    proc_file = tmp_path / "version"
    proc_file.write_text("NVRM version: 550\n")
    assert choose_torch.has_nvidia_driver(str(tmp_path), proc_file)


@pytest.mark.parametrize(
    ("platform", "driver", "cpu_only", "build", "index"),
    [
        ("linux", False, False, "cpu", choose_torch.CPU_INDEX_URL),
        ("linux", True, False, "cuda", None),
        ("linux", True, True, "cpu", choose_torch.CPU_INDEX_URL),
        ("win32", False, False, "cpu", choose_torch.CPU_INDEX_URL),
        ("darwin", False, False, "any", None),
        ("darwin", False, True, "any", None),
    ],
)
def test_choice_follows_the_machine(platform, driver, cpu_only, build, index):
    choice = choose_torch.choose(platform, driver, cpu_only, None)
    assert (choice.build, choice.index_url) == (build, index)
    assert choice.reason


def test_an_index_url_from_the_environment_wins():
    choice = choose_torch.choose("linux", False, True, "https://download.pytorch.org/whl/rocm6.4")
    assert (choice.build, choice.index_url) == ("any", "https://download.pytorch.org/whl/rocm6.4")


def test_a_cuda_build_is_replaced_where_the_cpu_build_is_wanted():
    cpu = choose_torch.choose("linux", False, False, None)
    commands = choose_torch.pip_commands("torch==2.13.0", cpu, ("2.13.0", "cuda"))
    assert [command[3] for command in commands] == ["uninstall", "install"]
    assert commands[1][-3:] == ["--index-url", choose_torch.CPU_INDEX_URL, "torch==2.13.0"]
    # Only torch from that index, with one retry: an unreachable index must not cost minutes.
    assert commands[1][4:8] == ["--quiet", "--no-deps", "--retries", "1"]
    assert choose_torch.pip_commands("torch==2.13.0", cpu, ("2.13.0+cpu", "cpu")) == []
    assert choose_torch.pip_commands("torch", cpu, ("2.14.1+cpu", "cpu")) == []
    # Another version of the right build: pip changes it, nothing is uninstalled first.
    [install] = choose_torch.pip_commands("torch==2.13.0", cpu, ("2.14.1+cpu", "cpu"))
    assert install[3] == "install"


def test_without_a_driver_the_script_keeps_this_cpu_build_and_says_so(tmp_path):
    installed = choose_torch.installed_build()
    if installed is None or installed[1] != "cpu" or Path("/proc/driver/nvidia/version").exists():
        pytest.skip("needs the CPU build of torch and no NVIDIA driver")
    result = run_script(f"torch=={installed[0].partition('+')[0]}", path=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "the CPU build: no NVIDIA driver here" in result.stderr
    assert "nothing to install" in result.stderr
    assert result.stdout == ""
    other = run_script("torch==2.4.0", path=str(tmp_path))
    assert other.stdout.split()[-3:] == ["--index-url", choose_torch.CPU_INDEX_URL, "torch==2.4.0"]


def test_with_a_driver_the_cpu_build_makes_way_for_the_cuda_build(tmp_path):
    installed = choose_torch.installed_build()
    if installed is None or installed[1] != "cpu" or sys.platform != "linux":
        pytest.skip("needs the CPU build of torch on Linux")
    result = run_script("torch", path=str(fake_nvidia_smi(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "the CUDA build: an NVIDIA driver is installed" in result.stderr
    uninstall, install = result.stdout.splitlines()
    assert uninstall.endswith("-m pip uninstall --yes --quiet torch")
    assert install.endswith("-m pip install --quiet torch")
    # make test wants the CPU build even here, and already has it.
    test_run = run_script("--cpu", f"torch=={installed[0].partition('+')[0]}", path=str(tmp_path))
    assert "nothing to install" in test_run.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_checks_torch_before_running_or_testing(tmp_path):
    def dry_run(target: str) -> list[str]:
        result = subprocess.run(
            ["make", "-n", "--no-print-directory", "-C", str(REPO), target, f"VENV={tmp_path / 'venv'}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return [" ".join(line.split()) for line in result.stdout.splitlines()]

    venv_python = f"{tmp_path / 'venv'}/bin/python"
    test_lines = dry_run("test")
    chooser = f'{venv_python} packaging/choose_torch.py --cpu "torch==2.13.0"'
    # Before the app is installed (so pip does not pull PyPI's torch) and again before the tests run,
    # because the stamp may come from `make run`.
    assert test_lines.count(chooser) == 2
    assert test_lines.index(chooser) < next(i for i, line in enumerate(test_lines) if "pip install --quiet -e" in line)
    assert test_lines[-3] == chooser and "pytest" in test_lines[-1]
    run_lines = dry_run("run")
    assert run_lines.count(f'{venv_python} packaging/choose_torch.py "torch"') == 2
    assert not any("--cpu" in line for line in run_lines)
