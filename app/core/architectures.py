"""Output architectures: config.json and tensor names exactly as transformers' save_pretrained writes them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from app.core.families import config_value, rope_settings

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
    "sliding_window",
)

EXPERT_PROJECTIONS = (("gate", "w1"), ("down", "w2"), ("up", "w3"))


def mixtral_config(
    base_config: Mapping[str, Any], num_experts: int, experts_per_token: int, dtype: str
) -> dict[str, Any]:
    """The Mixtral config.json for a MoE on the base's attention, as the installed transformers writes it.

    RoPE is passed the transformers-4 way (rope_theta, rope_scaling), which transformers 5 converts to
    rope_parameters; the legacy keys are also kept in the file, because transformers 4 ignores
    rope_parameters and would fall back to Mixtral's default theta of 1e6, a silent garbage-maker.
    """
    from transformers import MixtralConfig

    settings = {key: base_config[key] for key in CARRIED_KEYS if base_config.get(key) is not None}
    settings["head_dim"] = config_value(base_config, "head_dim")
    settings["num_key_value_heads"] = config_value(base_config, "num_key_value_heads")
    settings["tie_word_embeddings"] = bool(config_value(base_config, "tie_word_embeddings"))
    settings["sliding_window"] = base_config.get("sliding_window")
    rope = rope_settings(base_config)
    rope_theta = rope.pop("rope_theta")
    rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
    config = MixtralConfig(
        **settings,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        num_local_experts=num_experts,
        num_experts_per_tok=experts_per_token,
        output_router_logits=False,
    )
    data = config.to_dict()
    data["architectures"] = ["MixtralForCausalLM"]
    data["model_type"] = "mixtral"
    data["dtype"] = dtype
    data["torch_dtype"] = dtype
    data["rope_theta"] = rope_theta
    if rope_scaling is not None:
        data["rope_scaling"] = rope_scaling
    else:
        data.pop("rope_scaling", None)
    return data


def mixtral_router_name(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def mixtral_expert_name(layer: int, expert: int, slot: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{slot}.weight"
