"""Export a merged MoE to GGUF, the file llama.cpp-based apps run (no Qt)."""

from app.core.export.gguf_export import (
    COMPATIBLE_APPS,
    IN_PROCESS_TYPES,
    GgufPlan,
    GgufResult,
    export_gguf,
    plan_gguf_export,
)
from app.core.export.quantizer import QUANTIZER_TYPES, find_llama_quantize

__all__ = [
    "COMPATIBLE_APPS",
    "IN_PROCESS_TYPES",
    "QUANTIZER_TYPES",
    "GgufPlan",
    "GgufResult",
    "export_gguf",
    "find_llama_quantize",
    "plan_gguf_export",
]
