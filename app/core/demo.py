"""The demo: three tiny local experts and a recipe for them, built offline on a CPU (DEMO_DURATION).

A tiny Llama base is trained on a mix of arithmetic, Python code and English prose; each expert is
the base with its MLPs trained further on one of the three. Attention and embeddings stay the
base's, as a frankenMoE keeps them, so the merged model really uses each expert's MLPs, and the
base's hidden states differ enough between the three kinds of text that routing visibly differs.
Everything is seeded, so two builds give the same files. The result is cached: a second call
returns at once.
"""

from __future__ import annotations

import random
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.devices import one_torch_thread
from app.core.imports import TRANSFORMERS_IMPORT_LOCK
from app.core.progress import Job, Progress, check_cancel
from app.core.recipe import Expert, ExpertExtras, ModelRef, Recipe, StudioExtras, save_recipe

# Bump when anything below changes what gets built, so that old caches are rebuilt.
DEMO_VERSION = 1
RECIPE_NAME = "demo-recipe.yml"
SEED = 1234
VOCAB_SIZE = 384
SEQUENCE_LENGTH = 48
BATCH_SIZE = 16
# Training steps of the base, and of each expert on top of it. With fewer, the experts stay
# distinct but the test prompts start going astray (bench/demo.py measures both).
BASE_STEPS = 200
EXPERT_STEPS = 100
# What the app and README promise for a first build: bench/demo.py measured 20-22 s on two shared cores.
DEMO_DURATION = "about 20 seconds"


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b} = {value}"


def _code(rng: random.Random) -> str:
    name = rng.choice(["total", "items", "count", "values", "result", "index", "data"])
    other = rng.choice(["x", "y", "item", "row", "n"])
    templates = [
        f"def get_{name}({other}):\n    return {other}.{name}",
        f"for {other} in range(len({name})):\n    print({name}[{other}])",
        f"if {name} is None:\n    {name} = []",
        f"{name} = [{other} * 2 for {other} in {name}]",
        f"class {name.title()}:\n    def __init__(self, {other}):\n        self.{other} = {other}",
        f"import os\n{name} = os.path.join({other}, '{name}.txt')",
    ]
    return rng.choice(templates)


def _prose(rng: random.Random) -> str:
    subject = rng.choice(
        ["The old fisherman", "My grandmother", "A quiet girl", "The tired traveller", "Our neighbour"]
    )
    verb = rng.choice(
        ["walked slowly along", "sang softly beside", "dreamed about", "painted a picture of", "remembered"]
    )
    place = rng.choice(["the river", "the green hills", "a small village", "the autumn forest", "the sea at dawn"])
    tail = rng.choice(
        [
            "while the sun went down.",
            "and smiled.",
            "long ago.",
            "with a warm heart.",
            "in the morning light.",
        ]
    )
    return f"{subject} {verb} {place} {tail}"


@dataclass(frozen=True, slots=True)
class Domain:
    """A kind of text: how to make training samples, prompts for the router, and held-out prompts."""

    make_text: Callable[[random.Random], str]
    label: str
    color: str
    positive_prompts: tuple[str, ...]
    test_prompts: tuple[str, ...]


# Positive prompts build the routers; test prompts are held out to check where routing sends them.
DEMO_DOMAINS = {
    "arithmetic": Domain(
        _arithmetic,
        "Arithmetic",
        "#E69F00",
        ("12 + 7 = 19", "45 * 3 = 135", "81 - 26 = 55", "what is 9 * 8"),
        ("33 + 48 =", "7 * 6 = 42", "90 - 17 = 73"),
    ),
    "code": Domain(
        _code,
        "Code",
        "#56B4E9",
        ("def add(a, b):\n    return a + b", "for i in range(10):\n    print(i)", "import os", "class Point:"),
        ("if items is None:\n    items = []", "def get_total(row):", "values = [x * 2 for x in values]"),
    ),
    "prose": Domain(
        _prose,
        "Prose",
        "#009E73",
        ("The old man walked along the river.", "She smiled in the morning light.", "Once upon a time"),
        (
            "My grandmother painted the green hills.",
            "The tired traveller dreamed about the sea.",
            "Our neighbour sang softly.",
        ),
    ),
}

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def demo_recipe_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"demo-v{DEMO_VERSION}" / RECIPE_NAME


