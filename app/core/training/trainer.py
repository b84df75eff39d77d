"""Gate-only training of a merged MoE model's routers, as a job (a generator of progress records).

Only the routers (``mlp.gate`` / ``block_sparse_moe.gate``) and Qwen2-MoE's ``shared_expert_gate``
are trained; every other weight is frozen in the chosen dtype while the routers' master weights are
kept in float32. The objective is the next-token loss plus ``balance_coef`` times the Switch
load-balancing loss (as transformers' ``load_balancing_loss_func``) plus ``z_coef`` times the router
z-loss. The new model is written by :mod:`app.core.training.output`: nothing exists at ``out_dir``
until it is complete.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.core.problems import Problem
from app.core.progress import Job, Progress
from app.core.training.settings import RouterTrainingSettings, TrainingData

STAGES = ("data", "train", "validate", "write")


@dataclass(frozen=True, slots=True)
class TrainingProgress(Progress):
    """A progress record of a training run. ``stage`` is "data", "train", "validate" or "write".

    On "train" records ``done`` / ``total`` count steps and the losses are the step's; "validate"
    records carry ``val_loss``. ``expert_load`` is each expert's share of the routed tokens (top-k
    choices), averaged over the MoE layers; it sums to 1.
    """

    step: int = 0
    loss: float | None = None  # the step's total objective (next-token + coefficients x auxiliary losses)
    balance_loss: float | None = None  # the Switch load-balancing loss (before its coefficient)
    z_loss: float | None = None  # the router z-loss (before its coefficient)
    val_loss: float | None = None  # mean next-token loss on the validation sequences
    expert_load: tuple[float, ...] = ()
    tokens_per_s: float | None = None


@dataclass(frozen=True)
class RouterTrainingResult:
    out_dir: Path
    steps: int  # steps trained (fewer than planned when stopped early)
    tokens: int  # training tokens seen
    initial_val_loss: float  # validation next-token loss of the routers before training
    final_val_loss: float  # ... of the routers written
    best_val_loss: float
    final_train_loss: float  # the last step's next-token loss
    stopped_early: bool
    history: tuple[TrainingProgress, ...] = ()  # every "train" and "validate" record
    report: dict[str, Any] = field(default_factory=dict)  # JSON-able; what the CLI's --json writes


def check_router_training(
    model_dir: Path, out_dir: Path, settings: RouterTrainingSettings, data: TrainingData
) -> list[Problem]:
    """Problems found without loading the model or reading the data: settings, model folder, output folder."""
    raise NotImplementedError


def train_routers(
    model_dir: Path,
    out_dir: Path,
    settings: RouterTrainingSettings,
    data: TrainingData,
    *,
    cancel: threading.Event | None = None,
    resume: bool = False,
) -> Job[RouterTrainingResult]:
    """Train the routers of the MoE model in ``model_dir`` and write the new model to ``out_dir``.

    Yields :class:`TrainingProgress` records (stages "data", "train", "validate", "write") and
    returns a :class:`RouterTrainingResult`. Checks ``cancel`` every step and raises Cancelled,
    leaving nothing at ``out_dir``. Every ``settings.checkpoint_every`` steps the routers, the
    optimiser, the step and the random states are saved in a checkpoint folder beside ``out_dir``
    (:func:`checkpoint_dir`); with ``resume=True`` a run continues from it exactly as if it had not
    stopped. Raises ProblemsError (bad settings, dense model, output folder not empty) or
    FrankenMoEError (empty or too-short data, out of memory with the settings that would fit).
    """
    raise NotImplementedError
    yield Progress("data", 0, 1)


def checkpoint_dir(out_dir: Path) -> Path:
    """The resumable checkpoint folder of a run writing ``out_dir``: hidden, beside it, never inside it."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.frankenmoe-router-checkpoint"
