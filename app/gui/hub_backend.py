"""The seam between the Hub search dialog and the Hub core (issue 3, `app/core/hub.py`).

The dialog and the download buttons speak only this protocol; until the Hub core is part of the
build, there is no backend and they say so instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from app.core.recipe import ModelRef, Recipe
from app.gui.workers import JobFactory

SORTS = ("downloads", "likes", "trending", "recently updated")


@dataclass(frozen=True)
class HubModelRow:
    repo_id: str
    parameters: int | None
    size_bytes: int | None
    dtype: str
    license: str
    gated: bool
    downloads: int
    likes: int
    last_modified: str


class HubBackend(Protocol):
    def search(self, query: str, sort: str, limit: int) -> JobFactory:
        """A job returning ``list[HubModelRow]``."""
        ...

    def inspect(self, repo_id: str, recipe: Recipe) -> JobFactory:
        """A job returning a plain-text description: architecture, sizes, fit with the recipe."""
        ...

    def download(self, reference: ModelRef) -> JobFactory:
        """A job returning the downloaded snapshot's folder."""
        ...


def load_hub_backend() -> HubBackend | None:
    # The Hub core is being written on its own branch; wire its adapter here when it lands.
    return None
