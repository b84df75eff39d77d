"""What a Hub model is, and whether it can join a recipe, from its small files alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.hf_api import ModelInfo

from app.core.hub.adapters import AdapterCard, card_problems, read_adapter_card
from app.core.hub.config import HubConfig, resolve_config
from app.core.hub.errors import HubError, ModelNotFoundError, hub_errors, unreachable_error
from app.core.hub.files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    CHAT_TEMPLATE_FILES,
    RemoteFile,
    has_weights,
    is_adapter_repo,
    remote_merge_files,
)
from app.core.hub.network import require_hub, unreachable_reason
from app.core.hub.search import ModelSummary, summarize
from app.core.problems import Problem, Severity
from app.core.progress import format_bytes
from app.core.recipe import ModelRef
from app.core.sources import read_json_file


@dataclass(frozen=True, slots=True)
class Architecture:
    family: str | None
    architectures: tuple[str, ...]
    layers: int | None
    hidden_size: int | None
    intermediate_size: int | None
    vocab_size: int | None
    attention_heads: int | None
    kv_heads: int | None
    max_positions: int | None
    rope_theta: float | None
    rope_scaling: Mapping[str, Any] | None
    torch_dtype: str | None
    tokenizer_class: str | None
    has_chat_template: bool


@dataclass(frozen=True, slots=True)
class ModelReport:
    """Everything the Hub tells about a model before its weights are downloaded."""

    ref: ModelRef
    commit: str
    url: str
    summary: ModelSummary
    config: Mapping[str, Any]
    architecture: Architecture
    files: tuple[RemoteFile, ...]
    problems: tuple[Problem, ...]
    # For a PEFT adapter: its rank, base and sizes. ``config`` and ``architecture`` are then its base's,
    # when that base is on the Hub and readable.
    adapter: AdapterCard | None = None

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def bytes_cached(self) -> int:
        return sum(f.size for f in self.files if f.cached)

    @property
    def bytes_to_fetch(self) -> int:
        return self.bytes_total - self.bytes_cached

    @property
    def can_join(self) -> bool:
        return not any(p.is_error for p in self.problems)

    def size_text(self) -> str:
        """For example "12.4 GB to fetch, 3.1 GB already cached"."""
        if not self.bytes_to_fetch:
            return f"all {format_bytes(self.bytes_total)} already cached"
        text = f"{format_bytes(self.bytes_to_fetch)} to fetch"
        return f"{text}, {format_bytes(self.bytes_cached)} already cached" if self.bytes_cached else text


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (multimodal configs nest it under ``text_config``)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


def describe_architecture(
    config: Mapping[str, Any], tokenizer_config: Mapping[str, Any] | None, chat_template_file: bool = False
) -> Architecture:
    """The facts of a config that matter for merging; the chat template may sit in its own file."""
    text = text_config(config)

    def number(*keys: str) -> Any:
        return next((text[k] for k in keys if isinstance(text.get(k), int | float)), None)

    rope_scaling = text.get("rope_scaling") or text.get("rope_parameters")
    rope_theta = number("rope_theta")
    if rope_theta is None and isinstance(rope_scaling, Mapping):
        rope_theta = rope_scaling.get("rope_theta")
    tokenizer_config = tokenizer_config or {}
    return Architecture(
        family=text.get("model_type") or config.get("model_type"),
        architectures=tuple(config.get("architectures") or ()),
        layers=number("num_hidden_layers", "n_layer"),
        hidden_size=number("hidden_size", "n_embd"),
        intermediate_size=number("intermediate_size", "n_inner"),
        vocab_size=number("vocab_size"),
        attention_heads=number("num_attention_heads", "n_head"),
        kv_heads=number("num_key_value_heads") or number("num_attention_heads", "n_head"),
        max_positions=number("max_position_embeddings", "n_positions"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling if isinstance(rope_scaling, Mapping) else None,
        torch_dtype=text.get("torch_dtype") or text.get("dtype") or config.get("torch_dtype"),
        tokenizer_class=tokenizer_config.get("tokenizer_class"),
        has_chat_template=chat_template_file or bool(tokenizer_config.get("chat_template")),
    )


def _download_json(repo_id: str, filename: str, commit: str, config: HubConfig) -> dict[str, Any] | None:
    """A small JSON file of the repo, through the cache; None if the repo has no such file.

    When the Hub cannot be reached, the cache answers alone, without a request (as under
    ``HF_HUB_OFFLINE``), rather than after huggingface_hub's timeouts and retries.
    """
    reason = unreachable_reason(config)
    if reason is not None:
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=config.cache_dir, revision=commit)
        if cached is None:
            raise unreachable_error(config, reason)
        if not isinstance(cached, str):  # the cache knows the repo has no such file
            return None
        path = cached
    else:
        with hub_errors(repo_id, commit, config):
            try:
                path = hf_hub_download(
                    repo_id,
                    filename,
                    revision=commit,
                    cache_dir=config.cache_dir,
                    endpoint=config.endpoint,
                    token=config.token,
                    etag_timeout=config.request_timeout_s,
                )
            except EntryNotFoundError:
                return None
    try:
        data = read_json_file(Path(path))
    except (OSError, ValueError) as exc:
        raise HubError(
            f"{filename} of {repo_id} is not readable ({exc})", "pick another model; this one's files are damaged"
        ) from exc
    if not isinstance(data, dict):
        raise HubError(
            f"{filename} of {repo_id} is not a JSON object", "pick another model; this one's files are damaged"
        )
    return data


def fetch_config(ref: ModelRef, config: HubConfig | None = None) -> dict[str, Any]:
    """``config.json`` of a local folder or a Hub model (fetching only that file, or reading it from
    the cache when the Hub cannot be reached)."""
    if ref.is_local:
        return read_json_file(Path(ref.path).expanduser() / "config.json")
    config = resolve_config(config)
    loaded = _download_json(ref.path, "config.json", ref.revision or "main", config)
    if loaded is None:
        raise ModelNotFoundError(
            f"{ref} has no config.json, so it is not a transformers model",
            "pick a model whose files include config.json and safetensors weights",
        )
    return loaded


def inspect_model(
    ref: ModelRef | str,
    *,
    base: ModelRef | Mapping[str, Any] | None = None,
    config: HubConfig | None = None,
) -> ModelReport:
    """Describe a Hub model and check it against a recipe's ``base`` (a ref or its config.json).

    Downloads nothing but ``config.json``, ``tokenizer_config.json`` and the weights index. A PEFT
    adapter is described by its ``adapter_config.json`` and checked through its base model's config.
    Raises :class:`HubOfflineError` within ``config.probe_timeout_s`` when the Hub cannot be reached.
    """
    ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
    config = resolve_config(config)
    with hub_errors(ref.path, ref.revision, config):
        require_hub(config)
        info = config.api().model_info(
            ref.path, revision=ref.revision, files_metadata=True, timeout=config.request_timeout_s
        )
    commit = info.sha or ref.revision or "main"
    if is_adapter_repo(s.rfilename for s in info.siblings or []):
        return _inspect_adapter(ref, info, commit, base, config)
    model_config = _download_json(ref.path, "config.json", commit, config)
    problems: list[Problem] = []
    if model_config is None:
        model_config = {}
        problems.append(
            Problem("model", f"{ref} has no config.json, so it is not a transformers model", "pick another model")
        )
    tokenizer_config = _download_json(ref.path, "tokenizer_config.json", commit, config)
    files = remote_merge_files(info, config)
    if not has_weights(f.path for f in files):
        problems.append(
            Problem(
                "model",
                f"{ref} has no safetensors weights (only older pickle checkpoints or other formats)",
                "pick a version of the model published as .safetensors",
            )
        )
    if base is not None and model_config:
        from app.core.compat import compare_configs

        base_config = fetch_config(base, config) if isinstance(base, ModelRef) else base
        problems += compare_configs(base_config, model_config, str(ref))
    return ModelReport(
        ref=ref,
        commit=commit,
        url=config.repo_url(ref.path),
        summary=summarize(info),
        config=model_config,
        architecture=describe_architecture(
            model_config, tokenizer_config, any(f.path in CHAT_TEMPLATE_FILES for f in files)
        ),
        files=tuple(files),
        problems=tuple(problems),
    )


def _describe_base(card: AdapterCard, config: HubConfig) -> tuple[AdapterCard, dict[str, Any], list[Problem]]:
    """The adapter's base model from the Hub: its size, whether the cache holds it, and its config."""
    if card.base_model is None or card.base_is_local:
        return card, {}, []
    try:
        with hub_errors(card.base_model, None, config):
            base_info = config.api().model_info(
                card.base_model, files_metadata=True, timeout=config.request_timeout_s
            )
        base_files = remote_merge_files(base_info, config, adapter=False)
        base_config = _download_json(card.base_model, "config.json", base_info.sha or "main", config) or {}
    except HubError as error:
        note = Problem(
            "model",
            f"its base model {card.base_model} cannot be read from the Hub: {error.message}",
            error.hint,
            Severity.WARNING,
        )
        return card, {}, [note]
    card = replace(
        card,
        base_parameters=summarize(base_info).parameters,
        base_bytes=sum(f.size for f in base_files),
        base_cached=bool(base_files) and all(f.cached for f in base_files),
    )
    return card, base_config, []


