"""config.json is written without transformers; here it is held against the installed transformers' classes."""

from __future__ import annotations

import json

import pytest
import transformers

from app.core.merge import architectures
from app.core.merge.architectures import MIXTRAL, QWEN2_MOE, QWEN3_MOE, MoEShape

SHAPE = MoEShape(num_experts=3, experts_per_token=2, expert_intermediate_size=64, dtype="bfloat16",
                 shared_expert_intermediate_size=48)
BASES = {
    "llama": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 320},
    "mistral": {"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                "intermediate_size": 64, "vocab_size": 320, "sliding_window": 8, "rope_theta": 1e6},
    "qwen2": {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 320, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "qwen3": {"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
              "intermediate_size": 64, "vocab_size": 320, "head_dim": 16},
}
CASES = [(MIXTRAL, "llama"), (MIXTRAL, "mistral"), (QWEN2_MOE, "llama"), (QWEN2_MOE, "qwen2"), (QWEN3_MOE, "qwen3")]
# Keys only transformers 4 reads, and what model.save_pretrained adds to the config's own keys.
OURS_ONLY = {"rope_theta", "rope_scaling", "torch_dtype", "architectures", "dtype", "num_experts", "head_dim"}


def config_class(architecture: architectures.OutputArchitecture) -> type:
    return getattr(transformers, architecture.class_name.removesuffix("ForCausalLM") + "Config")


@pytest.mark.parametrize(("architecture", "base"), CASES, ids=[f"{a.name}-from-{b}" for a, b in CASES])
def test_config_json_is_what_transformers_writes_for_the_same_settings(architecture, base, tmp_path):
    ours = architecture.build_config(BASES[base], SHAPE)
    cls = config_class(architecture)
    # transformers reads our file into exactly the values we wrote ...
    loaded = cls.from_dict(json.loads(json.dumps(ours))).to_dict()
    for key, value in ours.items():
        if key not in OURS_ONLY:
            assert loaded[key] == value, key
    # ... and writes back every key we wrote, no more: nothing a loader looks for is missing.
    cls.from_dict(ours).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved) - set(ours) == set()
    assert {key: saved[key] for key in saved} == {key: ours[key] for key in saved}


@pytest.mark.parametrize("architecture", [MIXTRAL, QWEN2_MOE, QWEN3_MOE], ids=lambda a: a.name)
def test_keys_no_setting_decides_take_the_config_class_defaults(architecture):
    """Where neither the base nor the MoE decides a value, it is what transformers' class would give."""
    bare = {"model_type": "llama" if architecture is not QWEN3_MOE else "qwen3", "num_hidden_layers": 2,
            "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 320}
    ours = architecture.build_config(bare, SHAPE)
    defaults = config_class(architecture)().to_dict()
    undecided = {"attention_dropout", "initializer_range", "use_cache", "router_aux_loss_coef", "router_jitter_noise",
                 "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"}
    for key in undecided & set(defaults):
        assert ours[key] == defaults[key], key
    assert ours["rms_norm_eps"] == 1e-6  # the Llama or Qwen3 default the base runs with, not the MoE class's
