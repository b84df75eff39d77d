"""The Hugging Face Hub: search, inspect before downloading, download into the standard cache.

Everything here uses huggingface_hub's public API against ``HubConfig.endpoint``; errors come out
as :class:`HubError` subclasses that say what to do.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each name loads its module on first use: huggingface_hub's imports take a fifth of a second, which
# commands and pages that never reach the Hub (a local merge, the chat) should not pay.
_MODULE_OF = {
    "AdapterCard": "adapters",
    "HubUser": "auth",
    "check_token": "auth",
    "has_token": "auth",
    "save_token": "auth",
    "HubConfig": "config",
    "Architecture": "details",
    "ModelReport": "details",
    "fetch_config": "details",
    "inspect_model": "details",
    "DownloadProgress": "download",
    "download_model": "download",
    "ensure_models": "download",
    "ensure_recipe_models": "download",
    "plan_download": "download",
    "DiskFullError": "errors",
    "GatedModelError": "errors",
    "HubError": "errors",
    "HubOfflineError": "errors",
    "HubServerError": "errors",
    "ModelNotFoundError": "errors",
    "NoSafetensorsError": "errors",
    "RevisionNotFoundError": "errors",
    "TokenError": "errors",
    "call_cancellable": "network",
    "forget_reachability": "network",
    "require_hub": "network",
    "unreachable_reason": "network",
    "RemoteFile": "files",
    "cached_snapshot": "files",
    "is_adapter_repo": "files",
    "FitEstimate": "fit",
    "MachineMemory": "fit",
    "estimate_fit": "fit",
    "machine_memory": "fit",
    "ModelSummary": "search",
    "SearchPage": "search",
    "search_models": "search",
    "SORT_KEYS": "sorting",
    "SortKey": "sorting",
}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
