"""What a router training run uses: its settings, its data, and the step budget chosen when none is given.

The settings are plain values; :func:`settings_problems` says which ones cannot work (the trainer's
``check_router_training`` runs it before any model is loaded), so that the CLI and the app show one
clear message per bad value instead of a validation trace.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.core.problems import Problem

# A laptop CPU's rough throughput on the frozen-model forward and backward passes (FLOP/s), and the
# fixed cost of one step of a tiny model (Python, autograd, optimiser): what the default budget uses
# to aim at about a minute. Measured with bench/router_training_speed.py on the development machine.
LAPTOP_CPU_FLOPS = 2.0e10
STEP_OVERHEAD_S = 0.15
DEFAULT_BUDGET_SECONDS = 60.0
MIN_DEFAULT_STEPS = 20
MAX_DEFAULT_STEPS = 400
# Forward (2 FLOPs a weight per token) plus the backward through the activations (2 more): the frozen
# weights get no gradient of their own, which saves the third pass a full fine-tune would need.
FLOPS_PER_PARAMETER_TOKEN = 4


class RouterTrainingSettings(BaseModel):
    """How to train the routers. ``steps`` and ``tokens`` are alternative budgets (at most one of them);
    with neither, :func:`default_budget` chooses the steps."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int | None = None
    tokens: int | None = None  # training tokens; steps = ceil(tokens / (batch_size * seq_len))
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 1e-3
    balance_coef: float = 0.01  # weight of the Switch load-balancing loss
    z_coef: float = 0.0  # weight of the router z-loss
    val_fraction: float = 0.1  # share of the packed sequences held out for validation
    eval_every: int = 25  # steps between validation losses
    patience: int | None = 4  # evaluations without a better validation loss before stopping early; None: never
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # "auto": bfloat16/float16 on GPUs, float32 on the CPU
    load: Literal["full", "8bit", "4bit"] = "full"
    checkpoint_every: int = 50  # steps between resumable checkpoints; 0 turns them off

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def planned_steps(self) -> int | None:
        """The steps the budget asks for, or None when no budget is set (the default budget applies)."""
        if self.steps is not None:
            return self.steps
        if self.tokens is not None:
            return max(1, math.ceil(self.tokens / max(1, self.tokens_per_step)))
        return None


class TrainingData(BaseModel):
    """Where the training text comes from; every source given is used, and all of it is packed together."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    files: tuple[Path, ...] = ()  # .txt (paragraphs), .jsonl (text or messages), .parquet
    recipe_prompts: bool = False  # the prompts of the recipe saved beside the model
    hub_datasets: tuple[str, ...] = ()  # id[:config][/split], through the datasets library

    @property
    def is_empty(self) -> bool:
        return not (self.files or self.recipe_prompts or self.hub_datasets)


def settings_problems(settings: RouterTrainingSettings) -> list[Problem]:
    """Every setting that cannot work, each with the fix."""
    problems: list[Problem] = []

    def error(field: str, message: str, hint: str) -> None:
        problems.append(Problem(field, message, hint))

    if settings.steps is not None and settings.tokens is not None:
        error("steps", "both a step budget and a token budget are given", "give --steps or --tokens, not both")
    if settings.steps is not None and settings.steps < 1:
        error("steps", f"{settings.steps} training steps is not possible", "train for at least 1 step")
    if settings.tokens is not None and settings.tokens < 1:
        error("tokens", f"a budget of {settings.tokens} tokens is not possible", "give at least 1 token")
    if settings.seq_len < 2:
        error("seq_len", f"a sequence length of {settings.seq_len} has no token to predict", "use 2 or more")
    if settings.batch_size < 1:
        error("batch_size", f"a batch size of {settings.batch_size} is not possible", "use a batch size of 1 or more")
    if not (settings.lr > 0 and math.isfinite(settings.lr)):
        error("lr", f"the learning rate must be above 0 (it is {settings.lr})", "use e.g. 1e-3")
    for name in ("balance_coef", "z_coef"):
        value = getattr(settings, name)
        if not (value >= 0 and math.isfinite(value)):
            error(name, f"{name.replace('_', ' ')} must be 0 or more (it is {value})", "use e.g. 0.01, or 0 for none")
    if not 0 < settings.val_fraction < 1:
        error(
            "val_fraction",
            f"the validation fraction must be between 0 and 1 (it is {settings.val_fraction})",
            "use e.g. 0.1",
        )
    if settings.eval_every < 1:
        error("eval_every", f"validating every {settings.eval_every} steps is not possible", "use 1 or more")
    if settings.patience is not None and settings.patience < 1:
        error("patience", f"a patience of {settings.patience} evaluations is not possible", "use 1 or more, or none")
    if not 0 <= settings.warmup_fraction < 1:
        error("warmup_fraction", f"a warm-up fraction of {settings.warmup_fraction} is not possible", "use 0 to 0.5")
    if not settings.grad_clip >= 0:
        error("grad_clip", f"a gradient clip of {settings.grad_clip} is not possible", "use 1.0, or 0 for none")
    if settings.checkpoint_every < 0:
        error("checkpoint_every", "checkpoints cannot come every negative number of steps", "use 50, or 0 for none")
    return problems


def model_parameter_count(model_dir: Path) -> int:
    """Parameters in the model's safetensors files, from their headers (nothing read)."""
    from app.core.sources import ModelSource

    with ModelSource(Path(model_dir)) as source:
        return source.parameter_count


def default_budget(model_dir: Path, settings: RouterTrainingSettings | None = None) -> tuple[int, str]:
    """The number of steps to train when no budget is given, and the sentence that says so.

    Aimed at about a minute on a laptop CPU: the steps whose forward and backward passes, at
    ``settings``' batch size and sequence length (the defaults when None), take about that long.
    """
    settings = settings or RouterTrainingSettings()
    parameters = model_parameter_count(model_dir)
    step_flops = FLOPS_PER_PARAMETER_TOKEN * parameters * settings.tokens_per_step
    step_seconds = STEP_OVERHEAD_S + step_flops / LAPTOP_CPU_FLOPS
    steps = int(min(MAX_DEFAULT_STEPS, max(MIN_DEFAULT_STEPS, DEFAULT_BUDGET_SECONDS / step_seconds)))
    minutes = steps * step_seconds / 60
    sentence = (
        f"no step or token budget given: training {steps} steps of {settings.batch_size} x {settings.seq_len} "
        f"tokens ({steps * settings.tokens_per_step:,} tokens), about {max(minutes, 0.1):.1f} min on a laptop CPU "
        f"for this model's {parameters / 1e6:,.1f} M parameters; set --steps or --tokens to change it"
    )
    return steps, sentence
