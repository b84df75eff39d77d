"""The GUI's jobs over the core engine. Heavy modules (torch, transformers, the engine's own) are
imported inside the jobs, which run in worker threads, so the window never waits for them."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.core.problems import Problem
from app.core.progress import Job, Progress, check_cancel
from app.core.recipe import ModelRef, Recipe


@dataclass(frozen=True)
class ModelInfo:
    reference: ModelRef
    family: str = ""
    size_bytes: int = 0
    parameter_count: int = 0
    dtype: str = ""
    # Set instead of the figures above when the model cannot be read; `downloadable` when it is
    # a Hub model that simply is not in the cache yet.
    error: str = ""
    hint: str = ""
    downloadable: bool = False


def warm_up(cancel: threading.Event) -> Job[None]:
    """Import torch and transformers ahead of need, so the first preview starts at once."""
    yield Progress("loading", 0, 2, message="loading torch")
    import torch  # noqa: F401

    check_cancel(cancel)
    yield Progress("loading", 1, 2, message="loading transformers")
    import transformers  # noqa: F401

    yield Progress("loading", 2, 2, message="engine ready")


def inspect_models(references: list[ModelRef]) -> Any:
    def job(cancel: threading.Event) -> Job[dict[ModelRef, ModelInfo]]:
        from app.core.sources import ModelNotDownloaded, open_model
        from app.core.problems import FrankenMoEError

        found: dict[ModelRef, ModelInfo] = {}
        for done, reference in enumerate(references):
            check_cancel(cancel)
            yield Progress("inspecting models", done, len(references), message=f"reading {reference}")
            try:
                source = open_model(reference)
            except ModelNotDownloaded as exc:
                found[reference] = ModelInfo(reference, error=exc.message, hint=exc.hint, downloadable=True)
            except FrankenMoEError as exc:
                found[reference] = ModelInfo(reference, error=exc.message, hint=exc.hint)
            else:
                found[reference] = ModelInfo(
                    reference, source.family, source.size_bytes, source.parameter_count, source.dtype
                )
        return found

    return job


def check_compatibility(recipe: Recipe) -> Any:
    def job(cancel: threading.Event) -> Job[list[Problem]]:
        from app.core.compat import check_recipe

        yield Progress("checking", 0, 1, message="checking compatibility")
        check_cancel(cancel)
        return list(check_recipe(recipe))

    return job
