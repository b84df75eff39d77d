"""Can these models be merged? Every mismatch is named with both values, before any heavy work."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from app.core.families import (
    FAMILIES,
    SUPPORTED_FAMILIES,
    config_value,
    describe_parts,
    model_parts,
    require_sizes,
    rope_settings,
    sliding_window,
)
from app.core.merge.architectures import (
    ArchitectureRefused,
    OutputArchitecture,
    choose_architecture,
    default_architecture,
)
from app.core.problems import FrankenMoEError, Problem, Severity
from app.core.recipe import MAX_EXPERTS, ModelRef, Recipe, validate_recipe
from app.core.sources import (
    MAX_TOKENIZER_JSON_BYTES,
    ModelNotDownloaded,
    ModelSource,
    open_model,
    read_json_file,
    resolve_adapter_dir,
    resolve_model_dir,
)

# (config key, what to call it, why it matters)
SHAPE_KEYS = (
    ("hidden_size", "hidden size", "the attention and experts would not fit together"),
    ("intermediate_size", "intermediate size", "the experts of a MoE layer all have the same MLP size"),
    ("num_hidden_layers", "layer count", "each layer of the MoE takes one layer of every expert"),
    ("num_attention_heads", "attention heads", "the attention comes from the base and must match"),
    ("num_key_value_heads", "KV heads", "the attention comes from the base and must match"),
    ("head_dim", "head dim", "the attention comes from the base and must match"),
    ("vocab_size", "vocab size", "the embeddings come from the base and must match the experts'"),
    ("hidden_act", "activation", "experts trained with another activation would compute garbage"),
    ("tie_word_embeddings", "tied embeddings", "the LM head comes from the base"),
)
# The shared expert is a separate MLP with its own size in the config.
SHARED_EXPERT_FREE_KEYS = ("intermediate_size",)


def compare_configs(
    base_config: Mapping[str, Any],
    other_config: Mapping[str, Any],
    who: str,
    architecture: OutputArchitecture | None = None,
    shared_expert: bool = False,
    name: str | None = None,
) -> list[Problem]:
    """Mismatches between a donor's config and the base's, each naming both values.

    Problems are filed under the field ``who``; their messages call the donor ``name`` (its label,
    say), or ``who`` when no name is given. Both models are also checked against the output
    architecture (by default the base family's), which may not hold their attention biases or lack
    the q/k norms they need.
    """
    field_name = who
    who = name or who
    problems: list[Problem] = []
    base_family = str(base_config.get("model_type"))
    family = str(other_config.get("model_type"))
    target = architecture or default_architecture(base_config)
    for model, field, config in (("the base model", "base_model", base_config), (who, field_name, other_config)):
        model_type = str(config.get("model_type"))
        if model_type not in SUPPORTED_FAMILIES:
            problems.append(
                Problem(
                    field,
                    f"{model} is a {model_type!r} model; supported families are "
                    f"{', '.join(f.title for f in FAMILIES.values())}",
                    "choose models of a supported family",
                )
            )
        elif target is not None and (refusal := target.refusal(config)):
            problems.append(Problem(field, f"{model}: {refusal}", "choose models whose layers it can hold"))
    if problems:
        return _dedupe(problems)
    if family != base_family:
        problems.append(
            Problem(field_name, f"model family differs: base is {base_family}, {who} is {family}", _SAME_FAMILY_HINT)
        )
    base_parts, parts = model_parts(base_config), model_parts(other_config)
    if base_parts != parts:
        problems.append(
            Problem(
                field_name,
                f"attention layout differs: base has {describe_parts(base_parts)}, {who} has "
                f"{describe_parts(parts)}; {who} was not fine-tuned from the base",
                _SAME_FAMILY_HINT,
            )
        )
    for key, label, why in SHAPE_KEYS:
        if shared_expert and key in SHARED_EXPERT_FREE_KEYS:
            continue
        base_value, value = config_value(base_config, key), config_value(other_config, key)
        if base_value != value:
            problems.append(
                Problem(
                    field_name,
                    f"{label} differs: base has {base_value}, {who} has {value}; {why}",
                    _SAME_FAMILY_HINT,
                )
            )
    base_rope, rope = rope_settings(base_config), rope_settings(other_config)
    if base_rope != rope:
        problems.append(
            Problem(
                field_name,
                f"RoPE settings differ: base has {_short(base_rope)}, {who} has {_short(rope)}; "
                "the experts would see positions differently and produce garbage",
                _SAME_FAMILY_HINT,
            )
        )
    if sliding_window(base_config) != sliding_window(other_config):
        problems.append(
            Problem(
                field_name,
                f"sliding window differs: base has {sliding_window(base_config)}, "
                f"{who} has {sliding_window(other_config)}; the base's is used",
                "check that the expert was trained with the base's attention window",
                severity=Severity.WARNING,
            )
        )
    return problems


_SAME_FAMILY_HINT = "use fine-tunes of the same base model as experts"


def _short(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: list[Problem] = []
    for problem in problems:
        if problem not in seen:
            seen.append(problem)
    return seen


# --------------------------------------------------------------------------- tokenizers


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_fingerprint(folder: Path) -> dict[str, Any]:
    """What a tokenizer is made of: its vocabulary, special tokens and chat template.

    The app checks the recipe again after every edit, and reading a large vocabulary takes a second
    or more, so a fingerprint is kept while the tokenizer's files stay the same.
    """
    stamps = []
    for name in TOKENIZER_FILES:
        try:
            stat = (folder / name).stat()
        except OSError:
            continue
        stamps.append((name, stat.st_mtime_ns, stat.st_size))
    try:
        return _cached_fingerprint(folder, tuple(stamps))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise FrankenMoEError(
            f"cannot read the tokenizer files of {folder} ({exc})",
            "download the model again; its tokenizer files are damaged",
        ) from exc


@functools.lru_cache(maxsize=32)
def _cached_fingerprint(folder: Path, _stamps: tuple[tuple[str, int, int], ...]) -> dict[str, Any]:
    return _read_fingerprint(folder)


def _read_vocab(folder: Path) -> dict[str, int] | None:
    """The token -> id map of tokenizer.json, added tokens included; None without that file."""
    tokenizer_json = folder / "tokenizer.json"
    if not tokenizer_json.is_file():
        return None
    data = read_json_file(tokenizer_json, MAX_TOKENIZER_JSON_BYTES)
    model_vocab = (data.get("model") or {}).get("vocab") or {}
    if isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {piece: index for index, (piece, _score) in enumerate(model_vocab)}
    else:
        vocab = dict(model_vocab)
    for token in data.get("added_tokens") or []:
        vocab[token["content"]] = token["id"]
    return vocab


def _read_fingerprint(folder: Path) -> dict[str, Any]:
    # The vocabulary itself is not kept (tens of MB for a large one): only its digest, and the
    # folder to read it again from when a difference must be described.
    vocab_digest: str | None = None
    vocab = _read_vocab(folder)
    if vocab is not None:
        vocab_digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    elif (folder / "tokenizer.model").is_file():
        vocab_digest = hashlib.sha256((folder / "tokenizer.model").read_bytes()).hexdigest()

    config: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            config.update(read_json_file(path))
    specials = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        specials[key] = value.get("content") if isinstance(value, Mapping) else value
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and (folder / "chat_template.json").is_file():
        template = read_json_file(folder / "chat_template.json").get("chat_template")
    return {"folder": folder, "vocab_digest": vocab_digest, "specials": specials, "chat_template": template}


def compare_tokenizers(
    base: Mapping[str, Any], other: Mapping[str, Any], who: str, name: str | None = None
) -> list[Problem]:
    """Problems filed under the field ``who``, whose messages call the donor ``name`` (default ``who``)."""
    field, who = who, name or who
    problems: list[Problem] = []
    if base["vocab_digest"] is None:
        return [
            Problem(
                "base_model",
                "the base model has no tokenizer files (tokenizer.json or tokenizer.model)",
                "use a base folder that includes its tokenizer",
            )
        ]
    if other["vocab_digest"] is None:
        return [
            Problem(
                field,
                f"{who} has no tokenizer files, so its vocabulary cannot be checked",
                "make sure it was fine-tuned with the base's tokenizer",
                severity=Severity.WARNING,
            )
        ]
    if base["vocab_digest"] != other["vocab_digest"]:
        difference = _vocab_difference(_read_vocab(base["folder"]), _read_vocab(other["folder"]))
        problems.append(
            Problem(
                field,
                f"vocabulary differs from the base's: {difference}; "
                "token ids would mean different things to the experts",
                "use experts fine-tuned with the base model's tokenizer",
            )
        )
    for key, base_value in base["specials"].items():
        if other["specials"].get(key) != base_value:
            problems.append(
                Problem(
                    field,
                    f"the special token {key} differs: base has {base_value!r}, "
                    f"{who} has {other['specials'].get(key)!r}; "
                    "the base's tokenizer is used",
                    "check that the expert expects the base's special tokens",
                    severity=Severity.WARNING,
                )
            )
    if (base["chat_template"] or "") != (other["chat_template"] or ""):
        problems.append(
            Problem(
                field,
                f"chat template differs from the base's; the MoE uses the base's "
                f"({'none' if not base['chat_template'] else 'present'})",
                "check that the expert was tuned on the base's chat format",
                severity=Severity.WARNING,
            )
        )
    return problems


def _vocab_difference(base: Mapping[str, int] | None, other: Mapping[str, int] | None) -> str:
    if base is None or other is None:
        return "the tokenizer model files differ"
    only_base = len(set(base) - set(other))
    only_other = len(set(other) - set(base))
    moved = sum(1 for token, index in other.items() if token in base and base[token] != index)
    return (
        f"{len(base)} vs {len(other)} tokens, {only_base} only in the base, {only_other} only in it, {moved} renumbered"
    )


# --------------------------------------------------------------------------- whole recipes


def check_models(
    base: ModelSource,
    donors: Sequence[tuple[str, ModelSource]],
    architecture: OutputArchitecture | None = None,
    names: Mapping[str, str] | None = None,
) -> list[Problem]:
    """Compatibility of each (field, donor) with the base: configs, tensors present, tokenizers.

    Donors whose field starts with ``shared_experts`` are shared experts, whose MLP size may differ.
    Messages call each donor by its name in ``names`` (by field), else by its field.
    """
    names = names or {}
    problems: list[Problem] = []
    base_tokenizer = tokenizer_fingerprint(base.path)
    tokenizers: dict[Path, dict[str, Any]] = {base.path: base_tokenizer}
    for field, donor in donors:
        shared = field.startswith("shared_experts")
        name = names.get(field, field)
        config_problems = compare_configs(
            base.config, donor.config, field, architecture, shared_expert=shared, name=name
        )
        problems.extend(config_problems)
        if donor.path not in tokenizers:
            tokenizers[donor.path] = tokenizer_fingerprint(donor.path)
        problems.extend(compare_tokenizers(base_tokenizer, tokenizers[donor.path], field, name))
        if not any(p.is_error for p in config_problems):
            problems.extend(_missing_mlp_tensors(donor, field, name))
    return _dedupe(problems)


def _missing_mlp_tensors(donor: ModelSource, field: str, name: str) -> list[Problem]:
    layers = int(donor.config["num_hidden_layers"])
    missing = [
        name
        for layer in range(layers)
        for projection in ("gate", "up", "down")
        if not donor.has_tensor(name := f"model.layers.{layer}.mlp.{projection}_proj.weight")
    ]
    if not missing:
        return []
    return [
        Problem(
            field,
            f"the checkpoint of {name} ({donor.ref}) lacks {len(missing)} MLP tensor(s), e.g. {missing[0]}",
            "the checkpoint is incomplete or not a plain model of its family; download it again",
        )
    ]


def check_recipe(recipe: Recipe, cache_dir: Path | None = None, download_later: bool = False) -> list[Problem]:
    """Recipe validation plus, where the models can be opened, their compatibility.

    With ``download_later`` (the app's merge downloads what the cache lacks first), a Hub model not
    downloaded yet is a warning rather than an error.
    """
    problems = validate_recipe(recipe)
    if len(recipe.experts) > MAX_EXPERTS:
        return problems  # refused already; checking each of thousands of donors would take minutes
    base: ModelSource | None = None
    donors: list[tuple[str, ModelSource]] = []
    opened: dict[str, ModelSource] = {}
    names = {f"experts.{i}.source_model": recipe.expert_label(i) for i in range(len(recipe.experts))}
    names.update({f"shared_experts.{i}.source_model": "the shared expert" for i in range(len(recipe.shared_experts))})
    try:
        for field, ref in [
            ("base_model", recipe.base_model),
            *((f"experts.{i}.source_model", e.source_model) for i, e in enumerate(recipe.experts)),
            *((f"shared_experts.{i}.source_model", e.source_model) for i, e in enumerate(recipe.shared_experts)),
        ]:
            key = str(ref)
            if ref.lora is not None and key not in opened:
                adapter_issues = _adapter_problems(ref, field, names.get(field), cache_dir)
                problems.extend(adapter_issues)
                if any(p.is_error for p in adapter_issues):
                    continue
            try:
                if key not in opened:
                    opened[key] = open_model(ref, cache_dir)
            except ModelNotDownloaded as exc:
                if not download_later:
                    problems.append(Problem(field, exc.message, exc.hint))
                    continue
                problems.append(
                    Problem(
                        field,
                        f"{exc.message}, so it cannot be checked against the base yet",
                        "it is downloaded and checked when you merge; download it now to check it first",
                        severity=Severity.WARNING,
                    )
                )
                continue
            except FrankenMoEError as exc:
                message = f"{names[field]}: {exc.message}" if field in names else exc.message
                problems.append(Problem(field, message, exc.hint))
                continue
            try:
                require_sizes(opened[key].config, ref)
            except FrankenMoEError as exc:
                # Every later check reads these sizes: a model without them is only named.
                problems.append(Problem(field, exc.message, exc.hint))
                continue
            if field == "base_model":
                base = opened[key]
            else:
                donors.append((field, opened[key]))
        if base is not None:
            architecture: OutputArchitecture | None = None
            try:
                architecture = choose_architecture(recipe, base.config)
            except ArchitectureRefused as exc:
                problems.append(Problem(exc.field, exc.message, exc.hint))
            problems.extend(check_models(base, donors, architecture, names))
    finally:
        for source in opened.values():
            source.close()
    return _dedupe(problems)


def _adapter_problems(ref: ModelRef, field: str, name: str | None, cache_dir: Path | None) -> list[Problem]:
    """The checks of a ``MODEL+ADAPTER`` reference's adapter against its model, filed under the field."""
    from app.core.lora import adapter_problems, read_adapter

    role: Literal["expert", "base"] = "base" if field == "base_model" else "expert"
    who = f"{name}: " if name else ""
    try:
        model_folder = resolve_model_dir(ref.model, cache_dir)
        adapter = ref.lora or ref
        adapter_folder = resolve_adapter_dir(adapter, cache_dir)
    except ModelNotDownloaded:
        return []  # reported by the model's own check, as an error or (download_later) a warning
    except FrankenMoEError as exc:
        return [Problem(field, f"{who}{exc.message}", exc.hint)]
    try:
        info = read_adapter(adapter_folder, str(adapter))
    except FrankenMoEError as exc:
        return [Problem(field, f"{who}{exc.message}", exc.hint)]
    return [
        replace(problem, field=field, message=f"{who}{problem.message}")
        for problem in adapter_problems(info, model_folder, str(ref.model), role=role)
    ]
