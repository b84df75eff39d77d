"""Fast checks of packaging/: what CI can verify without building the 700 MB bundle.

The full build, install and self-test is packaging/linux/check.sh (about 15 minutes; see README).
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import re
import shutil
import struct
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
SHELL_SCRIPTS = sorted(PACKAGING.rglob("*.sh"))


class Recorder:
    """Stands in for PyInstaller's build targets (Analysis, EXE, ...), keeping their arguments."""

    made: list[Recorder]

    def __init__(self, kind: str, *args: Any, **kwargs: Any) -> None:
        self.kind, self.args, self.kwargs = kind, args, kwargs
        self.binaries: list[tuple[str, str, str]] = [
            ("torch/lib/libtorch_cpu.so", "", "BINARY"),
            ("torch/bin/torch_shm_manager", "", "BINARY"),
            ("torch/bin/test_api", "", "BINARY"),
            ("torch/lib/libtorchbind_test.so", "", "BINARY"),
            ("nvidia/cudnn/lib/libcudnn.so.9", "", "BINARY"),
            ("PySide6/Qt/plugins/platforms/libqxcb.so", "", "BINARY"),
            ("PySide6/Qt/plugins/platforms/libqeglfs.so", "", "BINARY"),
            ("PySide6/Qt/plugins/platforms/qwindows.dll", "", "BINARY"),
            ("PySide6/Qt/plugins/platformthemes/libqgtk3.so", "", "BINARY"),
            ("libcairo.so.2", "", "BINARY"),
        ]
        self.datas: list[tuple[str, str, str]] = [
            ("resources/icons/frankenmoe-64.png", "", "DATA"),
            ("torch/include/ATen/ATen.h", "", "DATA"),
            ("PySide6/Qt/translations/qt_de.qm", "", "DATA"),
            ("transformers/models/llama/modeling_llama.py", "", "DATA"),
        ]
        self.pure: list[Any] = []
        self.scripts: list[Any] = []


def run_spec(monkeypatch: pytest.MonkeyPatch, platform: str, slim: bool = True) -> list[Recorder]:
    """Execute the spec as PyInstaller would, with its build targets and hook helpers stubbed."""
    made: list[Recorder] = []

    def target(kind: str) -> Any:
        def make(*args: Any, **kwargs: Any) -> Recorder:
            made.append(Recorder(kind, *args, **kwargs))
            return made[-1]

        return make

    hooks = types.ModuleType("PyInstaller.utils.hooks")
    hooks.collect_submodules = lambda package, filter=None: [  # type: ignore[attr-defined]
        name
        for name in (f"{package}", f"{package}.models.llama.modeling_llama", f"{package}.models.bert.modeling_bert")
        if filter is None or filter(name)
    ]
    hooks.copy_metadata = lambda distribution: [(f"{distribution}.dist-info", f"{distribution}.dist-info")]  # type: ignore[attr-defined]
    hooks.collect_data_files = lambda package: [(f"{package}/data.json", package)]  # type: ignore[attr-defined]
    for name in ("PyInstaller", "PyInstaller.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "PyInstaller.utils.hooks", hooks)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the spec puts the repository first
    real_version = importlib.metadata.version
    # Whatever torch the tests run with, the spec sees a CPU build.
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "2.13.0+cpu" if name == "torch" else real_version(name)
    )
    monkeypatch.setenv("FRANKENMOE_SLIM", "1" if slim else "0")
    spec = PACKAGING / "frankenmoe.spec"
    namespace = {
        "SPECPATH": str(PACKAGING),
        "__file__": str(spec),
        **{kind: target(kind) for kind in ("Analysis", "PYZ", "EXE", "COLLECT", "BUNDLE")},
    }
    exec(compile(spec.read_text(encoding="utf-8"), str(spec), "exec"), namespace)
    return made


def by_kind(made: list[Recorder], kind: str) -> list[Recorder]:
    return [target for target in made if target.kind == kind]


