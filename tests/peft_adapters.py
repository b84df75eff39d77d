"""Tiny real PEFT LoRA adapters, made with ``peft`` itself on a tiny donor, for the Hub and GUI tests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MLP_AND_QUERY = ("gate_proj", "up_proj", "down_proj", "q_proj")


def make_tiny_adapter(
    base: Path,
    folder: Path,
    *,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: Sequence[str] = MLP_AND_QUERY,
    seed: int = 0,
    base_model_name: str | None = None,
    **lora_settings: Any,
) -> Path:
    """A LoRA adapter of ``base`` saved by ``peft`` (adapter_config.json, adapter_model.safetensors, README).

    A and B are both random (``init_lora_weights=False``), so the adapter changes the model.
    ``base_model_name`` replaces the local path peft records, as for an adapter published on the Hub.
    """
    import peft
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    settings = peft.LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
        init_lora_weights=False,
        **lora_settings,
    )
    peft.get_peft_model(model, settings).save_pretrained(folder)
    if base_model_name is not None:
        config_path = Path(folder) / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model_name
        config_path.write_text(json.dumps(config, indent=2))
    return Path(folder)
