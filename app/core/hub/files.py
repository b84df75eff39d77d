"""Which files of a Hub model a merge and a chat need, and which of them the cache already holds."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import get_cached_repo_tree, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import CachedRepoTreeNotFoundError
from huggingface_hub.hf_api import ModelInfo

from app.core.hub.config import HubConfig
from app.core.hub.errors import hub_errors
from app.core.recipe import ModelRef
from app.core.sources import read_json_file

CONFIG_FILES = frozenset({"config.json", "generation_config.json"})
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.json",
        "chat_template.jinja",
    }
)
CHAT_TEMPLATE_FILES = frozenset({"chat_template.jinja", "chat_template.json"})
INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
# A PEFT adapter: its settings and its weights (the pickle twin ``adapter_model.bin`` is never fetched),
# plus its card; tokenizer files too when it carries them.
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_EXTRA_FILES = frozenset({"README.md"})
# Names of a full model's weights, which an adapter repo does not carry.
MODEL_WEIGHT_PREFIXES = ("model", "pytorch_model", "consolidated")


@dataclass(frozen=True, slots=True)
class RemoteFile:
    """A file of the repo that a merge needs; ``cached`` if its blob is already in the cache."""

    path: str
    size: int
    etag: str | None
    cached: bool


def shard_names(index_file: Path) -> set[str]:
    weight_map = read_json_file(index_file).get("weight_map", {})
    return set(weight_map.values())


def is_adapter_repo(paths: Iterable[str]) -> bool:
    """A PEFT adapter repo: an ``adapter_config.json`` at the top and no full model's weights beside it."""
    top_level = {p for p in paths if "/" not in p}
    full_weights = any(
        p.startswith(MODEL_WEIGHT_PREFIXES) and p.endswith((".safetensors", ".bin")) for p in top_level
    )
    return ADAPTER_CONFIG_FILE in top_level and not full_weights


def select_adapter_files(paths: Iterable[str]) -> list[str]:
    """An adapter's files: its config, its safetensors weights, tokenizer files if any, and its card.

    Training leftovers (``optimizer.pt``, ``training_args.bin``), checkpoints in subfolders and the
    pickle ``adapter_model.bin`` stay on the Hub.
    """
    top_level = sorted(p for p in paths if "/" not in p)
    wanted = {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE} | TOKENIZER_FILES | ADAPTER_EXTRA_FILES
    return [p for p in top_level if p in wanted or p.endswith(".tiktoken")]


def select_merge_files(paths: Iterable[str], shards: Collection[str] | None) -> list[str]:
    """The repo files to fetch: configs, tokenizer and chat template, and one copy of the weights.

    Only top-level files: subfolders hold other formats (``original/``, ``onnx/``). Many repos carry
    the weights twice (sharded ``model-*.safetensors`` plus a ``consolidated.safetensors``), so when
    an index names the shards only those are taken. An adapter's files: :func:`select_adapter_files`.
    """
    top_level = sorted(p for p in paths if "/" not in p)
    chosen = [p for p in top_level if p in CONFIG_FILES or p in TOKENIZER_FILES or p.endswith(".tiktoken")]
    if shards is not None:
        chosen += [INDEX_FILE, *(p for p in top_level if p in shards)]
    elif SINGLE_WEIGHTS_FILE in top_level:
        chosen.append(SINGLE_WEIGHTS_FILE)
    else:
        chosen += [p for p in top_level if p.endswith(".safetensors")]
    return chosen


def has_weights(paths: Iterable[str]) -> bool:
    return any(p.endswith(".safetensors") for p in paths)


def repo_cache_folder(config: HubConfig, repo_id: str) -> Path:
    # The documented layout of the Hugging Face cache: models--{org}--{name}/{blobs,refs,snapshots}.
    return config.cache_dir / f"models--{repo_id.replace('/', '--')}"


