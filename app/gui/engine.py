"""The GUI's jobs over the core engine. Heavy modules (torch, transformers, the engine's own) are
imported inside the jobs, which run in worker threads, so the window never waits for them."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.core.imports import TRANSFORMERS_IMPORT_LOCK
from app.core.problems import Problem
from app.core.progress import Job, Progress, check_cancel
from app.core.recipe import ModelRef, Recipe
from app.gui.hub_jobs import ensure_downloaded
from app.gui.workers import JobFactory

if TYPE_CHECKING:
    from app.core.merge.gates import GateComputer, GateResult, RoutingPreview
    from app.core.merge.pipeline import MergeResult


@dataclass(frozen=True)
class ModelInfo:
    reference: ModelRef
    family: str = ""
    size_bytes: int = 0
    parameter_count: int = 0
    dtype: str = ""
    # Set instead of the figures above when the model cannot be read.
    error: str = ""
    hint: str = ""
    # A Hub model the cache does not hold yet; its figures, when the Hub answered, are the Hub's,
    # and `to_fetch` says how much a download brings.
    downloadable: bool = False
    to_fetch: str = ""


def warm_up(cancel: threading.Event) -> Job[None]:
    """Import torch and transformers ahead of need, so the first preview starts at once."""
    yield Progress("loading", 0, 2, message="loading torch")
    import torch  # noqa: F401

    check_cancel(cancel)
    yield Progress("loading", 1, 2, message="loading transformers")
    with TRANSFORMERS_IMPORT_LOCK:
        import transformers  # noqa: F401

    yield Progress("loading", 2, 2, message="engine ready")


def inspect_models(references: list[ModelRef], cache_dir: Path | None = None) -> JobFactory:
    def job(cancel: threading.Event) -> Job[dict[ModelRef, ModelInfo]]:
        from app.core.problems import FrankenMoEError
        from app.core.sources import ModelNotDownloaded, open_model

        found: dict[ModelRef, ModelInfo] = {}
        for done, reference in enumerate(references):
            check_cancel(cancel)
            yield Progress("inspecting models", done, len(references), message=f"reading {reference}")
            try:
                source = open_model(reference, cache_dir)
            except ModelNotDownloaded:
                found[reference] = _hub_model_info(reference)
            except FrankenMoEError as exc:
                found[reference] = ModelInfo(reference, error=exc.message, hint=exc.hint)
            else:
                with source:
                    found[reference] = ModelInfo(
                        reference, source.family, source.size_bytes, source.parameter_count, source.dtype
                    )
        return found

    return job


def _hub_model_info(reference: ModelRef) -> ModelInfo:
    """What the Hub says about a model the cache lacks, so that its row is filled before a download."""
    from app.core.hub import HubError, inspect_model

    # Of MODEL+ADAPTER, the model's figures, or the adapter's when the model is a local folder.
    on_hub = reference.lora if reference.model.is_local and reference.lora is not None else reference.model
    try:
        report = inspect_model(on_hub)
    except HubError as exc:
        return ModelInfo(reference, error=exc.message, hint=exc.hint, downloadable=True)
    summary = report.summary
    return ModelInfo(
        reference,
        report.architecture.family or "unknown",
        report.bytes_total,
        summary.parameters or 0,
        summary.dtype or "",
        downloadable=True,
        to_fetch=report.size_text(),
    )


def check_compatibility(recipe: Recipe, cache_dir: Path | None = None) -> JobFactory:
    def job(cancel: threading.Event) -> Job[list[Problem]]:
        from app.core.compat import check_recipe

        yield Progress("checking", 0, 1, message="checking compatibility")
        check_cancel(cancel)
        # The app's merge downloads what the cache lacks first: a model not downloaded yet blocks nothing.
        return list(check_recipe(recipe, cache_dir, download_later=True))

    return job


def base_parameter_count(recipe: Recipe, cache_dir: Path | None = None) -> JobFactory:
    """The base model's parameter count from its weights' headers, or None when it must be downloaded
    first or cannot be read: what the Preview page needs to judge whether a preview is quick."""

    def job(cancel: threading.Event) -> Job[int | None]:
        from app.core.problems import FrankenMoEError
        from app.core.sources import open_model

        yield Progress("estimating", 0, 1, message="reading the base model's size")
        check_cancel(cancel)
        try:
            with open_model(recipe.base_model, cache_dir) as source:
                return source.parameter_count
        except (FrankenMoEError, OSError):  # not downloaded, or unreadable: computing says why, when asked
            return None

    return job


@dataclass(frozen=True)
class PreviewResult:
    recipe: Recipe
    gates: GateResult
    routing: RoutingPreview | None  # None when no expert has test prompts


class GateSession:
    """Keeps one GateComputer, and with it the base model's weights, between previews, so that
    editing prompts and computing again takes a moment. Only one job uses it at a time."""

    def __init__(self, device: str = "auto", dtype: str | None = None, cache_dir: Path | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.cache_dir = cache_dir
        self._computer: GateComputer | None = None

    def _computer_for(self, recipe: Recipe) -> GateComputer:
        from app.core.merge.gates import GateComputer

        if self._computer is not None and self._computer.base != recipe.base_model:
            self.close()
        if self._computer is None:
            self._computer = GateComputer(
                recipe.base_model,
                device=self.device,
                dtype=self.dtype,
                keep_loaded=True,
                cache_dir=self.cache_dir,
            )
        return self._computer

    def preview(self, recipe: Recipe) -> JobFactory:
        def job(cancel: threading.Event) -> Job[PreviewResult]:
            # The routers come from the base model alone; fetch it first if it is a Hub model.
            yield from ensure_downloaded([recipe.base_model], cancel)
            computer = self._computer_for(recipe)
            gates = yield from computer.compute(recipe, cancel)
            test_prompts = [extras.test_prompts for extras in recipe.studio.experts[: len(recipe.experts)]]
            routing = None
            if any(test_prompts):
                routing = yield from computer.route(recipe, gates, test_prompts, cancel)
            return PreviewResult(recipe, gates, routing)

        return job

    def close(self) -> None:
        if self._computer is not None:
            self._computer.close()
            self._computer = None


@dataclass(frozen=True)
class MergeRequest:
    """The Merge page's choices; turned into the engine's MergeOptions in the worker, whose module
    is too heavy to import on the GUI thread."""

    out_dir: Path
    shard_size: int
    overwrite: bool
    device: str = "auto"
    dtype: str | None = None
    cache_dir: Path | None = None
    name: str = ""
    description: str = ""
    license: str = ""


def merge(recipe: Recipe, request: MergeRequest, gates: GateResult | None) -> JobFactory:
    """Downloads the Hub models the cache lacks first, as ``frankenmoe merge`` does; reuses the
    preview's gates when they were computed for this very recipe."""

    def job(cancel: threading.Event) -> Job[MergeResult]:
        from app.core.merge.modelcard import ModelCardFields
        from app.core.merge.pipeline import MergeOptions, merge_moe

        options = MergeOptions(
            out_dir=request.out_dir,
            shard_size=request.shard_size,
            overwrite=request.overwrite,
            dtype=request.dtype,
            device=request.device,
            cache_dir=request.cache_dir,
            card=ModelCardFields(
                name=request.name or None,
                description=request.description or None,
                license=request.license or None,
            ),
        )
        yield from ensure_downloaded(recipe.model_refs(), cancel)
        return (yield from merge_moe(recipe, options, cancel, gates))

    return job
