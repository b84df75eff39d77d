"""`frankenmoe --self-test`: proof that an installation works end to end, offline, in well under a minute.

Meant for smoke-testing any build (source, wheel, PyInstaller bundle, installed package): it imports
every module of the app and the libraries it needs at run time (with their package metadata, which
transformers checks and bundles easily lose), builds tiny models, merges them, generates a few
tokens with the chat engine while it captures which experts the routers chose, and opens and closes
the main window offscreen. It writes only to a temporary folder and never touches the user's
settings or the network.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

# Libraries the app needs at run time: (import name, distribution name whose metadata must be present).
RUNTIME_LIBRARIES = (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"),
    ("huggingface_hub", "huggingface-hub"),
    ("PySide6.QtWidgets", "PySide6-Essentials"),
    ("yaml", "PyYAML"),
    ("pydantic", "pydantic"),
    ("numpy", "numpy"),
    ("psutil", "psutil"),
    ("tqdm", "tqdm"),
    ("jinja2", "jinja2"),  # chat templates
)
GENERATED_TOKENS = 4
# The offscreen platform (which the self-test uses) cannot pass a window's size hints on; nothing is wrong.
HARMLESS_QT_MESSAGES = ("This plugin does not support propagateSizeHints()",)
# Tiny on purpose: the self-test proves the machinery, not the models' quality.
BASE_STEPS = 2
EXPERT_STEPS = 1


def check_imports() -> str:
    """Import every module of the app and every run-time library; read the libraries' metadata."""
    import importlib.metadata
    import pkgutil

    import app

    names = [module.name for module in pkgutil.walk_packages(app.__path__, "app.")]
    for name in names:
        importlib.import_module(name)
    versions = []
    for module, distribution in RUNTIME_LIBRARIES:
        importlib.import_module(module)
        versions.append(f"{distribution} {importlib.metadata.version(distribution)}")
    # transformers loads model classes lazily, on first use: these are the ones the app reads and
    # writes, which a bundle must carry.
    transformers = importlib.import_module("transformers")
    for name in (
        "AutoTokenizer",
        "PreTrainedTokenizerFast",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
    ):
        getattr(transformers, name)
    return f"{len(names)} app modules; " + ", ".join(versions)


def describe_accelerator() -> str:
    import torch

    from app.core.devices import resolve_device

    device = resolve_device("auto")
    if device.startswith("cuda"):
        return f"{device}: {torch.cuda.get_device_name(torch.device(device))} (CUDA {torch.version.cuda})"
    return f"{device} (torch {torch.__version__})"


def build_models(folder: Path) -> str:
    """Train tiny demo models (tokenizer, base, one expert per domain) and their recipe into folder."""
    from app.core.demo import DEMO_DOMAINS, train_domain_models
    from app.core.progress import run_job

    recipe = run_job(train_domain_models(folder, DEMO_DOMAINS, base_steps=BASE_STEPS, expert_steps=EXPERT_STEPS))
    return f"a base and {len(recipe.experts)} experts"


def merge(models: Path, out_dir: Path) -> str:
    from app.core.demo import RECIPE_NAME
    from app.core.merge.pipeline import MergeOptions, merge_moe
    from app.core.progress import run_job
    from app.core.recipe import load_recipe

    recipe = load_recipe(models / RECIPE_NAME)
    result = run_job(merge_moe(recipe, MergeOptions(out_dir=out_dir)))
    return f"{len(recipe.experts)} experts, {len(result.shard_files)} shard(s), {result.bytes_written:,} bytes"


