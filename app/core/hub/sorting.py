"""The orders a Hub search can sort by, apart from the search code so that the CLI can offer them cheaply."""

from __future__ import annotations

from typing import Literal, get_args

SortKey = Literal["downloads", "likes", "trending", "updated"]
SORT_KEYS: tuple[str, ...] = get_args(SortKey)
