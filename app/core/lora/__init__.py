"""PEFT LoRA adapters as experts: ``MODEL+ADAPTER`` in a recipe, the adapter merged tensor by tensor."""

from app.core.lora.adapter import ADAPTER_FILES, AdapterInfo, ModuleDelta, read_adapter
from app.core.lora.checks import adapter_problems

__all__ = ["ADAPTER_FILES", "AdapterInfo", "ModuleDelta", "adapter_problems", "read_adapter"]
