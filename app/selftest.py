"""`frankenmoe --self-test`: proof that an installation works end to end, offline, in well under a minute.

Meant for smoke-testing any build (source, wheel, PyInstaller bundle, installed package): it imports
every module of the app and the libraries it needs at run time (with their package metadata, which
transformers checks and bundles easily lose), builds tiny models, merges them, generates a few tokens
while capturing which experts the routers chose, and opens and closes the main window offscreen.
It writes only to a temporary folder and never touches the user's settings or the network.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

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
    # transformers loads model classes lazily, on first use; these are the ones the demo and chat need.
    transformers = importlib.import_module("transformers")
    for name in ("LlamaForCausalLM", "MixtralForCausalLM", "PreTrainedTokenizerFast"):
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
    from app.core.merge import MergeOptions, merge_moe
    from app.core.progress import run_job
    from app.core.recipe import load_recipe

    recipe = load_recipe(models / RECIPE_NAME)
    result = run_job(merge_moe(recipe, MergeOptions(out_dir=out_dir)))
    return f"{len(recipe.experts)} experts, {len(result.shard_files)} shard(s), {result.bytes_written:,} bytes"


def generate_with_routing(model_dir: Path) -> str:
    """Generate a few tokens greedily and record, per layer and token, the expert the router ranked first."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from app.core.devices import resolve_device

    logging.disable_progress_bar()  # the report is one line per step, not a loading bar
    device = resolve_device("auto")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    num_experts = int(model.config.num_local_experts)
    chosen: list[torch.Tensor] = []

    def record(_module: Any, _inputs: Any, output: Any) -> None:
        # transformers 5 routers return (logits, weights, indices); transformers 4 gates return logits.
        logits = output[0] if isinstance(output, tuple) else output
        chosen.append(logits.reshape(-1, num_experts).argmax(-1).cpu())

    routers = [
        module for name, module in model.named_modules() if name.endswith((".block_sparse_moe.gate", ".mlp.gate"))
    ]
    if len(routers) != model.config.num_hidden_layers:
        raise AssertionError(f"found {len(routers)} routers in {model.config.num_hidden_layers} layers")
    hooks = [router.register_forward_hook(record) for router in routers]
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "12 + 7 ="}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.inference_mode():
            output = model.generate(
                **inputs, max_new_tokens=GENERATED_TOKENS, min_new_tokens=GENERATED_TOKENS, do_sample=False
            )
    finally:
        for hook in hooks:
            hook.remove()
    prompt_length = inputs["input_ids"].shape[1]
    new_tokens = output.shape[1] - prompt_length
    # One router call per layer per forward step; every token (prompt and generated but the last) is routed.
    routed = torch.cat(chosen).reshape(-1)
    expected = (prompt_length + new_tokens - 1) * len(routers)
    if new_tokens != GENERATED_TOKENS or routed.numel() != expected:
        raise AssertionError(f"generated {new_tokens} tokens with {routed.numel()} routing choices, not {expected}")
    usage = torch.bincount(routed, minlength=num_experts).tolist()
    answer = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
    return f"{new_tokens} tokens on {device} ({answer!r}); top-1 choices per expert {usage}"


def open_main_window(cache_dir: Path, settings_dir: Path) -> str:
    """Open the main window offscreen with throw-away settings, let it start, and close it."""
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

