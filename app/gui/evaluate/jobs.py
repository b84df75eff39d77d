"""The Evaluate page's job: read the datasets, evaluate every model, then run lm-eval's tasks.

Runs in a worker thread (see :mod:`app.gui.workers`); torch, transformers and lm-eval are imported
there, never on the GUI thread. What the page chose travels as an :class:`EvaluateChoices`.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.core.problems import FrankenMoEError
from app.core.progress import Job, Progress, check_cancel
from app.gui.workers import JobFactory

if TYPE_CHECKING:
    from app.core.eval.data import EvalDataset
    from app.core.recipe import Recipe


def lm_eval_installed() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def recipe_beside(folder: Path) -> Path:
    """Where a merge saves the recipe of the model it wrote."""
    from app.core.merge.pipeline import RECIPE_FILENAME

    return Path(folder) / RECIPE_FILENAME


@dataclass(frozen=True)
class EvaluateChoices:
    model_dir: Path
    recipe_prompts: bool = True
    data_files: tuple[Path, ...] = ()
    compare_donors: bool = False
    top_ks: tuple[int | None, ...] = (None,)  # None: the model's own number of experts per token
    disabled: frozenset[int] = field(default_factory=frozenset)
    tasks: tuple[str, ...] = ()
    include_path: Path | None = None
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path | None = None  # the Hub cache, for a base or donor given as a Hub id


@dataclass(frozen=True)
class EvaluateOutcome:
    report: dict[str, Any]  # the report's JSON layout, as ``frankenmoe eval --json`` writes it
    expert_labels: tuple[str, ...]  # the MoE's experts, named as its recipe names them
    moe_top_k: int | None = None  # the MoE's own experts per token, where its config says
    lm_eval_runs: tuple[dict[str, Any], ...] = ()  # lm-eval's own results, per model and routing


def _read_recipe(folder: Path) -> Recipe | None:
    from app.core.recipe import load_recipe

    path = recipe_beside(folder)
    return load_recipe(path) if path.is_file() else None


def _datasets(choices: EvaluateChoices, recipe: Recipe | None) -> list[EvalDataset]:
    from app.core.eval.data import load_data_file, recipe_datasets

    datasets: list[EvalDataset] = []
    if choices.recipe_prompts:
        if recipe is None:
            raise FrankenMoEError(
                f"{choices.model_dir} holds no recipe, so it has no expert prompts to evaluate on",
                "Untick the recipe's prompts and add a data file, or pick a model that FrankenMoE Studio merged.",
            )
        datasets += recipe_datasets(recipe)
    datasets += [load_data_file(path) for path in choices.data_files]
    if not datasets:
        raise FrankenMoEError(
            "There is nothing to evaluate on", "Tick the recipe's prompts or add a data file (.txt, .jsonl, .parquet)."
        )
    return datasets


def evaluate_job(choices: EvaluateChoices) -> JobFactory:
    def job(cancel: threading.Event) -> Job[EvaluateOutcome]:
        from app.core.eval.controls import RoutingOverride
        from app.core.eval.harness import HarnessRequest
        from app.core.eval.nll import (
            EvalModel,
            EvalRequest,
            comparison_models,
            configured_top_k,
            evaluate,
            read_model_config,
        )

        yield Progress("reading datasets", 0, 1, message="reading the recipe and the data files")
        recipe = _read_recipe(choices.model_dir)
        datasets = (
            _datasets(choices, recipe) if choices.recipe_prompts or choices.data_files or not choices.tasks else []
        )
        if choices.tasks and not lm_eval_installed():
            raise FrankenMoEError(
                "The lm-eval package is not installed, so benchmark tasks cannot run",
                "Install it with pip install 'frankenmoe-studio[eval]', or clear the task list.",
            )
        check_cancel(cancel)
        models = (
            comparison_models(choices.model_dir, recipe)
            if choices.compare_donors
            else (EvalModel("moe", str(choices.model_dir)),)
        )
        top_k = configured_top_k(read_model_config(str(choices.model_dir)))
        if len(choices.top_ks) > 1 and top_k is None:
            raise FrankenMoEError(
                f"{choices.model_dir} has no experts, so there is no experts-per-token sweep to run",
                "Clear Experts per token, or choose a mixture-of-experts model.",
            )
        overrides = tuple(RoutingOverride(top_k=k, disabled=choices.disabled) for k in choices.top_ks)
        request = EvalRequest(
            models=models,
            datasets=tuple(datasets),
            batch_size=choices.batch_size,
            device=choices.device,
            dtype=choices.dtype,
            cache_dir=choices.cache_dir,
            overrides=overrides,
            # lm-eval's tasks run on each model while it is loaded for scoring: no second load.
            harness=HarnessRequest(
                tasks=choices.tasks,
                limit=choices.limit,
                num_fewshot=choices.num_fewshot,
                include_path=choices.include_path,
                batch_size=choices.batch_size,
            )
            if choices.tasks
            else None,
        )
        report = yield from evaluate(request, cancel)
        labels = tuple(recipe.expert_label(i) for i in range(len(recipe.experts))) if recipe is not None else ()
        return EvaluateOutcome(
            report.to_json(), labels, top_k, tuple(report.lm_eval_runs)
        )

    return job
