"""Tiny MoE models of every architecture the chat captures, saved as real model folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.models import write_tokenizer

TINY = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
    tie_word_embeddings=False,
)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_hidden_layers=2, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    # A shared expert, no top-k renormalisation, and a dense layer between two MoE layers.
    "qwen2_moe": dict(
        num_hidden_layers=3,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        mlp_only_layers=[1],
    ),
    "qwen3_moe": dict(
        num_hidden_layers=2,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_experts=5,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        head_dim=8,
    ),
}


def make_tiny_moe(
    folder: Path, architecture: str, seed: int = 0, layers: int | None = None, expert_names: tuple[str, ...] = ()
) -> Path:
    """A random MoE model of the given transformers architecture, deterministic for a seed.

    ``layers`` overrides the architecture's number of layers; ``expert_names`` are written as the
    experts' labels in a recipe beside the weights, as a merge writes them.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    vocab_size = write_tokenizer(folder)
    shape = dict(ARCHITECTURES[architecture], **({"num_hidden_layers": layers} if layers else {}))
    config = AutoConfig.for_model(architecture, vocab_size=vocab_size, **TINY, **shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Zero-initialised routers (Qwen's default) would make every choice a tie; spread them.
        for name, parameter in model.named_parameters():
            if name.endswith("gate.weight"):
                parameter.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    if expert_names:
        write_expert_names(folder, expert_names)
    return folder


def write_expert_names(folder: Path, names: tuple[str, ...]) -> None:
    from app.core.merge.pipeline import RECIPE_FILENAME

    experts = "".join(
        f"  - source_model: donor-{i}\n    positive_prompts: [{name!r}]\n" for i, name in enumerate(names)
    )
    labels = "".join(f"    - {{label: {name!r}}}\n" for name in names)
    recipe = f"base_model: base\ngate_mode: random\nexperts:\n{experts}frankenmoe:\n  experts:\n{labels}"
    (folder / RECIPE_FILENAME).write_text(recipe, encoding="utf-8")
