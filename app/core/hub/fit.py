"""Will it fit? Memory estimates for computing gates and for chatting with the finished MoE."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from app.core.hub.details import text_config
from app.core.problems import Problem, Severity
from app.core.progress import format_bytes

BYTES_PER_PARAMETER = {"float32": 4, "float16": 2, "bfloat16": 2}
# Activations, allocator slack and framework buffers on top of the weights, from experience with
# transformers inference; an estimate, so it errs on the generous side.
RUNTIME_OVERHEAD = 1.2
CHAT_CONTEXT_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class MachineMemory:
    ram_total: int
    ram_available: int
    vram_free: int | None = None
    vram_total: int | None = None


@dataclass(frozen=True, slots=True)
class FitEstimate:
    moe_parameters: int
    gate_bytes: int
    chat_bytes: int
    machine: MachineMemory
    problems: tuple[Problem, ...]


def machine_memory() -> MachineMemory:
    """This machine's RAM, and the free memory of the first CUDA device if there is one."""
    import psutil

    # The same reading as devices.available_memory: memory the system can hand out, page cache included.
    ram = psutil.virtual_memory()
    vram_free = vram_total = None
    import torch  # only here: importing torch takes seconds, and search or download never need it

    if torch.cuda.is_available():
        vram_free, vram_total = torch.cuda.mem_get_info()
    return MachineMemory(int(ram.total), int(ram.available), vram_free, vram_total)


def moe_parameter_count(config: Mapping[str, Any], dense_parameters: int, n_experts: int) -> int:
    """Parameters of a Mixtral-style MoE built from ``n_experts`` copies of this dense model's MLPs.

    Attention, embeddings and norms are shared; each expert adds one MLP (gate, up and down
    projections) per layer, and every layer gains a router of ``hidden x n_experts``.
    """
    text = text_config(config)
    layers = int(text.get("num_hidden_layers") or 0)
    hidden = int(text.get("hidden_size") or 0)
    intermediate = int(text.get("intermediate_size") or 0)
    mlp = layers * 3 * hidden * intermediate
    return dense_parameters + (n_experts - 1) * mlp + layers * hidden * n_experts


def kv_cache_bytes(config: Mapping[str, Any], tokens: int, bytes_per_value: int) -> int:
    text = text_config(config)
    layers = int(text.get("num_hidden_layers") or 0)
    heads = int(text.get("num_attention_heads") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or (int(text.get("hidden_size") or 0) // heads))
    return 2 * layers * kv_heads * head_dim * tokens * bytes_per_value


def estimate_fit(
    config: Mapping[str, Any],
    *,
    dense_parameters: int,
    n_experts: int,
    dtype: str = "bfloat16",
    machine: MachineMemory | None = None,
    adapter_parameters: int = 0,
) -> FitEstimate:
    """Memory to compute gates (one donor model at a time) and to chat with the merged MoE.

    Gate computation (hidden modes) runs each donor in turn, so it needs one dense model; chatting
    needs the whole MoE plus a KV cache for :data:`CHAT_CONTEXT_TOKENS` tokens.

    For a LoRA adapter joining as an expert, ``config`` and ``dense_parameters`` are its base
    model's and ``adapter_parameters`` its own: the donor run for the gates is the base with the
    adapter beside it, while in the MoE the adapter is merged into an MLP of the base's size.
    """
    if dtype not in BYTES_PER_PARAMETER:
        raise ValueError(f"dtype must be one of {', '.join(BYTES_PER_PARAMETER)}")
    machine = machine if machine is not None else machine_memory()
    per_parameter = BYTES_PER_PARAMETER[dtype]
    moe_parameters = moe_parameter_count(config, dense_parameters, n_experts)
    gate_bytes = int((dense_parameters + adapter_parameters) * per_parameter * RUNTIME_OVERHEAD)
    chat_bytes = int(
        moe_parameters * per_parameter * RUNTIME_OVERHEAD + kv_cache_bytes(config, CHAT_CONTEXT_TOKENS, per_parameter)
    )
    problems: list[Problem] = []
    for field, needed, doing in (
        ("gates", gate_bytes, "computing the gates"),
        ("chat", chat_bytes, f"chatting with the {n_experts}-expert MoE"),
    ):
        fits_gpu = machine.vram_free is not None and needed <= machine.vram_free
        if fits_gpu or needed <= machine.ram_available:
            continue
        where = f"{format_bytes(machine.ram_available)} of RAM free"
        if machine.vram_free is not None:
            where += f" and {format_bytes(machine.vram_free)} free on the GPU"
        severity = Severity.ERROR if needed > machine.ram_total else Severity.WARNING
        hint = (
            "close other programs to free memory"
            if severity is Severity.WARNING
            else "use fewer or smaller experts, or a machine with more memory"
        )
        problems.append(
            Problem(
                field,
                f"{doing} needs about {format_bytes(needed)}, but this machine has {where}",
                hint,
                severity,
            )
        )
    return FitEstimate(moe_parameters, gate_bytes, chat_bytes, machine, tuple(problems))
