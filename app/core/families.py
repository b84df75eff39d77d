"""What we know about each donor family: defaults its configs may leave out, and its attention's extras."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.core.problems import FrankenMoEError

# Attention and MLP parts beyond Llama's plain layout; an output architecture holds some of them.
QKV_BIAS = "q/k/v attention biases"
OUTPUT_BIAS = "an attention output bias"
QK_NORM = "q/k norms"
MLP_BIAS = "MLP biases"


@dataclass(frozen=True, slots=True)
class DonorFamily:
    model_type: str
    title: str
    # Defaults of transformers' config class, for keys a config.json may omit.
    defaults: Mapping[str, Any]
    # Parts every model of the family has, whatever its config says (Qwen2's q/k/v biases, Qwen3's q/k norms).
    built_in_parts: frozenset[str] = frozenset()
    # Whether sliding_window only applies with use_sliding_window (Qwen) or whenever it is set (Mistral).
    sliding_window_switch: bool = False

    def mlp_tensor(self, layer: int, projection: str) -> str:
        return f"model.layers.{layer}.mlp.{projection}_proj.weight"


_LLAMA_DEFAULTS = {
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "rms_norm_eps": 1e-6,
}
_QWEN_DEFAULTS = {
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "use_sliding_window": False,
    "max_window_layers": 28,
}

FAMILIES: dict[str, DonorFamily] = {
    "llama": DonorFamily("llama", "Llama", _LLAMA_DEFAULTS),
    "mistral": DonorFamily("mistral", "Mistral", {**_LLAMA_DEFAULTS, "sliding_window": None}),
    "qwen2": DonorFamily("qwen2", "Qwen2", _QWEN_DEFAULTS, frozenset({QKV_BIAS}), sliding_window_switch=True),
    "qwen3": DonorFamily(
        "qwen3",
        "Qwen3",
        # Qwen3's head dim is 128 unless the config says otherwise, not hidden size / heads.
        {**_QWEN_DEFAULTS, "attention_bias": False, "head_dim": 128},
        frozenset({QK_NORM}),
        sliding_window_switch=True,
    ),
}

SUPPORTED_FAMILIES = tuple(FAMILIES)


def family_title(config: Mapping[str, Any]) -> str:
    model_type = str(config.get("model_type"))
    family = FAMILIES.get(model_type)
    return family.title if family else model_type


# Keys every donor's config.json must give a positive whole number: no default stands in for them.
REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """A config value, falling back to the family default transformers would use.

    A null value is a missing one: transformers 4.57 writes e.g. "head_dim": null for Mistral, and
    its config classes then use the same fallback as for a missing key.
    """
    if config.get(key) is not None:
        return config[key]
    family = FAMILIES.get(str(config.get("model_type")))
    if family and family.defaults.get(key) is not None:
        return family.defaults[key]
    if key == "head_dim":
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    if key == "num_key_value_heads":
        return config.get("num_attention_heads")
    return None


def missing_sizes(config: Mapping[str, Any]) -> list[str]:
    """The REQUIRED_SIZES a config leaves out, sets to null, or sets to something other than a positive integer."""
    return [
        key
        for key in REQUIRED_SIZES
        if not (isinstance(config.get(key), int) and not isinstance(config.get(key), bool) and config[key] > 0)
    ]


def require_sizes(config: Mapping[str, Any], model: object) -> None:
    """Raise FrankenMoEError naming the sizes a model's config.json lacks (see missing_sizes)."""
    if missing := missing_sizes(config):
        raise FrankenMoEError(
            f"{model}: its config.json gives no size for {', '.join(missing)} (missing, null or not a "
            "positive whole number)",
            "download the model again, or write the values from its model card into config.json",
        )


def model_parts(config: Mapping[str, Any]) -> frozenset[str]:
    """The extras a model's layers carry: attention biases, q/k norms, MLP biases."""
    family = FAMILIES.get(str(config.get("model_type")))
    parts = set(family.built_in_parts if family else ())
    if config_value(config, "attention_bias"):
        parts |= {QKV_BIAS, OUTPUT_BIAS}
    if config_value(config, "mlp_bias"):
        parts.add(MLP_BIAS)
    return frozenset(parts)


def describe_parts(parts: frozenset[str] | set[str]) -> str:
    ordered = [part for part in (QKV_BIAS, OUTPUT_BIAS, QK_NORM, MLP_BIAS) if part in parts]
    if len(ordered) > 1:
        return f"{', '.join(ordered[:-1])} and {ordered[-1]}"
    return ordered[0] if ordered else "none of these"


def sliding_window(config: Mapping[str, Any]) -> int | None:
    """The attention window the model really uses: Qwen configs name one that only applies when switched on."""
    family = FAMILIES.get(str(config.get("model_type")))
    if family and family.sliding_window_switch and not config_value(config, "use_sliding_window"):
        return None
    return config_value(config, "sliding_window")


def rope_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """RoPE settings in one shape, from transformers 4's rope_theta/rope_scaling or 5's rope_parameters."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, Mapping):
        settings = dict(parameters)
    else:
        settings = dict(config.get("rope_scaling") or {})
        settings["rope_theta"] = config_value(config, "rope_theta")
    if "type" in settings and "rope_type" not in settings:
        settings["rope_type"] = settings.pop("type")
    settings.setdefault("rope_type", "default")
    settings.pop("type", None)
    if settings.get("rope_theta") is None:
        settings["rope_theta"] = config_value({"model_type": config.get("model_type")}, "rope_theta")
    settings["rope_theta"] = float(settings["rope_theta"]) if settings["rope_theta"] is not None else None
    return settings