def generate_with_routing(model_dir: Path) -> str:
    """Chat with the merged model through the chat engine: a few greedy tokens with their routing."""
    from app.core.chat import LoadRequest, SamplingSettings, load_chat_model
    from app.core.progress import run_job

    model = run_job(load_chat_model(LoadRequest(model=str(model_dir), device="auto")))
    try:
        if not model.is_moe:
            raise AssertionError(f"the merged model has no routers: {model.panel_unavailable_reason}")
        settings = SamplingSettings(temperature=0, max_new_tokens=GENERATED_TOKENS, seed=0)
        # No stop tokens: a tiny model may well say end-of-text at once, and the test needs its tokens.
        job = model.generate(model.prompt_ids([{"role": "user", "content": "12 + 7 ="}]), settings, stop_token_ids=())
        while True:
            try:
                next(job)
            except StopIteration as finished:
                result = finished.value
                break
        rule = model.capture.rule
        layers = len(result.generated[0].layers) if result.generated else 0
        for token in result.trace:
            if len(token.experts) != layers or any(len(choice) != rule.top_k for choice in token.experts):
                shape = f"top-{rule.top_k} in each of {layers} layers"
                raise AssertionError(f"token {token.position} is routed as {token.experts}, not {shape}")
        if len(result.generated) != GENERATED_TOKENS or layers == 0:
            raise AssertionError(f"generated {len(result.generated)} tokens routed over {layers} layers")
        experts = [token.top_expert() for token in result.generated]
        return (
            f"{len(result.generated)} tokens {model.description} ({result.text!r}), "
            f"{layers} routed layers, top experts {experts}"
        )
    finally:
        model.unload()


def open_main_window(cache_dir: Path, settings_dir: Path) -> str:
    """Open the main window offscreen with throw-away settings, let it start, and close it."""
    from PySide6.QtCore import qInstallMessageHandler

    # Qt's own messages are collected, not printed between the report's lines; any that matter
    # are reported with the step.
    qt_messages: list[str] = []
    previous = qInstallMessageHandler(lambda _mode, _context, message: qt_messages.append(message))
    try:
        detail = _show_and_close_main_window(cache_dir, settings_dir)
    finally:
        qInstallMessageHandler(previous)
    notes = [message for message in qt_messages if message not in HARMLESS_QT_MESSAGES]
    return detail + (f"; Qt said: {' | '.join(notes)}" if notes else "")


def _show_and_close_main_window(cache_dir: Path, settings_dir: Path) -> str:
    from PySide6.QtCore import QCoreApplication, QSettings
    from PySide6.QtWidgets import QApplication

    # Settings go to a temporary INI file, so the user's recent files and preferences stay untouched.
    QCoreApplication.setOrganizationName("FrankenMoE-selftest")
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(settings_dir))
    application = QApplication.instance() or QApplication(sys.argv[:1])
    from app.gui.launch import app_icon
    from app.gui.main_window import MainWindow
    from app.gui.settings import AppSettings

    icon = app_icon()
    if icon.isNull():
        raise AssertionError("the app icon is missing from resources/icons")
    window = MainWindow(AppSettings(cache_dir=cache_dir))
    window.show()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not window.isVisible():
        application.processEvents()
    application.processEvents()
    if not window.isVisible():
        raise AssertionError("the main window did not show")
    title = window.windowTitle()
    if not window.close():
        raise AssertionError("the main window refused to close")
    application.processEvents()
    return f"{title!r} on the {QApplication.platformName()} platform"


def _step(out: TextIO, name: str, action: Callable[[], str]) -> None:
    started = time.monotonic()
    detail = action()
    print(f"ok  {name:<22} {time.monotonic() - started:5.1f} s  {detail}", file=out, flush=True)


def run_self_test(out: TextIO | None = None) -> int:
    """Run every check in order; 0 when all pass, 1 at the first failure (with its traceback)."""
    out = out or sys.stdout
    # Set before anything imports huggingface_hub or Qt: no network, and no display needed.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from app import __version__

    started = time.monotonic()
    print(f"FrankenMoE Studio {__version__} self-test ({sys.executable})", file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="frankenmoe-selftest-") as tmp:
        workspace = Path(tmp)
        steps: list[tuple[str, Callable[[], str]]] = [
            ("imports", check_imports),
            ("accelerator", describe_accelerator),
            ("build tiny models", lambda: build_models(workspace / "models")),
            ("merge", lambda: merge(workspace / "models", workspace / "merged")),
            ("generate with routing", lambda: generate_with_routing(workspace / "merged")),
            ("main window", lambda: open_main_window(workspace / "cache", workspace / "settings")),
        ]
        for name, action in steps:
            try:
                _step(out, name, action)
            except Exception:
                print(f"FAIL {name}", file=out)
                traceback.print_exc(file=out)
                out.flush()
                return 1
    print(f"self-test passed in {time.monotonic() - started:.1f} s", file=out, flush=True)
    return 0
