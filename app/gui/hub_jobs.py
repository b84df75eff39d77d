"""The GUI's jobs over the Hub core (:mod:`app.core.hub`): search, inspect, download, tokens.

Like every job they run in worker threads. ``app.core.hub``, and huggingface_hub with it, is
imported inside the jobs, so the window opens without waiting for either.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from app.core.problems import FrankenMoEError
from app.core.progress import Job, Progress, check_cancel
from app.core.recipe import ModelRef, Recipe
from app.gui.widgets import format_duration
from app.gui.workers import JobFactory

if TYPE_CHECKING:
    from app.core.hub import FitEstimate, ModelReport, SearchPage, SortKey

T = TypeVar("T")

# The sort menu's wording, and the Hub core's sort key for each.
SORTS: dict[str, SortKey] = {
    "most downloaded": "downloads",
    "most liked": "likes",
    "trending": "trending",
    "recently updated": "updated",
}
# Memory estimates need a dtype the fit module knows; recipes without one merge in bfloat16.
FIT_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class SearchAnswer:
    """A page of results with the question it answers, so that a late answer to an older search
    can be told apart from the current one."""

    query: str
    sort: SortKey
    page: SearchPage
    adapters: bool = False


def search(query: str, sort: SortKey, limit: int, offset: int = 0, adapters: bool = False) -> JobFactory:
    """A page of Hub models matching ``query``; of PEFT adapters instead with ``adapters``."""

    def job(cancel: threading.Event) -> Job[SearchAnswer]:
        from app.core.hub import call_cancellable, search_models

        what = "adapters" if adapters else "models"
        yield Progress("searching", 0, 1, message=f"searching the Hub's {what} for {query!r}")
        page = call_cancellable(
            lambda: search_models(query, sort=sort, limit=limit, offset=offset, adapters=adapters), cancel
        )
        return SearchAnswer(query, sort, page, adapters)

    return job


@dataclass(frozen=True)
class HubDetails:
    """What the Hub search dialog's detail pane shows about one model, beyond its search row."""

    repo_id: str
    report: ModelReport | None = None
    fit: FitEstimate | None = None
    # Why the model was not checked against the recipe's base model, when it was not.
    base_note: str = ""
    # When the model could not be read: what happened, and what to do about it.
    error: str = ""
    hint: str = ""
    # For a gated model: the page where its terms are accepted.
    access_url: str = ""


def inspect(repo_id: str, recipe: Recipe, as_base: bool, new_expert: bool = True) -> JobFactory:
    """Describe a Hub model from its small files, checked against the recipe's base when it joins
    as an expert, with the memory the resulting MoE would need on this machine. An adapter for an
    expert already in the recipe (``new_expert`` False) adds no expert to that MoE."""

    def job(cancel: threading.Event) -> Job[HubDetails]:
        from app.core.hub import (
            GatedModelError,
            HubError,
            call_cancellable,
            estimate_fit,
            fetch_config,
            inspect_model,
        )

        yield Progress("inspecting", 0, 2, message=f"reading {repo_id}'s configuration")
        base_config = None
        base_note = ""
        if as_base:
            base_note = "Once it is the base, every expert is checked against it on the Models page."
        elif not recipe.base_model.path:
            base_note = "The recipe has no base model yet: the first model added becomes the base."
        else:
            try:
                base_config = call_cancellable(lambda: fetch_config(recipe.base_model), cancel)
            except (FrankenMoEError, OSError, ValueError) as error:
                reason = error.message if isinstance(error, FrankenMoEError) else str(error)
                base_note = f"Not checked against the base model, whose configuration cannot be read: {reason}"
        check_cancel(cancel)
        try:
            report = call_cancellable(lambda: inspect_model(repo_id, base=base_config), cancel)
        except GatedModelError as error:
            return HubDetails(repo_id, error=error.message, hint=error.hint, access_url=error.url)
        except HubError as error:
            return HubDetails(repo_id, error=error.message, hint=error.hint)
        check_cancel(cancel)
        yield Progress("inspecting", 1, 2, message="estimating memory")
        fit = None
        # An adapter becomes an MLP of its base's size: the memory is its base's, plus the adapter itself.
        adapter = report.adapter
        dense_parameters = report.summary.parameters if adapter is None else adapter.base_parameters
        adapter_parameters = (report.summary.parameters or 0) if adapter is not None else 0
        if dense_parameters and report.config:
            experts = len(recipe.experts) + (1 if new_expert and not as_base else 0)
            fit = estimate_fit(
                report.config,
                dense_parameters=dense_parameters,
                n_experts=max(2, experts),
                dtype=recipe.dtype if recipe.dtype in FIT_DTYPES else "bfloat16",
                adapter_parameters=adapter_parameters,
            )
        return HubDetails(repo_id, report, fit, base_note)

    return job


def describe_downloads(job: Job[T]) -> Job[T]:
    """``job``'s progress, with each download record naming its model and the time left."""
    from app.core.hub import DownloadProgress

    try:
        while True:
            try:
                record = next(job)
            except StopIteration as stop:
                return stop.value
            if isinstance(record, DownloadProgress) and record.bytes_total:
                message = f"{record.repo_id}: {record.message}"
                if record.eta_seconds is not None:
                    message += f", about {format_duration(record.eta_seconds)} left"
                record = replace(record, message=message)
            yield record
    finally:
        # Cancelling closes this generator: close the download too, which stops and joins its thread.
        job.close()


def download(reference: ModelRef) -> JobFactory:
    def job(cancel: threading.Event) -> Job[Path]:
        from app.core.hub import download_model

        return (yield from describe_downloads(download_model(reference, cancel)))

    return job


def ensure_downloaded(references: Sequence[ModelRef], cancel: threading.Event) -> Job[dict[ModelRef, Path]]:
    """Inside a preview or merge job: the Hub models the cache lacks are downloaded first, as
    ``frankenmoe merge`` does, with their progress reported as the job's own."""
    from app.core.hub import ensure_models

    return (yield from describe_downloads(ensure_models(list(references), cancel)))


@dataclass(frozen=True)
class HubLogin:
    """Who the saved token belongs to; never the token itself."""

    user: str
    token_name: str | None


def saved_login() -> JobFactory:
    """The login huggingface_hub already has (``HF_TOKEN`` or a saved token), or None."""

    def job(cancel: threading.Event) -> Job[HubLogin | None]:
        from app.core.hub import call_cancellable, check_token, has_token

        yield Progress("hub login", 0, 1, message="checking the saved token with the Hub")
        check_cancel(cancel)
        if not has_token():
            return None
        user = call_cancellable(check_token, cancel)
        return HubLogin(user.name, user.token_name)

    return job


def log_in(token: str) -> JobFactory:
    """Check a pasted token with the Hub and save it through huggingface_hub's own login."""

    def job(cancel: threading.Event) -> Job[HubLogin]:
        from app.core.hub import save_token

        yield Progress("hub login", 0, 1, message="checking the token with the Hub")
        check_cancel(cancel)
        user = save_token(token)
        return HubLogin(user.name, user.token_name)

    return job