def build_demo(
    cache_dir: Path,
    cancel: threading.Event | None = None,
    *,
    base_steps: int = BASE_STEPS,
    expert_steps: int = EXPERT_STEPS,
) -> Job[Path]:
    """Build (or find cached) the demo models and recipe; returns the recipe's path."""
    recipe_path = demo_recipe_path(cache_dir)
    if recipe_path.is_file():
        yield Progress("demo", 1, 1, message="demo models already built")
        return recipe_path

    target = recipe_path.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place, so a cancel or crash never leaves a half demo.
    workspace = target.with_name(f".{target.name}.partial")
    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir()
    try:
        yield from train_domain_models(
            workspace, DEMO_DOMAINS, cancel, base_steps=base_steps, expert_steps=expert_steps, final_folder=target
        )
        shutil.rmtree(target, ignore_errors=True)
        workspace.rename(target)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return recipe_path


def train_domain_models(
    workspace: Path,
    domains: Mapping[str, Domain],
    cancel: threading.Event | None = None,
    *,
    base_steps: int,
    expert_steps: int,
    final_folder: Path | None = None,
    seed: int = SEED,
    hidden_size: int = 64,
    num_layers: int = 4,
) -> Job[Recipe]:
    """Train a base on all domains and one MLP-only expert per domain into workspace; save a recipe.

    Paths in the recipe point into final_folder (where workspace will be renamed to), or workspace.
    """
    import torch

    # The models are tiny: one thread trains them several times faster than a pool whose threads
    # mostly wait for each other (and, on a busy machine, for a core). bench/demo.py measures it.
    with one_torch_thread():
        final_folder = final_folder or workspace
        total = base_steps + expert_steps * len(domains)
        yield Progress("demo: tokenizer", 0, total, message="training a tokenizer on the demo texts")
        rng = random.Random(seed)
        corpora = {name: [domain.make_text(rng) for _ in range(600)] for name, domain in domains.items()}
        tokenizer = _train_tokenizer([text for texts in corpora.values() for text in texts])
        streams = {name: _token_stream(tokenizer, texts) for name, texts in corpora.items()}
        check_cancel(cancel)

        torch.manual_seed(seed)
        model = _new_model(tokenizer, hidden_size, num_layers)
        mixed = torch.cat(list(streams.values()))
        done = 0
        for step in _train(model, mixed, base_steps, lambda name: True, cancel, seed):
            done += 1
            yield Progress("demo: base model", done, total, message=f"training the base model, step {step}")
        _save(model, tokenizer, workspace / "base")
        base_state = {key: value.clone() for key, value in model.state_dict().items()}

        experts = []
        extras = []
        for name, stream in streams.items():
            model.load_state_dict(base_state)
            torch.manual_seed(seed + len(experts) + 1)
            for step in _train(model, stream, expert_steps, lambda parameter: ".mlp." in parameter, cancel, seed):
                done += 1
                yield Progress(f"demo: {name} expert", done, total, message=f"training the {name} expert, step {step}")
            _save(model, tokenizer, workspace / f"expert-{name}")
            domain = domains[name]
            experts.append(
                Expert(
                    source_model=ModelRef(path=str(final_folder / f"expert-{name}")),
                    positive_prompts=domain.positive_prompts,
                )
            )
            extras.append(ExpertExtras(label=domain.label, color=domain.color, test_prompts=domain.test_prompts))

        recipe = Recipe(
            base_model=ModelRef(path=str(final_folder / "base")),
            experts=tuple(experts),
            gate_mode="hidden",
            dtype="float32",
            experts_per_token=2,
            studio=StudioExtras(experts=tuple(extras), seed=seed),
        )
        save_recipe(recipe, workspace / RECIPE_NAME)
        yield Progress("demo", total, total, message="demo models ready")
        return recipe


def _train_tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", core.token_to_id("<s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _token_stream(tokenizer: Any, texts: list[str]) -> Any:
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _new_model(tokenizer: Any, hidden_size: int, num_layers: int) -> Any:
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _train(
    model: Any, stream: Any, steps: int, trains: Callable[[str], bool], cancel: threading.Event | None, seed: int
) -> Any:
    """Yield after each optimiser step on random windows of ``stream``."""
    import torch

    parameters = [p for name, p in model.named_parameters() if trains(name)]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trains(name))
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        check_cancel(cancel)
        starts = torch.randint(0, len(stream) - SEQUENCE_LENGTH, (BATCH_SIZE,), generator=generator)
        batch = torch.stack([stream[s : s + SEQUENCE_LENGTH] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield step
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    model.eval()


def _save(model: Any, tokenizer: Any, folder: Path) -> None:
    with TRANSFORMERS_IMPORT_LOCK:
        from transformers.utils import logging

    # save_pretrained draws a tqdm bar on stderr; the core reports progress only through its jobs.
    bars_were_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        if bars_were_enabled:
            logging.enable_progress_bar()
