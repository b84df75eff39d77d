"""The Train routers page's jobs: the training itself, then the before/after comparison.

Both run in worker threads (see :mod:`app.gui.workers`); torch and transformers are imported there, never
on the GUI thread. The training is the core's :func:`app.core.training.trainer.train_routers`, unchanged.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.progress import Job, Progress, check_cancel
from app.gui.workers import JobFactory, call_in_worker

if TYPE_CHECKING:
    from app.core.chat.trace import ExpertLegend
    from app.core.eval.data import EvalDataset
    from app.core.routing_eval import ModelRouting
    from app.core.training.settings import RouterTrainingSettings, TrainingData
    from app.core.training.trainer import RouterTrainingResult

TRAINED_SUFFIX = "-routers-trained"
VALIDATION_ROW = "validation split"


def default_out_dir(model_dir: Path) -> Path:
    """A sibling of the model folder, so that the routers it came with are never touched."""
    return model_dir.with_name(model_dir.name + TRAINED_SUFFIX)


@dataclass(frozen=True)
class TrainChoices:
    model_dir: Path
    out_dir: Path
    settings: RouterTrainingSettings
    data: TrainingData
    resume: bool = False  # continue from the checkpoint a stopped run left beside out_dir


def train_job(choices: TrainChoices) -> JobFactory:
    def job(cancel: threading.Event) -> Job[RouterTrainingResult]:
        from app.core.training.trainer import train_routers

        training = train_routers(
            choices.model_dir, choices.out_dir, choices.settings, choices.data, cancel=cancel, resume=choices.resume
        )
        return (yield from training)

    return job


def expert_legend(model_dir: Path) -> ExpertLegend:
    """The experts' names and colours, from the recipe beside the model (``expert i`` without one)."""
    from app.core.chat.trace import read_legend
    from app.core.eval.nll import configured_experts, read_model_config

    return read_legend(model_dir, configured_experts(read_model_config(str(model_dir))))


def expert_legend_job(model_dir: Path) -> JobFactory:
    return call_in_worker(lambda: expert_legend(model_dir))


@dataclass(frozen=True)
class LossRow:
    """One dataset's mean next-token loss (nats per token) under the old and the new routers."""

    dataset: str
    before: float
    after: float
    tokens: int | None  # None for the trainer's own validation split, whose size the trainer keeps

    @property
    def change(self) -> float:
        return self.after - self.before


@dataclass(frozen=True)
class Comparison:
    """The old routers against the new: held-out losses, and where the recipe's test prompts go."""

    labels: tuple[str, ...]
    colors: tuple[str, ...]
    top_k: int
    losses: tuple[LossRow, ...]
    before_routing: ModelRouting | None  # None: the recipe has no test prompts
    after_routing: ModelRouting | None


def recipe_test_prompts(model_dir: Path) -> list[list[str]]:
    """The test prompts of each expert, from the recipe the merge saved beside the model; [] without one."""
    from app.core.merge.pipeline import RECIPE_FILENAME
    from app.core.recipe import load_recipe

    path = model_dir / RECIPE_FILENAME
    if not path.is_file():
        return []
    recipe = load_recipe(path)
    prompts = [list(extras.test_prompts) for extras in recipe.studio.experts[: len(recipe.experts)]]
    return prompts if any(prompts) else []


def held_out_datasets(prompts: list[list[str]], labels: tuple[str, ...], files: tuple[Path, ...]) -> list[EvalDataset]:
    """The recipe's test prompts, one dataset per expert, then each held-out file."""
    from app.core.eval.data import EvalDataset, load_data_file

    datasets = [
        EvalDataset(name=f"{labels[expert]} test prompts", records=tuple(texts))
        for expert, texts in enumerate(prompts)
        if texts
    ]
    return datasets + [load_data_file(path) for path in files]


def compare_job(
    before_dir: Path, after_dir: Path, result: RouterTrainingResult, held_out: tuple[Path, ...], device: str, dtype: str
) -> JobFactory:
    """Score both models on the held-out data and route the test prompts through both."""

    def job(cancel: threading.Event) -> Job[Comparison]:
        from app.core.eval.nll import EvalModel, EvalRequest, configured_top_k, evaluate, read_model_config
        from app.core.progress import relabelled  # one stage name for each model's routing records
        from app.core.routing_eval import evaluate_model_routing

        yield Progress("reading", 0, 1, message="reading the test prompts and held-out files")
        legend = expert_legend(after_dir)
        prompts = recipe_test_prompts(after_dir)
        datasets = held_out_datasets(prompts, legend.labels, held_out)
        losses = [LossRow(VALIDATION_ROW, result.initial_val_loss, result.final_val_loss, None)]
        if datasets:
            check_cancel(cancel)
            request = EvalRequest(
                models=(EvalModel("before", str(before_dir)), EvalModel("after", str(after_dir))),
                datasets=tuple(datasets),
                device=device,
                dtype=dtype,
            )
            report = yield from evaluate(request, cancel)
            scores = {(r.dataset, r.model): r for r in report.results}
            for dataset in datasets:
                before, after = scores[(dataset.name, "before")], scores[(dataset.name, "after")]
                losses.append(LossRow(dataset.name, before.nll, after.nll, after.tokens))
        routings: list[ModelRouting | None] = [None, None]
        if prompts:
            for index, (stage, folder) in enumerate((("routing before", before_dir), ("routing after", after_dir))):
                routing = evaluate_model_routing(folder, prompts, device=device, cancel=cancel)
                routings[index] = yield from relabelled(routing, stage)
        return Comparison(
            labels=legend.labels,
            colors=legend.colors,
            top_k=configured_top_k(read_model_config(str(after_dir))) or 1,
            losses=tuple(losses),
            before_routing=routings[0],
            after_routing=routings[1],
        )

    return job

