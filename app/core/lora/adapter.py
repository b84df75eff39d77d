"""PEFT LoRA adapters: what one holds, read from adapter_config.json and the safetensors header alone.

An adapter file names its tensors ``base_model.model.<module>.<part>``: ``lora_A.weight`` and
``lora_B.weight`` of a linear layer, ``lora_embedding_A`` / ``lora_embedding_B`` of an embedding,
``lora_magnitude_vector`` of a DoRA layer, and whole weights that replace the model's
(``modules_to_save``, and the ``<module>.base_layer.weight`` copies PEFT saves of resized embeddings).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from app.core.problems import FrankenMoEError
from app.core.sources import PICKLE_SUFFIXES, TensorInfo, read_json_file, read_safetensors_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
KEY_PREFIX = "base_model.model."

DeltaKind = Literal["linear", "embedding", "replacement"]

# Module kinds, by a part of the module's name; an expert of the MoE contributes only its MLP.
MLP_KIND = "MLP"
_KINDS = (
    (".mlp.", MLP_KIND),
    ("self_attn.", "attention"),
    ("embed_tokens", "embeddings"),
    ("lm_head", "LM head"),
    ("norm", "norms"),
)


def module_kind(module: str) -> str:
    """What part of the model a module is: MLP, attention, embeddings, LM head, norms, or its own name."""
    for marker, kind in _KINDS:
        if marker in f"{module}.":
            return kind
    return module.rsplit(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class ModuleDelta:
    """What the adapter does to one of the model's weights, ``<module>.weight``."""

    module: str
    kind: DeltaKind
    rank: int = 0
    alpha: float = 0.0
    scale: float = 0.0
    a: TensorInfo | None = None
    b: TensorInfo | None = None
    magnitude: TensorInfo | None = None  # DoRA
    # The weight itself, saved whole: it replaces the model's (modules_to_save), or is what the A and
    # B are added to (the base_layer copy PEFT saves of a targeted embedding).
    replacement: TensorInfo | None = None

    @property
    def target(self) -> str:
        return f"{self.module}.weight"

    @property
    def tensors(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in (self.a, self.b, self.magnitude, self.replacement) if t is not None)


@dataclass(frozen=True)
class AdapterInfo:
    folder: Path
    base_model: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    target_modules: tuple[str, ...]
    rank_pattern: dict
    alpha_pattern: dict
    modules_to_save: tuple[str, ...]
    parameter_count: int
    mlp_parameter_count: int
    size_bytes: int
    dropped_modules: tuple[str, ...]  # module kinds whose deltas the MoE cannot use
    # What the merge applies, one entry per weight of the model it changes.
    deltas: tuple[ModuleDelta, ...] = ()
    # Settings and tensors this program cannot apply exactly, each as a reason; adapter_problems refuses them.
    unsupported: tuple[str, ...] = ()
    peft_type: str = "LORA"
    target_pattern: str | None = None  # target_modules given as one regular expression
    name: str | None = None  # as the recipe writes it (a Hub id rather than its folder in the cache)

    @property
    def shown_name(self) -> str:
        return self.name or str(self.folder)

    @property
    def mlp_fraction(self) -> float:
        return self.mlp_parameter_count / self.parameter_count if self.parameter_count else 0.0

    @property
    def dropped_fraction(self) -> float:
        return 1.0 - self.mlp_fraction if self.parameter_count else 0.0

    def summary(self) -> str:
        """e.g. "r=16, alpha=32, MLP part 41 % of the adapter"."""
        extras = (", rsLoRA" if self.use_rslora else "") + (", DoRA" if self.use_dora else "")
        return f"r={self.r}, alpha={self.lora_alpha:g}{extras}, MLP part {self.mlp_fraction * 100:.0f} % of the adapter"