def test_spec_runs_and_ships_resources_metadata_and_models(monkeypatch):
    made = run_spec(monkeypatch, "linux")
    (analysis,) = by_kind(made, "Analysis")
    assert analysis.args[0] == [str(REPO / "app" / "__main__.py")]
    datas = analysis.kwargs["datas"]
    assert (str(REPO / "resources"), "resources") in datas
    for distribution in ("torch", "transformers", "tokenizers", "safetensors", "huggingface-hub"):
        assert (f"{distribution}.dist-info", f"{distribution}.dist-info") in datas
    # transformers 5.25 on imports kernels, which reads its own data files.
    kernels_installed = importlib.util.find_spec("kernels") is not None
    assert (("kernels/data.json", "kernels") in datas) is kernels_installed
    hidden = analysis.kwargs["hiddenimports"]
    assert "transformers.models.llama.modeling_llama" in hidden
    assert "transformers.models.bert.modeling_bert" not in hidden  # unsupported families stay out
    excludes = analysis.kwargs["excludes"]
    assert "PySide6.QtQml" in excludes and "transformers.models.bert" in excludes
    assert "transformers.models.llama" not in excludes and "transformers.models.mixtral" not in excludes
    (executable,) = by_kind(made, "EXE")
    assert executable.kwargs["name"] == "frankenmoe" and executable.kwargs["console"] is True
    (folder,) = by_kind(made, "COLLECT")
    assert folder.kwargs["name"] == "frankenmoe-studio"
    assert not by_kind(made, "BUNDLE")


def test_spec_leaves_out_tests_headers_translations_and_cuda_in_a_cpu_build(monkeypatch):
    made = run_spec(monkeypatch, "linux")
    (analysis,) = by_kind(made, "Analysis")
    kept = {entry[0] for entry in analysis.binaries + analysis.datas}
    assert kept == {
        "torch/lib/libtorch_cpu.so",
        "torch/bin/torch_shm_manager",
        "PySide6/Qt/plugins/platforms/libqxcb.so",
        "PySide6/Qt/plugins/platforms/qwindows.dll",
        "resources/icons/frankenmoe-64.png",
        "transformers/models/llama/modeling_llama.py",
    }


def test_unslimmed_spec_keeps_everything(monkeypatch):
    made = run_spec(monkeypatch, "linux", slim=False)
    (analysis,) = by_kind(made, "Analysis")
    assert len(analysis.binaries) == 10 and len(analysis.datas) == 4
    assert "transformers.models.bert.modeling_bert" in analysis.kwargs["hiddenimports"]


def test_spec_ships_every_model_family_the_app_reads_and_writes():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from app.core.families import SUPPORTED_FAMILIES
    from app.core.merge import architectures

    tree = ast.parse((PACKAGING / "frankenmoe.spec").read_text(encoding="utf-8"))
    (kept,) = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "TRANSFORMERS_MODELS" for t in node.targets)
    ]
    outputs = {v.class_name for v in vars(architectures).values() if isinstance(v, architectures.OutputArchitecture)}
    output_types = {model_type for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if name in outputs}
    assert len(output_types) == len(outputs) >= 3
    assert set(SUPPORTED_FAMILIES) | output_types <= set(kept)


@pytest.mark.parametrize("platform", ["win32", "darwin"])
def test_spec_adds_a_windowed_app_on_windows_and_macos(monkeypatch, platform):
    made = run_spec(monkeypatch, platform)
    (folder,) = by_kind(made, "COLLECT")
    executables = [part for part in folder.args if isinstance(part, Recorder) and part.kind == "EXE"]
    # The windowed one first: a macOS .app's main executable.
    names = [(exe.kwargs["name"], exe.kwargs["console"]) for exe in executables]
    assert names == [("FrankenMoE Studio", False), ("frankenmoe", True)]
    bundles = by_kind(made, "BUNDLE")
    assert len(bundles) == (platform == "darwin")
    if platform == "win32":
        assert Path(by_kind(made, "EXE")[0].kwargs["icon"]).is_file()


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: str(path.relative_to(REPO)))
def test_shell_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert script.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n")


