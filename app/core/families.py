"""What we know about each donor family: defaults its configs may leave out, and its tensor names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class DonorFamily:
    model_type: str
    # Defaults of transformers' config class, for keys a config.json may omit.
    defaults: Mapping[str, Any]

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

FAMILIES: dict[str, DonorFamily] = {
    "llama": DonorFamily("llama", _LLAMA_DEFAULTS),
    "mistral": DonorFamily("mistral", {**_LLAMA_DEFAULTS, "sliding_window": None}),
}

SUPPORTED_FAMILIES = tuple(FAMILIES)


def config_value(config: Mapping[str, Any], key: str) -> Any:
    """A config value, falling back to the family default transformers would use."""
    if key in config:
        return config[key]
    if key == "head_dim":
        return int(config["hidden_size"]) // int(config["num_attention_heads"])
    if key == "num_key_value_heads":
        return config.get("num_attention_heads")
    family = FAMILIES.get(str(config.get("model_type")))
    return family.defaults.get(key) if family else None


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
