from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Every module of the core, subpackages included, as dotted names below app.core.
CORE_MODULES = sorted(
    ".".join(path.relative_to(REPO / "app" / "core").with_suffix("").parts).removesuffix(".__init__")
    for path in (REPO / "app" / "core").rglob("*.py")
    if path.name != "__init__.py" or path.parent != REPO / "app" / "core"
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_core_imports_without_qt():
    """The engine must work where PySide6 is absent: block it, then import every core module."""
    code = (
        "import sys\n"
        "sys.modules['PySide6'] = None\n"
        "import importlib\n"
        f"for name in {CORE_MODULES!r}:\n"
        "    importlib.import_module('app.core.' + name)\n"
        "import app.cli.main\n"
        "assert not [m for m in sys.modules if m.startswith('PySide6.')]\n"
        "print('ok')\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert len(CORE_MODULES) >= 10


def test_reading_recipes_and_checking_models_does_not_load_torch():
    """What the window needs at start-up must not pay for torch and transformers."""
    code = (
        "import sys\n"
        "import app.core.recipe, app.core.sources, app.core.compat, app.core.problems, app.core.progress\n"
        "import app.cli.main\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
