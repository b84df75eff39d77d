"""Output architectures: config.json and tensor names exactly as transformers' save_pretrained writes them.

The config is written here rather than by transformers' config classes: importing those takes longer
than a whole merge of a small model. Tests hold it against the installed transformers' save_pretrained.

Each output architecture says which donor families it takes, which parts of their layers it can hold
(attention biases, q/k norms), whether it has a shared expert, how its config.json is built and how
its tensors are named. ``choose_architecture`` picks one for a recipe, or says why none fits.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from app.core.families import (
    FAMILIES,
    OUTPUT_BIAS,
    QK_NORM,
    QKV_BIAS,
    config_value,
    describe_parts,
    family_title,
    missing_sizes,
    model_parts,
    rope_settings,
    sliding_window,
)
from app.core.problems import FrankenMoEError
from app.core.recipe import Recipe

# Keys carried over from the base model's config, where it has them.
CARRIED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_dropout",
)

MLP_PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True, slots=True)
class MoEShape:
    """What the recipe and donors decide about the MoE, beyond the base's own config."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    dtype: str
    shared_expert_intermediate_size: int | None = None


ConfigBuilder = Callable[[Mapping[str, Any], MoEShape], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class OutputArchitecture:
    name: str  # as a recipe's `architecture` names it; mergekit-moe's names
    title: str
    class_name: str
    donor_families: tuple[str, ...]
    # Donor families that become this architecture when the recipe names none.
    default_for: tuple[str, ...]
    # Parts of a donor's layers this architecture can carry.
    holds: frozenset[str]
    # Parts it always computes with, which the base model must therefore bring.
    requires: frozenset[str]
    # Parts it always has, written as zeros where the base has none: a zero bias adds nothing.
    zero_filled: frozenset[str]
    has_shared_expert: bool
    build_config: ConfigBuilder
    router_template: str
    expert_template: str
    expert_slots: Mapping[str, str]  # donor projection -> its name in expert_template
    shared_expert_template: str = ""
    shared_gate_template: str = ""
    # Whether its config can slide the attention window over some layers only (else every layer or none).
    per_layer_windows: bool = False

    def router_name(self, layer: int) -> str:
        return self.router_template.format(layer=layer)

    def expert_name(self, layer: int, expert: int, projection: str) -> str:
        return self.expert_template.format(layer=layer, expert=expert, slot=self.expert_slots[projection])

    def shared_expert_name(self, layer: int, projection: str) -> str:
        return self.shared_expert_template.format(layer=layer, projection=projection)

    def shared_gate_name(self, layer: int) -> str:
        return self.shared_gate_template.format(layer=layer)

    def refusal(self, config: Mapping[str, Any]) -> str | None:
        """Why a model of this config cannot go into this architecture, or None if it can."""
        family = str(config.get("model_type"))
        title = family_title(config)
        parts = model_parts(config)
        reasons = []
        unheld = parts - self.holds
        if unheld:
            reasons.append(f"it has {describe_parts(unheld)}, which {self.title} cannot hold")
        missing = self.requires - parts
        if missing:
            reasons.append(f"it has no {describe_parts(missing)}, which {self.title} always applies")
        if not self.per_layer_windows and "num_hidden_layers" not in missing_sizes(config):
            sliding = [i for i, kind in enumerate(attention_layer_types(config)) if kind == "sliding_attention"]
            if 0 < len(sliding) < int(config["num_hidden_layers"]):
                reasons.append(
                    f"its attention window slides over layers {sliding[0]}-{sliding[-1]} only, and {self.title} "
                    "slides it over every layer or none"
                )
        if family not in self.donor_families and not reasons:
            reasons.append(f"{self.title} takes {' or '.join(FAMILIES[f].title for f in self.donor_families)} models")
        if family in self.donor_families and not reasons:
            return None
        return f"a {title} model cannot become {self.title}: " + "; ".join(reasons)


# --------------------------------------------------------------------------- config.json


def _carried_settings(base_config: Mapping[str, Any]) -> dict[str, Any]:
    # A key the base's config leaves out takes its family's default, which may differ from the MoE class's.
    settings = {key: config_value(base_config, key) for key in CARRIED_KEYS}
    settings = {key: value for key, value in settings.items() if value is not None}
    settings["tie_word_embeddings"] = bool(settings.get("tie_word_embeddings"))
    return settings


def _legacy_rope(base_config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """RoPE the transformers-4 way (rope_theta, rope_scaling), which transformers 5 converts to rope_parameters."""
    rope = rope_settings(base_config)
    rope_theta = rope.pop("rope_theta")
    return rope_theta, rope if rope.get("rope_type", "default") != "default" else None


def _transformers_version() -> str | None:
    """The installed transformers' version, from its metadata: importing it would take a second."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def _write_config(
    base_config: Mapping[str, Any],
    shape: MoEShape,
    class_name: str,
    class_defaults: Mapping[str, Any],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """config.json with every key save_pretrained writes for the class, plus what transformers 4 reads.

    Values come from the base (its attention and sizes), the MoE settings, and otherwise the config
    class's own defaults. transformers 4 ignores rope_parameters and would fall back to the
    architecture's default theta (1e6 for Mixtral), a silent garbage-maker; it also reads torch_dtype
    rather than dtype.
    """
    rope_theta, rope_scaling = _legacy_rope(base_config)
    data = {**class_defaults, **_carried_settings(base_config), **settings}
    data["rope_parameters"] = {**(rope_scaling or {"rope_type": "default"}), "rope_theta": rope_theta}
    data["rope_theta"] = rope_theta
    if rope_scaling is not None:
        data["rope_scaling"] = rope_scaling
    data["architectures"] = [class_name]
    data["dtype"] = shape.dtype
    data["torch_dtype"] = shape.dtype
    version = _transformers_version()
    if version is not None:
        data["transformers_version"] = version
    return data


def attention_layer_types(base_config: Mapping[str, Any]) -> list[str]:
    """Per layer, "sliding_attention" or "full_attention", as the base model really runs."""
    layers = int(base_config["num_hidden_layers"])
    if isinstance(base_config.get("layer_types"), list):
        return list(base_config["layer_types"])
    if sliding_window(base_config) is None:
        return ["full_attention"] * layers
    family = FAMILIES.get(str(base_config.get("model_type")))
    switched = family is not None and family.sliding_window_switch
    # Qwen slides the window over the layers from max_window_layers on; Mistral over every layer.
    first_sliding = int(config_value(base_config, "max_window_layers") or 0) if switched else 0
    return ["sliding_attention" if layer >= first_sliding else "full_attention" for layer in range(layers)]


# What transformers' config classes write for the keys neither the base nor the MoE settings decide.
_COMMON_DEFAULTS: dict[str, Any] = {
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "output_router_logits": False,
    "pad_token_id": None,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "use_cache": True,
}
_MIXTRAL_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "router_jitter_noise": 0.0,
}
_QWEN_MOE_DEFAULTS = {
    **_COMMON_DEFAULTS,
    "bos_token_id": None,
    "eos_token_id": None,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
}


def mixtral_config(base_config: Mapping[str, Any], shape: MoEShape) -> dict[str, Any]:
    """The Mixtral config.json for a MoE on the base's attention."""
    settings = {
        "model_type": "mixtral",
        "sliding_window": sliding_window(base_config),
        "num_local_experts": shape.num_experts,
        "num_experts_per_tok": shape.experts_per_token,
    }
    return _write_config(base_config, shape, "MixtralForCausalLM", _MIXTRAL_DEFAULTS, settings)


def _qwen_moe_settings(shape: MoEShape) -> dict[str, Any]:
    # Every layer sparse; top-k weights renormalised to sum to 1, as Mixtral (and mergekit-moe) do,
    # so that the chosen experts together weigh what the donor's single MLP did.
    return {
        "num_experts_per_tok": shape.experts_per_token,
        "moe_intermediate_size": shape.expert_intermediate_size,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def qwen2_moe_config(base_config: Mapping[str, Any], shape: MoEShape) -> dict[str, Any]:
    """Qwen2-MoE: the base's attention (q/k/v biases, zeros for Llama and Mistral), with one shared expert."""
    layer_types = attention_layer_types(base_config)
    sliding = [index for index, kind in enumerate(layer_types) if kind == "sliding_attention"]
    settings = {
        **_qwen_moe_settings(shape),
        "model_type": "qwen2_moe",
        "num_experts": shape.num_experts,
        "shared_expert_intermediate_size": shape.shared_expert_intermediate_size,
        # transformers 4 always gives Qwen2-MoE q/k/v biases; transformers 5 only with qkv_bias.
        "qkv_bias": True,
        "use_sliding_window": bool(sliding),
        # What transformers 5's Qwen2-MoE config writes for a window it does not use.
        "sliding_window": sliding_window(base_config) if sliding else 0,
        # transformers 4 slides the window over layers from max_window_layers on; 5 reads layer_types.
        "max_window_layers": sliding[0] if sliding else config_value(base_config, "max_window_layers") or 28,
        "layer_types": layer_types,
    }
    return _write_config(base_config, shape, "Qwen2MoeForCausalLM", _QWEN_MOE_DEFAULTS, settings)


def qwen3_moe_config(base_config: Mapping[str, Any], shape: MoEShape) -> dict[str, Any]:
    """Qwen3-MoE: the base's attention with its q/k norms, no shared expert."""
    window = sliding_window(base_config)
    settings = {
        **_qwen_moe_settings(shape),
        "model_type": "qwen3_moe",
        # transformers 5 reads num_local_experts; transformers 4 reads num_experts.
        "num_local_experts": shape.num_experts,
        "num_experts": shape.num_experts,
        "attention_bias": bool(config_value(base_config, "attention_bias")),
        "use_sliding_window": window is not None,
        "sliding_window": window,
    }
    return _write_config(base_config, shape, "Qwen3MoeForCausalLM", _QWEN_MOE_DEFAULTS, settings)


# --------------------------------------------------------------------------- the architectures

MIXTRAL = OutputArchitecture(
    name="mixtral",
    title="Mixtral",
    class_name="MixtralForCausalLM",
    donor_families=("llama", "mistral"),
    default_for=("llama", "mistral"),
    holds=frozenset(),
    requires=frozenset(),
    zero_filled=frozenset(),
    has_shared_expert=False,
    build_config=mixtral_config,
    router_template="model.layers.{layer}.block_sparse_moe.gate.weight",
    expert_template="model.layers.{layer}.block_sparse_moe.experts.{expert}.{slot}.weight",
    expert_slots={"gate": "w1", "down": "w2", "up": "w3"},
)

_QWEN_EXPERTS = {
    "router_template": "model.layers.{layer}.mlp.gate.weight",
    "expert_template": "model.layers.{layer}.mlp.experts.{expert}.{slot}_proj.weight",
    "expert_slots": {"gate": "gate", "down": "down", "up": "up"},
}

QWEN2_MOE = OutputArchitecture(
    name="qwen",
    title="Qwen2-MoE",
    class_name="Qwen2MoeForCausalLM",
    donor_families=("qwen2", "llama", "mistral"),
    default_for=("qwen2",),
    holds=frozenset({QKV_BIAS}),
    requires=frozenset(),
    zero_filled=frozenset({QKV_BIAS}),
    has_shared_expert=True,
    build_config=qwen2_moe_config,
    shared_expert_template="model.layers.{layer}.mlp.shared_expert.{projection}_proj.weight",
    shared_gate_template="model.layers.{layer}.mlp.shared_expert_gate.weight",
    **_QWEN_EXPERTS,
    per_layer_windows=True,
)

QWEN3_MOE = OutputArchitecture(
    name="qwen3",
    title="Qwen3-MoE",
    class_name="Qwen3MoeForCausalLM",
    donor_families=("qwen3",),
    default_for=("qwen3",),
    holds=frozenset({QKV_BIAS, OUTPUT_BIAS, QK_NORM}),
    requires=frozenset({QK_NORM}),
    zero_filled=frozenset(),
    has_shared_expert=False,
    build_config=qwen3_moe_config,
    **_QWEN_EXPERTS,
)

OUTPUT_ARCHITECTURES = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)


def default_architecture(base_config: Mapping[str, Any]) -> OutputArchitecture | None:
    family = str(base_config.get("model_type"))
    return next((a for a in OUTPUT_ARCHITECTURES if family in a.default_for), None)


class ArchitectureRefused(FrankenMoEError):
    """No output architecture can hold this recipe; ``field`` names the recipe key to change."""

    def __init__(self, field: str, message: str, hint: str) -> None:
        super().__init__(message, hint)
        self.field = field


def choose_architecture(recipe: Recipe, base_config: Mapping[str, Any]) -> OutputArchitecture:
    """The recipe's output architecture: the one it names, else the base family's. Raises ArchitectureRefused."""
    family = str(base_config.get("model_type"))
    if family not in FAMILIES:
        raise ArchitectureRefused(
            "base_model",
            f"base model is a {family!r} model; supported families are {', '.join(f.title for f in FAMILIES.values())}",
            "choose models of a supported family",
        )
    if recipe.architecture:
        architecture = _named_architecture(recipe, family)
        how = f"the recipe asks for {architecture.title}"
    else:
        architecture = default_architecture(base_config) or MIXTRAL
        how = f"{FAMILIES[family].title} donors become {architecture.title}"
    refusal = architecture.refusal(base_config)
    if refusal:
        raise ArchitectureRefused(
            "architecture" if recipe.architecture else "base_model", refusal, _fitting_hint(base_config)
        )
    if recipe.shared_experts and not architecture.has_shared_expert:
        can_share = QWEN2_MOE.refusal(base_config) is None
        raise ArchitectureRefused(
            "shared_experts",
            f"{how}, which has no shared expert",
            "remove shared_experts, or set `architecture: qwen` for a Qwen2-MoE, which has one"
            if can_share
            else "remove shared_experts, or move it into experts",
        )
    if architecture.has_shared_expert and len(recipe.shared_experts) != 1:
        raise ArchitectureRefused(
            "shared_experts",
            f"{how}, which has exactly one shared expert in every layer; the recipe has {len(recipe.shared_experts)}",
            "keep one entry in shared_experts"
            if recipe.shared_experts
            else "add one entry to shared_experts (the base model is a fine choice)",
        )
    return architecture


def _named_architecture(recipe: Recipe, family: str) -> OutputArchitecture:
    named = (recipe.architecture or "").lower()
    if named == QWEN2_MOE.name and not recipe.shared_experts:
        # mergekit-moe matches `qwen` as a prefix of both Qwen MoE and Qwen3 MoE and takes the one that
        # fits; without a shared expert only Qwen3 MoE can, so `qwen` means Qwen3-MoE for Qwen3 donors.
        return QWEN3_MOE if family in QWEN3_MOE.donor_families else QWEN2_MOE
    for architecture in OUTPUT_ARCHITECTURES:
        if architecture.name == named:
            return architecture
    raise ArchitectureRefused(
        "architecture",
        f"unknown or unsupported output architecture {recipe.architecture!r}",
        f"use one of: {', '.join(a.name for a in OUTPUT_ARCHITECTURES)}, or leave it out",
    )


def _fitting_hint(base_config: Mapping[str, Any]) -> str:
    fitting = [a.name for a in OUTPUT_ARCHITECTURES if a.refusal(base_config) is None]
    if not fitting:
        return "choose models whose layers one of the output architectures can hold"
    return f"set `architecture` to {' or '.join(fitting)}, or leave it out to choose from the donors"