def pattern_key(pattern_keys: Iterable[str], module: str) -> str | None:
    """The rank_pattern / alpha_pattern key that applies to a module, as PEFT matches them.

    PEFT takes the first key that matches the end of the module's name at a dot boundary, the key
    read as a regular expression (``(.*\\.)?(key)$``).
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank_and_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    r, alpha = int(config.get("r", 8)), config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_key, alpha_key = pattern_key(rank_pattern, module), pattern_key(alpha_pattern, module)
    return (
        int(rank_pattern[rank_key]) if rank_key is not None else r,
        alpha_pattern[alpha_key] if alpha_key is not None else alpha,
    )


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling, computed as PEFT computes it (Python floats), so that merges match it bit for bit."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


_PART = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_magnitude_vector"
    r"|lora_embedding_A|lora_embedding_B|base_layer\.weight)$"
)


def read_adapter(folder: Path, name: str | None = None) -> AdapterInfo:
    """An adapter folder's settings and tensors; reads the config and the safetensors header only.

    ``name`` is how messages call the adapter (a Hub id, not its snapshot folder in the cache); the
    folder by default. Raises FrankenMoEError for a missing folder or config, a pickle-only adapter,
    unreadable files.
    """
    folder = Path(folder).expanduser()
    shown = name or str(folder)
    if not folder.is_dir():
        raise FrankenMoEError(
            f"the adapter folder {folder} does not exist",
            "check the path after the '+', or give a Hub id such as org/adapter",
        )
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FrankenMoEError(
            f"{shown} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter folder",
            "point the part after '+' at the folder that holds adapter_config.json and adapter_model.safetensors "
            "(a full model goes before the '+', alone)",
        )
    try:
        config = read_json_file(config_path)
    except (OSError, ValueError) as exc:
        raise FrankenMoEError(
            f"the adapter {shown}'s {ADAPTER_CONFIG} is not valid JSON ({exc})", "repair or download the adapter again"
        ) from exc
    if not isinstance(config, Mapping):
        raise FrankenMoEError(
            f"the adapter {shown}'s {ADAPTER_CONFIG} is not a JSON object", "repair or download the adapter again"
        )
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise FrankenMoEError(
                f"the adapter {shown} has only pickle weights ({', '.join(pickled[:3])}); loading them could run "
                "arbitrary code, so FrankenMoE Studio never unpickles files",
                "use a safetensors version of the adapter, or convert it with a trusted tool: load it with PEFT "
                "and save it again with save_pretrained(..., safe_serialization=True)",
            )
        raise FrankenMoEError(
            f"the adapter {shown} has no {ADAPTER_WEIGHTS}",
            "download the adapter again, or point at the folder that holds its weights",
        )
    try:
        tensors = read_safetensors_header(weights)
    except FrankenMoEError as exc:
        raise FrankenMoEError(f"the adapter {shown}'s weights: {exc.message}", exc.hint) from exc
    return replace(_describe(folder, dict(config), tensors), name=name)


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _describe(folder: Path, config: dict[str, Any], tensors: Mapping[str, TensorInfo]) -> AdapterInfo:
    unsupported: list[str] = []
    use_rslora, use_dora = bool(config.get("use_rslora")), bool(config.get("use_dora"))
    parts: dict[str, dict[str, TensorInfo]] = {}
    replacements: dict[str, TensorInfo] = {}
    for key, info in tensors.items():
        name = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else key
        match = _PART.match(name)
        if match is None:
            # modules_to_save: the module's whole trained weights, e.g. lm_head.weight
            if name.endswith(".weight"):
                replacements[name[: -len(".weight")]] = info
            else:
                unsupported.append(f"tensor {key} is of no kind FrankenMoE Studio can apply")
            continue
        parts.setdefault(match["module"], {})[match["part"]] = info
    deltas: list[ModuleDelta] = []
    for module, found in sorted(parts.items()):
        saved_weight = found.pop("base_layer.weight", None)
        if not found:
            if saved_weight is not None:
                replacements[module] = saved_weight
            continue
        rank, alpha = module_rank_and_alpha(config, module)
        scale = lora_scale(alpha, rank, use_rslora) if rank > 0 else 0.0
        if "lora_B.bias" in found:
            unsupported.append(f"{module} has a LoRA bias (lora_bias), which FrankenMoE Studio does not apply")
        if "lora_A.weight" in found and "lora_B.weight" in found:
            deltas.append(
                ModuleDelta(
                    module, "linear", rank, alpha, scale, found["lora_A.weight"], found["lora_B.weight"],
                    magnitude=found.get("lora_magnitude_vector"),
                    replacement=saved_weight,
                )
            )
        elif "lora_embedding_A" in found and "lora_embedding_B" in found:
            if "lora_magnitude_vector" in found:
                unsupported.append(f"{module} is a DoRA embedding, which FrankenMoE Studio does not apply")
            deltas.append(
                ModuleDelta(
                    module, "embedding", rank, alpha, scale, found["lora_embedding_A"], found["lora_embedding_B"],
                    replacement=saved_weight,
                )
            )
        else:
            unsupported.append(f"{module} has {', '.join(sorted(found))} without its matching A or B matrix")
    for module, info in sorted(replacements.items()):
        deltas.append(ModuleDelta(module, "replacement", replacement=info))

    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        unsupported.append(f"it is a {config.get('peft_type')} adapter, not a LoRA one")
    if config.get("fan_in_fan_out"):
        unsupported.append("fan_in_fan_out is set (GPT-2 style Conv1D layers), which Llama-family models do not have")
    if config.get("layer_replication"):
        unsupported.append("layer_replication changes the model's layer count, which a MoE of the base's cannot hold")
    if config.get("target_parameters"):
        unsupported.append("target_parameters (LoRA on raw parameters) is not applied by FrankenMoE Studio")
    if use_dora and any(d.kind == "linear" and d.magnitude is None for d in deltas):
        unsupported.append("use_dora is set but the file lacks DoRA magnitude vectors")
    if not use_dora and any(d.magnitude is not None for d in deltas):
        unsupported.append("the file holds DoRA magnitude vectors but use_dora is not set")

    parameter_count = sum(t.numel for t in tensors.values())
    mlp_count = sum(t.numel for d in deltas if module_kind(d.module) == MLP_KIND for t in d.tensors)
    dropped = tuple(dict.fromkeys(module_kind(d.module) for d in deltas if module_kind(d.module) != MLP_KIND))
    target_modules = config.get("target_modules")
    return AdapterInfo(
        folder=folder,
        base_model=config.get("base_model_name_or_path") or None,
        r=int(config.get("r", 8)),
        lora_alpha=float(config.get("lora_alpha", 8)),
        use_rslora=use_rslora,
        use_dora=use_dora,
        target_modules=() if isinstance(target_modules, str) else _strings(target_modules),
        rank_pattern=dict(config.get("rank_pattern") or {}),
        alpha_pattern=dict(config.get("alpha_pattern") or {}),
        modules_to_save=_strings(config.get("modules_to_save")),
        parameter_count=parameter_count,
        mlp_parameter_count=mlp_count,
        size_bytes=(folder / ADAPTER_WEIGHTS).stat().st_size,
        dropped_modules=dropped,
        deltas=tuple(deltas),
        unsupported=tuple(unsupported),
        peft_type=str(config.get("peft_type", "LORA")),
        target_pattern=target_modules if isinstance(target_modules, str) else None,
    )


def find_delta(info: AdapterInfo, tensor_name: str) -> ModuleDelta | None:
    return next((d for d in info.deltas if d.target == tensor_name), None)

