"""Tiny PEFT LoRA adapters for tests and benchmarks, made with peft itself on the tiny donors.

Adapters are initialised at random (init_lora_weights=False), so that every delta is non-zero, and
DoRA magnitudes are perturbed away from the weight norms PEFT starts them at, and modules saved whole
(modules_to_save) away from the model's. Each comes with
PEFT's own merge_and_unload() of it, the reference the merge is held to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

MLP_MODULES = ["gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class MadeAdapter:
    folder: Path
    merged: dict[str, Any]  # PEFT's merge_and_unload() state dict, in the model's dtype (torch tensors)
    merged_folder: Path | None  # the same, saved as a full model, when asked for


def make_adapter(
    folder: Path,
    model_folder: Path,
    seed: int = 0,
    *,
    save_merged: bool = False,
    dtype: str = "float32",
    **lora_settings: Any,
) -> MadeAdapter:
    """A random adapter of LoraConfig(**lora_settings) on the model, saved as safetensors in folder."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    lora_settings.setdefault("target_modules", MLP_MODULES)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=getattr(torch, dtype))
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **lora_settings)
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in wrapped.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1 + 0.2 * torch.rand_like(parameter))
            elif "modules_to_save" in name:  # a trained copy differs from the model's module
                parameter.add_(0.01 * torch.randn_like(parameter))
    wrapped.save_pretrained(folder)
    merged_model = wrapped.merge_and_unload()
    merged = {name: tensor.detach().clone() for name, tensor in merged_model.state_dict().items()}
    merged_folder = None
    if save_merged:
        merged_folder = folder.with_name(f"{folder.name}-merged")
        merged_model.save_pretrained(merged_folder)
        for file in model_folder.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (merged_folder / file.name).write_bytes(file.read_bytes())
    return MadeAdapter(folder, merged, merged_folder)