def test_linux_build_uses_only_files_that_exist():
    text = (PACKAGING / "linux" / "build.sh").read_text(encoding="utf-8")
    for relative in re.findall(r"\b((?:packaging|resources)/[\w./-]+\.(?:desktop|in|svg|png|spec))\b", text):
        assert (REPO / relative).is_file(), relative


def desktop_entry() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(PACKAGING / "linux" / "frankenmoe-studio.desktop", encoding="utf-8")
    return parser["Desktop Entry"]


def test_desktop_entry_starts_the_installed_command_with_the_installed_icon():
    entry = desktop_entry()
    assert entry["Type"] == "Application"
    assert entry["Exec"].split()[0] == "frankenmoe"  # /usr/bin/frankenmoe, linked by build.sh
    assert entry["Icon"] == "frankenmoe-studio"  # installed as hicolor/*/apps/frankenmoe-studio.png
    assert entry["Terminal"] == "false"
    assert entry["Categories"].endswith(";")
    from app.gui.launch import DESKTOP_FILE

    assert DESKTOP_FILE == "frankenmoe-studio"


@pytest.mark.skipif(shutil.which("desktop-file-validate") is None, reason="desktop-file-utils is not installed")
def test_desktop_entry_validates():
    result = subprocess.run(
        ["desktop-file-validate", str(PACKAGING / "linux" / "frankenmoe-studio.desktop")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_deb_control_declares_what_qts_xcb_plugin_needs():
    control = (PACKAGING / "linux" / "control.in").read_text(encoding="utf-8")
    fields = dict(re.findall(r"^([\w-]+): (.*)$", control, flags=re.MULTILINE))
    assert fields["Package"] == "frankenmoe-studio"
    depends = fields["Depends"]
    for library in ("libxcb-cursor0", "libxkbcommon-x11-0", "libxcb-icccm4", "libegl1", "libfontconfig1"):
        assert library in depends
    build = (PACKAGING / "linux" / "build.sh").read_text(encoding="utf-8")
    for placeholder in set(re.findall(r"@\w+@", control)):
        assert f"s/{placeholder}/" in build, f"build.sh does not fill in {placeholder}"


def test_inno_setup_script_references_existing_files_and_the_spec_outputs():
    iss = PACKAGING / "windows" / "frankenmoe.iss"
    text = iss.read_text(encoding="utf-8")
    defines = dict(re.findall(r'^#define (\w+) "(.*)"$', text, flags=re.MULTILINE))
    assert defines["GuiExe"] == "FrankenMoE Studio.exe"  # the spec's windowed executable
    # The bundle is a build output: the folder the spec's COLLECT writes into build/dist.
    bundle = (iss.parent / defines["BundleDir"].replace("\\", "/")).resolve()
    assert bundle == REPO / "build" / "dist" / "frankenmoe-studio"
    icon = re.search(r"^SetupIconFile=(.*)$", text, flags=re.MULTILINE)
    assert icon is not None and (iss.parent / icon.group(1).replace("\\", "/")).is_file()
    app_id = re.search(r"^AppId=\{\{([0-9A-F-]{36})\}$", text, flags=re.MULTILINE)
    assert app_id is not None, "AppId must be a GUID written as {{GUID}"
    for section in ("[Setup]", "[Files]", "[Icons]", "[Run]"):
        assert section in text
    assert "{#GuiExe}" in text.split("[Icons]")[1]


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_icons_exist_in_every_size_the_scripts_use():
    icons = REPO / "resources" / "icons"
    for size in (16, 24, 32, 48, 64, 128, 256, 512):
        assert png_size(icons / f"frankenmoe-{size}.png") == (size, size)
    assert (icons / "frankenmoe.svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")
    ico = (icons / "frankenmoe.ico").read_bytes()
    assert struct.unpack("<HHH", ico[:6]) == (0, 1, 7)
    mac = (PACKAGING / "macos" / "build.sh").read_text(encoding="utf-8")
    for size in re.findall(r"frankenmoe-(\d+)\.png", mac):
        assert (icons / f"frankenmoe-{size}.png").is_file()


def test_makefile_lints_packaging():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "ruff check app tests bench packaging" in makefile
