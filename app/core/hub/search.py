"""Searching the Hub for text-generation models, with the facts that matter for merging."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from app.core.hub.config import HubConfig, resolve_config
from app.core.hub.errors import hub_errors
from app.core.hub.network import require_hub
from app.core.hub.sorting import SORT_KEYS, SortKey

# Our sort keys as the Hub's listing API spells them.
_HUB_SORT = {
    "downloads": "downloads",
    "likes": "likes",
    "trending": "trendingScore",
    "updated": "lastModified",
}

# Bytes per parameter for the dtype names the Hub uses in its safetensors metadata.
DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "BF16": 2,
    "F16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

SEARCH_FIELDS = [
    "downloads",
    "likes",
    "lastModified",
    "trendingScore",
    "gated",
    "safetensors",
    "cardData",
    "tags",
    "pipeline_tag",
    "library_name",
]
# The library of PEFT adapters. The Hub lists a repo's library among its tags, so ``filter=peft``
# finds adapters, as huggingface_hub's ``list_models(filter="peft")`` asks.
ADAPTER_LIBRARY = "peft"
# The tag with which the Hub names an adapter's base model.
ADAPTER_BASE_TAG = "base_model:adapter:"


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """One Hub model as a search result. Sizes are None when the Hub has no safetensors metadata."""

    repo_id: str
    parameters: int | None
    dtype: str | None
    size_bytes: int | None
    license: str | None
    gated: bool
    downloads: int | None
    likes: int | None
    last_modified: datetime | None
    library: str | None = None
    # For an adapter: the model it was trained on, as the Hub's tags name it.
    base_model: str | None = None

    @property
    def is_adapter(self) -> bool:
        return self.library == ADAPTER_LIBRARY


@dataclass(frozen=True, slots=True)
class SearchPage:
    models: tuple[ModelSummary, ...]
    offset: int
    has_more: bool

    @property
    def next_offset(self) -> int:
        return self.offset + len(self.models)


def summarize(info: ModelInfo) -> ModelSummary:
    parameters = dtype = size = None
    if info.safetensors is not None and info.safetensors.parameters:
        counts = info.safetensors.parameters
        parameters = info.safetensors.total or sum(counts.values())
        dtype = max(counts, key=lambda name: counts[name])
        # Unknown dtypes count as 2 bytes, the common case for today's checkpoints.
        size = sum(n * DTYPE_BYTES.get(name, 2) for name, n in counts.items())
    license_ = getattr(info.card_data, "license", None) if info.card_data is not None else None
    if license_ is None:
        license_ = next((t.removeprefix("license:") for t in info.tags or [] if t.startswith("license:")), None)
    if isinstance(license_, list):
        license_ = ", ".join(map(str, license_))
    base_tags = (t.removeprefix(ADAPTER_BASE_TAG) for t in info.tags or [] if t.startswith(ADAPTER_BASE_TAG))
    base_model = next(base_tags, None)
    return ModelSummary(
        repo_id=info.id,
        parameters=parameters,
        dtype=dtype,
        size_bytes=size,
        license=license_,
        gated=bool(info.gated),
        downloads=info.downloads,
        likes=info.likes,
        last_modified=info.last_modified,
        library=info.library_name,
        base_model=base_model,
    )


def _list_models(params: dict[str, Any], wanted: int, config: HubConfig) -> list[ModelInfo]:
    """The first ``wanted`` models of the Hub's listing, following its Link-header pages.

    Asked directly rather than through ``HfApi.list_models``, whose pages retry a failed
    connection for 23 s and wait without a timeout: a search is asked once, with
    ``config.request_timeout_s``, and a failure is reported at once.
    """
    session = get_session()
    headers = build_hf_headers(token=config.token)
    url: str | None = f"{config.endpoint}/api/models"
    query: dict[str, Any] | None = params
    found: list[ModelInfo] = []
    while url is not None and len(found) < wanted:
        response = session.get(url, params=query, headers=headers, timeout=config.request_timeout_s)
        hf_raise_for_status(response)
        for item in response.json():
            item.setdefault("siblings", None)
            found.append(ModelInfo(**item))
        url = response.links.get("next", {}).get("url")
        query = None  # the next page's link carries the query
    return found[:wanted]


def search_models(
    query: str,
    *,
    sort: SortKey = "downloads",
    limit: int = 20,
    offset: int = 0,
    adapters: bool = False,
    config: HubConfig | None = None,
) -> SearchPage:
    """Text-generation models matching ``query``, ``limit`` at a time, starting after ``offset`` results;
    with ``adapters``, PEFT adapters instead (library ``peft``, whatever their pipeline tag, since
    many adapters declare none).

    The Hub's listing cannot resume at a page, so a later page asks for all results up to its end
    and skips the ones already shown; one result more than needed tells whether more exist.
    Raises :class:`HubOfflineError` within ``config.probe_timeout_s`` when the Hub cannot be reached.
    """
    if sort not in _HUB_SORT:
        raise ValueError(f"sort must be one of {', '.join(SORT_KEYS)}")
    config = resolve_config(config)
    wanted = offset + limit + 1
    params: dict[str, Any] = {
        "filter": ADAPTER_LIBRARY if adapters else "text-generation",
        "sort": _HUB_SORT[sort],
        "limit": wanted,
        "expand": SEARCH_FIELDS,
    }
    if query.strip():
        params["search"] = query.strip()
    with hub_errors(None, None, config):
        require_hub(config)
        listing = _list_models(params, wanted, config)
    found = [summarize(info) for info in listing[offset:]]
    return SearchPage(models=tuple(found[:limit]), offset=offset, has_more=len(found) > limit)