def _inspect_adapter(
    ref: ModelRef,
    info: ModelInfo,
    commit: str,
    base: ModelRef | Mapping[str, Any] | None,
    config: HubConfig,
) -> ModelReport:
    files = remote_merge_files(info, config, adapter=True)
    settings = _download_json(ref.path, ADAPTER_CONFIG_FILE, commit, config) or {}
    weights = next((f for f in files if f.path == ADAPTER_WEIGHTS_FILE), None)
    card = read_adapter_card(settings, weights.size if weights is not None else 0, sum(f.size for f in files))
    problems = card_problems(card, str(ref), weights is not None)
    card, base_config, base_problems = _describe_base(card, config)
    problems += base_problems
    if base is not None and base_config:
        from app.core.compat import compare_configs

        recipe_base = fetch_config(base, config) if isinstance(base, ModelRef) else base
        problems += compare_configs(recipe_base, base_config, f"{ref} (an adapter of {card.base_model})")
    tokenizer_config = None
    if any(f.path == "tokenizer_config.json" for f in files):
        tokenizer_config = _download_json(ref.path, "tokenizer_config.json", commit, config)
    return ModelReport(
        ref=ref,
        commit=commit,
        url=config.repo_url(ref.path),
        summary=summarize(info),
        config=base_config,
        architecture=describe_architecture(
            base_config, tokenizer_config, any(f.path in CHAT_TEMPLATE_FILES for f in files)
        ),
        files=tuple(files),
        problems=tuple(problems),
        adapter=card,
    )