def _blob_is_cached(config: HubConfig, repo_id: str, etag: str | None) -> bool:
    # Blobs are named by their ETag (sha256 for LFS files, git blob id otherwise), which is how
    # huggingface_hub skips a file whose content it already holds under any revision.
    return etag is not None and (repo_cache_folder(config, repo_id) / "blobs" / etag).is_file()


def remote_merge_files(info: ModelInfo, config: HubConfig, adapter: bool | None = None) -> list[RemoteFile]:
    """The files a merge needs, sized by the Hub's file metadata (``model_info(files_metadata=True)``);
    of an adapter (``adapter``, or None to tell by the repo's files), only its own files."""
    siblings = {s.rfilename: s for s in info.siblings or []}
    if adapter is None:
        adapter = is_adapter_repo(siblings)
    if adapter:
        return [_remote_file(info, config, siblings[path]) for path in select_adapter_files(siblings)]
    shards: set[str] | None = None
    if INDEX_FILE in siblings:
        with hub_errors(info.id, info.sha, config):
            index_path = hf_hub_download(
                info.id,
                INDEX_FILE,
                revision=info.sha,
                cache_dir=config.cache_dir,
                endpoint=config.endpoint,
                token=config.token,
                etag_timeout=config.request_timeout_s,
            )
        shards = shard_names(Path(index_path))
    chosen = select_merge_files(siblings, shards)
    return [_remote_file(info, config, siblings[path]) for path in chosen]


def _remote_file(info: ModelInfo, config: HubConfig, sibling: Any) -> RemoteFile:
    etag = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
    size = sibling.lfs.size if sibling.lfs is not None else (sibling.size or 0)
    return RemoteFile(sibling.rfilename, size, etag, _blob_is_cached(config, info.id, etag))


def refresh_cached(files: Iterable[RemoteFile], repo_id: str, config: HubConfig) -> list[RemoteFile]:
    """``files`` with ``cached`` as the cache holds them now."""
    return [RemoteFile(f.path, f.size, f.etag, _blob_is_cached(config, repo_id, f.etag)) for f in files]


def _cached_listing(ref: ModelRef, revision: str, config: HubConfig, snapshot: Path) -> list[str]:
    try:
        return [f.path for f in get_cached_repo_tree(ref.path, revision=revision, cache_dir=config.cache_dir)]
    except CachedRepoTreeNotFoundError:
        # Downloaded by another tool that kept no file listing: judge by what the folder holds.
        return [p.name for p in snapshot.iterdir()]


def cached_snapshot(ref: ModelRef, config: HubConfig) -> Path | None:
    """The snapshot folder of a Hub model, or of a repo that holds a PEFT adapter, if the cache already
    holds every file a merge needs; no network."""
    revision = ref.revision or "main"
    config_path = try_to_load_from_cache(ref.path, "config.json", cache_dir=config.cache_dir, revision=revision)
    if not isinstance(config_path, str):
        return cached_adapter_snapshot(ref, config)
    snapshot = Path(config_path).parent
    listed = _cached_listing(ref, revision, config, snapshot)
    index = snapshot / INDEX_FILE
    shards = shard_names(index) if index.is_file() else None
    if INDEX_FILE in listed and shards is None:
        return None
    needed = select_merge_files(listed, shards)
    if not has_weights(needed) or not all((snapshot / path).is_file() for path in needed):
        return None
    return snapshot


def cached_adapter_snapshot(ref: ModelRef, config: HubConfig) -> Path | None:
    """The snapshot folder of a Hub adapter if the cache holds its safetensors weights and every other
    file an adapter download fetches; no network."""
    revision = ref.revision or "main"
    config_path = try_to_load_from_cache(ref.path, ADAPTER_CONFIG_FILE, cache_dir=config.cache_dir, revision=revision)
    if not isinstance(config_path, str):
        return None
    snapshot = Path(config_path).parent
    needed = select_adapter_files(_cached_listing(ref, revision, config, snapshot))
    if ADAPTER_WEIGHTS_FILE not in needed or not all((snapshot / path).is_file() for path in needed):
        return None
    return snapshot
