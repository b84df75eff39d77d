"""The Hugging Face Hub: search, inspect before downloading, download into the standard cache.

Everything here uses huggingface_hub's public API against ``HubConfig.endpoint``; errors come out
as :class:`HubError` subclasses that say what to do.
"""

from app.core.hub.auth import HubUser, check_token, has_token, save_token
from app.core.hub.config import HubConfig
from app.core.hub.details import Architecture, ModelReport, fetch_config, inspect_model
from app.core.hub.download import (
    DownloadProgress,
    download_model,
    ensure_models,
    ensure_recipe_models,
    plan_download,
)
from app.core.hub.errors import (
    DiskFullError,
    GatedModelError,
    HubError,
    HubOfflineError,
    HubServerError,
    ModelNotFoundError,
    NoSafetensorsError,
    RevisionNotFoundError,
    TokenError,
)
from app.core.hub.files import RemoteFile, cached_snapshot
from app.core.hub.fit import FitEstimate, MachineMemory, estimate_fit, machine_memory
from app.core.hub.search import SORT_KEYS, ModelSummary, SearchPage, SortKey, search_models

__all__ = [
    "SORT_KEYS",
    "Architecture",
    "DiskFullError",
    "DownloadProgress",
    "FitEstimate",
    "GatedModelError",
    "HubConfig",
    "HubError",
    "HubOfflineError",
    "HubServerError",
    "HubUser",
    "MachineMemory",
    "ModelNotFoundError",
    "ModelReport",
    "ModelSummary",
    "NoSafetensorsError",
    "RemoteFile",
    "RevisionNotFoundError",
    "SearchPage",
    "SortKey",
    "TokenError",
    "cached_snapshot",
    "check_token",
    "download_model",
    "ensure_models",
    "ensure_recipe_models",
    "estimate_fit",
    "fetch_config",
    "has_token",
    "inspect_model",
    "machine_memory",
    "plan_download",
    "save_token",
    "search_models",
]
